"""Fine-tuning data: plain text packed into fixed-length sequences, or instruction rows (prompt /
response, or chat messages) rendered with the tokenizer's chat template, loss on responses only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llmlite.data import load_text, read_json_rows
from llmlite.errors import LlmliteError
from llmlite.training.loss import IGNORE

FORMATS = ("auto", "text", "instruction")
_PROMPT_KEYS = ("prompt", "instruction", "question")
_RESPONSE_KEYS = ("response", "completion", "output", "answer")


@dataclass
class Example:
    """One training sequence: token ids and labels (``IGNORE`` where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def load_examples(source: str, tokenizer, seqlen: int, fmt: str = "auto") -> tuple[list[Example], str]:
    """The examples of ``source`` and the format found (``text`` or ``instruction``)."""
    rows = _instruction_rows(source) if fmt != "text" else None
    if rows is None:
        if fmt == "instruction":
            raise LlmliteError(
                f"{source} is not instruction data; give a JSONL file whose rows have prompt/response "
                "or messages, or use --format text"
            )
        return pack_text(load_text(source), tokenizer, seqlen, source), "text"
    examples = [instruction_example(row, tokenizer, seqlen, f"{source} {where}") for where, row in rows]
    examples = [e for e in examples if any(t != IGNORE for t in e.labels)]
    if not examples:
        raise LlmliteError(
            f"{source} has no usable rows: every response was empty or cut off by --seqlen {seqlen}; "
            "check the file or raise --seqlen"
        )
    return examples, "instruction"


def pack_text(text: str, tokenizer, seqlen: int, source: str = "text") -> list[Example]:
    """Token ids of ``text`` cut into consecutive sequences of ``seqlen`` (the tail is dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
    count = len(ids) // seqlen
    if count == 0:
        raise LlmliteError(
            f"{source} has no usable rows: {len(ids)} tokens make no sequence of --seqlen {seqlen}; "
            "give more text or lower --seqlen"
        )
    return [
        Example(ids[i * seqlen : (i + 1) * seqlen], ids[i * seqlen : (i + 1) * seqlen]) for i in range(count)
    ]


def piqa_instructions() -> list[dict]:
    """PIQA validation (bundled with its licence in ``llmlite.evals.piqa``) as instruction rows:
    the goal as the prompt, the correct solution as the response (1,838 rows)."""
    from importlib import resources

    folder = resources.files("llmlite.evals").joinpath("piqa")
    questions = folder.joinpath("valid.jsonl").read_text(encoding="utf-8").splitlines()
    labels = folder.joinpath("valid-labels.lst").read_text(encoding="utf-8").split()
    rows = [json.loads(q) for q in questions if q.strip()]
    return [
        {"prompt": r["goal"], "response": r[f"sol{int(label) + 1}"]}
        for r, label in zip(rows, labels, strict=True)
    ]


BUNDLED_INSTRUCTIONS = {"piqa-instruct": piqa_instructions}


def _instruction_rows(source: str) -> list[tuple[str, object]] | None:
    """Rows of a JSONL/JSON file, each with where it is (``line 3``), when they look like
    instruction data, else ``None``."""
    if source in BUNDLED_INSTRUCTIONS:
        return [(f"row {i + 1}", row) for i, row in enumerate(BUNDLED_INSTRUCTIONS[source]())]
    path = Path(source).expanduser()
    if not (path.is_file() and path.suffix in {".jsonl", ".json"}):
        return None
    rows = read_json_rows(path)
    if not rows:
        raise LlmliteError(f"{path} has no usable rows: the file is empty; give a file with data")
    dicts = [r for _, r in rows if isinstance(r, dict)]
    if not any("messages" in r or any(k in r for k in _PROMPT_KEYS) for r in dicts):
        return None
    return rows


def instruction_example(row: dict, tokenizer, seqlen: int, where: str) -> Example:
    """Render one row with the chat template; labels cover the assistant turns only."""
    if not isinstance(row, dict):
        raise LlmliteError(
            f"{where} is not a JSON object; each line must be {{'prompt': ..., 'response': ...}}"
        )
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(_is_message(m) for m in messages)):
            raise LlmliteError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise LlmliteError(f"{where}: no assistant message to learn from; add one or drop the row")
    else:
        prompt = next((row[k] for k in _PROMPT_KEYS if k in row), None)
        response = next((row[k] for k in _RESPONSE_KEYS if k in row), None)
        if prompt is None or response is None:
            missing = "response" if prompt is not None else "prompt"
            raise LlmliteError(
                f"{where} has no {missing} field; each row needs 'prompt' and 'response' "
                f"(or 'messages'); fix or remove the row"
            )
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise LlmliteError(
                    f"{where}: its {name} is a {type(value).__name__}, not text; fix or remove the row"
                )
        messages = [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}]
    ids, labels = _render(messages, tokenizer)
    return Example(ids[:seqlen], labels[:seqlen])


def _is_message(m) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _render(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        full = _tokens(_text(messages[: i + 1], tokenizer, generation_prompt=False), tokenizer)
        keep = _common_prefix(ids, full)  # earlier labels stay valid up to here
        begin = len(full)
        if message["role"] == "assistant":  # learn from after the generation prompt
            prompt = _tokens(_text(messages[:i], tokenizer, generation_prompt=True), tokenizer)
            begin = max(_common_prefix(prompt, full), keep)
        labels = labels[:keep] + [IGNORE] * (begin - keep) + full[begin:]
        ids = full
    return ids, labels


def _text(messages: list[dict], tokenizer, generation_prompt: bool) -> str:
    if not messages:
        return ""
    if tokenizer.chat_template is None:
        # No template: "prompt\n" then "response<eos>", the plain completion format.
        eos = tokenizer.eos_token or ""
        parts = [m["content"] + ("\n" if m["role"] != "assistant" else eos) for m in messages]
        return "".join(parts)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokens(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split: (train, held_out); held out at least one example when asked."""
    if fraction <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    if n <= 0:
        raise LlmliteError(
            "the data make one sequence only, too few for a held-out split; give more data or --eval-split 0"
        )
    held = sorted(order[:n])
    train = sorted(order[n:])
    return [examples[i] for i in train], [examples[i] for i in held]


def collate(batch: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` and ``labels``, and each row's ``lengths``. Causal attention never
    lets a real token see the padding after it, so no attention mask is needed (and SDPA keeps its
    causal fast path)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    lengths = torch.tensor([len(e.input_ids) for e in batch])
    return {"input_ids": ids, "labels": labels, "lengths": lengths}


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group: bool) -> list[list[int]]:
    """The batches of one epoch, seeded by (seed, epoch). ``group``: within each run of 50 batches'
    worth of shuffled examples, batch examples of similar length together (less padding), then
    shuffle the batches (as transformers' ``group_by_length``)."""
    order = epoch_order(len(lengths), seed, epoch)
    if group:
        mega = 50 * batch_size
        order = [
            i
            for k in range(0, len(order), mega)
            for i in sorted(order[k : k + mega], key=lambda i: -lengths[i])
        ]
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    if group:
        shuffle = epoch_order(len(batches), seed + 1, epoch)
        batches = [batches[i] for i in shuffle]
    return batches


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation seeded by (seed, epoch), so a resumed run
    sees the batches an uninterrupted one would."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()

"""Text sources → token windows: bundled corpora, local files, hub datasets; calibration sampling."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from llmlite.errors import LlmliteError

BUNDLED_CORPORA = {
    "wikitext2": "wikitext-2/wiki.test.raw",
    "wikitext2-test": "wikitext-2/wiki.test.raw",
    "wikitext2-valid": "wikitext-2/wiki.valid.tokens",
}
DEFAULT_EVAL_TEXT = "wikitext2"
DEFAULT_CALIBRATION = "wikitext2-valid"  # the default calibration text
SELF_TEXT = "self"  # calibration windows the model writes itself (llmlite.calibration)
# What quantize and prune calibrate on by default: half WikiText-2 validation, half the model's own
# text (docs/benchmarks/unseen.md: better on text no default was chosen on, no worse on WikiText-2)
DEFAULT_CALIBRATION_SET = f"{DEFAULT_CALIBRATION}+{SELF_TEXT}"
_TEXT_FIELDS = ("text", "content", "document")


def load_text(source: str) -> str:
    """The text of a bundled corpus, a local ``.txt``/``.jsonl``/``.parquet`` file, or a hub dataset.

    JSONL and parquet rows contribute their ``text`` field (or ``content``/``document``), joined by
    blank lines. A hub dataset is named ``name[:config][:split]`` (split defaults to ``test``).
    """
    if source in BUNDLED_CORPORA:
        ref = resources.files("llmlite.corpora").joinpath(BUNDLED_CORPORA[source])
        return _normalise(ref.read_text(encoding="utf-8"))
    path = Path(source).expanduser()
    if path.is_file():
        return _normalise(_read_file(path))
    if path.exists():
        raise LlmliteError(f"{source} is a folder; pass a .txt, .jsonl or .parquet file")
    if source.startswith((".", "/", "~")) or path.suffix in {".txt", ".jsonl", ".json", ".parquet"}:
        raise LlmliteError(f"no such text file: {source}")
    return _normalise(_read_hub_dataset(source))


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n")


def _read_file(path: Path) -> str:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
            return _join_rows(rows, path)
        if path.suffix in {".jsonl", ".json"}:
            rows = read_json_rows(path)
            return _join_rows([row for _, row in rows], path, [where for where, _ in rows])
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmliteError(_not_utf8(path, e)) from None
    except (OSError, ValueError) as e:  # pyarrow's errors are ValueErrors
        raise LlmliteError(
            f"cannot read {path} ({_one_line(e)}); it must be UTF-8 text, JSONL or parquet"
        ) from None
    except ImportError:
        raise LlmliteError("reading parquet needs pyarrow: pip install pyarrow") from None


def read_json_rows(path: Path) -> list[tuple[str, object]]:
    """The rows of a JSON-lines file, each with where it is (``line 3``: 1-based, blank lines
    counted); a ``.json`` file holding one JSON list gives ``item 1``, ``item 2``, ...

    A line that is not JSON is refused with its number and what is wrong with it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmliteError(_not_utf8(path, e)) from None
    except OSError as e:
        raise LlmliteError(f"cannot read {path} ({_one_line(e)}); check the file") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlmliteError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the file"
            ) from None
        return [(f"item {i + 1}", row) for i, row in enumerate(whole)]
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise LlmliteError(
                f"{path} line {number} is not valid JSON ({e.msg} at column {e.colno}); "
                "each line must be one JSON object: fix or remove that line"
            ) from None
    return rows


def _not_utf8(path: Path, e: UnicodeDecodeError) -> str:
    line = e.object[: e.start].count(b"\n") + 1
    return (
        f"{path} is not UTF-8 text (byte {e.start} on line {line} cannot be decoded); "
        "save it as UTF-8 or pass a .txt, .jsonl or .parquet file"
    )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _join_rows(rows: list, path: Path | str, places: list[str] | None = None) -> str:
    texts = []
    for i, row in enumerate(rows):
        field = next((f for f in _TEXT_FIELDS if isinstance(row, dict) and f in row), None)
        if field is None:
            where = places[i] if places else f"row {i + 1}"
            raise LlmliteError(
                f"{path} {where} has no text field ({', '.join(_TEXT_FIELDS)}); "
                "add one or convert the file to plain text"
            )
        texts.append(str(row[field]))
    return "\n\n".join(texts)


def _read_hub_dataset(source: str) -> str:
    from llmlite.models import go_offline_unless_reachable

    name, config, split = [*source.split(":"), None, None][:3]
    try:
        import datasets

        if not go_offline_unless_reachable():
            datasets.config.HF_HUB_OFFLINE = True
        ds = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as e:  # datasets raises many types for "not found" and "offline"
        raise LlmliteError(
            f"cannot load the text '{source}': not a bundled corpus ({', '.join(BUNDLED_CORPORA)}), "
            f"not a local file, and the hub dataset failed ({str(e).splitlines()[0][:120]})"
        ) from None
    return _join_rows(list(ds), source)


def tokenize(tokenizer, text: str) -> Tensor:
    """Token ids ``[n]`` of the whole text, tokenized once, with no special tokens added."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(ids["input_ids"], dtype=torch.long)


def eval_windows(ids: Tensor, ctx: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows ``[n, ctx]`` from the start of ``ids`` (the tail is dropped)."""
    if ctx < 2:
        raise LlmliteError(f"context length {ctx} is too short; use --ctx 2 or more")
    n = ids.numel() // ctx
    if n == 0:
        raise LlmliteError(
            f"the text has {ids.numel()} tokens, fewer than one window of {ctx}; "
            "use a longer text or a smaller --ctx"
        )
    if max_windows is not None:
        if max_windows < 1:
            raise LlmliteError(f"--max-windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * ctx].view(n, ctx)


def calibration_windows(ids: Tensor, samples: int, seqlen: int, seed: int = 0) -> Tensor:
    """``samples`` windows ``[samples, seqlen]`` at seeded random offsets (reproducible)."""
    if samples < 1 or seqlen < 1:
        raise LlmliteError(f"--samples and --seqlen must be at least 1 (got {samples}, {seqlen})")
    if ids.numel() < seqlen:
        raise LlmliteError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])

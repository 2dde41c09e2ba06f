"""Calibration windows: sampled from texts, written by the model itself, or a mix of both.

``--calibration wikitext2-valid+self``: half the windows from WikiText-2 validation, half written by
the model ("self-calibration", Williams et al., NAACL 2025). A compressed model is asked to
reproduce the float model on text like the text it will meet; the model's own samples, drawn at
temperature 1 from its document-start token, are text of its own distribution, of every kind it
learned, rather than of one corpus's. They are cached in ``$LLMLITE_CACHE/calibration``, keyed by a
fingerprint of the weights, the count, the length and the seed.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import DynamicCache

from llmlite.data import SELF_TEXT, calibration_windows, load_text, tokenize
from llmlite.errors import LlmliteError
from llmlite.models import cache_dir

SELF = SELF_TEXT  # the --calibration name of these windows
BATCH = 32  # sequences sampled together


def document_start(tokenizer) -> int:
    """The token a document starts with in pre-training: BOS where the tokenizer adds one, else its
    end-of-text token (GPT-2-style vocabularies, SmolLM2, Qwen), else EOS."""
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    if added:
        return added[0]
    for token in ("<|endoftext|>", "<|end_of_text|>"):
        if token in tokenizer.get_vocab():
            return tokenizer.convert_tokens_to_ids(token)
    if tokenizer.eos_token_id is None:
        raise LlmliteError(
            "the tokenizer has no BOS, end-of-text or EOS token to start --calibration self from"
        )
    return tokenizer.eos_token_id


@torch.inference_mode()
def generated_windows(
    model, start: int, samples: int, seqlen: int, seed: int = 0, progress: bool = True
) -> Tensor:
    """``[samples, seqlen]`` token ids: ``start``, then ``seqlen − 1`` tokens sampled from the
    model's next-token distribution at temperature 1 (no top-k/top-p), in batches of ``BATCH``."""
    if samples < 1 or seqlen < 1:
        raise LlmliteError(f"--samples and --seqlen must be at least 1 (got {samples}, {seqlen})")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    bar = tqdm(total=samples * seqlen, desc="writing calibration text", unit="tok", disable=not progress)
    for first in range(0, samples, BATCH):
        ids = torch.full((min(BATCH, samples - first), 1), start, dtype=torch.long)
        tokens, cache = [ids], DynamicCache(config=model.config)
        for _ in range(seqlen - 1):
            out = model(tokens[-1], cache=cache, use_cache=True)
            probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
            tokens.append(torch.multinomial(probs, 1, generator=generator))
            bar.update(ids.shape[0])
        rows.append(torch.cat(tokens, dim=1))
        bar.update(ids.shape[0])
    bar.close()
    return torch.cat(rows)


def calibration_set(
    spec: str, model, tokenizer, samples: int, seqlen: int, seed: int = 0, progress: bool = True
):
    """``[samples, seqlen]`` windows from the sources of ``spec`` joined by ``+`` (a text or corpus
    name, or ``self``), the samples split evenly between them (the first ones take the remainder)
    and interleaved, so that the first windows (GPTAQ's ``--v2-windows``) mix them too."""
    sources = spec.split("+")
    if "" in sources or len(set(sources)) < len(sources):
        raise LlmliteError(
            f"--calibration {spec!r}: name each source once, joined by '+' (e.g. wikitext2-valid+self)"
        )
    if samples < len(sources):
        raise LlmliteError(
            f"--samples {samples} is fewer than the {len(sources)} calibration sources; give more"
        )
    counts = [samples // len(sources) + (i < samples % len(sources)) for i in range(len(sources))]
    parts = []
    for source, n in zip(sources, counts, strict=True):
        if source == SELF:
            parts.append(cached_generated(model, document_start(tokenizer), n, seqlen, seed, progress))
        else:
            parts.append(calibration_windows(tokenize(tokenizer, load_text(source)), n, seqlen, seed))
    return torch.stack([part[i] for i in range(counts[0]) for part in parts if i < part.shape[0]])


def cached_generated(model, start: int, samples: int, seqlen: int, seed: int, progress: bool) -> Tensor:
    """``generated_windows``, read from the cache when this model wrote them before."""
    key = f"{fingerprint(model)}-{start}-{samples}x{seqlen}-seed{seed}"
    path = cache_dir() / "calibration" / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    windows = generated_windows(model, start, samples, seqlen, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(windows, tmp)
    tmp.replace(path)
    return windows


def fingerprint(model) -> str:
    """16 hex digits of SHA-256 over the config and about a million weights sampled evenly from
    every parameter: equal for the same weights, different for a fine-tuned or other model."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    params = list(model.state_dict().items())
    total = sum(p.numel() for _, p in params)
    step = max(1, total // 1_000_000)
    for name, p in params:
        digest.update(name.encode())
        digest.update(p.detach().flatten()[::step].float().numpy().tobytes())
    return digest.hexdigest()[:16]

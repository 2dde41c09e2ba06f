"""llmlite as an lm-evaluation-harness model, so that every lm-eval task runs on what llmlite loads.

    lm_eval --model llmlite --model_args pretrained=PATH_OR_NAME --tasks llmlite_piqa \\
        --include_path "$(python -c 'import llmlite.evaluation.harness as h; print(h.TASKS_DIR)')"

``pretrained`` is anything ``llmlite.load_model`` reads (the bundled ``smollm2-135m``, a Hugging
Face folder or hub id, a ``.gguf`` file, a llmlite/GPTQ checkpoint) or a loaded model, given with its
``tokenizer``. The name ``llmlite`` is registered when lm-eval's model registry is first used
(``llmlite.lm_eval_hook``), or when this module is imported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import transformers
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

import llmlite.evals
from llmlite.errors import LlmliteError
from llmlite.evaluation.scoring import Scored, rolling_windows, score
from llmlite.models import load_model

log = logging.getLogger(__name__)

ROLLING = ("lm-eval", "papers")
TASKS_DIR = Path(llmlite.evals.__file__).parent  # the repository's evals/tasks/, shipped as llmlite.evals


@register_model("llmlite")
class LlmliteLM(HFLM):
    """lm-eval's causal-LM scoring (``loglikelihood``, rolling, ``generate_until``) on a llmlite model.

    Beyond ``HFLM``'s arguments: ``batch_tokens`` (tokens per batch of packed rows; 0 = lm-eval's
    own loop), ``rolling`` (``lm-eval`` windows, as ``--model hf``, or ``papers``: the GPTQ/AWQ
    non-overlapping windows of ``llmlite eval``), ``ppl_window`` (rolling window length; default
    ``max_length``) and ``max_windows`` (score only the first N windows of each document).
    """

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel = "smollm2-135m",
        tokenizer: transformers.PreTrainedTokenizerBase | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        batch_tokens: int = 512,
        rolling: str = "lm-eval",
        ppl_window: int | None = None,
        max_windows: int | None = None,
        **kwargs,
    ) -> None:
        if rolling not in ROLLING:
            raise LlmliteError(f"rolling must be 'lm-eval' or 'papers', got {rolling!r}")
        batch_tokens = _whole(
            "batch_tokens", batch_tokens, 0, "e.g. batch_tokens=512 (0: lm-eval's own loop)"
        )
        ppl_window = _whole(
            "ppl_window", ppl_window, 2, "e.g. ppl_window=2048, or leave it out for max_length"
        )
        max_windows = _whole(
            "max_windows", max_windows, 1, "e.g. max_windows=10, or leave it out for every window"
        )
        if isinstance(pretrained, str):
            target = _usable(device)
            pretrained, loaded_tokenizer = _load(pretrained)
            tokenizer = tokenizer or loaded_tokenizer
            pretrained.to(target)
        if tokenizer is None:
            raise LlmliteError("a loaded model needs its tokenizer; pass LlmliteLM(model, tokenizer=...)")
        super().__init__(
            pretrained=pretrained, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **kwargs
        )
        self.batch_tokens = 512 if batch_tokens is None else batch_tokens
        self.rolling = rolling
        self.ppl_window = ppl_window or None
        self.max_windows = max_windows or None
        self._encoded: dict[tuple, list[int]] = {}

    def tok_encode(self, string: str, left_truncate_len=None, add_special_tokens=None) -> list[int]:
        """lm-eval's encoding, remembered: multiple-choice contexts are encoded once, not per choice."""
        key = (string, left_truncate_len, add_special_tokens)
        if key not in self._encoded:
            if len(self._encoded) > 100_000:
                self._encoded.clear()
            self._encoded[key] = super().tok_encode(string, left_truncate_len, add_special_tokens)
        return self._encoded[key]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[Scored]:
        """Log-likelihood of whole texts, windowed by ``rolling`` (``lm-eval`` or ``papers``); each
        result also carries the number of tokens scored (``.tokens``), for token perplexity."""
        owners, windows = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = super().tok_encode(text)
            window = self.ppl_window or self.max_length
            mine = rolling_windows(tokens, window, self.rolling, self.prefix_token_id, self.max_windows)
            if not mine:
                raise LlmliteError(
                    f"a text of {len(tokens)} tokens is shorter than one {window}-token window; "
                    "give a longer text or a smaller window"
                )
            owners += [i] * len(mine)
            windows += [(None, ctx, cont) for ctx, cont in mine]
        answers = self._loglikelihood_tokens(windows, disable_tqdm)
        totals = [0.0] * len(requests)
        counts = [0] * len(requests)
        for i, (_, _, cont), (logprob, _) in zip(owners, windows, answers, strict=True):
            totals[i] += logprob
            counts[i] += len(cont)
        results = [Scored(t, n) for t, n in zip(totals, counts, strict=True)]
        for req, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(result))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """Shared contexts packed once, batches by length under ``batch_tokens`` (see ``scoring``).

        ``batch_size`` does not apply here (the token budget does); ``batch_tokens=0`` restores
        lm-eval's own loop."""
        if self.batch_tokens <= 0:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="llmlite loglikelihood")
        token_requests = [(ctx, cont) for _, ctx, cont in requests]
        answers = score(self.model, token_requests, self.max_length, self.batch_tokens, progress=bar)
        bar.close()
        for (key, _, _), answer in zip(requests, answers, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers


def _usable(device: str | None) -> torch.device:
    """``device``, or the CPU where CUDA is asked for (lm_eval's default) but there is none."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            log.warning("llmlite: %s is not available; evaluating on the CPU", device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise LlmliteError(f"device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None


def _load(source: str):
    """``load_model``, every failure a ``LlmliteError`` (lm-eval prints its message last)."""
    try:
        return load_model(source)
    except LlmliteError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LlmliteError(
            f"cannot load the model {source}: {first}; check pretrained= (a bundled name, folder, "
            ".gguf file, hub id or checkpoint)"
        ) from None


def _whole(name: str, value, minimum: int, otherwise: str) -> int | None:
    """A whole-number model argument, checked (lm-eval passes ``name=5`` as 5 and ``name=x`` as
    "x"); ``None`` stays ``None`` and 0 means the default."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():  # lm-eval reads "-3" as -3.0
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LlmliteError(f"{name} must be a whole number, got {value!r}; {otherwise}")
    if value != 0 and value < minimum:
        raise LlmliteError(f"{name} must be at least {minimum}, got {value}; {otherwise}")
    return value

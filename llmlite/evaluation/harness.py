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

import llmlite.evals
from llmlite.models import load_model

log = logging.getLogger(__name__)

TASKS_DIR = Path(llmlite.evals.__file__).parent  # the repository's evals/, shipped as llmlite.evals


@register_model("llmlite")
class LlmliteLM(HFLM):
    """lm-eval's causal-LM scoring (``loglikelihood``, rolling, ``generate_until``) on a llmlite model."""

    def __init__(
        self,
        pretrained: str | transformers.PreTrainedModel = "smollm2-135m",
        tokenizer: transformers.PreTrainedTokenizerBase | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        **kwargs,
    ) -> None:
        if isinstance(pretrained, str):
            pretrained, loaded_tokenizer = load_model(pretrained)
            tokenizer = tokenizer or loaded_tokenizer
            pretrained.to(_usable(device))
        if tokenizer is None:
            raise ValueError("pass the tokenizer with a loaded model: LlmliteLM(model, tokenizer=...)")
        super().__init__(
            pretrained=pretrained, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **kwargs
        )


def _usable(device: str | None) -> torch.device:
    """``device``, or the CPU where CUDA is asked for (lm_eval's default) but there is none."""
    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            log.warning("llmlite: %s is not available; evaluating on the CPU", device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

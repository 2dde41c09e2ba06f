"""Default KV-cache settings, shared by the cache, the CLI and the option dataclasses (kept apart
from ``cache`` so that reading them does not import torch)."""

KV_DEFAULTS = {"group_size": 64, "residual": 32, "sinks": 4, "scheme": "auto", "salient": 0.2}

# What each option does, for the help of every command that takes it (eval, generate).
KV_HELP = {
    "bits": "quantized KV cache: 2, 4 or 8 bits (16 = unquantized cache)",
    "group_size": "channels per value group; KIVI: also tokens per key group",
    "residual": "recent tokens kept in full precision",
    "sinks": "first tokens kept in full precision",
    "scheme": "kivi (keys per channel in token groups), salient (keys per token, the most important "
    "channels at twice the bits; values rotated) or auto: salient at 2 bits, kivi otherwise",
    "salient": "salient scheme: fraction of key channels at twice the bits",
}

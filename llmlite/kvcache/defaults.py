"""Default KV-cache settings, shared by the cache, the CLI and the option dataclasses (kept apart
from ``cache`` so that reading them does not import torch)."""

KV_DEFAULTS = {"group_size": 64, "residual": 32, "sinks": 4, "scheme": "auto", "salient": 0.2}

"""``LowRankLinear``: a linear ``W ≈ U·V`` (``W`` ``[out, in]``, ``U`` ``[out, r]``, ``V`` ``[r, in]``)
held as two dense linears, ``x -> (x Vᵀ) Uᵀ + b``: an ``nn.Sequential`` of ``Linear(in, r, bias=False)``
and ``Linear(r, out, bias)``, so that its tensors are ``NAME.0.weight`` (``V``), ``NAME.1.weight``
(``U``) and ``NAME.1.bias``, and plain ``torch.nn.Sequential`` reads the same state dict.

A factorised folder records its ranks in ``config.json`` under ``CONFIG_KEY``
(``{"ranks": {"model.layers.0.self_attn.q_proj": 64, ...}}``); ``install_low_rank`` puts the
layers in place in a model built from that config, before its state dict is loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlite.errors import LlmliteError

CONFIG_KEY = "low_rank"


class LowRankLinear(nn.Sequential):
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out, bias)``: ``U·V`` applied as ``V`` then
    ``U``, ``rank·(in + out)`` weights instead of ``in·out``."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = False, dtype=None, device=None
    ):
        kw = {"dtype": dtype, "device": device}
        super().__init__(
            nn.Linear(in_features, rank, bias=False, **kw), nn.Linear(rank, out_features, bias, **kw)
        )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    @classmethod
    def from_factors(
        cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """The layer computing ``x (U·V)ᵀ + bias`` from ``u`` ``[out, r]`` and ``v`` ``[r, in]``."""
        layer = cls(v.shape[1], u.shape[0], u.shape[1], bias is not None, dtype=u.dtype, device=u.device)
        with torch.no_grad():
            layer[0].weight.copy_(v)
            layer[1].weight.copy_(u)
            if bias is not None:
                layer[1].bias.copy_(bias)
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        return self[1].bias

    def dense_weight(self) -> torch.Tensor:
        """``U·V`` ``[out, in]``, computed in float64 and returned in the layer's dtype."""
        return (self[1].weight.double() @ self[0].weight.double()).to(self[1].weight.dtype)

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` of ``U·V`` (``--merge``)."""
        w = self[1].weight
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, dtype=w.dtype, device=w.device
        )
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def low_rank_ranks(config: dict | object) -> dict[str, int]:
    """The ranks a factorised folder's config records (``{}`` for any other model): a ``config.json``
    mapping or a transformers config."""
    entry = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if entry is None:
        return {}
    ranks = entry.get("ranks") if isinstance(entry, dict) else None
    if not isinstance(ranks, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in ranks.items()
    ):
        raise LlmliteError(
            f"config.json: {CONFIG_KEY}.ranks must map module names to integer ranks; re-create the model"
        )
    return ranks


def install_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each ``nn.Linear`` named in ``ranks`` by a ``LowRankLinear`` of its rank (weights
    uninitialised: load the state dict next)."""
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, nn.Linear):
            raise LlmliteError(f"config.json: {CONFIG_KEY} names {name}, which is not a linear of this model")
        if not 1 <= rank <= min(old.in_features, old.out_features):
            raise LlmliteError(
                f"config.json: {CONFIG_KEY} gives {name} ({old.out_features}x{old.in_features}) rank {rank}; "
                "re-create the model"
            )
        w = old.weight
        layer = LowRankLinear(
            old.in_features, old.out_features, rank, old.bias is not None, dtype=w.dtype, device=w.device
        )
        model.set_submodule(name, layer)

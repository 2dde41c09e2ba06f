"""The pure cores of structured pruning (``llmlite prune --structure``): how much each whole unit
(an MLP channel, a key/value group of attention heads, a decoder layer) matters on calibration
data, and which units go.

- **contribution norms** (channels, heads): a unit that reads the input columns ``C`` of a linear
  ``W`` ``[out, in]`` adds ``W[:, C]·x[C]`` to the linear's output; its importance is the root mean
  square over the calibration tokens of that contribution's norm,
  ``sqrt(mean_t ‖W[:, C] x_t[C]‖²) = sqrt(tr(W_C H_CC W_Cᵀ) / 2)`` with ``H = 2XᵀX / tokens`` the
  Hessian the layer walk already measures. For one column (an MLP channel ``j`` through ``down_proj``)
  it is Wanda's score of the whole column, ``‖W[:, j]‖₂ · rms(x_j)``; for a key/value group the
  columns of ``o_proj`` that its query heads write, cross terms between those heads included.
- **block influence** (layers, ShortGPT): ``BI = 1 − mean_t cos(x_t, y_t)`` of the hidden state
  entering (``x``) and leaving (``y``) a decoder layer; a layer that barely turns the residual
  stream has a low BI.
- **lowest**: the ``n`` units of least importance, the first of equal scores first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmlite.pruning.masks import drop_lowest

STRUCTURES = ("channels", "heads", "layers")


def contribution_norms(w: Tensor, hessian: Tensor, columns: Tensor) -> Tensor:
    """Per unit, ``sqrt(tr(W_C H_CC W_Cᵀ) / 2)``: the RMS over tokens of ``‖W[:, C] x_t[C]‖₂``.

    ``w`` ``[out, in]``; ``hessian`` ``2XᵀX / tokens`` ``[in, in]``; ``columns`` ``[units, k]`` the
    input columns of each unit (equal counts). Computed in float64; returns ``[units]`` float64."""
    w, h = w.double(), hessian.double()
    wc = w[:, columns].permute(1, 0, 2)  # [units, out, k]
    hc = h[columns[:, :, None], columns[:, None, :]]  # [units, k, k]
    energy = ((wc @ hc) * wc).sum((1, 2)) / 2
    return energy.clamp(min=0).sqrt()


def channel_scores(down: Tensor, hessian: Tensor) -> Tensor:
    """Each MLP channel ``j``: ``‖down[:, j]‖₂ · sqrt(H_jj / 2)``, ``H`` the Hessian of ``down_proj``'s
    inputs (the channel activations)."""
    return contribution_norms(down, hessian, torch.arange(down.shape[1], device=down.device)[:, None])


def group_columns(heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """``[kv_heads, heads / kv_heads · head_dim]``: the ``o_proj`` input columns of each key/value
    group (query head ``h`` reads key/value head ``h // (heads / kv_heads)``, as ``repeat_kv``)."""
    return torch.arange(heads * head_dim).view(kv_heads, -1)


def group_scores(o_proj: Tensor, hessian: Tensor, heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """Each key/value group: the norm of its query heads' joint contribution through ``o_proj``."""
    return contribution_norms(o_proj, hessian, group_columns(heads, kv_heads, head_dim).to(o_proj.device))


def lowest(scores: Tensor, n: int) -> list[int]:
    """The indices of the ``n`` lowest ``scores`` ``[units]``, ascending; of equal scores the first."""
    keep = drop_lowest(scores[None], n)[0]
    return [int(i) for i in (~keep).nonzero().flatten()]


@dataclass
class BlockInfluence:
    """``1 − mean cos(x, y)`` over tokens, accumulated a chunk at a time (float64 sums)."""

    cosines: float = 0.0
    tokens: int = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        """``x``, ``y``: a layer's input and output hidden states ``[..., hidden]``."""
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        self.cosines += float(torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12).sum())
        self.tokens += x.shape[0]

    @property
    def value(self) -> float:
        return 1.0 - self.cosines / max(self.tokens, 1)

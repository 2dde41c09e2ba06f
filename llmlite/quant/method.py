"""What a compression method is to the layer walk (``llmlite.quant.driver``).

The walk hands a method each *group* of linears that read the same input (q/k/v, o, gate/up,
down) as one float32 weight ``W`` ``[Σ out, in]`` (the group's weights stacked by rows) with the
statistics of the group's calibration inputs ``X`` ``[tokens, in]`` the method asked for; the
method returns ``W``'s replacement as a ``QuantizedWeight`` (same rows), which the walk splits
back into the group's modules. A method that needs no statistics is run on each linear alone,
without any forward pass. Methods are files in ``llmlite/quant/methods/`` (found there by name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from llmlite.quant.awq import Quantizer
from llmlite.quant.grid import QuantizedWeight

# What the walk can measure on a group's calibration inputs (see ``GroupStats``).
STATISTICS = frozenset({"hessian", "drift", "inputs"})
# Settings that only some methods read; the config refuses them for the others.
OPTIONAL_SETTINGS = frozenset({"mse", "refit", "v2", "clip", "awq_vo"})


@dataclass
class QuantSettings:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False
    damp: float = 0.01
    mse: bool = False
    refit: bool = False  # re-solve each group's scale for the least layer-output error after GPTQ
    quantize_head: bool = False
    v2_alpha: float = 0.0  # GPTAQ's correction towards the float model's outputs; 0: plain GPTQ
    # Calibration windows that also run through the float model for GPTAQ's drift (the first ones,
    # rounded up to whole chunks of CHUNK_TOKENS); 0: all of them. The Hessian always sees all.
    v2_windows: int = 0
    # Keep the MLP's inner activations (the largest calibration buffer) in float16 between the
    # down projection's Hessian, which sees them in float32, and its outputs, which see them
    # rounded (relative 2⁻¹¹, far below the quantization error): half the bytes of the largest
    # buffer. False: every activation in float32 (bit-identical to the hooks path).
    compact_mlp: bool = True
    clip: bool = True  # AWQ: search each group's clipping range on the output error
    value_mapping: bool = True  # AWQ: also smooth v_proj -> o_proj (GQA-aware)
    dtype: str = "float16"  # storage of the unquantized tensors (AWQ rounds folded norms to it)
    # Mixed precision: the width of each linear by the walk's name (``layers.3.mlp.down_proj``);
    # those not named (and the head) take ``bits``.
    module_bits: dict[str, int] | None = None

    def bits_for(self, name: str) -> int:
        """The width linear ``name`` is quantized at."""
        return (self.module_bits or {}).get(name, self.bits)


@dataclass
class GroupStats:
    """Statistics of a group's calibration inputs ``X`` ``[tokens, in]``, each present when asked for.

    ``hessian``: ``H = 2 XᵀX / tokens`` ``[in, in]`` float32 (the walk always measures it for a
    calibrated method: it reports each module's output error with it). ``drift``: ``W·D`` with
    ``D = 2 (X̃ − X)ᵀX / tokens``, ``X̃`` the float model's inputs to the group (GPTAQ; only when
    ``v2_alpha > 0``). ``inputs``: the chunks of ``X`` themselves, each ``[tokens, in]``.
    """

    hessian: Tensor | None = None
    drift: Tensor | None = None
    inputs: list[Tensor] | None = None

    @property
    def input_rms(self) -> Tensor:
        """The root mean square of each input column, ``sqrt(diag(H) / 2)`` ``[in]``: Wanda's and
        AWQ's activation norms, per token."""
        return (self.hessian.diagonal() / 2).sqrt()


@dataclass
class Quantized:
    weight: QuantizedWeight
    damp: float | None = None  # the Hessian damping used, when the method raised the setting's


@dataclass(frozen=True)
class Method:
    """A compression method: ``run(W, stats, settings) -> Quantized`` plus what it needs."""

    name: str
    run: Callable[[Tensor, GroupStats, QuantSettings], Quantized]
    needs: frozenset[str] = frozenset()  # of STATISTICS; empty: weights only, no calibration
    options: frozenset[str] = frozenset()  # of OPTIONAL_SETTINGS that the method reads
    defaults: frozenset[str] = frozenset()  # of ``options``: those on unless turned off
    help: str = ""  # one line for the CLI and the docs
    # AWQ: the quantizer at a width (``quant.smooth.rtn`` or ``plain_gptq``) that scores the scales
    # folded into each layer (``quant.smooth``) before its groups are quantized; None: no smoothing
    scale_search: Callable[[QuantSettings, int], Quantizer] | None = None

    def __post_init__(self) -> None:
        unknown = self.needs - STATISTICS | self.options - OPTIONAL_SETTINGS | self.defaults - self.options
        if unknown:
            raise ValueError(f"method {self.name}: unknown statistics or settings {sorted(unknown)}")

    @property
    def smooths(self) -> bool:
        return self.scale_search is not None

    @property
    def calibrated(self) -> bool:
        return bool(self.needs)

"""Mixed precision under a size budget: measure each linear's sensitivity once
(``sensitivity.sensitivities``), choose each linear's width exactly (``allocate.allocate``), and
record what was chosen (``MixedPlan``, into ``llmlite.json``, and a plot).

Two budgets, both over the linears of the decoder layers (every one of them is quantized):

* ``avg_bits = A``: ``Σ_i n_i b_i ≤ A · Σ_i n_i`` with ``n_i`` the weights of linear ``i``: the
  code bits per weight, scales, zero-points and ``g_idx`` not counted, as "4-bit" does not count
  them, so uniform 3- and 4-bit take exactly 3.0 and 4.0;
* ``budget_mb = X``: the tensors of ``model.safetensors`` take at most ``X · 2²⁰`` bytes: every
  quantized linear in the layout written (codes, scales, zero-points, ``g_idx``, bias) plus the
  tensors that stay float (embeddings, norms, an untied head) in ``dtype``. The file's JSON
  header, ``config.json`` and the tokenizer files are not counted.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import torch
from torch import Tensor, nn

from llmlite.arch import decoder_layers
from llmlite.errors import LlmliteError
from llmlite.quant.allocate import BudgetTooSmall, allocate
from llmlite.quant.layouts import LAYOUTS
from llmlite.quant.sensitivity import sensitivities

SENSITIVITY_WINDOWS = 8  # the first calibration windows, through the model once forward and back
MIB = 2**20
PLOT = "mixed-precision.png"


@dataclass
class MixedPlan:
    """What the allocation chose. ``bits``: each linear's width by the walk's name;
    ``sensitivity``: the predicted increase of the mean calibration NLL (nats) when that linear
    alone is rounded to nearest at each width; ``budget`` and ``used`` in ``unit``."""

    target: str  # "--avg-bits 3.5" or "--budget-mb 60"
    candidates: list[int]
    unit: str  # "weight bits" (avg_bits) or "bytes" (budget_mb)
    budget: int
    used: int
    average_bits: float  # Σ n_i b_i / Σ n_i of the chosen widths
    linear_bytes: int  # the quantized linears in the layout written
    float_bytes: int  # the tensors that stay float, in the stored dtype
    float_loss: float  # the float model's mean NLL on the sensitivity windows
    predicted_increase: float  # Σ of the chosen widths' sensitivities
    windows: int
    seconds: float
    bits: dict[str, int]
    sensitivity: dict[str, dict[int, float]]

    @property
    def top_bits(self) -> int:
        """The most common width (the checkpoint's top-level ``bits``; ties: the larger)."""
        counts = Counter(self.bits.values())
        return max(counts, key=lambda b: (counts[b], b))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sensitivity"] = {n: {str(b): v for b, v in s.items()} for n, s in self.sensitivity.items()}
        return out


def targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' linears by the walk's names (``layers.{i}.{name}``)."""
    return {
        f"layers.{i}.{name}": m
        for i, layer in enumerate(decoder_layers(model))
        for name, m in layer.named_modules()
        if isinstance(m, nn.Linear)
    }


def written_group_size(linears: list[nn.Linear], fmt: str, group_size: int) -> int:
    """The group size layout ``fmt`` writes (``layouts.fit_weights``): the weights' own for GPTQ,
    else the common one that holds whole groups only."""
    if fmt == "gptq" or group_size == -1:
        return group_size
    return math.gcd(group_size, *(m.in_features for m in linears))


def linear_bytes(m: nn.Linear, fmt: str, bits: int, group_size: int, sym: bool) -> int:
    """The bytes of linear ``m``'s tensors at ``bits`` in layout ``fmt`` (``group_size``: as written)."""
    sizes = (m.in_features, m.out_features, bits, group_size, m.bias is not None, sym)
    tensors = LAYOUTS[fmt].codec.layout(*sizes)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def float_bytes(model: nn.Module, quantized: set[str], dtype: torch.dtype) -> int:
    """The bytes of the tensors a checkpoint stores unquantized (``checkpoint.write_checkpoint``):
    the state dict less the ``quantized`` modules' tensors and a head tied to the embeddings."""
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight
    head_name = next((n for n, m in model.named_modules() if m is head), None) if tied else None
    total = 0
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quantized or (tied and key == f"{head_name}.weight"):
            continue
        total += t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
    return total


def plan(
    model: nn.Module,
    windows: Tensor,
    candidates: list[int],
    group_size: int,
    sym: bool,
    fmt: str,
    dtype: torch.dtype,
    avg_bits: float | None = None,
    budget_mb: float | None = None,
    progress: bool = True,
) -> MixedPlan:
    """Each decoder linear's width among ``candidates`` with the least predicted loss under the
    budget (``avg_bits`` or ``budget_mb``; see the module's docstring), sensitivities measured on
    the first ``SENSITIVITY_WINDOWS`` of ``windows``. A budget below every linear at the smallest
    candidate is a one-line error, raised before the sensitivity pass."""
    start = time.perf_counter()
    linears = targets(model)
    names = list(linears)
    weights = [m.in_features * m.out_features for m in linears.values()]
    if avg_bits is not None:
        target, unit = f"--avg-bits {avg_bits:g}", "weight bits"
        sizes = [[n * b for b in candidates] for n in weights]
        budget = math.floor(Fraction(str(avg_bits)) * sum(weights))
        fixed = 0
    else:
        target, unit = f"--budget-mb {budget_mb:g}", "bytes"
        g = written_group_size(list(linears.values()), fmt, group_size)
        sizes = [[linear_bytes(m, fmt, b, g, sym) for b in candidates] for m in linears.values()]
        fixed = float_bytes(model, {_full_name(model, m) for m in linears.values()}, dtype)
        budget = math.floor(Fraction(str(budget_mb)) * MIB) - fixed
    smallest = sum(min(s) for s in sizes)
    if smallest > budget:
        if avg_bits is not None:
            raise LlmliteError(f"{target} is below the smallest allocation; use at least {min(candidates)}")
        need = (smallest + fixed) / MIB
        raise LlmliteError(
            f"{target} is below the smallest allocation ({need:.2f} MiB: every linear at "
            f"{min(candidates)} bits, plus {fixed / MIB:.2f} MiB of float tensors); raise it to at least "
            f"{math.ceil(need * 100) / 100:.2f}"
        )
    sens, loss = sensitivities(
        model, linears, windows[:SENSITIVITY_WINDOWS], candidates, group_size, sym, progress
    )
    costs = [[sens[n][b] for b in candidates] for n in names]
    try:
        picks = allocate(costs, sizes, budget)
    except BudgetTooSmall:  # checked above; kept for the solver's own contract
        raise LlmliteError(f"{target} is below the smallest allocation") from None
    bits = {n: candidates[c] for n, c in zip(names, picks, strict=True)}
    used = sum(s[c] for s, c in zip(sizes, picks, strict=True))
    code_bits = sum(n * bits[name] for n, name in zip(weights, names, strict=True))
    g = written_group_size(list(linears.values()), fmt, group_size)
    stored = sum(linear_bytes(m, fmt, bits[n], g, sym) for n, m in linears.items())
    return MixedPlan(
        target=target,
        candidates=list(candidates),
        unit=unit,
        budget=budget + fixed,
        used=used + fixed,
        average_bits=code_bits / sum(weights),
        linear_bytes=stored,
        float_bytes=float_bytes(model, {_full_name(model, m) for m in linears.values()}, dtype),
        float_loss=loss,
        predicted_increase=sum(c[p] for c, p in zip(costs, picks, strict=True)),
        windows=min(SENSITIVITY_WINDOWS, windows.shape[0]),
        seconds=time.perf_counter() - start,
        bits=bits,
        sensitivity=sens,
    )


def _full_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def plot(p: MixedPlan, path: Path) -> None:
    """A PNG of the chosen width of each linear per layer (top) and its sensitivity at each
    candidate width (bottom, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({n.split(".", 2)[2] for n in p.bits})
    layer = {n: int(n.split(".")[1]) for n in p.bits}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for k, kind in enumerate(kinds):
        names = [n for n in p.bits if n.split(".", 2)[2] == kind]
        offset = (k - (len(kinds) - 1) / 2) * 0.1
        top.plot([layer[n] + offset for n in names], [p.bits[n] for n in names], "o", label=kind, ms=4)
    top.set_ylabel("bits")
    top.set_yticks(p.candidates)
    top.set_title(f"{p.target}: {p.average_bits:.3f} bits per weight on average")
    top.legend(fontsize=7, ncol=4)
    for b in p.candidates:
        per_layer: dict[int, float] = {}
        for n, s in p.sensitivity.items():
            per_layer[layer[n]] = per_layer.get(layer[n], 0.0) + max(s[b], 1e-12)
        xs = sorted(per_layer)
        bottom.semilogy(xs, [per_layer[x] for x in xs], "-o", ms=3, label=f"{b}-bit")
    bottom.set_ylabel("predicted ΔNLL of the layer's linears (nats)")
    bottom.set_xlabel("decoder layer")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

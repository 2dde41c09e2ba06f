"""Factorise every linear of a model's decoder layers in place with a method of ``lowrank.methods``.

Three steps, because the ranks come from one target for the whole model:

1. **statistics** (ASVD, SVD-LLM): the Hessian ``H = 2XᵀX/tokens`` of each group's calibration
   inputs, through the quantizer's layer walk (``quant.driver.walk_groups``) over the *unchanged*
   model (as both papers: every layer sees the original model's activations); one ``[in, in]``
   float32 matrix per group is held until step 3;
2. **ranks**: each linear's spectrum under its method (the singular values it truncates), then
   ``allocate.global_ranks`` on the relative energies ``σ_i² / Σσ²`` (for SVD-LLM, the fraction of the
   linear's output energy on the calibration inputs that a dropped value loses), or the same
   fraction of each linear (``uniform``), or one ``--rank``;
3. **factors**: each linear whose rank saves weights is replaced by a ``LowRankLinear`` (``U·V``);
   the others stay dense. Embeddings, norms and the head are kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.arch import decoder_layers, family
from llmlite.errors import LlmliteError
from llmlite.layers.lowrank import LowRankLinear
from llmlite.lowrank.allocate import DENSE, cost, global_ranks, max_rank, minimum_cost, uniform_ranks
from llmlite.lowrank.methods import LowrankSettings, get
from llmlite.quant.driver import linears, relative_output_error, walk_groups
from llmlite.quant.method import GroupStats


@dataclass
class ModuleRecord:
    name: str  # the module's full name (model.layers.3.mlp.down_proj)
    shape: tuple[int, int]  # [out, in]
    rank: int | None  # None: kept dense
    params: int  # weights kept: rank·(out + in), or out·in when dense
    truncation: float  # Σ_{i>r} σ_i² / Σ σ_i² of the method's (transformed) weight; 0 when dense
    output_error: float | None = None  # ‖X(UV − W)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs (from H)
    damp: float | None = None  # SVD-LLM's damping of H (0: none was needed)
    seconds: float = 0.0

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class LowrankReport:
    settings: LowrankSettings
    modules: list[ModuleRecord] = field(default_factory=list)
    budget: int | None = None  # the weights the ratio allowed (None with --rank)
    path: str = ""  # "llama-staged", "generic-hooks" or "weights-only" (plain SVD)
    seconds: float = 0.0

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.modules)

    @property
    def kept(self) -> float:
        """Weights kept over the decoder linears' weights."""
        return self.params / max(self.dense_params, 1)

    @property
    def ranks(self) -> dict[str, int]:
        return {m.name: m.rank for m in self.modules if m.rank is not None}

    def to_dict(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "params": self.params,
            "dense_params": self.dense_params,
            "kept": self.kept,
            "budget": self.budget,
            "factorised": len(self.ranks),
            "path": self.path,
            "seconds": self.seconds,
            "modules": [{**asdict(m), "dense_params": m.dense_params} for m in self.modules],
        }


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder layers' linears by full name, refused (one line) for a family ``arch`` does not know."""
    family(model)
    layers = decoder_layers(model)
    if any(isinstance(m, LowRankLinear) for m in layers.modules()):
        source = getattr(model, "llmlite_source", None) or type(model).__name__
        raise LlmliteError(f"{source} is factorised already; factorise the dense model it came from")
    prefix = next(n for n, m in model.named_modules() if m is layers)
    found = {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers) for n, m in linears(layer).items()}
    if not found:
        raise LlmliteError(f"{type(model).__name__} has no nn.Linear in its decoder layers to factorise")
    return found


def check_factorizable(model: nn.Module, settings: LowrankSettings) -> dict[str, nn.Linear]:
    """The linears, after refusing (one line, before any work) a rank that some linear cannot hold
    or a ratio that keeps less than rank 1 of every linear."""
    found = decoder_linears(model)
    shapes = [(m.out_features, m.in_features) for m in found.values()]
    if settings.rank is not None:
        for name, m in found.items():
            if settings.rank > min(m.out_features, m.in_features):
                raise LlmliteError(
                    f"--rank {settings.rank} is larger than {name} ({m.out_features}x{m.in_features}) holds; "
                    f"use --rank {min(min(s) for s in shapes)} or less, or --ratio"
                )
        return found
    total = sum(m * n for m, n in shapes)
    floor = minimum_cost(shapes) if settings.allocation == "global" else _uniform_floor(shapes)
    if settings.ratio * total < floor:
        raise LlmliteError(
            f"--ratio {settings.ratio:g} keeps {int(settings.ratio * total)} of the {total} weights of the "
            f"decoder linears, less than rank 1 of each needs ({floor}); use --ratio "
            f"{math.ceil(1000 * floor / total) / 1000:g} or more"
        )
    return found


def _uniform_floor(shapes: list[tuple[int, int]]) -> int:
    """The least ``ratio·Σmn`` at which the uniform share gives every linear rank 1."""
    total = sum(m * n for m, n in shapes)
    need = max((m + n) / (m * n) for m, n in shapes if max_rank(m, n) >= 1)
    return math.ceil(need * total)


@torch.no_grad()
def factorize_model(
    model: nn.Module, settings: LowrankSettings, calibration: Tensor | None = None, progress: bool = True
) -> LowrankReport:
    """Factorise the linears of ``model``'s decoder layers in place. ``calibration`` (``[samples,
    seqlen]`` token ids) is needed by ASVD and SVD-LLM, unused by plain SVD."""
    method = get(settings.method)
    found = check_factorizable(model, settings)
    report = LowrankReport(settings)
    start = time.perf_counter()
    hessians: dict[str, Tensor | None] = dict.fromkeys(found)
    if method.calibrated:
        if calibration is None:
            raise ValueError(f"{method.name} needs calibration token windows")
        layers_name = next(n for n, m in model.named_modules() if m is decoder_layers(model))

        def visit(prefix: str, layer: nn.Module, names: list[str], stats: GroupStats) -> None:
            h = stats.hessian.cpu()
            index = prefix.removeprefix("layers.")  # the walk's "layers.3."
            for name in names:  # one tensor shared by the group
                hessians[f"{layers_name}.{index}{name}"] = h

        report.path = walk_groups(model, calibration, visit, progress, desc=f"{method.name} statistics")
        unseen = [name for name, h in hessians.items() if h is None]
        if unseen:
            raise RuntimeError(f"the layer walk gave no statistics for {unseen[0]}")
    else:
        report.path = "weights-only"
    names = list(found)
    shapes = [(found[n].out_features, found[n].in_features) for n in names]
    if settings.rank is not None:
        ranks = [settings.rank if settings.rank <= max_rank(*s) else DENSE for s in shapes]
    elif settings.allocation == "uniform":
        ranks = uniform_ranks(shapes, settings.ratio)
    else:
        report.budget = int(settings.ratio * sum(m * n for m, n in shapes))
        energies = [
            s**2 / (s**2).sum().clamp(min=1e-300)
            for s in _spectra(found, hessians, method, settings, progress)
        ]
        ranks = global_ranks(energies, shapes, report.budget)
    _factorize(
        model, found, hessians, dict(zip(names, ranks, strict=True)), method, settings, report, progress
    )
    report.seconds = time.perf_counter() - start
    return report


def _by_group(found: dict[str, nn.Linear], hessians: dict[str, Tensor | None]):
    """The linears in groups that share a Hessian (each its own group without one), in order."""
    groups: list[list[str]] = []
    for name in found:
        h = hessians[name]
        if groups and h is not None and hessians[groups[-1][0]] is h:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _spectra(found, hessians, method, settings, progress) -> list[Tensor]:
    out: list[Tensor] = []
    for group in tqdm(_by_group(found, hessians), desc="spectra", unit="group", disable=not progress):
        basis = method.basis(hessians[group[0]], settings)
        out += [basis.spectrum(found[n].weight.detach()) for n in group]
    return out


def _factorize(model, found, hessians, ranks, method, settings, report, progress) -> None:
    for group in tqdm(_by_group(found, hessians), desc=method.name, unit="group", disable=not progress):
        h = hessians[group[0]]
        need = any(ranks[n] is not DENSE for n in group)
        basis = method.basis(h, settings) if need else None
        for name in group:
            module, rank = found[name], ranks[name]
            shape = (module.out_features, module.in_features)
            if rank is DENSE:
                report.modules.append(ModuleRecord(name, shape, None, cost(shape, None), 0.0))
                continue
            start = time.perf_counter()
            w = module.weight.detach()
            low = basis.factorize(w, rank)
            energy = float((low.sigma**2).sum())
            truncation = low.dropped / energy if energy > 0 else 0.0
            seconds = time.perf_counter() - start
            error = None
            if h is not None:
                error = relative_output_error(w.double(), low.u @ low.v, h.to(w.device).double())
            bias = None if module.bias is None else module.bias.detach()
            layer = LowRankLinear.from_factors(low.u.to(w.dtype), low.v.to(w.dtype), bias)
            model.set_submodule(name, layer)
            report.modules.append(
                ModuleRecord(name, shape, rank, cost(shape, rank), truncation, error, basis.damp, seconds)
            )

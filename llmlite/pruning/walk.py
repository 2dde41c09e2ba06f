"""Prune every linear of a model's decoder layers in place with a method of ``pruning.methods``:
a calibrated one (Wanda, SparseGPT) through the quantizer's layer walk (``quant.driver.walk_groups``:
each layer sees the outputs of the pruned layers before it, each group the outputs of the pruned
groups before it), magnitude pruning on the weights alone. Embeddings and the head are kept."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.arch import decoder_layers, family
from llmlite.pruning.masks import check_divides, one_thread
from llmlite.pruning.methods import PruneSettings, get
from llmlite.quant.driver import linears, relative_output_error, walk_groups
from llmlite.quant.method import GroupStats


@dataclass
class ModuleRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float  # the fraction of the linear's weights that are zero after pruning
    seconds: float
    damp: float | None = None  # SparseGPT's damping (raised from the setting when Cholesky failed)
    output_error: float | None = None  # ‖X(Ŵ−W)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs


@dataclass
class PruneReport:
    settings: PruneSettings
    modules: list[ModuleRecord] = field(default_factory=list)
    path: str = ""  # "llama-staged", "generic-hooks" or "weights-only" (magnitude)
    seconds: float = 0.0  # wall time of the pruning itself (model loading excluded)

    @property
    def sparsity(self) -> float:
        """Zeros over weights, over every pruned linear."""
        weights = sum(m.shape[0] * m.shape[1] for m in self.modules)
        return sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.modules) / max(weights, 1)

    def to_dict(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "target_sparsity": self.settings.target,
            "sparsity": self.sparsity,
            "path": self.path,
            "seconds": self.seconds,
            "modules": [asdict(m) for m in self.modules],
        }


def check_prunable(model: nn.Module, settings: PruneSettings) -> nn.ModuleList:
    """The decoder layers, refused (one line) for a family ``arch`` does not know, or for an N:M
    pattern whose M does not divide some linear's in-features."""
    family(model)
    layers = decoder_layers(model)
    if settings.pattern is not None:
        for i, layer in enumerate(layers):
            for name, module in linears(layer).items():
                check_divides(module.in_features, settings.pattern[1], f"layers.{i}.{name}")
    return layers


@torch.no_grad()
def prune_model(
    model: nn.Module, settings: PruneSettings, calibration: Tensor | None = None, progress: bool = True
) -> PruneReport:
    """Prune the linears of ``model``'s decoder layers in place. ``calibration`` (``[samples,
    seqlen]`` token ids) is required by the calibrated methods and unused by magnitude."""
    method = get(settings.method)
    layers = check_prunable(model, settings)
    report = PruneReport(settings)
    start = time.perf_counter()
    if not method.calibrated:
        report.path = "weights-only"
        for i, layer in enumerate(tqdm(layers, desc=method.name, unit="layer", disable=not progress)):
            for name in linears(layer):
                _prune_group(layer, [name], None, settings, report, f"layers.{i}.")
    else:
        if calibration is None:
            raise ValueError(f"{method.name} needs calibration token windows")

        def visit(prefix: str, layer: nn.Module, names: list[str], stats: GroupStats) -> None:
            _prune_group(layer, names, stats, settings, report, prefix)

        report.path = walk_groups(model, calibration, visit, progress, desc=method.name)
    report.seconds = time.perf_counter() - start
    return report


def remeasure(model: nn.Module, report: PruneReport) -> None:
    """Read each record's sparsity again from ``model`` (after its weights were rounded to the
    storage dtype, where a kept weight may have become zero)."""
    layers = decoder_layers(model)
    for record in report.modules:  # names such as layers.3.mlp.down_proj
        weight = layers.get_submodule(record.name.removeprefix("layers.")).weight
        record.sparsity = float((weight == 0).float().mean())


def _prune_group(
    parent: nn.Module,
    names: list[str],
    stats: GroupStats | None,
    settings: PruneSettings,
    report: PruneReport,
    prefix: str,
) -> None:
    """The method on linears that share their inputs (their weights stacked by rows), each weight
    then replaced by its pruned rows."""
    modules = [parent.get_submodule(n) for n in names]
    w = torch.cat([m.weight.detach().float() for m in modules])
    rows = [m.out_features for m in modules]
    start = time.perf_counter()
    with one_thread():
        pruned, damp = get(settings.method).run(w, stats, settings, rows)
    seconds = (time.perf_counter() - start) / len(names)
    row = 0
    for name, module, r in zip(names, modules, rows, strict=True):
        part = pruned[row : row + r]
        rows_before = w[row : row + r]
        error = None if stats is None else relative_output_error(rows_before, part.float(), stats.hessian)
        row += r
        module.weight.data = part.to(module.weight.dtype).contiguous()
        zeros = float((module.weight == 0).float().mean())
        shape = tuple(module.weight.shape)
        report.modules.append(ModuleRecord(prefix + name, shape, zeros, seconds, damp, error))

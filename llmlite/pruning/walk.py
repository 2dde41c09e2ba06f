"""Prune every linear of a model's decoder layers in place with a method of ``pruning.methods``:
a calibrated one (Wanda, SparseGPT) through the quantizer's layer walk (``quant.driver.walk_groups``:
each layer sees the outputs of the pruned layers before it; its groups are measured in one pass of
the unpruned layer, or with ``true_sequential`` each after the pruned groups before it), magnitude
pruning on the weights alone. Embeddings and the head are kept.

With ``settings.bits`` each group is pruned and then quantized in the same visit: GPTQ on the
pruned weight under the method's mask (``quant.gptq.gptq(..., keep=mask)``), every method then
calibrated (GPTQ needs the Hessian; magnitude's mask still reads the weights alone). The float
linears hold the dequantized values while the layer's later groups are calibrated, and are
replaced by ``QuantLinear`` modules once the layer is done."""

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
from llmlite.quant.gptq import gptq
from llmlite.quant.grid import QuantizedWeight
from llmlite.quant.linear import QuantLinear
from llmlite.quant.method import GroupStats


@dataclass
class ModuleRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float  # the fraction of the linear's weights that are zero after pruning
    seconds: float
    damp: float | None = None  # SparseGPT's damping (raised from the setting when Cholesky failed)
    output_error: float | None = None  # ‖X(Ŵ−W)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs
    # the fraction of the weights the mask removed (exact zeros); ``sparsity`` may exceed it where a
    # kept weight rounds to zero (in the storage dtype, or on the quantization grid)
    pruned: float | None = None


@dataclass
class PruneReport:
    settings: PruneSettings
    modules: list[ModuleRecord] = field(default_factory=list)
    path: str = ""  # "one-pass", "llama-staged", "generic-hooks" or "weights-only" (magnitude)
    seconds: float = 0.0  # wall time of the pruning itself (model loading excluded)

    @property
    def sparsity(self) -> float:
        """Zeros over weights, over every pruned linear."""
        weights = sum(m.shape[0] * m.shape[1] for m in self.modules)
        return sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.modules) / max(weights, 1)

    @property
    def pruned(self) -> float:
        """Weights the masks removed over weights, over every pruned linear."""
        weights = sum(m.shape[0] * m.shape[1] for m in self.modules)
        return sum((m.pruned or 0.0) * m.shape[0] * m.shape[1] for m in self.modules) / max(weights, 1)

    def to_dict(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "target_sparsity": self.settings.target,
            "sparsity": self.sparsity,
            "pruned": self.pruned,
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
    if not calibrated(settings):
        report.path = "weights-only"
        for i, layer in enumerate(tqdm(layers, desc=method.name, unit="layer", disable=not progress)):
            for name in linears(layer):
                _prune_group(layer, [name], None, settings, report, f"layers.{i}.")
    else:
        if calibration is None:
            raise ValueError(f"{method.name} needs calibration token windows")
        done: dict[str, QuantLinear] = {}  # the layer's quantized linears, installed after it

        def visit(prefix: str, layer: nn.Module, names: list[str], stats: GroupStats) -> None:
            done.update(_prune_group(layer, names, stats, settings, report, prefix))

        def install(i: int, layer: nn.Module) -> None:
            for name, qlinear in done.items():
                layer.set_submodule(name, qlinear)
            done.clear()

        desc = method.name if settings.bits is None else f"{method.name} + {settings.bits}-bit GPTQ"
        report.path = walk_groups(
            model, calibration, visit, progress, desc=desc, after_layer=install,
            true_sequential=settings.true_sequential,
        )  # fmt: skip
    report.seconds = time.perf_counter() - start
    return report


def calibrated(settings: PruneSettings) -> bool:
    """Whether the run needs calibration windows: a calibrated method, or any with ``bits``."""
    return get(settings.method).calibrated or settings.bits is not None


def remeasure(model: nn.Module, report: PruneReport) -> None:
    """Read each record's sparsity again from ``model`` (after its weights were rounded to the
    storage dtype, where a kept weight may have become zero)."""
    layers = decoder_layers(model)
    for record in report.modules:  # names such as layers.3.mlp.down_proj
        module = layers.get_submodule(record.name.removeprefix("layers."))
        weight = module.dequantize() if isinstance(module, QuantLinear) else module.weight
        record.sparsity = float((weight == 0).float().mean())


def _prune_group(
    parent: nn.Module,
    names: list[str],
    stats: GroupStats | None,
    settings: PruneSettings,
    report: PruneReport,
    prefix: str,
) -> dict[str, QuantLinear]:
    """The method on linears that share their inputs (their weights stacked by rows), each weight
    then replaced by its pruned rows; with ``settings.bits``, quantized by GPTQ under the mask,
    each float weight set to the dequantized values and its ``QuantLinear`` returned."""
    modules = [parent.get_submodule(n) for n in names]
    w = torch.cat([m.weight.detach().float() for m in modules])
    rows = [m.out_features for m in modules]
    start = time.perf_counter()
    with one_thread():
        result = get(settings.method).run(w, stats, settings, rows)
        pruned, damp, quantized = result.weight, result.damp, None
        if settings.bits is not None:
            s = settings
            grid = (s.bits, s.group_size, s.sym, s.act_order, s.damp)
            joint = gptq(pruned, stats.hessian, *grid, refit=s.refit, keep=result.keep)
            quantized, damp = joint.weight, max(damp or 0.0, joint.damp)
    seconds = (time.perf_counter() - start) / len(names)
    row, out = 0, {}
    for name, module, r in zip(names, modules, rows, strict=True):
        part = slice(row, row + r)
        row += r
        if quantized is None:
            final = pruned[part]
        else:
            q = quantized
            qw = QuantizedWeight(q.codes[part], q.scale[part], q.zero[part], q.g_idx, q.bits)
            bias = None if module.bias is None else module.bias.detach()
            out[name] = QuantLinear.from_weight(qw, bias, settings.group_size).to(module.weight.device)
            final = qw.dequantize()  # QuantLinear's values, bit for bit
        error = None if stats is None else relative_output_error(w[part], final.float(), stats.hessian)
        module.weight.data = final.to(module.weight.dtype).contiguous()
        zeros = float((module.weight == 0).float().mean())
        removed = float((~result.keep[part]).float().mean())
        shape = tuple(module.weight.shape)
        report.modules.append(ModuleRecord(prefix + name, shape, zeros, seconds, damp, error, removed))
    return out

"""Structured pruning of a model in place (``llmlite prune --structure``): whole units removed, the
model left dense and smaller, its config updated so that plain transformers loads it.

- ``channels``: MLP channels (intermediate neurons: rows of gate/up, columns of down), ranked in
  each layer by the norm of their contribution through ``down_proj`` (``structured.channel_scores``);
- ``heads``: whole key/value groups (a key/value head with the query heads that read it: rows of
  q/k/v, columns of o), ranked in each layer by the norm of the group's contribution through
  ``o_proj`` (``structured.group_scores``); the query/key-value ratio stays what it was;
- ``layers``: decoder layers of lowest Block Influence (ShortGPT, ``structured.BlockInfluence``),
  the others renumbered.

A transformers config has one ``intermediate_size`` and one pair of head counts for every layer,
so channels and heads go in the same number from every layer (each layer ranks its own). The
count is the nearest whole number of units to the target fraction of the decoder parameters.

Channels and heads are scored through the quantizer's layer walk (``quant.driver.walk_groups``):
each layer's units are chosen on the outputs of the pruned layers before it, and zeroed there
(so the walk goes on with the pruned model); once the walk is done the zeroed rows and columns are
cut out. Layers are scored in one pass of the unchanged model, as ShortGPT does.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.arch import Family, decoder_layers, family
from llmlite.errors import LlmliteError
from llmlite.pruning.structured import (
    BlockInfluence,
    channel_scores,
    group_columns,
    group_scores,
    lowest,
)
from llmlite.quant.driver import CHUNK_TOKENS, walk_groups
from llmlite.quant.method import GroupStats

UNITS = {"channels": "MLP channel", "heads": "key/value group", "layers": "decoder layer"}


@dataclass
class StructuredPlan:
    structure: str
    target: float  # the fraction of the decoder parameters asked to go
    count: int  # units removed from every layer (layers: decoder layers removed)
    units: int  # units of one layer before (channels, key/value groups), or layers
    unit_params: int  # parameters of one unit of one layer (layers: of one layer)
    layers: int
    decoder_params: int  # parameters of the decoder layers before
    heads_per_group: int = 1  # query heads per key/value head
    head_dim: int = 0

    @property
    def removed_params(self) -> int:
        return self.count * self.unit_params * (1 if self.structure == "layers" else self.layers)


@dataclass
class StructuredReport:
    plan: StructuredPlan
    removed: dict[int, list[int]] = field(default_factory=dict)  # layer -> channels or groups removed
    removed_layers: list[int] = field(default_factory=list)
    scores: dict[str, list] = field(default_factory=dict)  # heads: per layer; layers: block influence
    params_before: int = 0  # of the decoder layers
    params_after: int = 0
    config: dict[str, list] = field(default_factory=dict)  # key -> [before, after]
    path: str = ""
    seconds: float = 0.0
    recovery: dict | None = None  # the distillation after pruning (``distill_record``), if any

    @property
    def removed_fraction(self) -> float:
        return 1 - self.params_after / max(self.params_before, 1)

    def to_dict(self) -> dict:
        return {
            "structure": self.plan.structure,
            "target": self.plan.target,
            "removed_fraction": self.removed_fraction,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "plan": asdict(self.plan),
            "config": self.config,
            "removed": {str(i): units for i, units in self.removed.items()},
            "removed_layers": self.removed_layers,
            "scores": self.scores,
            "path": self.path,
            "seconds": self.seconds,
            "recovery": self.recovery,
        }


def decoder_params(model: nn.Module) -> int:
    return sum(p.numel() for p in decoder_layers(model).parameters())


def check_structured(model: nn.Module, structure: str, sparsity: float) -> StructuredPlan:
    """The plan (units removed from every layer), refused in one line before any work for a family
    ``arch`` does not know, a target below one unit, one that removes every unit, or (heads) a head
    count the model's config class does not accept."""
    fam = family(model)
    layers = decoder_layers(model)
    config = model.config
    total, n_layers = decoder_params(model), len(layers)
    plan = StructuredPlan(structure, sparsity, 0, n_layers, total // n_layers, n_layers, total)
    if structure == "channels":
        gate, up, down = (layers[0].get_submodule(f"{fam.mlp}.{p}") for p in fam.mlp_projections)
        plan.units = down.in_features
        plan.unit_params = gate.in_features + up.in_features + down.out_features
        plan.unit_params += (gate.bias is not None) + (up.bias is not None)
    elif structure == "heads":
        q, k, v, o = (layers[0].get_submodule(f"{fam.attention}.{p}") for p in fam.attention_projections)
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        d = q.out_features // heads
        r = heads // kv
        plan.units, plan.heads_per_group, plan.head_dim = kv, r, d
        plan.unit_params = r * d * (q.in_features + (q.bias is not None)) + r * d * o.out_features
        plan.unit_params += d * (k.in_features + (k.bias is not None) + v.in_features + (v.bias is not None))
    step = plan.unit_params * (1 if structure == "layers" else n_layers)  # one unit from every layer
    exact = sparsity * total / step
    plan.count = math.floor(exact + 0.5)
    share = step / total
    what = UNITS[structure] + ("" if structure == "layers" else " in every layer")
    if plan.count < 1:
        why = ""
        if structure == "heads":
            why = (
                f" (a key/value head and the {plan.heads_per_group} query heads that read it; fewer heads "
                "would break the GQA groups)"
            )
        raise LlmliteError(
            f"--sparsity {sparsity:g} with --structure {structure} removes less than one {what}{why}, "
            f"{share:.1%} of the decoder parameters; use --sparsity {_up(0.5 * share)} or more"
        )
    if plan.count >= plan.units:
        raise LlmliteError(
            f"--sparsity {sparsity:g} with --structure {structure} would remove all {plan.units} "
            f"{UNITS[structure]}s{'' if structure == 'layers' else ' of every layer'}; at most "
            f"{plan.units - 1} can go: use --sparsity {_down((plan.units - 0.5) * share)} or less"
        )
    if structure == "heads":
        _admissible_heads(plan, config, share)
    return plan


def _up(x: float) -> str:
    return f"{math.ceil(1000 * x) / 1000:g}"


def _down(x: float) -> str:  # below x: x itself rounds up to one unit more
    return f"{max(math.floor(1000 * x - 1e-6) / 1000, 0.001):g}"


def _admissible_heads(plan: StructuredPlan, config, share: float) -> None:
    """Refuse a count of key/value groups whose head counts the config class does not accept
    (Llama's needs ``hidden_size`` to be a multiple of ``num_attention_heads``), naming the counts
    it accepts."""

    def accepted(count: int) -> bool:
        kv = plan.units - count
        changes = {"num_attention_heads": kv * plan.heads_per_group, "num_key_value_heads": kv}
        return _config_accepts(config, head_dim=plan.head_dim, **changes)

    if accepted(plan.count):
        return
    name = type(config).__name__
    heads = (plan.units - plan.count) * plan.heads_per_group
    counts = [c for c in range(1, plan.units) if accepted(c)]
    options = ", ".join(f"{c} (--sparsity {c * share:.3f})" for c in counts)
    instead = f"the counts it accepts: {options}" if counts else "no count of groups leaves one it accepts"
    raise LlmliteError(
        f"--sparsity {plan.target:g} with --structure heads removes {plan.count} of {plan.units} key/value "
        f"groups, leaving {heads} attention heads, which {name} refuses (hidden_size {config.hidden_size}); "
        f"{instead}; or use --structure channels or layers"
    )


def _config_accepts(config, **changes) -> bool:
    values = {**config.to_dict(), **changes}
    try:
        type(config).from_dict(values)
    except Exception:  # the config class's own validation, whatever it raises
        return False
    return True


@torch.no_grad()
def prune_structured(
    model: nn.Module, plan: StructuredPlan, calibration: Tensor, progress: bool = True
) -> StructuredReport:
    """Remove ``plan.count`` units (see the module's text) from ``model`` in place, scored on the
    ``calibration`` token windows ``[samples, seqlen]``."""
    fam = family(model)
    report = StructuredReport(plan, params_before=decoder_params(model))
    start = time.perf_counter()
    if plan.structure == "layers":
        influence = block_influence(model, calibration, progress)
        report.scores["block_influence"] = influence
        report.removed_layers = lowest(torch.tensor(influence, dtype=torch.float64), plan.count)
        report.path = "one-pass"
        remove_layers(model, report.removed_layers, report)
    else:
        report.path = _score_and_zero(model, fam, plan, calibration, report, progress)
        for i, layer in enumerate(decoder_layers(model)):
            gone = set(report.removed[i])
            keep = torch.tensor([u for u in range(plan.units) if u not in gone])
            if plan.structure == "channels":
                shrink_mlp(layer, fam, keep)
            else:
                shrink_attention(layer, fam, keep, plan.heads_per_group, plan.head_dim)
        _set_config(model, report, _structure_config(plan))
    report.params_after = decoder_params(model)
    report.seconds = time.perf_counter() - start
    return report


def _structure_config(plan: StructuredPlan) -> dict:
    kept = plan.units - plan.count
    if plan.structure == "channels":
        return {"intermediate_size": kept}
    heads = {"num_attention_heads": kept * plan.heads_per_group, "num_key_value_heads": kept}
    return {**heads, "head_dim": plan.head_dim}  # head_dim no longer hidden_size / heads


def _score_and_zero(model, fam: Family, plan, calibration, report: StructuredReport, progress) -> str:
    """Through the layer walk: each layer's units scored on its calibration inputs, the lowest
    zeroed in the linear that reads them (down_proj's columns, o_proj's), before the walk goes on."""
    target = f"{fam.mlp}.{fam.down}" if plan.structure == "channels" else f"{fam.attention}.{fam.o}"
    heads = plan.units * plan.heads_per_group

    def visit(prefix: str, layer: nn.Module, names: list[str], stats: GroupStats) -> None:
        if names != [target]:
            return
        i = int(prefix.split(".")[1])  # "layers.3."
        module = layer.get_submodule(target)
        w = module.weight
        if plan.structure == "channels":
            scores = channel_scores(w, stats.hessian)
            columns = torch.arange(w.shape[1])[:, None]
        else:
            scores = group_scores(w, stats.hessian, heads, plan.units, plan.head_dim)
            columns = group_columns(heads, plan.units, plan.head_dim)
            report.scores.setdefault("group_norms", []).append([float(s) for s in scores])
        gone = lowest(scores, plan.count)
        report.removed[i] = gone
        w[:, columns[gone].flatten().to(w.device)] = 0

    desc = f"{plan.structure} importance"
    return walk_groups(model, calibration, visit, progress, desc=desc)


@torch.no_grad()
def block_influence(model: nn.Module, calibration: Tensor, progress: bool = True) -> list[float]:
    """Each decoder layer's ``1 − mean cos(input, output)`` over the calibration tokens (one forward
    pass of the decoder, without the head)."""
    layers = decoder_layers(model)
    found = [BlockInfluence() for _ in layers]

    def hook(i: int):
        def record(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            found[i].add(x, output[0] if isinstance(output, tuple) else output)

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    device = next(model.parameters()).device
    per = max(1, CHUNK_TOKENS // calibration.shape[1])
    try:
        for start in tqdm(
            range(0, calibration.shape[0], per), desc="block influence", unit="chunk", disable=not progress
        ):
            body(input_ids=calibration[start : start + per].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [b.value for b in found]


# --- surgery ------------------------------------------------------------------------------------


def _keep_rows(linear: nn.Linear, rows: Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data[rows].clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone(), linear.bias.requires_grad)
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: Tensor) -> None:
    columns = columns.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data[:, columns].clone(), linear.weight.requires_grad)
    linear.in_features = len(columns)


def shrink_mlp(layer: nn.Module, fam: Family, keep: Tensor) -> None:
    """Keep the MLP channels ``keep`` (indices): rows of gate and up, columns of down."""
    mlp = layer.get_submodule(fam.mlp)
    _keep_rows(getattr(mlp, fam.gate), keep)
    _keep_rows(getattr(mlp, fam.up), keep)
    _keep_columns(getattr(mlp, fam.down), keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def shrink_attention(layer: nn.Module, fam: Family, keep: Tensor, per_group: int, head_dim: int) -> None:
    """Keep the key/value groups ``keep`` (indices): their key/value heads' rows of k and v, their
    query heads' rows of q and columns of o."""
    attn = layer.get_submodule(fam.attention)
    kv_rows = (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()
    q_heads = (keep[:, None] * per_group + torch.arange(per_group)).flatten()
    q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    _keep_rows(getattr(attn, fam.q), q_rows)
    _keep_rows(getattr(attn, fam.k), kv_rows)
    _keep_rows(getattr(attn, fam.v), kv_rows)
    _keep_columns(getattr(attn, fam.o), q_rows)
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(keep))):
        if hasattr(attn, name):  # older attention classes keep the counts
            setattr(attn, name, value)


def remove_layers(model: nn.Module, gone: list[int], report: StructuredReport) -> None:
    """Drop the decoder layers ``gone``; the others keep their order and are renumbered (each
    module's ``layer_idx``, which indexes the KV cache), and every per-layer list of the config
    (``layer_types``, ``no_rope_layers``...) keeps the kept layers' entries."""
    layers = decoder_layers(model)
    name = next(n for n, m in model.named_modules() if m is layers)
    gone = set(gone)
    kept = [layer for i, layer in enumerate(layers) if i not in gone]
    for j, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
    model.set_submodule(name, nn.ModuleList(kept))
    old = len(layers)
    config = model.config
    changes: dict = {"num_hidden_layers": len(kept)}
    for key, value in config.to_dict().items():
        if "layer" in key and isinstance(value, list) and len(value) == old:
            changes[key] = [v for i, v in enumerate(value) if i not in gone]
    window = getattr(config, "max_window_layers", None)
    if isinstance(window, int):  # Qwen2/3: the layers below it use full attention
        changes["max_window_layers"] = sum(1 for i in range(min(window, old)) if i not in gone)
    _set_config(model, report, changes)


def _set_config(model: nn.Module, report: StructuredReport, changes: dict) -> None:
    config = model.config
    for key, value in changes.items():
        report.config[key] = [getattr(config, key, None), value]
        setattr(config, key, value)

"""Walk a model's decoder layers and quantize every Linear in them with a method of
``llmlite/quant/methods`` (RTN, GPTQ, ...; see ``llmlite.quant.method`` for what a method is).

A calibrated method (GPTQ) runs *sequentially*: each layer is calibrated on the outputs of the
already-quantized layers before it, and *true-sequentially* inside a layer: linears that read the
same input (q/k/v, then o, then gate/up, then down) are quantized as a group, and later groups see
the outputs of the quantized earlier ones. Only one layer's activations for the calibration set
are held at a time.

Two ways through a layer, with identical results (``compact_mlp=False``):

* Llama-style layers (Llama, Mistral, Qwen2/3, SmolLM): a staged forward that runs every part of
  the layer exactly once and keeps at most the layer's hidden states plus the MLP's inner
  activations (in float16 by default, see ``QuantSettings.compact_mlp``);
* any other layer: the layer's own forward, stopped by a hook at each group's input, re-run once
  per group (slower, same memory).

With ``v2_alpha > 0`` (GPTAQ, GPTQModel's "v2") a second stream of hidden states runs through a
float copy of each layer, and every group aims at reproducing the *float* model's outputs rather
than its own float weights on its drifted inputs (``gptq.drift_target``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.arch import LLAMA, decoder_layers
from llmlite.errors import LlmliteError
from llmlite.memory import trim_heap
from llmlite.quant.checkpoint import quantized_error
from llmlite.quant.compressed import is_compressed
from llmlite.quant.gptq import accumulate_drift, accumulate_hessian, finish_hessian
from llmlite.quant.grid import QuantizedWeight
from llmlite.quant.hooks import Stop, input_of
from llmlite.quant.linear import QuantLinear
from llmlite.quant.method import GroupStats, Method, QuantSettings
from llmlite.quant.methods import get
from llmlite.quant.smooth import SmoothRecord, smooth_layer

log = logging.getLogger("llmlite")
CHUNK_TOKENS = 2048  # calibration tokens per forward call (bounds the temporaries)
SUPPORTED = "Llama-style decoder-only models (Llama, Mistral, Qwen2/3, SmolLM...) with nn.Linear projections"


@dataclass
class ModuleRecord:
    name: str
    shape: tuple[int, int]
    seconds: float
    damp: float | None = None  # damping GPTQ needed (raised from the setting when Cholesky failed)
    output_error: float | None = None  # relative error of the layer output on calibration inputs


@dataclass
class QuantReport:
    settings: QuantSettings
    modules: list[ModuleRecord] = field(default_factory=list)
    path: str = ""  # "llama-staged", "generic-hooks" or "weights-only" (a method without calibration)
    seconds: float = 0.0  # wall time of the quantization itself (model loading excluded)
    smoothing: list[SmoothRecord] = field(default_factory=list)  # AWQ: what each mapping chose
    mixed: dict | None = None  # mixed precision: the plan (``mixed.MixedPlan.to_dict``)

    def to_dict(self) -> dict:
        out = {
            "settings": asdict(self.settings),
            "path": self.path,
            "seconds": self.seconds,
            "modules": [asdict(m) for m in self.modules],
        }
        if self.smoothing:
            out["smoothing"] = [asdict(r) for r in self.smoothing]
        if self.mixed is not None:
            out["mixed"] = self.mixed
        return out


def check_quantizable(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of ``model``, refused when there is nothing llmlite can quantize in them:
    the model is quantized already, or its projections are not ``nn.Linear`` (GPT-2's Conv1D)."""
    qc = getattr(model, "llmlite_quantization", None)
    if qc or any(is_compressed(m) for m in model.modules()):
        source = getattr(model, "llmlite_source", None) or _architecture(model)
        raise quantized_error(source, qc or {"quant_method": "gptq"}, "quantize")
    layers = decoder_layers(model)
    if not any(linears(layer) for layer in layers):
        kinds = sorted({type(m).__name__ for m in layers[0].modules() if _is_projection(m)})
        found = f"its projections are {', '.join(kinds)}" if kinds else "it has no projections"
        source = getattr(model, "llmlite_source", None)
        name = f"{source} ({_architecture(model)})" if source else _architecture(model)
        raise LlmliteError(
            f"{name} has no nn.Linear layers in its decoder layers ({found}); llmlite quantizes {SUPPORTED}"
        )
    return layers


def check_smoothable(model: nn.Module, method: Method) -> None:
    """A one-line error when ``method`` smooths (AWQ) and ``model``'s layers lack its mappings."""
    if method.smooths and not all(_is_llama_style(layer) for layer in decoder_layers(model)):
        raise LlmliteError(
            f"--method {method.name} folds its scales into the norm or linear before each group, which "
            f"needs the Llama layer layout; {_architecture(model)} has another: use --method gptq or rtn"
        )


def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else type(model).__name__


def _is_projection(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return not list(module.children()) and isinstance(weight, Tensor) and weight.dim() == 2


def linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def relative_output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """‖X(Ŵ−W)ᵀ‖² / ‖XWᵀ‖² from the Hessian ``H ∝ XᵀX`` alone."""
    d = w_hat - w
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp(min=1e-30))


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    settings: QuantSettings,
    calibration: Tensor | None = None,
    progress: bool = True,
    path: str | None = None,
) -> QuantReport:
    """Quantize every Linear inside the decoder layers of ``model`` in place (``QuantLinear``).

    ``calibration`` is ``[samples, seqlen]`` token ids, required by GPTQ and unused by RTN.
    ``path`` forces "generic-hooks" (for tests); by default Llama-style models take the staged path.
    """
    report = QuantReport(settings=settings)
    method = get(settings.method)
    layers = check_quantizable(model)  # before calibration, not after it
    head = model.get_output_embeddings() if settings.quantize_head else None
    if not method.calibrated:
        report.path = "weights-only"
        for i, layer in enumerate(tqdm(layers, desc=method.name, unit="layer", disable=not progress)):
            for name, module in linears(layer).items():
                _quantize_alone(layer, name, module, method, settings, report, f"layers.{i}.{name}")
        if head is not None:
            _quantize_head(model, head, method, settings, None, report)
        return report
    if calibration is None:
        raise ValueError(f"{method.name} needs calibration token windows")
    check_smoothable(model, method)
    hidden, kwargs = _capture_layer_inputs(model, layers[0], calibration)
    hidden = _one_block(hidden)
    hidden_float = None
    if settings.v2_alpha > 0 and "drift" in method.needs:
        hidden_float = _one_block(hidden[: _float_chunks(hidden, settings.v2_windows)])
    buffers: dict[str, Tensor] = {}  # the staged path's activation buffers, reused by every layer
    trim_heap()  # the captured chunks, now copied into one block
    staged = path is None and all(_is_llama_style(layer) for layer in layers)
    report.path = "llama-staged" if staged else "generic-hooks"
    bar = tqdm(layers, desc=method.name, unit="layer", disable=not progress)
    for i, layer in enumerate(bar):
        done: dict[str, QuantLinear] = {}

        def quantize_group(names: list[str], inputs, float_inputs=None, layer=layer, i=i, done=done) -> None:
            prefix = f"layers.{i}."
            done.update(_quantize_group(layer, names, inputs, float_inputs, method, settings, report, prefix))

        count = len(linears(layer))
        if method.smooths:
            prefix = f"layers.{i}."
            bits = settings.bits
            if settings.module_bits is not None:
                bits = lambda n, p=prefix: settings.bits_for(p + n)  # noqa: E731
            search = partial(method.scale_search, settings)
            grid = (bits, settings.group_size, search, getattr(torch, settings.dtype))
            report.smoothing += smooth_layer(
                layer, hidden, kwargs, *grid, value_mapping=settings.value_mapping, prefix=prefix
            )
        if staged:
            _llama_layer(layer, hidden, kwargs, quantize_group, hidden_float, settings.compact_mlp, buffers)
        else:
            _generic_layer(layer, hidden, kwargs, quantize_group, hidden_float)
        _install(layer, done)
        trim_heap()
        recent = report.modules[-count:] if count else []
        worst = max((r.output_error or 0.0 for r in recent), default=0.0)
        bar.set_postfix(max_rel_err=f"{worst:.2e}")
    if head is not None:
        norm = getattr(model.base_model, "norm", None)
        if norm is None:
            raise LlmliteError(
                f"--quantize-head needs a final `norm` module in {type(model).__name__}; drop the option"
            )
        _quantize_head(model, head, method, settings, (norm(c) for c in hidden), report)
    return report


@torch.no_grad()
def walk_groups(
    model: nn.Module,
    calibration: Tensor,
    visit: Callable[[str, nn.Module, list[str], GroupStats], None],
    progress: bool = True,
    desc: str = "",
    path: str | None = None,
    after_layer: Callable[[int, nn.Module], None] | None = None,
    true_sequential: bool = True,
) -> str:
    """The walk of ``quantize_model`` for a method that rewrites float weights in place (pruning):
    sequential over the decoder layers, true-sequential inside each (q/k/v, o, gate/up, down), the
    same two ways through a layer. ``visit(prefix, layer, names, stats)`` gets each group (``names``
    relative to ``layer``, ``prefix`` such as ``"layers.3."``) with the Hessian of its calibration
    inputs, and must leave the group's weights at their final values before the walk goes on;
    ``after_layer(i, layer)``, once layer ``i`` is done (its outputs computed), may replace its
    modules (``QuantLinear`` for the float linears whose weights hold its values).
    With ``true_sequential=False`` every group of a layer is measured in one pass through the
    unchanged layer before any is visited (SparseGPT's reference and llm-compressor), then the
    layer's outputs are computed with its new weights ("one-pass").
    Returns the way taken ("llama-staged", "generic-hooks" or "one-pass")."""
    layers = check_quantizable(model)
    hidden, kwargs = _capture_layer_inputs(model, layers[0], calibration)
    hidden = _one_block(hidden)
    buffers: dict[str, Tensor] = {}
    trim_heap()
    staged = path is None and all(_is_llama_style(layer) for layer in layers)
    for i, layer in enumerate(tqdm(layers, desc=desc, unit="layer", disable=not progress)):

        def group(names: list[str], inputs, float_inputs=None, layer=layer, i=i) -> None:
            visit(f"layers.{i}.", layer, names, _stats(inputs))

        if not true_sequential:
            for names, stats in _layer_stats(layer, hidden, kwargs):
                visit(f"layers.{i}.", layer, names, stats)
            for c, kw in enumerate(kwargs):
                out = layer(hidden[c], **kw)
                hidden[c] = out[0] if isinstance(out, tuple) else out
        elif staged:
            _llama_layer(layer, hidden, kwargs, group, None, True, buffers)
        else:
            _generic_layer(layer, hidden, kwargs, group)
        if after_layer is not None:
            after_layer(i, layer)
        trim_heap()
    if not true_sequential:
        return "one-pass"
    return "llama-staged" if staged else "generic-hooks"


@torch.no_grad()
def _layer_stats(
    layer: nn.Module, hidden: list[Tensor], kwargs: list[dict]
) -> list[tuple[list[str], GroupStats]]:
    """Each group of ``layer`` (the linears that read the same input, in call order) with the
    Hessian of its inputs, all from one forward of every chunk through the unchanged layer."""
    groups = _groups(layer, hidden[0], kwargs[0])
    sums: dict[str, list] = {names[0]: [None, 0] for names in groups}  # first name: [2XᵀX, tokens]

    def gather(x: Tensor, name: str) -> None:
        x = x.reshape(-1, x.shape[-1])
        total = sums[name]
        if total[0] is None:
            total[0] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        accumulate_hessian(total[0], x)
        total[1] += x.shape[0]

    handles = [
        layer.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: gather(args[0], name))
        for name in sums
    ]
    try:
        for h, kw in zip(hidden, kwargs, strict=True):
            layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return [(names, GroupStats(finish_hessian(*sums[names[0]]))) for names in groups]


# --- calibration plumbing ----------------------------------------------------------------------


@torch.no_grad()
def _capture_layer_inputs(model: nn.Module, first: nn.Module, calibration: Tensor):
    """Hidden states entering the first layer (as ``[chunks]`` of ``[b, seqlen, d]``) and the
    keyword arguments the model passes to every layer (rotary embeddings, masks), per chunk."""
    per_chunk = max(1, CHUNK_TOKENS // calibration.shape[1])
    hidden: list[Tensor] = []
    kwargs: list[dict] = []

    def catch(_module, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h)
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise Stop

    device = next(model.parameters()).device
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for i in range(0, calibration.shape[0], per_chunk):
            with contextlib.suppress(Stop):
                model(input_ids=calibration[i : i + per_chunk].to(device), use_cache=False)
    finally:
        handle.remove()
    return hidden, kwargs


def _one_block(chunks: list[Tensor]) -> list[Tensor]:
    """The chunks copied into one tensor, returned as views of it in the same order."""
    return list(torch.cat(chunks).split([c.shape[0] for c in chunks]))


def _float_chunks(hidden: list[Tensor], windows: int) -> int:
    """How many of the first chunks hold at least ``windows`` windows (all for 0)."""
    if windows <= 0:
        return len(hidden)
    seen = 0
    for i, chunk in enumerate(hidden):
        seen += chunk.shape[0]
        if seen >= windows:
            return i + 1
    return len(hidden)


def _buffer(buffers: dict[str, Tensor], like: list[Tensor], width: int, dtype) -> list[Tensor]:
    """Views shaped like the chunks ``like`` (last dimension ``width``) of one long-lived block.

    The block is allocated once and reused by every stage of every layer (one stage's activations
    at a time), which keeps such activations out of the heap: freed and reallocated among each
    stage's temporaries, they would fragment it and raise the peak memory by a few hundred MB.
    """
    shape = (sum(c.shape[0] for c in like), *like[0].shape[1:-1], width)
    nbytes = math.prod(shape) * dtype.itemsize
    block = buffers.get("block")
    if block is None or block.numel() < nbytes:
        buffers.pop("block", None)
        block = buffers["block"] = torch.empty(nbytes, dtype=torch.uint8, device=like[0].device)
    return list(block[:nbytes].view(dtype).view(shape).split([c.shape[0] for c in like]))


def _stats(
    inputs: Iterable[Tensor],
    float_inputs: Iterable[Tensor] | None = None,
    w: Tensor | None = None,
    keep_inputs: bool = False,
) -> GroupStats:
    """The Hessian ``H`` of a group's ``inputs`` and, given the float model's inputs to the same
    group for the first chunks (``v2_windows``) and the group's weight ``w`` ``[out, in]``, the drift
    of its outputs ``W·D`` (``D`` as in ``gptq.drift_target``; ``None`` without float inputs);
    with ``keep_inputs``, the inputs themselves as ``[tokens, in]`` chunks."""
    h = d = None
    tokens = float_tokens = 0
    kept: list[Tensor] | None = [] if keep_inputs else None
    floats = None if float_inputs is None else iter(float_inputs)
    direct = w is not None and 2 * w.shape[0] < w.shape[1]  # W(X̃−X)ᵀX costs less than D, then W·D
    for x in inputs:
        x = x.reshape(-1, x.shape[-1])
        if h is None:
            h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            d_rows = w.shape[0] if direct else x.shape[1]
            d = None if floats is None else torch.zeros(d_rows, x.shape[1], dtype=h.dtype, device=x.device)
        accumulate_hessian(h, x)
        if kept is not None:
            kept.append(x.clone())  # the staged path reuses its buffers
        x_float = None if floats is None else next(floats, None)
        if x_float is not None:
            accumulate_drift(d, x, x_float.reshape(x.shape), w if direct else None)
            float_tokens += x.shape[0]
        tokens += x.shape[0]
    if d is not None:
        d = d / max(float_tokens, 1)
        d = d if direct else w.to(d.dtype) @ d
    return GroupStats(finish_hessian(h, tokens), d, kept)


def _quantize_group(
    parent: nn.Module,
    names: list[str],
    inputs: Iterable[Tensor],
    float_inputs: Iterable[Tensor] | None,
    method: Method,
    settings: QuantSettings,
    report: QuantReport,
    prefix: str,
) -> dict[str, QuantLinear]:
    """``method`` on linears that share ``inputs`` (one Hessian): their weights are stacked by rows.
    Given the float model's inputs to them too, the method may aim at the float model's outputs
    (GPTAQ).

    The float modules stay in place, their weights set to exactly what the ``QuantLinear``
    computes with, so that the rest of the layer's calibration runs at full speed; the returned
    ``QuantLinear`` modules replace them when the layer is done (``_install``).
    """
    modules = [parent.get_submodule(n) for n in names]
    w = torch.cat([m.weight.detach().float() for m in modules])
    stats = _stats(inputs, float_inputs, w, keep_inputs="inputs" in method.needs)
    start = time.perf_counter()
    parts, damps = _run_by_width(w, stats, [m.out_features for m in modules], names, method, settings, prefix)
    seconds = (time.perf_counter() - start) / len(names)
    quantized, row = {}, 0
    for name, module, part in zip(names, modules, parts, strict=True):
        rows = slice(row, row + module.out_features)
        row += module.out_features
        qlinear = _quant_linear(module, part, settings)
        module.weight.data = part.dequantize(module.weight.dtype)  # QuantLinear's values, bit for bit
        if module.bias is not None:
            module.bias.data = qlinear.bias.to(module.bias.dtype)
        error = relative_output_error(w[rows], module.weight.detach().float(), stats.hessian)
        report.modules.append(
            ModuleRecord(prefix + name, tuple(module.weight.shape), seconds, damps[name], error)
        )
        quantized[name] = qlinear
    return quantized


def _run_by_width(
    w: Tensor,
    stats: GroupStats,
    rows: list[int],
    names: list[str],
    method: Method,
    settings: QuantSettings,
    prefix: str,
) -> tuple[list[QuantizedWeight], dict[str, float | None]]:
    """``method`` on the stacked weight ``w`` of a group (``rows``: each module's output rows),
    once per width when mixed precision gives its modules different ones (the rows of one width
    stacked; a method treats rows independently given the shared Hessian, so one width's run is
    the stacked run's rows). Returns each module's weight and the damping each run used."""
    widths = [settings.bits_for(prefix + n) for n in names]
    starts = [sum(rows[:k]) for k in range(len(rows))]
    parts: list[QuantizedWeight | None] = [None] * len(names)
    damps: dict[str, float | None] = {}
    for bits in sorted(set(widths)):
        chosen = [k for k, b in enumerate(widths) if b == bits]
        index = torch.cat([torch.arange(starts[k], starts[k] + rows[k]) for k in chosen])
        every = len(chosen) == len(names)
        sub = stats if every else GroupStats(stats.hessian, _rows(stats.drift, index), stats.inputs)
        result = method.run(w if every else w[index], sub, replace(settings, bits=bits))
        if result.damp is not None and result.damp != settings.damp:
            log.warning(
                "%s: Hessian not positive definite at damp %g; used %g",
                prefix + names[chosen[0]],
                settings.damp,
                result.damp,
            )
        qw, row = result.weight, 0
        for k in chosen:
            part = slice(row, row + rows[k])
            row += rows[k]
            parts[k] = QuantizedWeight(qw.codes[part], qw.scale[part], qw.zero[part], qw.g_idx, qw.bits)
            damps[names[k]] = result.damp
    return parts, damps


def _rows(t: Tensor | None, index: Tensor) -> Tensor | None:
    return None if t is None else t[index]


def _quantize_alone(
    parent: nn.Module,
    name: str,
    module: nn.Linear,
    method: Method,
    settings: QuantSettings,
    report: QuantReport,
    full_name: str,
) -> None:
    """A method without calibration on one linear, replaced at once."""
    start = time.perf_counter()
    own = replace(settings, bits=settings.bits_for(full_name))
    result = method.run(module.weight.detach().float(), GroupStats(), own)
    qlinear = _quant_linear(module, result.weight, settings)
    report.modules.append(ModuleRecord(full_name, tuple(module.weight.shape), time.perf_counter() - start))
    _install(parent, {name: qlinear})


def _quant_linear(module: nn.Linear, qw: QuantizedWeight, settings: QuantSettings) -> QuantLinear:
    bias = None if module.bias is None else module.bias.detach()
    return QuantLinear.from_weight(qw, bias, settings.group_size).to(module.weight.device)


def _install(parent: nn.Module, quantized: dict[str, QuantLinear]) -> None:
    for name, qlinear in quantized.items():
        parent.set_submodule(name, qlinear)


def _quantize_head(
    model, head: nn.Linear, method: Method, settings, inputs: Iterable[Tensor] | None, report
) -> None:
    """Quantize the output head (a calibrated method given its ``inputs``); a head tied to the
    input embeddings is untied first."""
    if model.get_input_embeddings().weight is head.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    parent_name = next(n for n, m in model.named_modules() if m is head)
    if inputs is None:
        _quantize_alone(model, parent_name, head, method, settings, report, parent_name)
    else:
        quantized = _quantize_group(model, [parent_name], inputs, None, method, settings, report, prefix="")
        _install(model, quantized)


# --- the two ways through a layer ---------------------------------------------------------------


def _is_llama_style(layer: nn.Module) -> bool:
    """Whether ``layer`` has exactly the Llama layout (``arch.LLAMA``), so the staged path fits."""
    children = set(dict(layer.named_children()))
    attn, mlp = getattr(layer, LLAMA.attention, None), getattr(layer, LLAMA.mlp, None)
    return (
        children == LLAMA.children
        and all(isinstance(getattr(attn, p, None), nn.Linear) for p in LLAMA.attention_projections)
        and all(isinstance(getattr(mlp, p, None), nn.Linear) for p in LLAMA.mlp_projections)
        and hasattr(mlp, "act_fn")
    )


@torch.no_grad()
def _llama_layer(
    layer: nn.Module,
    hidden: list[Tensor],
    kwargs: list[dict],
    quantize: Callable,
    hidden_float: list[Tensor] | None = None,
    compact: bool = False,
    buffers: dict[str, Tensor] | None = None,
) -> None:
    """``h ← h + o(attn(norm₁ h))``, then ``h ← h + down(act(gate(x)) · up(x))`` with ``x = norm₂ h``,
    quantizing each group once its input is known for every chunk. Updates ``hidden`` (and
    ``hidden_float``, run through a float copy of the layer) in place."""
    fl = None if hidden_float is None else copy.deepcopy(layer)
    attn, mlp = layer.self_attn, layer.mlp
    buffers = {} if buffers is None else buffers
    mlp_dtype = torch.float16 if compact else hidden[0].dtype
    widths = ((attn.o_proj.in_features, hidden[0].dtype), (mlp.down_proj.in_features, mlp_dtype))
    for width, dtype in widths:  # the larger first: one allocation for the whole walk
        _buffer(buffers, hidden, width, dtype)

    def pairs(fn: Callable, float_fn: Callable):
        return (fn(h) for h in hidden), None if fl is None else (float_fn(g) for g in hidden_float)

    qkv, o, gate_up, down = LLAMA.groups()
    quantize(qkv, *pairs(layer.input_layernorm, fl and fl.input_layernorm))

    attn_in = _buffer(buffers, hidden, attn.o_proj.in_features, hidden[0].dtype)
    for a, h, kw in zip(attn_in, hidden, kwargs, strict=True):
        a.copy_(input_of(attn.o_proj, attn, layer.input_layernorm(h), kw))
    attn_in_float = None
    if fl is not None:
        attn_in_float = [
            input_of(fl.self_attn.o_proj, fl.self_attn, fl.input_layernorm(g), kw)
            for g, kw in zip(hidden_float, kwargs, strict=False)
        ]
        for g, a in zip(hidden_float, attn_in_float, strict=True):
            g += fl.self_attn.o_proj(a)
    quantize(o, attn_in, attn_in_float)
    for h, a in zip(hidden, attn_in, strict=True):
        h += attn.o_proj(a)
    del attn_in, attn_in_float
    trim_heap()

    quantize(gate_up, *pairs(layer.post_attention_layernorm, fl and fl.post_attention_layernorm))

    def inner(layer: nn.Module, h: Tensor) -> Tensor:
        x = layer.post_attention_layernorm(h)
        act = layer.mlp.act_fn(layer.mlp.gate_proj(x))
        act *= layer.mlp.up_proj(x)  # in place: one buffer of the layer's widest size fewer
        return act

    kept = _buffer(buffers, hidden, mlp.down_proj.in_features, mlp_dtype)  # the down projection's inputs
    scales = [1.0] * len(kept)

    def down_inputs():
        for i, h in enumerate(hidden):
            m = inner(layer, h)
            scales[i] = _fp16_scale(m) if compact else 1.0
            kept[i].copy_(m if scales[i] == 1.0 else m / scales[i])  # rounds to float16 if compact
            yield m

    def down_inputs_float():
        for g in hidden_float:
            m = inner(fl, g)
            g += fl.mlp.down_proj(m)
            yield m

    quantize(down, down_inputs(), None if fl is None else down_inputs_float())
    for h, m, scale in zip(hidden, kept, scales, strict=True):
        h += mlp.down_proj(m.float().mul_(scale) if compact else m)


def _fp16_scale(x: Tensor) -> float:
    """A power of two that brings every value of ``x`` within float16's range (1 if they fit)."""
    if not x.numel():
        return 1.0
    lo, hi = x.aminmax()  # no |x| temporary of the layer's widest size
    amax = max(-float(lo), float(hi))
    return 2.0 ** math.ceil(math.log2(amax / 2**15)) if amax > 2**15 else 1.0


@torch.no_grad()
def _generic_layer(
    layer: nn.Module,
    hidden: list[Tensor],
    kwargs: list[dict],
    quantize: Callable,
    hidden_float: list[Tensor] | None = None,
) -> None:
    """Any layer: groups are the linears that receive the same input tensor, in call order."""
    fl = None if hidden_float is None else copy.deepcopy(layer)
    for names in _groups(layer, hidden[0], kwargs[0]):
        module = layer.get_submodule(names[0])
        inputs = (input_of(module, layer, h, kw) for h, kw in zip(hidden, kwargs, strict=True))
        float_inputs = None
        if fl is not None:
            target = fl.get_submodule(names[0])
            float_inputs = [input_of(target, fl, g, kw) for g, kw in zip(hidden_float, kwargs, strict=False)]
        quantize(names, inputs, float_inputs)
    for stream, run in ((hidden, layer), (hidden_float, fl)):
        for i, kw in enumerate(kwargs[: len(stream)] if stream is not None else ()):
            out = run(stream[i], **kw)
            stream[i] = out[0] if isinstance(out, tuple) else out


def _groups(layer: nn.Module, h: Tensor, kw: dict) -> list[list[str]]:
    calls: list[tuple[str, Tensor]] = []  # holding the inputs keeps their identities distinct
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: calls.append((n, args[0])))
        for n, m in linears(layer).items()
    ]
    try:
        layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[Tensor, list[str]]] = []
    done: set[str] = set()
    for name, x in calls:
        if name in done:
            continue
        done.add(name)
        group = next((g for g in groups if g[0] is x), None)
        if group is None:
            groups.append((x, [name]))
        else:
            group[1].append(name)
    return [names for _, names in groups]

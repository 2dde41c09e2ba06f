"""How much each linear's rounding at each bit width raises the model's calibration loss.

For a linear ``y = x Wᵀ`` rounded to nearest at ``b`` bits (``ΔW_b = RTN_b(W) − W``), everything
else float, the increase of the mean next-token NLL ``L`` over ``T`` calibration tokens is
predicted to second order with the empirical Fisher of the real model's loss at its float weights:

    ΔL(W, b) ≈ 1/(2T) · Σ_t (g_t · Δy_t)²,   Δy_t = ΔW_b x_t,   g_t = ∂(T·L)/∂y_t

(``x_t`` ``[in]`` the linear's input at token ``t``, ``g_t`` ``[out]`` the gradient of the summed
NLL with respect to its output there). One forward and one backward pass per calibration window
measure it for every linear and width at once: ``Σ_t ((g_t ΔW_b) · x_t)²`` costs one extra forward
of the decoder layers per candidate width. The first-order term ``Σ_t g_t · Δy_t`` is left out: at
a trained model it averages to zero and, on a few windows, is noise of either sign.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlite.quant.grid import fake_quantize


def fisher_increase(g: Tensor, x: Tensor, dw: Tensor) -> Tensor:
    """``Σ_t ((g_t ΔW) · x_t)²`` (float64) for output gradients ``g`` ``[T, out]``, inputs ``x``
    ``[T, in]`` and a weight change ``dw`` ``[out, in]``: twice the predicted increase of the
    summed loss."""
    s = ((g @ dw) * x).sum(-1)
    return s.double().square().sum()


def sensitivities(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    windows: Tensor,
    bits: Sequence[int],
    group_size: int,
    sym: bool,
    progress: bool = True,
) -> tuple[dict[str, dict[int, float]], float]:
    """The predicted increase of the mean NLL on ``windows`` ``[n, seqlen]`` when only linear
    ``name`` of ``targets`` is rounded to nearest at ``b`` bits (``group_size``, ``sym``), for
    every name and ``b`` in ``bits``, and the float model's mean NLL itself."""
    acc = {name: dict.fromkeys(bits, 0.0) for name in targets}
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    handles = []

    def forward_hook(name: str):
        def hook(module: nn.Linear, args, out: Tensor) -> None:
            x = args[0].detach().reshape(-1, module.in_features).float()

            def on_grad(g: Tensor) -> None:
                g = g.reshape(-1, module.out_features).float()
                w = module.weight.detach().float()
                for b in bits:
                    dw = fake_quantize(w, b, group_size, sym) - w
                    acc[name][b] += float(fisher_increase(g, x, dw))

            out.register_hook(on_grad)

        return hook

    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    handles += [m.register_forward_hook(forward_hook(n)) for n, m in targets.items()]
    nll, tokens = 0.0, 0
    device = next(model.parameters()).device
    try:
        for window in tqdm(windows, desc="sensitivity", unit="window", disable=not progress):
            ids = window.unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            loss.backward()
            nll += float(loss.detach())
            tokens += ids.shape[1] - 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    scale = 1.0 / (2 * max(tokens, 1))
    return {n: {b: v * scale for b, v in per.items()} for n, per in acc.items()}, nll / max(tokens, 1)


@torch.no_grad()
def measured_increase(
    model: nn.Module, linear: nn.Linear, windows: Tensor, bits: int, group_size: int, sym: bool
) -> float:
    """The true increase of the mean NLL on ``windows`` when ``linear`` alone is rounded to
    nearest at ``bits`` (for checking ``sensitivities``): two full forward passes per window."""

    def mean_nll() -> float:
        total, tokens = 0.0, 0
        for window in windows:
            ids = window.unsqueeze(0).to(linear.weight.device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            tokens += ids.shape[1] - 1
        return total / tokens

    base = mean_nll()
    w = linear.weight.data.clone()
    try:
        linear.weight.data = fake_quantize(w.float(), bits, group_size, sym).to(w.dtype)
        return mean_nll() - base
    finally:
        linear.weight.data = w

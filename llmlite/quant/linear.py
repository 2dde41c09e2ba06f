"""``QuantLinear``: a Linear layer stored in the GPTQ layout, with switchable compute backends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmlite.kernels import cpu, cuda
from llmlite.quant.formats import from_gptq, packed_length, to_gptq, unpack
from llmlite.quant.grid import QuantizedWeight, num_groups


@dataclass(frozen=True)
class Backend:
    """How a ``QuantLinear`` computes: ``forward(layer, x) -> y``, after ``prepare(layer)`` has
    repacked the layer's codes once (at load time) into whatever the kernel reads."""

    forward: Callable[[QuantLinear, Tensor], Tensor]
    prepare: Callable[[QuantLinear], None] | None = None


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, prepare: Callable[[QuantLinear], None] | None = None):
    """Register ``forward(layer, x) -> y`` (the decorated function) as the compute backend
    ``name``; ``prepare(layer)``, if given, runs once when a layer is set to the backend."""

    def wrap(forward: Callable[[QuantLinear, Tensor], Tensor]):
        BACKENDS[name] = Backend(forward, prepare)
        return forward

    return wrap


@register_backend("torch")
def _torch_backend(layer: QuantLinear, x: Tensor) -> Tensor:
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _DequantizedLinear.apply(x, layer, bias)
    return F.linear(x, layer.dequantize(x.dtype), bias)


def _linear_in_out(x: Tensor, w_in_out: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` for a weight stored ``[in, out]``: the BLAS reads it as it is, no transposed copy."""
    y = x @ w_in_out
    return y if bias is None else y.add_(bias)


class _DequantizedLinear(torch.autograd.Function):
    """``x Wᵀ + b`` whose backward dequantizes ``W`` again instead of keeping the float weight
    (or ``x``, which the frozen weight does not need) alive from forward to backward (QLoRA's
    trick: training memory stays near the packed size)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear, bias: Tensor | None) -> Tensor:
        ctx.layer = layer
        return _linear_in_out(x, layer.dequantize_in_out(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.layer.dequantize_in_out(grad.dtype).T, None, None


class QuantLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` held as packed integer codes (buffers ``qweight``, ``qzeros``,
    ``scales``, ``g_idx``, ``bias``, packed as in the GPTQ layout: the torch backend's form, which
    peft's GPTQ LoRA also reads). Files are written and read by the codecs of ``formats.py``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        groups = num_groups(in_features, group_size)
        words = packed_length(in_features, bits)
        self.register_buffer("qweight", torch.zeros(words, out_features, dtype=torch.int32))
        zero_words = packed_length(out_features, bits)
        self.register_buffer("qzeros", torch.zeros(groups, zero_words, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)

    @classmethod
    def from_weight(
        cls, weight: QuantizedWeight, bias: Tensor | None = None, group_size: int = -1, backend: str = "auto"
    ) -> QuantLinear:
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, weight.bits, group_size, bias is not None)
        for name, tensor in to_gptq(weight, bias).items():
            getattr(layer, name).copy_(tensor)
        return layer.set_backend(backend)

    def set_backend(self, name: str) -> QuantLinear:
        """Compute with backend ``name`` from now on (its ``prepare`` step runs here, once)."""
        if name not in BACKENDS:
            raise ValueError(f"unknown QuantLinear backend {name!r}; registered: {', '.join(BACKENDS)}")
        self.backend = name
        if BACKENDS[name].prepare is not None:
            BACKENDS[name].prepare(self)
        return self

    def stored_bytes(self) -> int:
        """Bytes of the packed weight, its grid and its bias (the checkpoint's tensors)."""
        tensors = (self.qweight, self.qzeros, self.scales, self.g_idx, self.bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def infeatures(self) -> int:  # AutoGPTQ's names, which peft reads
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    def quantized_weight(self) -> QuantizedWeight:
        tensors = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales}
        return from_gptq({**tensors, "g_idx": self.g_idx}, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``[out, in]`` as ``(q - z) · s`` (the values of ``QuantizedWeight.dequantize``)."""
        return self.dequantize_in_out(dtype).T.contiguous()

    def dequantize_in_out(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The transposed weight ``[in, out]``, the orientation the codes are stored in."""
        g = self.g_idx.long()
        codes = unpack(self.qweight, self.bits, self.in_features).to(dtype)
        zeros = unpack(self.qzeros.T, self.bits, self.out_features).T.to(dtype) + 1
        return (codes - zeros.index_select(0, g)) * self.scales.to(dtype).index_select(0, g)

    def _apply(self, fn, recurse=True):
        # Casting the model (``.half()``, ``.to(bfloat16)``) must not round the stored scales:
        # they stay float16, the checkpoint's exact values; only their device follows.
        scales, bias = self.scales, self.bias
        super()._apply(fn, recurse)
        self.scales = scales.to(self.scales.device)
        if bias is not None:
            self.bias = bias.to(self.bias.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return BACKENDS[self.backend].forward(self, x)

    def extra_repr(self) -> str:
        chosen = ""
        if self.backend == "auto":
            chosen = f" (decode: {self.cpu_choice[0]}, prefill: {self.cpu_choice[1]})"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, backend={self.backend}{chosen}"
        )


def _auto_forward(layer: QuantLinear, x: Tensor) -> Tensor:
    if x.device.type == "cuda":
        return cuda.forward(layer, x, _torch_backend)
    return cpu.forward(layer, x, _torch_backend)


def _triton_prepare(layer: QuantLinear) -> None:
    if (why := cuda.unavailable()) is not None:
        raise ValueError(why)


# auto: per device, the fastest path measured (CPU) or the Triton kernels (CUDA); triton: the
# Triton kernels wherever they run (on CPU tensors under TRITON_INTERPRET=1)
BACKENDS["auto"] = Backend(_auto_forward, partial(cpu.prepare, reference=_torch_backend))
BACKENDS["triton"] = Backend(partial(cuda.forward, reference=_torch_backend), _triton_prepare)

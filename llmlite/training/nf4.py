"""QLoRA's NF4 base layers on the CPU without a fresh float copy of each weight per call.

bitsandbytes dequantizes every 4-bit weight into a newly allocated float tensor in each forward and
again in each backward. On the CPU those short-lived 0.4-3.5 MB blocks fragment glibc's heap, and
QLoRA's peak memory ended above LoRA's (docs/benchmarks/finetune.md). Here the weight is
dequantized by bitsandbytes' own CPU kernels into one scratch buffer that every layer reuses,
inside an opaque operator (``llmlite::nf4_linear``) whose backward dequantizes again: nothing of
the weight's float copy outlives the call, in eager mode or under ``torch.compile``.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SCRATCH: dict[tuple[str, torch.dtype], Tensor] = {}


_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@cache
def _kernel(name: str):
    """A function of bitsandbytes' native CPU library, or None where it lacks it (older or mock builds)."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    return getattr(getattr(lib, "_lib", None), name, None)


def _supported(dtype: torch.dtype) -> bool:
    return (
        dtype in _SUFFIX
        and _kernel("cdequantize_blockwise_cpu_fp32") is not None
        and _kernel(f"cdequantize_blockwise_cpu_nf4_{_SUFFIX[dtype]}") is not None
    )


def _scratch(kind: str, numel: int, dtype: torch.dtype) -> Tensor:
    """The first ``numel`` elements of the reusable buffer ``kind`` (grown when too small)."""
    buffer = _SCRATCH.get((kind, dtype))
    if buffer is None or buffer.numel() < numel:
        buffer = _SCRATCH[(kind, dtype)] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def dequantize_nf4_into_scratch(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype,
) -> Tensor:
    """The NF4 weight of ``shape`` in ``dtype``, written into the shared scratch buffer (valid until
    the next call). ``absmax`` is float32, or uint8 codes of ``nested_absmax`` blocks of 256 (double
    quantization) with ``nested_code`` and ``offset``."""
    packed, absmax = packed.contiguous(), absmax.contiguous()
    if nested_absmax is not None:
        scales = _scratch("absmax", absmax.numel(), torch.float32)
        _kernel("cdequantize_blockwise_cpu_fp32")(
            _ptr(nested_code.contiguous()),
            _ptr(absmax),
            _ptr(nested_absmax.contiguous()),
            _ptr(scales),
            ctypes.c_longlong(256),
            ctypes.c_longlong(absmax.numel()),
        )
        absmax = scales.add_(offset)
    numel = shape[0] * shape[1]
    out = _scratch("weight", numel, dtype)
    # Blocks run over the flattened weight. bitsandbytes' AVX-512 kernel (rows of a multiple of
    # 16) assumes that every row holds whole blocks, and reads the wrong scales when a row ends
    # inside a block (96 columns, blocks of 64), as bitsandbytes' own path does. Rows of exactly
    # one block (or a single row) are right on every path.
    rows, cols = (numel // blocksize, blocksize) if numel % blocksize == 0 else (1, numel)
    nf4 = _kernel(f"cdequantize_blockwise_cpu_nf4_{_SUFFIX[dtype]}")
    nf4(_ptr(packed), _ptr(absmax), _ptr(out), *map(ctypes.c_longlong, (blocksize, rows, cols)))
    return out.view(shape)


@torch.library.custom_op("llmlite::nf4_linear", mutates_args=())
def nf4_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    bias: Tensor | None,
    blocksize: int,
    out_features: int,
) -> Tensor:
    """``x @ W.T + bias`` for the NF4 weight ``W`` of ``out_features`` rows."""
    w = dequantize_nf4_into_scratch(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, (out_features, x.shape[-1]), x.dtype
    )
    return F.linear(x, w, bias)


@nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, nested_code, offset, bias, blocksize, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("llmlite::nf4_linear_grad_input", mutates_args=())
def nf4_linear_grad_input(
    grad: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    blocksize: int,
    in_features: int,
) -> Tensor:
    """``grad @ W``: the gradient of ``nf4_linear`` with respect to its input."""
    w = dequantize_nf4_into_scratch(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, (grad.shape[-1], in_features),
        grad.dtype,
    )  # fmt: skip
    return grad @ w


@nf4_linear_grad_input.register_fake
def _(grad, packed, absmax, nested_absmax, nested_code, offset, blocksize, in_features):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup_context(ctx, inputs, output) -> None:
    x, packed, absmax, nested_absmax, nested_code, offset, _bias, blocksize, _out = inputs
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)
    ctx.blocksize, ctx.in_features = blocksize, x.shape[-1]


def _backward(ctx, grad: Tensor):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = nf4_linear_grad_input(
            grad, packed, absmax, nested_absmax, nested_code, offset, ctx.blocksize, ctx.in_features
        )
    if ctx.needs_input_grad[6]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, None, None, grad_bias, None, None


nf4_linear.register_autograd(_backward, setup_context=_setup_context)


def _operands(packed: Tensor, state) -> tuple:
    """The tensors of an NF4 weight (bitsandbytes ``QuantState``) as ``nf4_linear`` takes them."""
    nested = state.state2 if state.nested else None
    return (
        packed.view(torch.uint8),
        state.absmax,
        None if nested is None else nested.absmax,
        None if nested is None else nested.code,
        None if nested is None else state.offset,
    )


def _forward(self, x: Tensor) -> Tensor:
    """``bnb.nn.Linear4bit.forward`` through ``nf4_linear`` (bitsandbytes' own on other devices)."""
    if x.device.type != "cpu":
        return type(self).forward(self, x)
    state = self.weight.quant_state
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    y = nf4_linear(
        x.to(self.compute_dtype), *_operands(self.weight.data, state), bias, state.blocksize, state.shape[0]
    )
    return y.to(x.dtype)


def _covered(state, device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether bitsandbytes' CPU kernels, called as here, cover this NF4 weight."""
    return (
        device.type == "cpu"
        and dtype is not None
        and _supported(dtype)
        and state is not None
        and state.quant_type == "nf4"
        and len(state.shape) == 2
        and state.shape[1] % 2 == 0
        and not getattr(state, "packing_format_for_cpu", False)
        and (not state.nested or state.state2.blocksize == 256)
    )


def dequantize_nf4(packed: Tensor, state, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """A float copy of the NF4 weight ``packed`` with bitsandbytes ``state`` on the CPU (right where
    bitsandbytes' own ``dequantize_4bit`` reads wrong scales, see ``dequantize_nf4_into_scratch``),
    or None where this path does not cover it."""
    if not _covered(state, packed.device, dtype):
        return None
    args = _operands(packed, state)
    return dequantize_nf4_into_scratch(*args, state.blocksize, tuple(state.shape), dtype).clone()


def reuse_dequantization_buffer(model: nn.Module) -> int:
    """Route every CPU NF4 layer of ``model`` (bitsandbytes ``Linear4bit``) that bitsandbytes' CPU
    kernels cover through ``nf4_linear``. Returns how many layers were switched."""
    import bitsandbytes as bnb

    switched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and _covered(
            module.weight.quant_state, module.weight.device, module.compute_dtype
        ):
            module.forward = _forward.__get__(module)
            switched += 1
    return switched

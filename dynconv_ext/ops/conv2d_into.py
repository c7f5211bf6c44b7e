"""conv2d_into: a convolution written straight into a channel slice of a wider buffer (a concat without a copy).

    conv2d_into(input, weight, bias, out, channel_offset, stride, padding, dilation, groups, activation)

sets ``out[:, channel_offset : channel_offset + C_out] = act(F.conv2d(input, weight, bias, ...))`` in place and
returns ``out``. Dense-connectivity networks (MSDNet, RANet, DenseNet) concatenate every layer's new features
onto all earlier ones; with ``torch.cat`` each layer re-copies everything before it (quadratic traffic). With one
preallocated channels-last buffer per scale, each layer instead writes its ``C_out`` new channels at the next
offset, and the next layer reads the filled prefix ``out[:, :c]`` as its input in place: the CPU kernel reads a
channel-slice view of a channels-last buffer without copying it.

Backends (``backend=``): ``"auto"`` the C++ kernel of the tensors' device: on CPU the implicit-GEMM kernel
(the same microkernel as ``masked_conv2d``, all pixels active; float32/float64), on CUDA the CUDA implicit GEMM
(masked_conv2d's forward with all pixels active, no mask or index map; float32/float64/float16/bfloat16, fp32
accumulation) where the extension was built with CUDA, else the reference; ``"cpp"`` the CPU kernel only;
``"triton"`` the Triton implicit-GEMM kernel (CUDA tensors, float32 / float16 / bfloat16; CPU tensors only under
``TRITON_INTERPRET=1``, for tests): it reads the input through its strides (a channel-slice view of a
channels-last buffer in place), fuses bias and activation into the epilogue and stores through ``out``'s strides
into the slice, op ``dynconv::conv2d_into_triton``; ``"reference"`` pure PyTorch (conv then a slice copy).
Neither GPU kernel has run on a GPU yet (checked by host emulation / the Triton interpreter).

Autograd: when gradients are needed, the result is differentiable with respect to ``input``, ``weight``,
``bias`` and the untouched part of ``out`` (the written slice's old values get no gradient); ``out`` must then
not be a leaf that requires grad.
"""
import importlib
import os
from typing import Optional, Tuple, Union

import torch

from .. import _extension
from ..reference import conv2d_into_reference
from .masked_conv2d import _CONSTANT_FLAG, ACTIVATIONS, _output_size, _pair, records_grad

IntOr2 = Union[int, Tuple[int, int]]
INTO_BACKENDS = ("auto", "cpp", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _validate(input, weight, bias, out, channel_offset, stride, padding, dilation, groups):
    name = "conv2d_into"
    for arg, t in (("input", input), ("weight", weight), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be 4-D, got shape {tuple(t.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{name}: bias must be [C_out={weight.shape[0]}], got {tuple(bias.shape)}")
    for arg, t in (("weight", weight), ("bias", bias), ("out", out)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name}: {arg} dtype {t.dtype} differs from input dtype {input.dtype}")
        if t is not None and t.device != input.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but input is on {input.device}")
    if not isinstance(groups, int) or groups < 1 or input.shape[1] % groups or weight.shape[0] % groups:
        raise ValueError(f"{name}: groups={groups} must divide input channels ({input.shape[1]}) and C_out "
                         f"({weight.shape[0]})")
    if weight.shape[1] * groups != input.shape[1]:
        raise ValueError(f"{name}: weight expects {weight.shape[1] * groups} input channels, input has "
                         f"{input.shape[1]}")
    ho, wo = _output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3], stride, padding,
                          dilation)
    if out.shape[0] != input.shape[0] or tuple(out.shape[2:]) != (ho, wo):
        raise ValueError(f"{name}: out must be [N={input.shape[0]}, C, {ho}, {wo}] (the conv's output size), "
                         f"got {tuple(out.shape)}")
    if not isinstance(channel_offset, int) or channel_offset < 0 or channel_offset + weight.shape[0] > out.shape[1]:
        raise ValueError(f"{name}: channel_offset={channel_offset} + C_out={weight.shape[0]} must fit in out's "
                         f"{out.shape[1]} channels")
    _check_no_overlap(name, input, out, channel_offset, weight.shape[0])


def _check_backend(name, backend, input):
    """The device and dtype rules of the explicit backends ('auto' and 'reference' take anything valid)."""
    on_cpu = input.device.type == "cpu"
    if backend == "cpp" and not on_cpu:
        raise ValueError(f"{name}: backend='cpp' is the CPU kernel; input is on {input.device}")
    if backend == "triton":
        if on_cpu and not _triton_interpreter():
            raise ValueError(f"{name}: backend='triton' needs CUDA tensors (CPU tensors only under "
                             "TRITON_INTERPRET=1); on CPU use 'auto' or 'cpp'")
        if input.dtype not in TRITON_DTYPES:
            raise TypeError(f"{name}: backend='triton' supports float32, float16 and bfloat16, got {input.dtype}")
    elif on_cpu and input.dtype not in (torch.float32, torch.float64) and backend != "reference":
        raise TypeError(f"{name}: CPU kernels support float32 and float64, got {input.dtype}")


def _triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors (slowly); how the tests check the Triton backend."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_ops():
    """Registers the dynconv::*_triton ops (imported lazily: triton is optional, and slow to import)."""
    return importlib.import_module("dynconv_ext.triton.ops")


def _check_no_overlap(name, input, out, lo, c_out):
    """Reading a channel slice of the buffer being written is the point; reading the written slice is not.
    (Skipped under torch.compile, which cannot trace storage pointers.)"""
    if torch.compiler.is_compiling():
        return
    if out.untyped_storage().data_ptr() != input.untyped_storage().data_ptr():
        return
    if out.stride(1) != 1 or input.stride() != out.stride():
        raise ValueError(f"{name}: input shares out's storage; only channel slices of the same channels-last "
                         "buffer may be read while writing")
    in_lo = (input.data_ptr() - out.data_ptr()) // out.element_size()
    in_hi = in_lo + input.shape[1]
    if in_lo < lo + c_out and lo < in_hi:
        raise ValueError(f"{name}: input (channels [{in_lo}, {in_hi}) of out) overlaps the written channels "
                         f"[{lo}, {lo + c_out})")


class _Conv2dIntoFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, out, channel_offset, conv_args, activation, backend):
        ctx.mark_dirty(out)
        _conv2d_into_raw(input.detach(), weight.detach(), None if bias is None else bias.detach(), out,
                         channel_offset, conv_args, activation, backend)
        written = out.narrow(1, channel_offset, weight.shape[0])
        ctx.save_for_backward(input, weight, written.detach().clone() if activation else None)
        ctx.conv_args, ctx.activation, ctx.offset, ctx.has_bias = conv_args, activation, channel_offset, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, y = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        c_out = weight.shape[0]
        g = grad_out.narrow(1, ctx.offset, c_out)
        if y is not None:
            clipped = (y <= 0) | (y >= 6) if ctx.activation == "relu6" else (y <= 0)
            g = g.masked_fill(clipped, 0)
        need = ctx.needs_input_grad
        gi, gw, gb = torch.ops.aten.convolution_backward(
            g.contiguous(), input, weight, [c_out] if ctx.has_bias else None, list(stride), list(padding),
            list(dilation), False, [0, 0], groups, [need[0], need[1], need[2] and ctx.has_bias])
        g_out = None
        if need[3]:
            g_out = grad_out.clone()
            g_out.narrow(1, ctx.offset, c_out).zero_()
        return gi, gw, gb, g_out, None, None, None, None


_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The fused concat ops this build has CUDA kernels for (fixed once the extension is loaded; a constant, so that
# torch.compile sees no dispatcher query).
_CUDA_OPS = frozenset(
    op for op in ("conv2d_into_", "resize_into_")
    if _extension.load_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"dynconv::{op}", "CUDA"))


def _use_op(op, input, backend):
    """Whether the dynconv op runs (else the reference): always on CPU (the functional has checked the dtype); on
    CUDA where this build registered a CUDA kernel for the op and the dtype is one it supports."""
    if backend == "reference":
        return False
    if input.device.type == "cpu":
        return True
    return input.device.type == "cuda" and input.dtype in _CUDA_DTYPES and op in _CUDA_OPS


def _conv2d_into_raw(input, weight, bias, out, channel_offset, conv_args, activation, backend):
    stride, padding, dilation, groups = conv_args
    if backend == "triton":
        _triton_ops()
        torch.ops.dynconv.conv2d_into_triton(input, weight, bias, out, channel_offset, list(stride), list(padding),
                                             list(dilation), groups, ACTIVATIONS[activation])
        return out
    if not _use_op("conv2d_into_", input, backend):
        return conv2d_into_reference(input, weight, bias, out, channel_offset, stride, padding, dilation, groups,
                                     activation)
    _extension.require_extension()
    torch.ops.dynconv.conv2d_into_(input, weight, bias, out, channel_offset, list(stride), list(padding),
                                   list(dilation), groups, ACTIVATIONS[activation])
    return out


def conv2d_into(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out: torch.Tensor,
    channel_offset: int,
    stride: IntOr2 = 1,
    padding: IntOr2 = 0,
    dilation: IntOr2 = 1,
    groups: int = 1,
    *,
    activation: Optional[str] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Writes ``act(F.conv2d(input, weight, bias, stride, padding, dilation, groups))`` into
    ``out[:, channel_offset : channel_offset + C_out]`` and returns ``out``.

    Args:
        input: ``[N, C, H, W]``; may be a channel slice (e.g. the filled prefix) of a channels-last buffer,
            read in place.
        weight: ``[C_out, C/groups, kH, kW]``; bias: ``[C_out]`` or None.
        out: ``[N, C_total, Ho, Wo]`` buffer (channels-last for the fast path), written in place; channels outside
            the slice are untouched.
        channel_offset: first channel of ``out`` written.
        activation: None, ``"relu"`` or ``"relu6"``, fused into the write.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.
    """
    if backend not in INTO_BACKENDS:
        raise ValueError(f"conv2d_into: backend must be one of {INTO_BACKENDS}, got {backend!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv2d_into: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    _validate(input, weight, bias, out, channel_offset, stride, padding, dilation, groups)
    _check_backend("conv2d_into", backend, input)
    conv_args = (stride, padding, dilation, groups)
    if records_grad(input, weight, bias, out):
        return _Conv2dIntoFn.apply(input, weight, bias, out, channel_offset, conv_args, activation, backend)
    return _conv2d_into_raw(input, weight, bias, out, channel_offset, conv_args, activation, backend)


def mark_constant_weight(weight: torch.Tensor) -> torch.Tensor:
    """Declares ``weight`` constant while it lives (its owner never modifies it, e.g. a model's BN-folded inference
    weights): the CPU kernels then keep its packed layout across calls instead of repacking it on every call
    (csrc/cpu/packed_weights.h; a change seen by its version counter still repacks). Returns ``weight``. Inference
    tensors are left unmarked (no version counter); so is everything when the extension is not loaded."""
    if weight.device.type == "cpu" and _extension.load_error() is None and not weight.is_inference():
        torch.ops.dynconv.mark_constant_weight(weight)
        # (masked_conv2d's auto crossover reads it: a packed weight costs a sparse call nothing to pack)
        setattr(weight, _CONSTANT_FLAG, True)
    return weight


def conv2d_into_unchecked(input, weight, bias, out, channel_offset: int, stride, padding, dilation, groups: int,
                          activation: int, backend: str = "auto") -> torch.Tensor:
    """:func:`conv2d_into` for callers that built every argument themselves (the models' fused inference paths,
    hundreds of small convs per forward): stride, padding and dilation as 2-lists, ``activation`` as the op's code
    (``ACTIVATIONS``), and no Python-side validation, which cost ~9 us a call against ~7 us for the whole C++ op on
    a small conv (batch-1 inference). The C++ kernel still checks shapes, dtypes and the slice. Anything else than
    a CPU tensor with backend ``"auto"``/``"cpp"`` outside autograd goes through :func:`conv2d_into`."""
    if (input.device.type == "cpu" and (backend == "auto" or backend == "cpp") and _extension.load_error() is None
            and not records_grad(input, weight, bias, out)):
        torch.ops.dynconv.conv2d_into_(input, weight, bias, out, channel_offset, stride, padding, dilation, groups,
                                       activation)
        return out
    act = next(name for name, code in ACTIVATIONS.items() if code == activation)
    return conv2d_into(input, weight, bias, out, channel_offset, tuple(stride), tuple(padding), tuple(dilation),
                       groups, activation=act, backend=backend)


if _extension.load_error() is None:
    @torch.library.register_fake("dynconv::conv2d_into_")
    def _conv2d_into_fake(input, weight, bias, out, channel_offset, stride, padding, dilation, groups, activation):
        return None  # mutates out only

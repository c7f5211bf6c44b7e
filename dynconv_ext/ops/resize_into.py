"""resize_into: bilinear resampling written straight into a channel slice of a wider buffer.

    resize_into(input, out, channel_offset)

sets ``out[:, channel_offset : channel_offset + C] = F.interpolate(input, size=out.shape[-2:], mode="bilinear",
align_corners=True)`` in place (a plain copy when the sizes agree) and returns ``out``. RANet's fusion layers
concatenate a resampled copy of the current features and an upsampled conv of the coarser sub-network's
features; written into one preallocated channels-last buffer, that concat costs no extra copy. Pair it with
:func:`conv2d_into` for the conv parts.

Backends (``backend=``): ``"auto"`` the C++ kernel of the tensors' device: on CPU float32/float64, vectorized over
the channels of a channels-last buffer; on CUDA (where the extension was built with CUDA, else the reference)
float32/float64/float16/bfloat16, interpolating in fp32 for the half types as PyTorch does; ``"cpp"`` the CPU
kernel only; ``"triton"`` the Triton kernel (CUDA tensors, float32 / float16 / bfloat16; CPU tensors only under
``TRITON_INTERPRET=1``, for tests): tiles of pixels x channels, input and ``out`` addressed through their strides,
blended in fp32, op ``dynconv::resize_into_triton``; ``"reference"`` pure PyTorch.
Differentiable with respect to ``input`` and the untouched part of ``out`` when gradients are needed.
"""
import torch
import torch.nn.functional as F

from .. import _extension
from ..reference import resize_into_reference
from .conv2d_into import INTO_BACKENDS, _check_backend, _check_no_overlap, _triton_ops, _use_op, records_grad


def _validate(input, out, channel_offset):
    name = "resize_into"
    for arg, t in (("input", input), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {arg} must be 4-D, got shape {tuple(t.shape)}")
    if out.dtype != input.dtype:
        raise TypeError(f"{name}: out dtype {out.dtype} differs from input dtype {input.dtype}")
    if out.device != input.device:
        raise ValueError(f"{name}: out is on {out.device} but input is on {input.device}")
    if out.shape[0] != input.shape[0]:
        raise ValueError(f"{name}: out batch ({out.shape[0]}) differs from input batch ({input.shape[0]})")
    if not isinstance(channel_offset, int) or channel_offset < 0 or channel_offset + input.shape[1] > out.shape[1]:
        raise ValueError(f"{name}: channel_offset={channel_offset} + C={input.shape[1]} must fit in out's "
                         f"{out.shape[1]} channels")
    if min(input.shape[2:]) < 1 or min(out.shape[2:]) < 1:
        raise ValueError(f"{name}: spatial sizes must be positive, got input {tuple(input.shape)} and out "
                         f"{tuple(out.shape)}")
    _check_no_overlap(name, input, out, channel_offset, input.shape[1])


class _ResizeIntoFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, out, channel_offset, backend):
        ctx.mark_dirty(out)
        _resize_into_raw(input.detach(), out, channel_offset, backend)
        ctx.in_size, ctx.offset, ctx.channels = tuple(input.shape[-2:]), channel_offset, input.shape[1]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad
        gi = g_out = None
        if need[0]:
            g = grad_out.narrow(1, ctx.offset, ctx.channels)
            if tuple(g.shape[-2:]) == ctx.in_size:
                gi = g.clone()
            else:  # the adjoint of bilinear resampling, through autograd of the reference
                with torch.enable_grad():
                    x = torch.zeros((g.shape[0], g.shape[1]) + ctx.in_size, dtype=g.dtype, device=g.device,
                                    requires_grad=True)
                    y = F.interpolate(x, size=tuple(g.shape[-2:]), mode="bilinear", align_corners=True)
                    gi, = torch.autograd.grad(y, x, g)
        if need[1]:
            g_out = grad_out.clone()
            g_out.narrow(1, ctx.offset, ctx.channels).zero_()
        return gi, g_out, None, None


def _resize_into_raw(input, out, channel_offset, backend):
    if backend == "triton":
        _triton_ops()
        torch.ops.dynconv.resize_into_triton(input, out, channel_offset)
        return out
    if not _use_op("resize_into_", input, backend):
        return resize_into_reference(input, out, channel_offset)
    _extension.require_extension()
    torch.ops.dynconv.resize_into_(input, out, channel_offset)
    return out


def resize_into(input: torch.Tensor, out: torch.Tensor, channel_offset: int, *, backend: str = "auto") -> torch.Tensor:
    """Writes ``input`` bilinearly resampled (align_corners=True) to ``out``'s spatial size into
    ``out[:, channel_offset : channel_offset + C]`` and returns ``out``.

    Args:
        input: ``[N, C, h, w]`` (may be a channel slice of a channels-last buffer).
        out: ``[N, C_total, H, W]`` buffer, written in place; other channels untouched.
        channel_offset: first channel of ``out`` written.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"reference"``.
    """
    if backend not in INTO_BACKENDS:
        raise ValueError(f"resize_into: backend must be one of {INTO_BACKENDS}, got {backend!r}")
    _validate(input, out, channel_offset)
    _check_backend("resize_into", backend, input)
    if records_grad(input, out):
        return _ResizeIntoFn.apply(input, out, channel_offset, backend)
    return _resize_into_raw(input, out, channel_offset, backend)


def resize_into_unchecked(input, out, channel_offset: int, backend: str = "auto") -> torch.Tensor:
    """:func:`resize_into` without the Python-side validation, for the models' fused inference paths (see
    :func:`dynconv_ext.ops.conv2d_into.conv2d_into_unchecked`); the C++ kernel still checks its arguments."""
    if (input.device.type == "cpu" and (backend == "auto" or backend == "cpp") and _extension.load_error() is None
            and not records_grad(input, out)):
        torch.ops.dynconv.resize_into_(input, out, channel_offset)
        return out
    return resize_into(input, out, channel_offset, backend=backend)


if _extension.load_error() is None:
    @torch.library.register_fake("dynconv::resize_into_")
    def _resize_into_fake(input, out, channel_offset):
        return None  # mutates out only

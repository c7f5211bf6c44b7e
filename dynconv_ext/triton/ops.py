"""The Triton kernels as torch.library.triton_op operators (so torch.compile sees into them), with autograd.

    dynconv::masked_conv2d_triton(input, weight, bias?, pixel_mask, stride, padding, dilation, groups,
                                  residual?, activation) -> Tensor
        the forward: act(conv + bias (+ residual)) at the active pixels of the bool [N, Ho, Wo] pixel mask,
        the residual (or 0) elsewhere; activation 0 none, 1 ReLU, 2 ReLU6 (the C++ op's codes), fused in the
        kernel's epilogue. Output channels-last.
    dynconv::masked_conv2d_triton_backward(grad_output, input, weight, pixel_mask, output?, stride, padding,
                                           dilation, groups, activation, output_mask) -> (Tensor, Tensor, Tensor)
        (grad_input, grad_weight, grad_bias) as Triton kernels; an entry whose output_mask is False is an empty
        tensor. `output` (the forward's result) is needed when activation != 0: the gradient passes only where
        the activation did not clip. grad_weight/grad_bias: implicit GEMM over the active rows with fp32 atomic
        accumulation (not bitwise deterministic); grad_input: pulled per input pixel that an active output reads.
    dynconv::conv2d_into_triton(input, weight, bias?, out(a!), channel_offset, stride, padding, dilation, groups,
                                activation) -> ()
        out[:, channel_offset : channel_offset + C_out] = act(conv2d(input, weight, bias)) in place (the fused
        concat of dense blocks); input and out are read/written through their strides (a channel-slice view of a
        channels-last buffer is read in place). No autograd here: the functional conv2d_into wraps it.
    dynconv::resize_into_triton(input, out(a!), channel_offset) -> ()
        out[:, channel_offset : channel_offset + C] = bilinear (align_corners=True) resample of input to out's
        size (a copy when the sizes agree), in place. No autograd here: the functional resize_into wraps it.

The autograd of the forward calls the backward op; grad_residual is grad_output where the activation did not
clip at an active pixel (elementwise, in PyTorch). All index lists are compacted on the device: no host sync.
Registered on import (the package imports it when a CUDA device is present); CPU tensors reach these ops only
in tests, under TRITON_INTERPRET=1.
"""
from typing import List, Optional, Tuple

import torch

from .conv2d_into import conv2d_into_triton
from .masked_conv2d import ACT_NONE, ACT_RELU6, masked_conv2d_triton, masked_conv2d_triton_backward
from .resize_into import resize_into_triton


@torch.library.triton_op("dynconv::masked_conv2d_triton", mutates_args=())
def masked_conv2d_triton_op(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            pixel_mask: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int],
                            groups: int, residual: Optional[torch.Tensor], activation: int) -> torch.Tensor:
    return masked_conv2d_triton(input, weight, bias, pixel_mask, stride, padding, dilation, groups, residual,
                                activation)


@torch.library.triton_op("dynconv::masked_conv2d_triton_backward", mutates_args=())
def masked_conv2d_triton_backward_op(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                                     pixel_mask: torch.Tensor, output: Optional[torch.Tensor], stride: List[int],
                                     padding: List[int], dilation: List[int], groups: int, activation: int,
                                     output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return masked_conv2d_triton_backward(grad_output, input, weight, pixel_mask, output, stride, padding,
                                         dilation, groups, activation, output_mask)


def _setup_context(ctx, inputs, output):
    input, weight, bias, pixel_mask, stride, padding, dilation, groups, residual, activation = inputs
    # With a fused activation the backward needs to know where it clipped: keep the output.
    ctx.save_for_backward(input, weight, pixel_mask, output if activation != ACT_NONE else None)
    ctx.args = (stride, padding, dilation, groups, activation)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, weight, pixel_mask, output = ctx.saved_tensors
    stride, padding, dilation, groups, activation = ctx.args
    need = ctx.needs_input_grad
    output_mask = [need[0], need[1], need[2] and ctx.has_bias]
    gi = gw = gb = None
    if any(output_mask):
        gi, gw, gb = torch.ops.dynconv.masked_conv2d_triton_backward(
            grad, input, weight, pixel_mask, output, stride, padding, dilation, groups, activation, output_mask)
    grad_residual = None
    if need[8]:
        grad_residual = grad
        if activation != ACT_NONE:  # at active pixels the residual went through the activation
            clipped = output <= 0
            if activation == ACT_RELU6:
                clipped = clipped | (output >= 6)
            grad_residual = torch.where(pixel_mask.unsqueeze(1) & clipped, torch.zeros_like(grad), grad)
    return (gi if output_mask[0] else None, gw if output_mask[1] else None, gb if output_mask[2] else None,
            None, None, None, None, None, grad_residual, None)


torch.library.register_autograd("dynconv::masked_conv2d_triton", _backward, setup_context=_setup_context)


@torch.library.triton_op("dynconv::conv2d_into_triton", mutates_args={"out"})
def conv2d_into_triton_op(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor,
                          channel_offset: int, stride: List[int], padding: List[int], dilation: List[int],
                          groups: int, activation: int) -> None:
    conv2d_into_triton(input, weight, bias, out, channel_offset, stride, padding, dilation, groups, activation)


@torch.library.triton_op("dynconv::resize_into_triton", mutates_args={"out"})
def resize_into_triton_op(input: torch.Tensor, out: torch.Tensor, channel_offset: int) -> None:
    resize_into_triton(input, out, channel_offset)

"""dynconv::masked_conv2d_triton: the Triton forward kernel as a torch.library.triton_op (so torch.compile
sees into it), with autograd. Registered on import when a CUDA device is present.

Backward is computed with dense gradient functions (torch.nn.grad) on the masked grad_output: correct,
but not yet sparse; Triton backward kernels are future work (issue: GPU backends).
"""
from typing import List, Optional

import torch

from .masked_conv2d import masked_conv2d_triton


@torch.library.triton_op("dynconv::masked_conv2d_triton", mutates_args=())
def masked_conv2d_triton_op(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            pixel_mask: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int],
                            groups: int, residual: Optional[torch.Tensor]) -> torch.Tensor:
    return masked_conv2d_triton(input, weight, bias, pixel_mask, stride, padding, dilation, groups, residual)


def _setup_context(ctx, inputs, output):
    input, weight, bias, pixel_mask, stride, padding, dilation, groups, residual = inputs
    ctx.save_for_backward(input, weight, pixel_mask)
    ctx.args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    input, weight, pixel_mask = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.args
    g = grad * pixel_mask.unsqueeze(1).to(grad.dtype)
    need = ctx.needs_input_grad
    gi = torch.nn.grad.conv2d_input(input.shape, weight, g, stride, padding, dilation, groups) if need[0] else None
    gw = torch.nn.grad.conv2d_weight(input, weight.shape, g, stride, padding, dilation, groups) if need[1] else None
    gb = g.sum((0, 2, 3)) if (need[2] and ctx.has_bias) else None
    return gi, gw, gb, None, None, None, None, None, (grad if need[8] else None)


torch.library.register_autograd("dynconv::masked_conv2d_triton", _backward, setup_context=_setup_context)

"""Pure-PyTorch reference implementations: the oracles of the tests and the fallback of last resort.

They compute densely and mask, which is exactly what the official code of dynamic networks does.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def expand_block_mask(mask: torch.Tensor, block_size: int, out_hw: Sequence[int]) -> torch.Tensor:
    """Expands a [N, Hm, Wm] (or [N, 1, Hm, Wm]) block mask to a [N, 1, Ho, Wo] pixel mask."""
    if mask.dim() == 4:
        mask = mask[:, 0]
    if block_size > 1:
        mask = mask.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)
    return mask[:, : out_hw[0], : out_hw[1]].unsqueeze(1)


def masked_conv2d_reference(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    block_size: int = 1,
    residual: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """conv2d computed densely; where the mask is True: act(conv + residual), elsewhere: residual (or 0)."""
    out = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    pixel_mask = expand_block_mask(mask, block_size, out.shape[-2:])
    base = residual if residual is not None else torch.zeros((), dtype=out.dtype, device=out.device)
    if residual is not None:
        out = out + residual
    if activation == "relu":
        out = torch.relu(out)
    elif activation == "relu6":
        out = out.clamp(0, 6)
    return torch.where(pixel_mask, out, base)


_ACT = {None: lambda t: t, "relu": torch.relu, "relu6": lambda t: t.clamp(0, 6)}


def conv2d_into_reference(input, weight, bias, out, channel_offset, stride=1, padding=0, dilation=1, groups=1,
                          activation=None):
    """``out[:, off:off+C_out] = act(F.conv2d(input, weight, bias, ...))``; returns ``out`` (written in place)."""
    y = _ACT[activation](F.conv2d(input, weight, bias, stride, padding, dilation, groups))
    out[:, channel_offset:channel_offset + y.shape[1]].copy_(y)
    return out


def resize_into_reference(input, out, channel_offset):
    """``out[:, off:off+C] = bilinear resize of input to out's size`` (align_corners=True, RANet's fusion;
    a plain copy when the sizes agree); returns ``out`` (written in place)."""
    y = input if tuple(input.shape[-2:]) == tuple(out.shape[-2:]) else \
        F.interpolate(input, size=tuple(out.shape[-2:]), mode="bilinear", align_corners=True)
    out[:, channel_offset:channel_offset + y.shape[1]].copy_(y)
    return out

"""Gated residual blocks that compute only where their gate says (DynConv)."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import masked_conv2d
from ..reference import expand_block_mask
from .gates import MaskUnit


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """Weight and bias of conv followed by bn (eval statistics), as one conv."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    b = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        b = b + conv.bias * scale
    return w, b


def dilate_pixel_mask(mask: torch.Tensor, kernel: int, dilation: int = 1) -> torch.Tensor:
    """Pixels a kernel x kernel (stride 1, 'same') conv must read so its output is right at `mask` [N, H, W].

    A separable boolean OR of shifted copies: much cheaper than max-pooling a float mask.
    """
    if kernel == 1:
        return mask
    r = dilation * (kernel // 2)
    out = mask.clone()
    for shift in range(dilation, r + 1, dilation):  # horizontal pass
        out[:, :, shift:] |= mask[:, :, :-shift]
        out[:, :, :-shift] |= mask[:, :, shift:]
    rows = out.clone()
    for shift in range(dilation, r + 1, dilation):  # vertical pass
        out[:, shift:] |= rows[:, :-shift]
        out[:, :-shift] |= rows[:, shift:]
    return out


class DynBasicBlock(nn.Module):
    """ResNet basic block (3x3 conv-BN-ReLU, 3x3 conv-BN, + identity, ReLU) gated by a MaskUnit.

    Eval: conv1 runs on the gate's mask dilated by one pixel (conv2's halo), conv2 on the mask itself with
    the identity as residual; BN is folded into both convs and ReLU fused into their epilogues, so no dense
    intermediate is formed. Inactive pixels output the identity. Training: dense compute, the branch
    multiplied by the (straight-through) mask, so gradients reach the gate.

    After each forward, ``last_stats`` holds per-sample executed and dense MACs of this block.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 block_size: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.gate = MaskUnit(inplanes, stride, block_size)
        self.block_size = block_size
        self.last_stats = {}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask: optional bool [N, Hm, Wm] overriding the gate (benchmarks, tests)."""
        n, _, h, w = x.shape
        ho, wo = -(-h // self.conv1.stride[0]), -(-w // self.conv1.stride[1])
        identity = x if self.downsample is None else self.downsample(x)
        soft = None
        if mask is None:
            mask, soft = self.gate(x, (ho, wo))
        if self.training:
            pix = expand_block_mask(mask, self.block_size, (ho, wo)).to(x.dtype)
            branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            out = F.relu(identity + branch * pix)
            active = pix.mean((1, 2, 3))
            dilated = F.max_pool2d(pix, 3, 1, 1).mean((1, 2, 3))
        else:
            mask = mask.bool()
            pix = expand_block_mask(mask, self.block_size, (ho, wo))[:, 0]
            full = bool(pix.all())
            dil = pix if full else dilate_pixel_mask(pix, 3)
            w1, b1 = fold_bn(self.conv1, self.bn1)
            w2, b2 = fold_bn(self.conv2, self.bn2)
            hidden = masked_conv2d(x, w1, b1, None if full else dil, self.conv1.stride, 1, activation="relu")
            out = masked_conv2d(hidden, w2, b2, None if full else mask, 1, 1, block_size=self.block_size,
                                residual=identity, activation="relu")
            active = pix.sum((1, 2)) / float(ho * wo)
            dilated = dil.sum((1, 2)) / float(ho * wo)
        self.last_stats = self._stats((h, w), (ho, wo), active, dilated, soft)
        return out

    def _stats(self, in_hw, out_hw, active, dilated, soft):
        pixels = out_hw[0] * out_hw[1]
        c1 = self.conv1.in_channels * self.conv1.out_channels * 9
        c2 = self.conv2.in_channels * self.conv2.out_channels * 9
        ds = 0
        if self.downsample is not None:
            ds = sum(m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                     for m in self.downsample.modules() if isinstance(m, nn.Conv2d)) * pixels
        gate = self.gate.macs(in_hw, out_hw)
        return {
            "dense_macs": float((c1 + c2) * pixels + ds),
            "executed_macs": (dilated * c1 + active * c2) * pixels + ds + gate,  # per sample
            "conditional_dense_macs": float((c1 + c2) * pixels),
            "conditional_macs": (dilated * c1 + active * c2) * pixels,
            "density": active,
            "soft_density": soft.mean((1, 2)) if soft is not None else None,
        }

"""MobileNetV2 (torchvision layout) whose residual inverted-residual blocks are DynConv-gated."""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.blocks import DynInvertedResidual, conv_bn_act, fold_bn
from .common import enable_inplace_residual

# (expand ratio t, output channels c, repeats n, first stride s), as in the paper and torchvision.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class PlainInvertedResidual(nn.Module):
    """An ungated inverted residual (blocks without a residual: stride 2 or a channel change)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        layers = [conv_bn_act(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, oup, 1, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.macs_per_pixel = (inp * hidden if expand_ratio != 1 else 0, hidden * 9 + hidden * oup)
        self.stride = stride

    def forward(self, x):
        return folded_forward(self.conv, x) if not self.training else self.conv(x)


def folded_forward(mods: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """An eval-mode Conv-BN[-ReLU6] stack (conv_bn_act items, or a bare Conv2d followed by its BatchNorm2d) with
    each BN folded into its conv: what inference deployments do, and what the gated blocks do."""
    mods = list(mods)
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Sequential):  # conv_bn_act: conv, BN, ReLU6
            w, b = fold_bn(m[0], m[1])
            x = F.conv2d(x, w, b, m[0].stride, m[0].padding, m[0].dilation, m[0].groups).clamp_(0.0, 6.0)
            i += 1
        else:  # Conv2d then BatchNorm2d
            w, b = fold_bn(m, mods[i + 1])
            x = F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
            i += 2
    return x


class DynMobileNetV2(nn.Module):
    """MobileNetV2; `forward(x, masks)` takes one mask per gated block (10 of the 17 blocks)."""

    def __init__(self, num_classes: int = 1000, block_size: int = 1):
        super().__init__()
        feats = [conv_bn_act(3, 32, 3, 2)]
        inp = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                stride = s if i == 0 else 1
                if stride == 1 and inp == c:
                    feats.append(DynInvertedResidual(inp, c, t, block_size))
                else:
                    feats.append(PlainInvertedResidual(inp, c, stride, t))
                inp = c
        feats.append(conv_bn_act(inp, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        enable_inplace_residual(self)  # the model owns its intermediates
        self.stem_macs = 0  # MACs of everything not gated, per sample, from the last forward

    def forward(self, x: torch.Tensor, masks: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        gated = [m for m in self.features if isinstance(m, DynInvertedResidual)]
        if masks is not None and len(masks) != len(gated):
            raise ValueError(f"DynMobileNetV2: masks must have one entry per gated block ({len(gated)}), "
                             f"got {len(masks)}")
        k, ungated = 0, 0
        for m in self.features:
            if isinstance(m, DynInvertedResidual):
                x = m(x, None if masks is None else masks[k])
                k += 1
                continue
            h_in, w_in = x.shape[-2:]
            x = m(x) if self.training or isinstance(m, PlainInvertedResidual) else folded_forward([m], x)
            h, w = x.shape[-2:]
            if isinstance(m, PlainInvertedResidual):
                ungated += m.macs_per_pixel[0] * h_in * w_in + m.macs_per_pixel[1] * h * w
            else:
                conv = m[0]
                ungated += conv.in_channels // conv.groups * conv.out_channels * conv.kernel_size[0] ** 2 * h * w
        self.stem_macs = ungated
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)

    def forward_dense(self, x: torch.Tensor, fold_bn: bool = False) -> torch.Tensor:
        """The same network computed densely (gates ignored). fold_bn=False: every layer as nn.Modules (BN unfolded,
        the plain eager network); True: eval BN folded into every conv, the gated path's own arithmetic (the
        fairer dense baseline)."""
        for m in self.features:
            if isinstance(m, DynInvertedResidual):
                x = x + (folded_forward(m.conv, x) if fold_bn else m.conv(x))
            elif fold_bn:
                x = folded_forward(m.conv if isinstance(m, PlainInvertedResidual) else [m], x)
            else:
                x = m.conv(x) if isinstance(m, PlainInvertedResidual) else m(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def dynconv_mobilenetv2(num_classes: int = 1000, block_size: int = 1) -> DynMobileNetV2:
    """MobileNetV2 (width 1.0) with gated residual blocks."""
    return DynMobileNetV2(num_classes, block_size)

"""CIFAR ResNet (He et al., 3 stages of 16/32/64 channels) with DynConv-gated basic blocks."""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..nn.blocks import DynBasicBlock, dense_block_forward
from .common import enable_inplace_residual


class DynResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; every residual block is a DynBasicBlock.

    ``forward(x, masks=None)``: masks, if given, is one bool mask per block (overriding the gates), for
    benchmarks with chosen densities. After a forward, ``executed_macs(model)`` reports the MACs.
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, block_size: int = 1, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"DynResNetCifar: depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        blocks: List[DynBasicBlock] = []
        inplanes = width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                blocks.append(DynBasicBlock(inplanes, planes, stride, down, block_size))
                inplanes = planes
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(inplanes, num_classes)
        enable_inplace_residual(self)  # the model owns its intermediates
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.out_channels > 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.stem_macs = 3 * width * 9 * 32 * 32

    def forward(self, x: torch.Tensor, masks: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        if masks is not None and len(masks) != len(self.blocks):
            raise ValueError(f"DynResNetCifar: masks must have one entry per block ({len(self.blocks)}), "
                             f"got {len(masks)}")
        x = self.relu(self.bn1(self.conv1(x)))
        self.stem_macs = self.conv1.in_channels * self.conv1.out_channels * 9 * x.shape[-2] * x.shape[-1]
        for i, block in enumerate(self.blocks):
            x = block(x, None if masks is None else masks[i])
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


    def forward_dense(self, x: torch.Tensor, fold_bn: bool = False) -> torch.Tensor:
        """The same network computed densely, gates ignored (every block fully executed): the baseline.

        fold_bn=True folds eval-mode BN into the block convs (as the gated path does), the fairest dense baseline.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        for b in self.blocks:
            x = dense_block_forward(b, x, fold_bn)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def dynconv_resnet32(num_classes: int = 10, block_size: int = 1) -> DynResNetCifar:
    """CIFAR ResNet-32 with gated blocks (DynConv's CIFAR model)."""
    return DynResNetCifar(32, num_classes, block_size)

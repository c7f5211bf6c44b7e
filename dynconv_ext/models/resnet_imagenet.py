"""ImageNet-layout ResNet-50/101 (torchvision v1.5: stride on the 3x3) with DynConv-gated bottlenecks."""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.blocks import DynBottleneck, fold_bn


class DynResNet(nn.Module):
    """ResNet with gated bottleneck blocks; parameter names follow torchvision's ResNet (plus `.gate`)."""

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, block_size: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if j == 0 and (stride != 1 or inplanes != planes * 4):
                    down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * 4))
                blocks.append(DynBottleneck(inplanes, planes, stride, down, block_size))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.out_channels > 1:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.stem_macs = 0

    def _stem(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        self.stem_macs = 3 * 64 * 49 * x.shape[-2] * x.shape[-1]
        return self.maxpool(x)

    def forward(self, x: torch.Tensor, masks: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        x = self._stem(x)
        blocks = [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]
        if masks is not None and len(masks) != len(blocks):
            raise ValueError(f"DynResNet: masks must have one entry per block ({len(blocks)}), got {len(masks)}")
        for k, b in enumerate(blocks):
            x = b(x, None if masks is None else masks[k])
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_dense(self, x: torch.Tensor, fold_bn_: bool = False) -> torch.Tensor:
        """The same network computed densely, gates ignored; fold_bn_=True folds eval BN into the convs."""
        x = self._stem(x)
        for i in range(1, 5):
            for b in getattr(self, f"layer{i}"):
                identity = x if b.downsample is None else b.downsample(x)
                if fold_bn_:
                    (w1, b1), (w2, b2), (w3, b3) = (fold_bn(b.conv1, b.bn1), fold_bn(b.conv2, b.bn2),
                                                    fold_bn(b.conv3, b.bn3))
                    t = F.conv2d(x, w1, b1).relu_()
                    t = F.conv2d(t, w2, b2, b.stride, 1).relu_()
                    x = F.conv2d(t, w3, b3).add_(identity).relu_()
                else:
                    x = F.relu(b.dense_branch(x) + identity)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def dynconv_resnet50(num_classes: int = 1000, block_size: int = 1) -> DynResNet:
    """ResNet-50 (ImageNet layout) with gated bottlenecks."""
    return DynResNet((3, 4, 6, 3), num_classes, block_size)


def dynconv_resnet101(num_classes: int = 1000, block_size: int = 1) -> DynResNet:
    """ResNet-101 (ImageNet layout) with gated bottlenecks."""
    return DynResNet((3, 4, 23, 3), num_classes, block_size)

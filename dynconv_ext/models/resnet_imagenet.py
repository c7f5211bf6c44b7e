"""ImageNet-layout ResNets (torchvision's: v1.5, stride on the 3x3) with DynConv-gated blocks."""
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..nn.blocks import DynBasicBlock, DynBottleneck, dense_block_forward
from .common import enable_inplace_residual


class DynResNet(nn.Module):
    """ResNet with gated blocks (DynBasicBlock or DynBottleneck); parameter names follow torchvision's ResNet
    (plus each block's `.gate`), so torchvision weights load into it (see `dynamic_from_torchvision`)."""

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, block_size: int = 1, block=DynBottleneck):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        e = block.expansion
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if j == 0 and (stride != 1 or inplanes != planes * e):
                    down = nn.Sequential(nn.Conv2d(inplanes, planes * e, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * e))
                blocks.append(block(inplanes, planes, stride, down, block_size))
                inplanes = planes * e
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * e, num_classes)
        enable_inplace_residual(self)  # the model owns its intermediates
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

    def forward_dense(self, x: torch.Tensor, fold_bn: bool = False) -> torch.Tensor:
        """The same network computed densely, gates ignored; fold_bn=True folds eval BN into the convs."""
        x = self._stem(x)
        for i in range(1, 5):
            for b in getattr(self, f"layer{i}"):
                x = dense_block_forward(b, x, fold_bn)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def dynconv_resnet50(num_classes: int = 1000, block_size: int = 1) -> DynResNet:
    """ResNet-50 (ImageNet layout) with gated bottlenecks."""
    return DynResNet((3, 4, 6, 3), num_classes, block_size)


def dynconv_resnet101(num_classes: int = 1000, block_size: int = 1) -> DynResNet:
    """ResNet-101 (ImageNet layout) with gated bottlenecks."""
    return DynResNet((3, 4, 23, 3), num_classes, block_size)


def dynconv_resnet18(num_classes: int = 1000, block_size: int = 1) -> DynResNet:
    """ResNet-18 (ImageNet layout) with gated basic blocks."""
    return DynResNet((2, 2, 2, 2), num_classes, block_size, DynBasicBlock)


def dynconv_resnet34(num_classes: int = 1000, block_size: int = 1) -> DynResNet:
    """ResNet-34 (ImageNet layout) with gated basic blocks."""
    return DynResNet((3, 4, 6, 3), num_classes, block_size, DynBasicBlock)


def dynamic_from_torchvision(model: nn.Module, block_size: int = 1) -> DynResNet:
    """A gated copy of a torchvision ResNet (resnet18/34/50/101/152), its weights kept; gates start 'all on'.

    Raises ValueError for models it cannot convert (not a ResNet, grouped or widened bottlenecks).
    """
    needed = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
    if not all(hasattr(model, a) for a in needed):
        raise ValueError(f"dynamic_from_torchvision: expected a torchvision ResNet, got {type(model).__name__}")
    first = model.layer1[0]
    kind = type(first).__name__
    if kind == "BasicBlock":
        block = DynBasicBlock
    elif kind == "Bottleneck":
        if first.conv2.groups != 1 or first.conv1.out_channels * 4 != first.conv3.out_channels:
            raise ValueError("dynamic_from_torchvision: grouped or widened bottlenecks (ResNeXt, Wide ResNet) "
                             "are not supported")
        block = DynBottleneck
    else:
        raise ValueError(f"dynamic_from_torchvision: unsupported block type {kind}")
    layers = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    dyn = DynResNet(layers, model.fc.out_features, block_size, block)
    missing, unexpected = dyn.load_state_dict(model.state_dict(), strict=False)
    bad_missing = [k for k in missing if ".gate." not in k]
    if bad_missing or unexpected:
        raise ValueError(f"dynamic_from_torchvision: weights do not map (missing {bad_missing[:5]}, "
                         f"unexpected {list(unexpected)[:5]})")
    p = next(model.parameters())
    return dyn.to(device=p.device, dtype=p.dtype).train(model.training)

"""CIFAR ResNet (He et al., 3 stages of 16/32/64 channels) with DynConv-gated basic blocks."""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..nn.blocks import DynBasicBlock


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
        from ..nn.blocks import fold_bn as _fold
        import torch.nn.functional as F
        x = self.relu(self.bn1(self.conv1(x)))
        for b in self.blocks:
            identity = x if b.downsample is None else b.downsample(x)
            if fold_bn:
                w1, b1 = _fold(b.conv1, b.bn1)
                w2, b2 = _fold(b.conv2, b.bn2)
                out = F.conv2d(x, w1, b1, b.conv1.stride, 1).relu_()
                x = F.conv2d(out, w2, b2, 1, 1).add_(identity).relu_()
            else:
                out = self.relu(b.bn1(b.conv1(x)))
                x = self.relu(b.bn2(b.conv2(out)) + identity)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def dynconv_resnet32(num_classes: int = 10, block_size: int = 1) -> DynResNetCifar:
    """CIFAR ResNet-32 with gated blocks (DynConv's CIFAR model)."""
    return DynResNetCifar(32, num_classes, block_size)


def executed_macs(model: nn.Module) -> dict:
    """Per-sample MACs of the last forward: {'executed': [N] tensor, 'dense': float, 'per_block': [...]}.

    Counts convolutions (stem, blocks, downsample shortcuts, gates) and the classifier; each gated conv
    counts at the pixels it computed (conv1 of a block at the dilated mask).
    """
    blocks = [m for m in model.modules() if isinstance(m, DynBasicBlock)]
    fc = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    stem = getattr(model, "stem_macs", 0)
    executed = stem + fc + sum(b.last_stats["executed_macs"] for b in blocks)
    dense = stem + fc + sum(b.last_stats["dense_macs"] for b in blocks)
    return {"executed": executed, "dense": dense, "per_block": [b.last_stats for b in blocks]}


def set_block_masks(model: DynResNetCifar, x: torch.Tensor, density: float, block_size: int = 4,
                    coherent: bool = True, generator=None) -> List[torch.Tensor]:
    """Random masks of a given density for every block of a model at input x (benchmarks, tests).

    coherent=True draws spatially coherent masks (smoothed noise thresholded at the density's quantile),
    like the masks DynConv learns; False draws independent cells.
    """
    masks = []
    h, w = x.shape[-2:]
    for block in model.blocks:
        s = block.conv1.stride[0]
        h, w = -(-h // s), -(-w // s)
        b = block.block_size
        hm, wm = -(-h // b), -(-w // b)
        noise = torch.rand(x.shape[0], 1, hm, wm, generator=generator)
        if coherent and min(hm, wm) >= 4:
            noise = nn.functional.avg_pool2d(noise, 3, 1, 1, count_include_pad=False)
            noise = nn.functional.avg_pool2d(noise, 3, 1, 1, count_include_pad=False)
        flat = noise.flatten(1)
        k = max(0, min(flat.shape[1], round(density * flat.shape[1])))
        thresh = flat.sort(1, descending=True).values[:, max(k - 1, 0)].reshape(-1, 1, 1, 1)
        m = (noise >= thresh)[:, 0] if k > 0 else torch.zeros(x.shape[0], hm, wm, dtype=torch.bool)
        masks.append(m)
    return masks

"""Helpers shared by the dynamic models: executed-MAC accounting and benchmark masks."""
from typing import List, Optional

import torch
import torch.nn as nn

from ..nn.blocks import GatedBlock


def gated_blocks(model: nn.Module) -> List[GatedBlock]:
    """The gated blocks of a model, in order."""
    return [m for m in model.modules() if isinstance(m, GatedBlock)]


def enable_inplace_residual(model: nn.Module) -> None:
    """Let every gated block of `model` update its identity tensor in place in eval. Only for containers that
    own their intermediates (nothing reads a block's input after the block), as the models here do."""
    for m in gated_blocks(model):
        m.inplace_residual = True


def executed_macs(model: nn.Module) -> dict:
    """Per-sample MACs of the last forward: {'executed': [N] tensor, 'dense': float, 'per_block': [...]}.

    Counts the stem (`model.stem_macs`), every gated block (its convs at the pixels they computed, the
    dense shortcut, the gate) and the linear classifier.
    """
    blocks = gated_blocks(model)
    fc = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    stem = getattr(model, "stem_macs", 0)
    executed = stem + fc + sum(b.last_stats["executed_macs"] for b in blocks)
    dense = stem + fc + sum(b.last_stats["dense_macs"] for b in blocks)
    return {"executed": executed, "dense": dense, "per_block": [b.last_stats for b in blocks]}


def block_masks(model: nn.Module, x: torch.Tensor, density: float, coherent: bool = True,
                generator=None) -> List[torch.Tensor]:
    """Random masks of a given density for every gated block of `model` at input `x` (benchmarks, tests).

    The blocks' resolutions come from one probe forward of a single sample. coherent=True draws spatially
    coherent masks (smoothed noise thresholded at the density's quantile), like the masks DynConv learns;
    False draws independent cells.
    """
    blocks = gated_blocks(model)
    sizes = {}
    hooks = [b.register_forward_pre_hook(lambda m, args, i=i: sizes.__setitem__(i, tuple(args[0].shape[-2:])))
             for i, b in enumerate(blocks)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    masks = []
    batch = x.shape[0]
    for i, block in enumerate(blocks):
        h, w = sizes[i]
        s = block.stride
        h, w = (h - 1) // s + 1, (w - 1) // s + 1
        b = block.block_size
        hm, wm = -(-h // b), -(-w // b)
        noise = torch.rand(batch, 1, hm, wm, generator=generator)
        if coherent and min(hm, wm) >= 4:
            noise = nn.functional.avg_pool2d(noise, 3, 1, 1, count_include_pad=False)
            noise = nn.functional.avg_pool2d(noise, 3, 1, 1, count_include_pad=False)
        flat = noise.flatten(1)
        k = max(0, min(flat.shape[1], round(density * flat.shape[1])))
        if k == 0:
            masks.append(torch.zeros(batch, hm, wm, dtype=torch.bool))
            continue
        thresh = flat.sort(1, descending=True).values[:, k - 1].reshape(-1, 1, 1, 1)
        masks.append((noise >= thresh)[:, 0])
    return masks


def mean_density(model: nn.Module) -> float:
    """The last forward's active density, averaged over the gated blocks and the samples."""
    dens = [float(b.last_stats["density"].mean()) for b in gated_blocks(model)]
    return sum(dens) / len(dens)


def randomize_gates(model: nn.Module, std: float = 1.0, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Gives every gate of `model` zero bias and N(0, std) weights (from `generator`, else torch's global RNG), in
    place, and returns the model.

    Untrained gates start fully executed (bias 3: every conv dense), which times nothing of the masked path; random
    ones give partial, spatially noisy pixel masks (about half the pixels at std 1): the benchmarks' stand-in for a
    trained model, and a pessimistic one (noisy masks dilate to nearly every pixel)."""
    from ..nn.gates import MaskUnit
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, MaskUnit):
                mod.conv.weight.normal_(0.0, std, generator=generator)
                mod.conv.bias.zero_()
    return model

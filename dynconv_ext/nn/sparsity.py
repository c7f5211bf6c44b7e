"""DynConv's sparsity criterion: reach a budget of conditional MACs, with per-block bounds early on."""
import math

import torch
import torch.nn as nn


class SparsityCriterion(nn.Module):
    """loss = weight * [(network conditional MAC fraction - budget)^2 + mean of per-block bound violations^2].

    Following DynConv, each block's own fraction must lie in [lower, upper], bounds that start tight at
    the budget and open to [0, 1] over the first `anneal_fraction` of training (cos^2 schedule), so no block
    collapses to 0 or stays at 1 early. Conditional MACs count the gated convs (conv1 at its dilated mask).

    Call with the per-block stats of the last forward (``executed_macs(model)['per_block']``) and the
    training progress in [0, 1].
    """

    def __init__(self, budget: float, anneal_fraction: float = 1 / 3, weight: float = 10.0):
        super().__init__()
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"SparsityCriterion: budget must be in (0, 1], got {budget}")
        self.budget, self.anneal_fraction, self.weight = budget, anneal_fraction, weight

    def bounds(self, progress: float):
        p = min(1.0, max(0.0, progress / self.anneal_fraction)) if self.anneal_fraction > 0 else 1.0
        tight = math.cos(p * math.pi / 2) ** 2  # 1 -> 0
        return tight * self.budget, 1.0 - tight * (1.0 - self.budget)

    def forward(self, per_block, progress: float) -> torch.Tensor:
        cond = torch.stack([s["conditional_macs"] for s in per_block]).sum(0)
        dense = sum(s["conditional_dense_macs"] for s in per_block)
        loss = ((cond / dense).mean() - self.budget) ** 2
        lo, hi = self.bounds(progress)
        block_loss = 0.0
        for s in per_block:
            f = (s["conditional_macs"] / s["conditional_dense_macs"]).mean()
            block_loss = block_loss + torch.relu(lo - f) ** 2 + torch.relu(f - hi) ** 2
        return self.weight * (loss + block_loss / len(per_block))

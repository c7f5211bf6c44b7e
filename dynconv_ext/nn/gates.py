"""Spatial gates (DynConv's mask units): where a residual block computes."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class MaskUnit(nn.Module):
    """Predicts a spatial execution mask for a block from the block's input.

    The input is average-pooled to the mask's resolution (one cell per ``block_size x block_size`` output
    pixels of a block with stride ``stride``), and a 1x1 conv gives one logit per cell.

    * training: straight-through Gumbel-sigmoid with temperature ``tau`` -- the forward value is a hard 0/1
      mask, the gradient that of the soft sigmoid;
    * eval: ``logits > 0``, a bool mask ``[N, Hm, Wm]``.

    ``forward`` returns ``(mask, soft)``: soft is the sigmoid probability (for the sparsity loss).
    """

    def __init__(self, in_channels: int, stride: int = 1, block_size: int = 1, tau: float = 1.0):
        super().__init__()
        self.stride, self.block_size, self.tau = stride, block_size, tau
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1, bias=True)
        nn.init.zeros_(self.conv.weight)
        nn.init.constant_(self.conv.bias, 3.0)  # start (almost) fully executed, as DynConv does

    def logits(self, x: torch.Tensor, out_hw) -> torch.Tensor:
        hm, wm = -(-out_hw[0] // self.block_size), -(-out_hw[1] // self.block_size)
        # (at the input's own size the pooling is the identity: skip its pass)
        pooled = x if tuple(x.shape[-2:]) == (hm, wm) else F.adaptive_avg_pool2d(x, (hm, wm))
        return self.conv(pooled)[:, 0]

    def forward(self, x: torch.Tensor, out_hw):
        logits = self.logits(x, out_hw)
        soft = torch.sigmoid(logits)
        if not self.training:
            return logits > 0, soft
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        gumbel = torch.log(u) - torch.log1p(-u)  # difference of two Gumbels = logistic noise
        relaxed = torch.sigmoid((logits + gumbel) / self.tau)
        hard = (relaxed > 0.5).to(relaxed.dtype)
        return hard - relaxed.detach() + relaxed, soft

    def extra_repr(self) -> str:
        return f"stride={self.stride}, block_size={self.block_size}, tau={self.tau}"

    def macs(self, in_hw, out_hw) -> int:
        """MACs per sample: the pooling adds (one per input element) and the 1x1 conv."""
        hm, wm = -(-out_hw[0] // self.block_size), -(-out_hw[1] // self.block_size)
        return self.conv.in_channels * (in_hw[0] * in_hw[1] + hm * wm)

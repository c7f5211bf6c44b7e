"""SparseConv2d: a drop-in nn.Conv2d that computes only the output pixels a mask selects."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import BACKENDS, masked_conv2d


class SparseConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an optional spatial mask.

    Same constructor, parameters, ``state_dict`` keys and ``repr`` as ``nn.Conv2d`` (it is a subclass),
    so ``load_state_dict`` from a dense conv works unchanged.

    ``forward(input)`` is exactly ``nn.Conv2d.forward``. ``forward(input, mask)`` computes only the output
    pixels where ``mask`` is True (pixel mask ``[N, (1,) Ho, Wo]`` or block mask
    ``[N, (1,) ceil(Ho/b), ceil(Wo/b)]``) and returns 0 elsewhere; ``residual=r`` adds the result onto
    ``r`` instead. See :func:`dynconv_ext.ops.masked_conv2d`.

    Args (beyond ``nn.Conv2d``'s):
        backend: ``"auto"`` (default), ``"cpp"``, ``"dense"`` or ``"reference"``.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"SparseConv2d: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, backend: str = "auto") -> "SparseConv2d":
        """A SparseConv2d with the configuration and a copy of the weights of ``conv``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense: conv must be an nn.Conv2d, got {type(conv).__name__}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                  backend=backend)
        new.load_state_dict(conv.state_dict())
        new.train(conv.training)
        return new

    def _explicit_padding(self):
        """Padding as ints; 'same' / 'valid' resolved the way nn.Conv2d does."""
        if self.padding == "valid":
            return (0, 0), (0, 0, 0, 0)
        if self.padding == "same":
            # nn.Conv2d puts the odd extra pixel of 'same' padding on the bottom/right.
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            left = [t // 2 for t in total]
            extra = [t - 2 * lo for t, lo in zip(total, left)]
            return tuple(left), (0, extra[1], 0, extra[0])
        return tuple(self.padding), (0, 0, 0, 0)

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                residual: Optional[torch.Tensor] = None, block_size: Optional[int] = None) -> torch.Tensor:
        if mask is None and residual is None:
            return super().forward(input)
        padding, extra = self._explicit_padding()
        if self.padding_mode != "zeros":
            # Non-zero padding modes pad explicitly (cheap and dense), then convolve without padding.
            pad = (padding[1], padding[1], padding[0], padding[0])
            input = F.pad(input, pad, mode=self.padding_mode)
            padding = (0, 0)
        elif any(extra):
            input = F.pad(input, extra)
        return masked_conv2d(input, self.weight, self.bias, mask, self.stride, padding, self.dilation, self.groups,
                             block_size=block_size, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else s + f", backend={self.backend!r}"

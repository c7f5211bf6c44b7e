"""dilate_mask: the input pixels a kernel x kernel conv (stride 1, 'same' padding) reads for its outputs at a mask.

    dilate_mask(mask, kernel, dilation=1)

returns the bool ``[N, H, W]`` mask OR-ed with its shifts by multiples of ``dilation`` up to ``dilation *
(kernel // 2)`` in both directions (a boolean max-filter): where a DynConv block's first conv must compute so its
second is right at ``mask``. On CPU the C++ op ``dynconv::dilate_mask`` (one pass, ~1-2 us at batch 1 on 32x32);
elsewhere, under torch.compile or without the extension, shifted copies OR-ed together in PyTorch.
"""
import torch

from .. import _extension


def _dilate_torch(mask: torch.Tensor, kernel: int, dilation: int) -> torch.Tensor:
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


def dilate_mask(mask: torch.Tensor, kernel: int, dilation: int = 1) -> torch.Tensor:
    """See the module docstring. ``mask``: bool ``[N, H, W]``; ``kernel``: odd, >= 1; ``dilation`` >= 1."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(f"dilate_mask: mask must be a bool tensor [N, H, W], got "
                         f"{(mask.dtype, tuple(mask.shape)) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"dilate_mask: kernel must be an odd int >= 1, got {kernel!r}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilate_mask: dilation must be an int >= 1, got {dilation!r}")
    if kernel == 1:
        return mask
    if mask.device.type == "cpu" and _extension.load_error() is None and not torch.compiler.is_compiling():
        return torch.ops.dynconv.dilate_mask(mask, kernel, dilation)
    return _dilate_torch(mask, kernel, dilation)


if _extension.load_error() is None:
    @torch.library.register_fake("dynconv::dilate_mask")
    def _dilate_mask_fake(mask, kernel, dilation):
        return torch.empty_like(mask, memory_format=torch.contiguous_format)

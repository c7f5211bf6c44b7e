"""Multiply-accumulate counts of (masked) convolutions."""


def conv2d_macs(weight_shape, output_pixels: int) -> int:
    """MACs of a convolution computed at `output_pixels` output positions (summed over the batch).

    Each output element costs C_in/groups * kH * kW MACs, and each output pixel has C_out elements.
    For a dense conv, output_pixels = N * Ho * Wo; for a masked conv, the number of active pixels.
    """
    c_out, c_per_group, kh, kw = weight_shape
    return int(output_pixels) * c_out * c_per_group * kh * kw


class LayerMacs:
    """Counts, while active (``with LayerMacs(module) as m: ...``), the MACs of every ``nn.Conv2d`` and ``nn.Linear``
    forward inside ``module``, summed over the batch, in ``m.total``."""

    def __init__(self, module):
        self.module = module
        self.total = 0
        self._hooks = []

    def _hook(self, m, inp, out):
        from torch import nn
        if isinstance(m, nn.Conv2d):
            self.total += conv2d_macs(m.weight.shape, out.numel() // m.out_channels)
        else:
            self.total += out.numel() * m.in_features

    def __enter__(self):
        from torch import nn
        self._hooks = [m.register_forward_hook(self._hook) for m in self.module.modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear))]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return False

"""Multiply-accumulate counts of (masked) convolutions."""


def conv2d_macs(weight_shape, output_pixels: int) -> int:
    """MACs of a convolution computed at `output_pixels` output positions (summed over the batch).

    Each output element costs C_in/groups * kH * kW MACs, and each output pixel has C_out elements.
    For a dense conv, output_pixels = N * Ho * Wo; for a masked conv, the number of active pixels.
    """
    c_out, c_per_group, kh, kw = weight_shape
    return int(output_pixels) * c_out * c_per_group * kh * kw

"""Documented functionals over the dynconv:: operators."""
from .conv2d_into import conv2d_into, mark_constant_weight
from .masked_conv2d import ACTIVATIONS, BACKENDS, active_rows, dense_crossover, masked_conv2d, resolve_block_size

from .resize_into import resize_into
from .dilate_mask import dilate_mask

__all__ = ["masked_conv2d", "conv2d_into", "resize_into", "active_rows", "resolve_block_size", "dense_crossover", "BACKENDS", "ACTIVATIONS",
           "mark_constant_weight", "dilate_mask"]

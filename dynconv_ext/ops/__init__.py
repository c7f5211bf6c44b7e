"""Documented functionals over the dynconv:: operators."""
from .masked_conv2d import BACKENDS, dense_crossover, masked_conv2d, resolve_block_size

__all__ = ["masked_conv2d", "resolve_block_size", "dense_crossover", "BACKENDS"]

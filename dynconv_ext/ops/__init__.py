"""Documented functionals over the dynconv:: operators."""
from .masked_conv2d import ACTIVATIONS, BACKENDS, active_rows, dense_crossover, masked_conv2d, resolve_block_size

__all__ = ["masked_conv2d", "active_rows", "resolve_block_size", "dense_crossover", "BACKENDS", "ACTIVATIONS"]

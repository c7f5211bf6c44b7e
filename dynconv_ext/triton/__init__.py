"""Triton kernels (NVIDIA GPUs; checked on CPU with TRITON_INTERPRET=1 set before triton is imported)."""
from .masked_conv2d import TRITON_AVAILABLE

__all__ = ["TRITON_AVAILABLE"]

"""nn modules that call dynconv_ext.ops."""
from .sparse_conv import SparseConv2d

__all__ = ["SparseConv2d"]

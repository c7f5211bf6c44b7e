"""nn modules that call dynconv_ext.ops."""
from .blocks import DynBasicBlock, dilate_pixel_mask, fold_bn
from .gates import MaskUnit
from .sparse_conv import SparseConv2d
from .sparsity import SparsityCriterion

__all__ = ["SparseConv2d", "MaskUnit", "DynBasicBlock", "SparsityCriterion", "fold_bn", "dilate_pixel_mask"]

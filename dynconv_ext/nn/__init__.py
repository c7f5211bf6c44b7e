"""nn modules that call dynconv_ext.ops."""
from .blocks import DynBasicBlock, dilate_pixel_mask, fold_bn
from .gates import MaskUnit
from .sparse_conv import SparseConv2d
from .sparsity import SparsityCriterion



def dynamic_from_torchvision(model, block_size: int = 1):
    """A gated copy of a torchvision ResNet, weights kept (see dynconv_ext.models.dynamic_from_torchvision)."""
    from ..models import dynamic_from_torchvision as convert
    return convert(model, block_size)


__all__ = ["dynamic_from_torchvision", "SparseConv2d", "MaskUnit", "DynBasicBlock", "SparsityCriterion", "fold_bn", "dilate_pixel_mask"]

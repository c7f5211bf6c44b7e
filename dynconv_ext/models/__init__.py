"""Dynamic models built on dynconv_ext.nn blocks."""
from .resnet_cifar import DynResNetCifar, dynconv_resnet32, executed_macs, set_block_masks

__all__ = ["DynResNetCifar", "dynconv_resnet32", "executed_macs", "set_block_masks"]

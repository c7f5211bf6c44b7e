"""Dynamic models built on dynconv_ext.nn blocks."""
from .common import block_masks, executed_macs, gated_blocks, mean_density, randomize_gates
from .mobilenetv2 import DynMobileNetV2, dynconv_mobilenetv2
from .msdnet import MSDNet, msdnet_cifar, msdnet_cifar_budgeted, msdnet_imagenet
from .ranet import RANet, ranet_cifar, ranet_imagenet
from .resnet_cifar import DynResNetCifar, dynconv_resnet32
from .resnet_imagenet import (DynResNet, dynamic_from_torchvision, dynconv_resnet18, dynconv_resnet34,
                              dynconv_resnet50, dynconv_resnet101)

__all__ = ["DynResNetCifar", "dynconv_resnet32", "DynResNet", "dynconv_resnet18", "dynconv_resnet34",
           "dynconv_resnet50", "dynconv_resnet101", "DynMobileNetV2", "dynconv_mobilenetv2",
           "dynamic_from_torchvision", "executed_macs", "block_masks", "gated_blocks", "mean_density", "randomize_gates"]
__all__ += ["MSDNet", "msdnet_cifar", "msdnet_cifar_budgeted", "msdnet_imagenet"]
__all__ += ["RANet", "ranet_cifar", "ranet_imagenet"]

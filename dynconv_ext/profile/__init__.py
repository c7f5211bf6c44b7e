"""Counting MACs and timing ops the way benchmarks/ and `python -m dynconv_ext bench` report them."""
from .macs import LayerMacs, conv2d_macs
from .timing import interleaved_medians, machine_description

__all__ = ["conv2d_macs", "LayerMacs", "interleaved_medians", "machine_description"]

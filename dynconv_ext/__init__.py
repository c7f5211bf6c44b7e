"""dynconv_ext: real wall-clock speedups for dynamic-inference CNNs (masked convolution kernels)."""
from . import _extension
from . import ops, reference
from . import nn  # noqa: E402  (after ops: modules call the functionals)
from . import models  # noqa: E402
from . import inference  # noqa: E402
from ._extension import build_info

import torch as _torch

if _torch.cuda.is_available():  # register the Triton op up front so torch.compile finds it
    try:
        from .triton import ops as _triton_ops  # noqa: F401
    except ImportError:
        pass

__version__ = "0.1.0"
__all__ = ["ops", "nn", "models", "inference", "reference", "build_info", "__version__"]

"""Bad input raises a clear error that names the argument; nothing crashes the process."""
import pytest
import torch

from dynconv_ext.nn import SparseConv2d
from dynconv_ext.ops import masked_conv2d

X = torch.randn(2, 4, 8, 8)
W = torch.randn(6, 4, 3, 3)
M = torch.rand(2, 8, 8) < 0.5


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(input=torch.randn(4, 8, 8)), ValueError, "input must be a 4-D"),
    (dict(weight=torch.randn(6, 4, 3)), ValueError, "weight must be a 4-D"),
    (dict(weight=torch.randn(6, 5, 3, 3)), ValueError, "input has 4 channels but weight expects 5"),
    (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(input=torch.randint(0, 3, (2, 4, 8, 8))), TypeError, "input must be a floating-point"),
    (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias dtype"),
    (dict(mask=torch.rand(2, 7, 8) < 0.5), ValueError, "fits no block size"),
    (dict(mask=torch.rand(3, 8, 8) < 0.5), ValueError, "mask batch"),
    (dict(mask=torch.rand(2, 8, 8)), TypeError, "mask must be a bool"),
    (dict(mask=torch.rand(2, 2, 8, 8) < 0.5), ValueError, "4-D mask must be"),
    (dict(mask=torch.rand(2, 8) < 0.5), ValueError, "mask must be"),
    (dict(mask=[[True]]), TypeError, "mask must be a bool tensor"),
    (dict(groups=3), ValueError, "groups=3 does not divide the input channels"),
    (dict(groups=0), ValueError, "groups must be a positive int"),
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(dilation=(1, 0)), ValueError, "dilation must be >= 1"),
    (dict(stride="two"), TypeError, "stride must be an int or a pair"),
    (dict(padding="same"), ValueError, "padding must be ints"),
    (dict(weight=torch.randn(6, 4, 11, 11)), ValueError, "too small for the kernel"),
    (dict(residual=torch.randn(2, 6, 7, 8)), ValueError, "residual must have the output's shape"),
    (dict(residual=torch.randn(2, 6, 8, 8, dtype=torch.float64)), TypeError, "residual dtype"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(block_size=3), ValueError, "block_size=3"),
    (dict(block_size=0), ValueError, "block_size must be a positive int"),
])
def test_functional_errors(kwargs, exc, match):
    args = dict(input=X, weight=W, bias=None, mask=M, stride=1, padding=1, dilation=1, groups=1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        masked_conv2d(**args)


def test_groups_must_divide_output_channels():
    with pytest.raises(ValueError, match="does not divide the output channels"):
        masked_conv2d(torch.randn(1, 4, 8, 8), torch.randn(5, 2, 3, 3), None, M[:1], 1, 1, groups=2)


def test_cpu_kernel_rejects_half():
    x, w = X.half(), W.half()
    with pytest.raises(TypeError, match="float32 and float64"):
        masked_conv2d(x, w, None, M, 1, 1, backend="cpp")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to place a tensor on another device")
def test_mask_on_other_device():
    with pytest.raises(ValueError, match="mask is on"):
        masked_conv2d(X, W, None, M.cuda(), 1, 1)


def test_op_level_checks_name_the_argument():
    """Calling the raw operator with a bad mask raises a RuntimeError (not a crash)."""
    with pytest.raises(RuntimeError, match="mask must have shape"):
        torch.ops.dynconv.masked_conv2d(X, W, None, M[:, :7], [1, 1], [1, 1], [1, 1], 1, 1, None, 0, 2.0)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.dynconv.masked_conv2d(X, W, None, M.float(), [1, 1], [1, 1], [1, 1], 1, 1, None, 0, 2.0)
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.dynconv.masked_conv2d(X, W, None, M, [1, 1], [1, 1], [1, 1], 3, 1, None, 0, 2.0)


def test_module_errors():
    conv = SparseConv2d(4, 6, 3, padding=1)
    with pytest.raises(ValueError, match="input has 3 channels"):
        conv(torch.randn(2, 3, 8, 8), M)
    with pytest.raises(ValueError, match="mask batch"):
        conv(X, M[:1])


def test_all_false_mask_is_fast_path_zeros():
    y = masked_conv2d(X, W, torch.randn(6), torch.zeros(2, 8, 8, dtype=torch.bool), 1, 1)
    assert (y == 0).all()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_reject_cpu_tensors(backend):
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        masked_conv2d(X, W, None, M, 1, 1, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpp_backend_rejects_cuda_tensors():
    with pytest.raises(ValueError, match="CPU kernel"):
        masked_conv2d(X.cuda(), W.cuda(), None, M.cuda(), 1, 1, backend="cpp")

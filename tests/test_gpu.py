"""CUDA-device checks of the GPU backends (skipped, visibly, without a GPU)."""
import pytest
import torch

from dynconv_ext.ops import masked_conv2d
from dynconv_ext.reference import masked_conv2d_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-2), (torch.float16, 5e-2), (torch.bfloat16, 2e-1)])
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("channels_last", [True, False])
def test_triton_forward_matches_reference(dtype, tol, block, channels_last):
    x = torch.randn(4, 64, 28, 28, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=dtype) * 0.05
    b = torch.randn(64, device="cuda", dtype=dtype)
    m = torch.rand(4, 28 // block, 28 // block, device="cuda") < 0.3
    y = masked_conv2d(x, w, b, m, 1, 1, backend="triton")
    ref = masked_conv2d_reference(x.float(), w.float(), b.float(), m, 1, 1, 1, 1, block)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)


def test_triton_backward_matches_reference():
    x = torch.randn(2, 16, 12, 12, device="cuda", requires_grad=True)
    w = torch.randn(32, 16, 3, 3, device="cuda", requires_grad=True)
    m = torch.rand(2, 12, 12, device="cuda") < 0.5
    g = torch.randn(2, 32, 12, 12, device="cuda")
    got = torch.autograd.grad(masked_conv2d(x, w, None, m, 1, 1, backend="triton"), (x, w), g)
    ref = torch.autograd.grad(masked_conv2d_reference(x, w, None, m, 1, 1), (x, w), g)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-2, atol=1e-2)


def test_triton_op_opcheck():
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda")
    pm = torch.rand(2, 9, 9, device="cuda") < 0.5
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_triton.default,
                          (x, w, None, pm, [1, 1], [1, 1], [1, 1], 1, None))


def test_auto_on_cuda_is_correct():
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda")
    m = torch.rand(2, 9, 9, device="cuda") < 0.5
    torch.testing.assert_close(masked_conv2d(x, w, None, m, 1, 1), masked_conv2d_reference(x, w, None, m, 1, 1))

"""torch.compile(fullgraph=True) traces the ops (fake kernels + registered autograd)."""
import pytest
import torch

from dynconv_ext.nn import SparseConv2d
from dynconv_ext.ops import masked_conv2d
from dynconv_ext.reference import masked_conv2d_reference

pytestmark = pytest.mark.slow


def test_compile_module_forward_and_backward():
    torch._dynamo.reset()
    conv = SparseConv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 10, 10, requires_grad=True)
    m = torch.rand(2, 10, 10) < 0.5

    def step(x, m):
        return conv(x, m).relu().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, m)
    loss.backward()
    g_compiled = x.grad.clone()
    x.grad = None
    step(x, m).backward()
    torch.testing.assert_close(loss, step(x, m))
    torch.testing.assert_close(g_compiled, x.grad)


def test_compile_inductor_functional_with_residual():
    torch._dynamo.reset()
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    w, r = torch.randn(6, 3, 3, 3), torch.randn(1, 6, 8, 8)
    m = torch.rand(1, 4, 4) < 0.5

    @torch.compile(fullgraph=True)
    def f(x, w, r, m):
        return masked_conv2d(x, w, None, m, 1, 1, residual=r).sigmoid()

    torch.testing.assert_close(f(x, w, r, m), masked_conv2d_reference(x, w, None, m, 1, 1, 1, 1, 2, r).sigmoid(),
                               rtol=1e-4, atol=1e-4)

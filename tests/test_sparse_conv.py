"""SparseConv2d is a drop-in nn.Conv2d."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv_ext.nn import SparseConv2d
from dynconv_ext.reference import masked_conv2d_reference


def test_same_constructor_state_dict_and_repr():
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
    torch.manual_seed(0)
    sparse = SparseConv2d(8, 16, 3, stride=2, padding=1, bias=False)
    assert isinstance(sparse, nn.Conv2d)
    assert list(sparse.state_dict()) == list(dense.state_dict())
    assert torch.equal(sparse.weight, dense.weight)  # same reset_parameters
    assert repr(sparse) == repr(dense).replace("Conv2d", "SparseConv2d")
    sparse.load_state_dict(dense.state_dict())


def test_no_mask_is_exactly_nn_conv2d():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(2, 4, 9, 9)
    assert torch.equal(sparse(x), conv(x))


def test_from_dense_keeps_weights_and_config():
    conv = nn.Conv2d(6, 12, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=3, bias=True)
    sparse = SparseConv2d.from_dense(conv)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(sparse, attr) == getattr(conv, attr)
    assert torch.equal(sparse.weight, conv.weight) and torch.equal(sparse.bias, conv.bias)
    assert sparse.weight.data_ptr() != conv.weight.data_ptr()  # a copy, not shared storage
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(3, 3))


@pytest.mark.parametrize("block", [1, 2])
def test_masked_forward_matches_reference(block):
    conv = SparseConv2d(5, 7, 3, stride=1, padding=1)
    x = torch.randn(2, 5, 10, 10)
    m = torch.rand(2, 10 // block, 10 // block) < 0.5
    y = conv(x, m)
    ref = masked_conv2d_reference(x, conv.weight, conv.bias, m, 1, 1, 1, 1, block)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_residual_forward():
    conv = SparseConv2d(4, 4, 3, padding=1)
    x, r = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    m = torch.rand(1, 6, 6) < 0.5
    torch.testing.assert_close(conv(x, m, residual=r),
                               masked_conv2d_reference(x, conv.weight, conv.bias, m, 1, 1, residual=r),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding,padding_mode,kernel,dilation", [
    ("same", "zeros", 3, 1), ("same", "zeros", 4, 1), ("same", "zeros", 3, 2), ("valid", "zeros", 3, 1),
    (1, "reflect", 3, 1), (2, "replicate", 5, 1), (1, "circular", 3, 1),
])
def test_padding_variants_match_nn_conv2d(padding, padding_mode, kernel, dilation):
    conv = nn.Conv2d(3, 5, kernel, padding=padding, padding_mode=padding_mode, dilation=dilation)
    sparse = SparseConv2d.from_dense(conv)
    x = torch.randn(2, 3, 9, 9)
    dense = conv(x)
    m = torch.ones(2, *dense.shape[-2:], dtype=torch.bool)
    m[:, ::2] = False
    torch.testing.assert_close(sparse(x, m), dense * m[:, None], rtol=1e-4, atol=1e-4)


def test_backward_through_module():
    conv = SparseConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    m = torch.rand(2, 8, 8) < 0.5
    conv(x, m).square().sum().backward()
    ref = nn.Conv2d(4, 6, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    x2 = x.detach().clone().requires_grad_()
    (ref(x2) * m[:, None]).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-3)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        SparseConv2d(3, 3, 3, backend="gpu-magic")


def test_swap_into_sequential_with_state_dict():
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    sparse = nn.Sequential(SparseConv2d(3, 8, 3, padding=1), nn.ReLU(), SparseConv2d(8, 8, 3, padding=1))
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(sparse(x), dense(x))


def test_torchvision_style_swap():
    """Swapping every nn.Conv2d of a model for SparseConv2d.from_dense keeps its outputs."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(2, 3, 10, 10)
    before = model(x)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(model, name, SparseConv2d.from_dense(child))
    torch.testing.assert_close(model(x), before)
    assert F.conv2d is not None

"""dilate_mask: the C++ op equals the PyTorch formulation and a max-pool oracle; opcheck; bad input."""
import pytest
import torch
import torch.nn.functional as F

from dynconv_ext import _extension
from dynconv_ext.ops import dilate_mask
from dynconv_ext.ops.dilate_mask import _dilate_torch

needs_ext = pytest.mark.skipif(_extension.load_error() is not None, reason="extension not built")


def _oracle(mask, kernel, dilation):
    """Max-pool of the float mask with a dilated kernel ('same' padding)."""
    r = dilation * (kernel // 2)
    padded = F.pad(mask[:, None].float(), (r, r, r, r))  # zeros: outside pixels are inactive
    return F.max_pool2d(padded, kernel, 1, 0, dilation)[:, 0] > 0


@needs_ext
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 7, 9), (2, 1, 5), (2, 5, 1), (1, 2, 2), (20, 14, 14)])
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (5, 1), (3, 2), (7, 3), (5, 4)])
@pytest.mark.parametrize("density", [0.05, 0.5])
def test_op_matches_oracle(shape, kernel, dilation, density):
    torch.manual_seed(hash((shape, kernel, dilation)) % 1000)
    m = torch.rand(*shape) < density
    got = torch.ops.dynconv.dilate_mask(m, kernel, dilation)
    assert got.dtype == torch.bool and got.shape == m.shape
    assert torch.equal(got, _oracle(m, kernel, dilation))
    assert torch.equal(_dilate_torch(m, kernel, dilation), got)
    assert torch.equal(dilate_mask(m, kernel, dilation), got)


@needs_ext
def test_non_contiguous_and_edges():
    m = torch.zeros(2, 9, 8, dtype=torch.bool)
    m[0, 0, 0] = m[1, 8, 7] = True
    t = m.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    got = dilate_mask(t, 3)
    assert torch.equal(got, _oracle(m, 3, 1))
    assert got[0, :2, :2].all() and got[0].sum() == 4 and got[1].sum() == 4


@needs_ext
def test_opcheck():
    m = torch.rand(2, 6, 7) < 0.3
    torch.library.opcheck(torch.ops.dynconv.dilate_mask.default, (m, 3, 1))


def test_kernel_one_is_identity():
    m = torch.rand(1, 4, 4) < 0.5
    assert dilate_mask(m, 1) is m


@pytest.mark.parametrize("args,match", [((torch.zeros(2, 3, 3), 3), "bool"), ((torch.zeros(3, 3, dtype=torch.bool), 3), r"\[N, H, W\]"),
                                        ((torch.zeros(1, 3, 3, dtype=torch.bool), 2), "odd"),
                                        ((torch.zeros(1, 3, 3, dtype=torch.bool), 3, 0), "dilation")])
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        dilate_mask(*args)

"""The CPU kernels' packed-weight cache (csrc/cpu/packed_weights.h): weights marked constant keep their packed layout
across calls, an in-place change (version counter) repacks, unmarked weights are repacked on every call (so even a
change the version counter misses, through ``.data``, is seen), and entries go with their weights."""
import gc

import pytest
import torch
import torch.nn.functional as F

from dynconv_ext.ops import masked_conv2d
from dynconv_ext.ops.conv2d_into import conv2d_into, mark_constant_weight


def stats():
    return tuple(torch.ops.dynconv.packed_cache_stats())


def _conv_into(x, w, b):
    out = torch.zeros(x.shape[0], w.shape[0] + 3, x.shape[2], x.shape[3]).contiguous(memory_format=torch.channels_last)
    conv2d_into(x, w, b, out, 3, 1, 1, activation="relu")
    return out[:, 3:]


def _ref(x, w, b):
    return F.conv2d(x.double(), w.double(), b.double(), 1, 1).relu().float()


@pytest.mark.parametrize("cout", [6, 24, 64])  # the 8x8 / AVX-512 fused / blocked paths
def test_marked_weight_is_cached_and_repacked_after_an_inplace_change(cout):
    torch.manual_seed(cout)
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(cout, 16, 3, 3), torch.randn(cout)
    n0, _ = stats()
    mark_constant_weight(w)
    first = _conv_into(x, w, b)
    n1, bytes1 = stats()
    assert n1 == n0 + 1 and bytes1 >= w.numel() * 4  # one packing kept
    torch.testing.assert_close(first, _ref(x, w, b), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(_conv_into(x, w, b), first, rtol=0, atol=0)  # served from the cache
    assert stats()[0] == n1
    with torch.no_grad():
        w.mul_(-0.5)  # version counter moves: repacked, the stale packing replaced
    torch.testing.assert_close(_conv_into(x, w, b), _ref(x, w, b), rtol=1e-4, atol=1e-3)
    assert stats()[0] == n1
    # the masked op reads the same cache
    m = torch.rand(2, 9, 9) < 0.5
    y = masked_conv2d(x, w, b, m, 1, 1, backend="cpp")
    torch.testing.assert_close(y, F.conv2d(x, w, b, 1, 1) * m.unsqueeze(1), rtol=1e-4, atol=1e-3)
    assert stats()[0] >= n1  # (the masked op's panel width may differ: a second packing of w)
    del w
    gc.collect()
    assert stats()[0] <= n0  # every entry of w went with it


def test_unmarked_weight_sees_changes_through_data():
    torch.manual_seed(1)
    x = torch.randn(1, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    w = torch.nn.Parameter(torch.randn(16, 8, 3, 3))
    b = torch.randn(16)
    with torch.no_grad():
        _conv_into(x, w, b)
        w.data.mul_(2)  # `.data` does not move w's version counter: only repacking on every call sees it
        torch.testing.assert_close(_conv_into(x, w, b), _ref(x, w.detach(), b), rtol=1e-4, atol=1e-3)


def test_cache_switch_and_inference_tensors(monkeypatch):
    x = torch.randn(1, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    b = torch.randn(16)
    with torch.inference_mode():
        wi = torch.randn(16, 8, 3, 3)
        mark_constant_weight(wi)  # ignored (no version counter), no crash
        n = stats()[0]
        torch.testing.assert_close(_conv_into(x, wi, b), _ref(x, wi, b), rtol=1e-4, atol=1e-3)
        assert stats()[0] == n
    monkeypatch.setenv("DYNCONV_EXT_PACK_CACHE", "0")
    w = mark_constant_weight(torch.randn(16, 8, 3, 3))
    n = stats()[0]
    torch.testing.assert_close(_conv_into(x, w, b), _ref(x, w, b), rtol=1e-4, atol=1e-3)
    assert stats()[0] == n  # off: nothing kept


def test_models_folded_weights_are_packed_once():
    from dynconv_ext import models
    net = models.msdnet_cifar(num_classes=10, nBlocks=2).eval()
    x = torch.randn(2, 3, 32, 32)
    n0 = stats()[0]
    with torch.inference_mode():  # folded outside inference mode all the same: cacheable
        ref = net(x)
        n1 = stats()[0]
        again = net(x)
    assert n1 > n0 and stats()[0] == n1  # the second forward packed nothing new
    for a, b in zip(again, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sparse_conv2d_with_a_marked_weight():
    """A user's opt-in: a SparseConv2d whose weight is marked constant keeps it packed; an in-place update (version
    counter) is still seen."""
    from dynconv_ext.nn import SparseConv2d
    from dynconv_ext.ops import mark_constant_weight as public_mark
    torch.manual_seed(3)
    conv = SparseConv2d(16, 32, 3, padding=1)
    public_mark(conv.weight)
    x = torch.randn(2, 16, 10, 10).contiguous(memory_format=torch.channels_last)
    m = torch.rand(2, 10, 10) < 0.5
    n0 = stats()[0]
    with torch.no_grad():
        y1 = conv(x, m)
        assert stats()[0] == n0 + 1
        torch.testing.assert_close(conv(x, m), y1, rtol=0, atol=0)
        conv.weight.mul_(3)
        ref = F.conv2d(x, conv.weight, conv.bias, 1, 1) * m.unsqueeze(1)
        torch.testing.assert_close(conv(x, m), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n,c,hw,density,activation", [
    (1, 64, 7, 0.6, None),     # 7x7 at batch 1 (ResNet-50's last stage): unmarked, the per-call packing term wins
    (2, 32, 14, 0.95, "relu"),  # density 0.95: unmarked goes dense; marked stays sparse up to 4096 output pixels
])
def test_auto_keeps_marked_weights_sparse_at_small_outputs(n, c, hw, density, activation):
    # For an unmarked weight `auto` computes densely here; a marked weight is packed once, and at small outputs the
    # dense conv (which reorders the weight on every call) loses to the sparse kernel, so `auto` stays sparse (and
    # keeps a packing in the cache), with the same result.
    torch.manual_seed(0)
    x = torch.randn(n, c, hw, hw).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, c, 3, 3), torch.randn(c)
    m = torch.rand(n, hw, hw) < density
    n0, _ = stats()
    plain = masked_conv2d(x, w, b, m, 1, 1, activation=activation)
    assert stats()[0] == n0  # dense fallback: nothing packed
    wm = mark_constant_weight(w.clone())
    got = masked_conv2d(x, wm, b, m, 1, 1, activation=activation)
    assert stats()[0] == n0 + 1  # the sparse kernel ran and kept the packing
    torch.testing.assert_close(got, plain, rtol=1e-4, atol=1e-3)


def test_dense_fallback_leaves_inactive_pixels_when_asked():
    # the dense fallback with zero_inactive=False: right where active (the rest is unspecified)
    torch.manual_seed(1)
    x = torch.randn(2, 32, 14, 14).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, 32, 3, 3), torch.randn(32)
    m = torch.rand(2, 14, 14) < 0.95
    plain = masked_conv2d(x, w, b, m, 1, 1, activation="relu")
    loose = masked_conv2d(x, w, b, m, 1, 1, activation="relu", backend="dense", zero_inactive=False)
    torch.testing.assert_close(loose.permute(1, 0, 2, 3)[:, m], plain.permute(1, 0, 2, 3)[:, m], rtol=1e-4, atol=1e-3)

"""The CPU kernels' instruction-set paths give the same results.

On a CPU with AVX-512F, float32 convolutions with more than 16 output channels per group run on AVX-512 register
blocks (6 rows x 64 channels where the panels tile the output, 8 x 32 otherwise); DYNCONV_EXT_AVX512=0 (read on
every call) sends them back to the AVX2 6x16 block. Both are checked against the reference on shapes that pick
each block: partial panels, groups, strides, dilation, residual and activation, a slice output. The AVX-512 cases
skip on CPUs without it.
"""
import pytest
import torch
import torch.nn.functional as F

import dynconv_ext
from dynconv_ext.ops import masked_conv2d
from dynconv_ext.ops.conv2d_into import conv2d_into
from dynconv_ext.reference import masked_conv2d_reference

# (C_in, C_out, k, stride, padding, dilation, groups, H). Masked convs: Cog 64 and 128 (6x64 panels), 24/40/96
# (8x32, partial last panel), 64 with 160 input channels at 3x3 (K = 1440 > 1152: 8x32), 2 groups of 64, a 1x1.
# conv2d_into (dense) also takes the fused 8x16 / 8x32 blocks for 9-64 channels per group: 12, 2 groups of 16,
# 24, 40, 64. The last three have so few rows that the masked conv splits their weight panels across threads.
SHAPES = [
    (16, 64, 3, 1, 1, 1, 1, 9),
    (32, 128, 3, 2, 1, 1, 1, 11),
    (8, 24, 3, 1, 2, 2, 1, 10),
    (20, 40, 1, 1, 0, 1, 1, 7),
    (12, 96, 3, 1, 1, 1, 1, 8),
    (160, 64, 3, 1, 1, 1, 1, 6),
    (16, 128, 3, 1, 1, 1, 2, 7),
    (64, 64, 1, 1, 0, 1, 1, 13),
    (10, 12, 3, 1, 1, 1, 1, 9),
    (8, 32, 3, 2, 1, 1, 2, 12),
    # few active rows, many weight panels: the panels are split across threads (4 and 8 panels of 64; 2 groups)
    (64, 256, 3, 1, 1, 1, 1, 4),
    (96, 512, 3, 1, 1, 1, 1, 3),
    (64, 256, 3, 1, 1, 1, 2, 4),
]

# Depthwise-style groups (one input channel per group) take their own kernel: 4-pixel AVX-512 runs along interior
# rows, one pixel at a time at borders and between inactive pixels. (C, C_out, k, stride, padding, dilation, H):
# one 16-lane block, 2.5 blocks with dilation, an odd count with stride 2, a channel multiplier of 2 (generic loop),
# a single-channel plain conv (routed to the GEMM), and 20-pixel rows (runs of several 4-pixel groups).
DEPTHWISE = [
    (16, 16, 3, 1, 1, 1, 10),
    (24, 24, 3, 1, 1, 1, 20),
    (40, 40, 3, 1, 2, 2, 11),
    (13, 13, 3, 2, 1, 1, 13),
    (8, 16, 3, 1, 1, 1, 9),
    (1, 1, 3, 1, 1, 1, 12),
]


@pytest.fixture(params=["avx2", "avx512"])
def isa(request, monkeypatch):
    monkeypatch.setenv("DYNCONV_EXT_AVX512", "1" if request.param == "avx512" else "0")
    if request.param == "avx512" and dynconv_ext.build_info()["cpu_kernel"] != "avx512f":
        pytest.skip("this CPU has no AVX-512F")
    return request.param


def test_build_info_names_the_kernel_in_use(monkeypatch):
    info = dynconv_ext.build_info()["cpu_kernel"]
    monkeypatch.setenv("DYNCONV_EXT_AVX512", "0")
    off = dynconv_ext.build_info()["cpu_kernel"]
    assert off in ("avx2_fma", "generic")
    assert info in ("avx512f", off)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}-{s[1]}-k{s[2]}-s{s[3]}-g{s[6]}" for s in SHAPES])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_masked_conv2d_isa(isa, shape, density):
    cin, cout, k, st, pad, dil, g, h = shape
    gen = torch.Generator().manual_seed(cin * 31 + cout)
    x = torch.randn(2, cin, h, h, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // g, k, k, generator=gen)
    b = torch.randn(cout, generator=gen)
    ho = F.conv2d(x[:1], w, None, st, pad, dil, g).shape[-1]
    m = torch.rand(2, ho, ho, generator=gen) < density
    r = torch.randn(2, cout, ho, ho, generator=gen).contiguous(memory_format=torch.channels_last)
    y = masked_conv2d(x, w, b, m, st, pad, dil, g, backend="cpp")
    ref = masked_conv2d_reference(x, w, b, m, st, pad, dil, g, 1)
    tol = 1e-4 * max(1.0, (w[0].numel()) ** 0.5)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=tol)
    assert (y.permute(1, 0, 2, 3)[:, ~m] == 0).all()
    yr = masked_conv2d(x, w, b, m, st, pad, dil, g, backend="cpp", residual=r, activation="relu")
    torch.testing.assert_close(yr, torch.where(m.unsqueeze(1), (ref + r).relu(), r), rtol=1e-4, atol=tol)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}-{s[1]}-k{s[2]}-s{s[3]}-g{s[6]}" for s in SHAPES])
def test_conv2d_into_isa(isa, shape):
    """A dense conv written into a channel slice of a wider channels-last buffer (the other channels untouched)."""
    cin, cout, k, st, pad, dil, g, h = shape
    gen = torch.Generator().manual_seed(cin + cout)
    x = torch.randn(2, cin, h, h, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // g, k, k, generator=gen)
    b = torch.randn(cout, generator=gen)
    ho = F.conv2d(x[:1], w, None, st, pad, dil, g).shape[-1]
    out = torch.randn(2, cout + 10, ho, ho, generator=gen).contiguous(memory_format=torch.channels_last)
    before = out.clone()
    conv2d_into(x, w, b, out, 3, st, pad, dil, g, activation="relu6")
    ref = F.conv2d(x.double(), w.double(), b.double(), st, pad, dil, g).clamp(0, 6)
    tol = 1e-4 * max(1.0, (w[0].numel()) ** 0.5)
    torch.testing.assert_close(out[:, 3:3 + cout].double(), ref, rtol=1e-4, atol=tol)
    assert torch.equal(out[:, :3], before[:, :3]) and torch.equal(out[:, 3 + cout:], before[:, 3 + cout:])


# Few input channels: the fused dense path reads a kernel row's KW taps as one run of KW * C channels
# (C_in, C_out, k, stride, padding, H): MSDNet's and RANet's stems, a 5x5 at stride 2, 4 and 12 channels.
# (wide enough for whole 8-pixel segments of interior pixels, which take the merged rows; the rest are border pixels)
MERGED = [(3, 16, 3, 1, 1, 11), (3, 32, 3, 2, 1, 24), (4, 24, 5, 2, 2, 30), (12, 12, 3, 1, 0, 14), (3, 64, 3, 1, 1, 20)]


@pytest.mark.parametrize("merged", ["1", "0"])
@pytest.mark.parametrize("shape", MERGED, ids=[f"{s[0]}-{s[1]}-k{s[2]}-s{s[3]}" for s in MERGED])
def test_conv2d_into_merged_kernel_rows(monkeypatch, isa, shape, merged):
    """DYNCONV_EXT_MERGED_TAPS=1 (default) merges a kernel row's taps for small contiguous inputs; both ways equal
    the reference, into a channel slice of a wider buffer, borders included."""
    monkeypatch.setenv("DYNCONV_EXT_MERGED_TAPS", merged)
    cin, cout, k, st, pad, h = shape
    gen = torch.Generator().manual_seed(cin * cout + k)
    x = torch.randn(3, cin, h, h, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(cout, cin, k, k, generator=gen), torch.randn(cout, generator=gen)
    ho = F.conv2d(x[:1], w, None, st, pad).shape[-1]
    out = torch.randn(3, cout + 5, ho, ho, generator=gen).contiguous(memory_format=torch.channels_last)
    before = out.clone()
    conv2d_into(x, w, b, out, 2, st, pad, activation="relu")
    ref = F.conv2d(x.double(), w.double(), b.double(), st, pad).relu()
    torch.testing.assert_close(out[:, 2:2 + cout].double(), ref, rtol=1e-4, atol=1e-4 * max(1.0, w[0].numel() ** 0.5))
    assert torch.equal(out[:, :2], before[:, :2]) and torch.equal(out[:, 2 + cout:], before[:, 2 + cout:])


@pytest.mark.parametrize("shape", SHAPES[:5] + SHAPES[6:8], ids=[f"{s[0]}-{s[1]}-k{s[2]}-s{s[3]}-g{s[6]}"
                                                                 for s in SHAPES[:5] + SHAPES[6:8]])
@pytest.mark.parametrize("n", [1, 3])  # fewer samples than threads (dA materialized) and more (per-sample pull)
def test_masked_conv2d_backward_isa(isa, shape, n):
    """float32 gradients (the backward GEMMs: AVX-512 tiles of 1, 2 or 4 panels, or the AVX2 tile) against the
    float64 gradients of the dense reference times the mask."""
    cin, cout, k, st, pad, dil, g, h = shape
    gen = torch.Generator().manual_seed(7 * cin + cout)
    x = torch.randn(n, cin, h, h, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // g, k, k, generator=gen)
    b = torch.randn(cout, generator=gen)
    ho = F.conv2d(x[:1], w, None, st, pad, dil, g).shape[-1]
    m = torch.rand(n, ho, ho, generator=gen) < 0.4
    go = torch.randn(n, cout, ho, ho, generator=gen)
    grads = []
    for dtype, fn in ((torch.float32, lambda *t: masked_conv2d(*t, m, st, pad, dil, g, backend="cpp")),
                      (torch.float64, lambda xx, ww, bb: F.conv2d(xx, ww, bb, st, pad, dil, g) * m.unsqueeze(1))):
        xs, ws, bs = (t.to(dtype).detach().requires_grad_(True) for t in (x, w, b))
        fn(xs, ws, bs).backward(go.to(dtype))
        grads.append((xs.grad, ws.grad, bs.grad))
    for got, ref in zip(*grads):
        scale = ref.abs().max().item() + 1.0
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("shape", DEPTHWISE, ids=[f"{s[0]}-{s[1]}-s{s[3]}-d{s[5]}" for s in DEPTHWISE])
@pytest.mark.parametrize("layout", ["cl", "nchw"])
@pytest.mark.parametrize("density", [0.6, 1.0])
def test_depthwise_isa(isa, shape, layout, density):
    c, cout, k, st, pad, dil, h = shape
    gen = torch.Generator().manual_seed(c * 7 + cout + h)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    x = torch.randn(3, c, h, h, generator=gen).contiguous(memory_format=fmt)
    w = torch.randn(cout, 1, k, k, generator=gen)
    b = torch.randn(cout, generator=gen)
    ho = F.conv2d(x[:1], w, None, st, pad, dil, c).shape[-1]
    m = torch.rand(3, ho, ho, generator=gen) < density
    r = torch.randn(3, cout, ho, ho, generator=gen).contiguous(memory_format=fmt)
    ref = masked_conv2d_reference(x, w, b, m, st, pad, dil, c, 1)
    y = masked_conv2d(x, w, b, m, st, pad, dil, c, backend="cpp")
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert (y.permute(1, 0, 2, 3)[:, ~m] == 0).all()
    yr = masked_conv2d(x, w, b, m, st, pad, dil, c, backend="cpp", residual=r, activation="relu6")
    torch.testing.assert_close(yr, torch.where(m.unsqueeze(1), (ref + r).clamp(0, 6), r), rtol=1e-5, atol=1e-5)
    out = torch.randn(3, cout + 5, ho, ho, generator=gen).contiguous(memory_format=torch.channels_last)
    before = out.clone()
    conv2d_into(x, w, b, out, 2, st, pad, dil, c, activation="relu")
    torch.testing.assert_close(out[:, 2:2 + cout], F.conv2d(x, w, b, st, pad, dil, c).relu(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :2], before[:, :2]) and torch.equal(out[:, 2 + cout:], before[:, 2 + cout:])


@pytest.mark.parametrize("zmm16", ["1", "0"])
@pytest.mark.parametrize("cout,groups", [(16, 1), (12, 1), (32, 2)])
def test_masked_conv2d_16_channel_block(monkeypatch, isa, zmm16, cout, groups):
    # 9-16 output channels per group: the AVX-512 8x16 block (DYNCONV_EXT_ZMM16=0: the AVX2 6x16 one). 64 images of
    # 32x32 make a >= 4 MiB output at 16 channels: streaming stores and the inactive pixels zeroed inside the block.
    monkeypatch.setenv("DYNCONV_EXT_ZMM16", zmm16)
    gen = torch.Generator().manual_seed(cout + groups)
    x = torch.randn(64, 16, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, 16 // groups, 3, 3, generator=gen)
    b = torch.randn(cout, generator=gen)
    m = torch.rand(64, 32, 32, generator=gen) < 0.3
    y = masked_conv2d(x, w, b, m, 1, 1, 1, groups, backend="cpp")
    ref = masked_conv2d_reference(x, w, b, m, 1, 1, 1, groups, 1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)
    assert (y.permute(1, 0, 2, 3)[:, ~m] == 0).all()
    r = torch.randn(64, cout, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    yr = masked_conv2d(x, w, b, m, 1, 1, 1, groups, backend="cpp", residual=r, activation="relu")
    torch.testing.assert_close(yr, torch.where(m.unsqueeze(1), (ref + r).relu(), r), rtol=1e-4, atol=1e-3)

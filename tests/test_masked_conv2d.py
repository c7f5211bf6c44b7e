"""masked_conv2d against the dense reference, over many shapes, layouts, masks and backends."""
import random

import pytest
import torch
import torch.nn.functional as F

from dynconv_ext.ops import masked_conv2d, resolve_block_size
from dynconv_ext.reference import expand_block_mask, masked_conv2d_reference


def _random_configs(n, seed=1234):
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        groups = rng.choice([1, 1, 1, 2, 3, "dw"])
        cg = rng.choice([1, 3, 8, 17])
        cog = rng.choice([1, 5, 16, 19, 33])
        if groups == "dw":
            groups, cg, cog = rng.choice([4, 7]), 1, rng.choice([1, 2])
        k = rng.choice([(1, 1), (3, 3), (3, 3), (5, 5), (1, 3), (3, 2)])
        stride = rng.choice([1, 1, 2, (2, 1)])
        dilation = rng.choice([1, 1, 2])
        padding = rng.choice([0, 1, 2, (1, 0)])
        h, w = rng.randint(5, 17), rng.randint(5, 17)
        block = rng.choice([1, 1, 2, 3, 4, 8])
        density = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0])
        configs.append(dict(n=rng.randint(1, 3), cin=cg * groups, cout=cog * groups, k=k, stride=stride,
                            padding=padding, dilation=dilation, groups=groups, h=h, w=w, block=block,
                            density=density, bias=rng.random() < 0.7, cl=rng.random() < 0.5,
                            id=f"cfg{i}"))
    return configs


CONFIGS = _random_configs(48)


def _make(cfg, dtype=torch.float32, device="cpu"):
    x = torch.randn(cfg["n"], cfg["cin"], cfg["h"], cfg["w"], dtype=dtype, device=device)
    if cfg["cl"]:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cfg["cout"], cfg["cin"] // cfg["groups"], *cfg["k"], dtype=dtype, device=device)
    b = torch.randn(cfg["cout"], dtype=dtype, device=device) if cfg["bias"] else None
    return x, w, b


def _out_hw(cfg):
    y = F.conv2d(torch.empty(1, cfg["cin"], cfg["h"], cfg["w"]),
                 torch.empty(cfg["cout"], cfg["cin"] // cfg["groups"], *cfg["k"]), None, cfg["stride"],
                 cfg["padding"], cfg["dilation"], cfg["groups"])
    return y.shape[-2:]


def _mask(cfg, device="cpu"):
    ho, wo = _out_hw(cfg)
    b = cfg["block"]
    return torch.rand(cfg["n"], -(-ho // b), -(-wo // b), device=device) < cfg["density"]


def _tol(dtype, k_len):
    return dict(rtol=1e-4, atol=1e-4 * max(1.0, k_len ** 0.5)) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["id"] for c in CONFIGS])
@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_matches_reference(cfg, backend, device):
    ho, wo = _out_hw(cfg)
    if ho < 1 or wo < 1:
        pytest.skip("output would be empty")
    x, w, b = _make(cfg, device=device)
    m = _mask(cfg, device)
    block = cfg["block"]
    kw = dict(block_size=block)
    y = masked_conv2d(x, w, b, m, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], backend=backend, **kw)
    ref = masked_conv2d_reference(x, w, b, m, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], block)
    k_len = w.shape[1] * w.shape[2] * w.shape[3]
    torch.testing.assert_close(y, ref, **_tol(torch.float32, k_len))
    # Inactive pixels are exactly zero, not just close.
    pm = expand_block_mask(m, block, (ho, wo)).expand_as(y)
    assert (y[~pm] == 0).all()
    # Output keeps the input's memory format.
    if cfg["cl"] and cfg["cin"] > 1 and y.shape[1] > 1 and min(y.shape[-2:]) > 1:  # else the layout is ambiguous
        assert y.is_contiguous(memory_format=torch.channels_last)
    elif not cfg["cl"]:
        assert y.is_contiguous()


@pytest.mark.parametrize("cfg", CONFIGS[:16], ids=[c["id"] for c in CONFIGS[:16]])
def test_residual(cfg, device):
    ho, wo = _out_hw(cfg)
    if ho < 1 or wo < 1:
        pytest.skip("output would be empty")
    x, w, b = _make(cfg, device=device)
    m = _mask(cfg, device)
    r = torch.randn(cfg["n"], cfg["cout"], ho, wo, device=device)
    args = (cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    y = masked_conv2d(x, w, b, m, *args, block_size=cfg["block"], residual=r, backend="cpp")
    ref = masked_conv2d_reference(x, w, b, m, *args, cfg["block"], residual=r)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)
    pm = expand_block_mask(m, cfg["block"], (ho, wo)).expand_as(y)
    assert torch.equal(y[~pm], r[~pm])  # untouched where inactive
    assert not torch.equal(y, r) or not pm.any()  # the residual tensor itself is not modified in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(dtype):
    x = torch.randn(2, 6, 9, 9, dtype=dtype)
    w = torch.randn(8, 6, 3, 3, dtype=dtype)
    b = torch.randn(8, dtype=dtype)
    m = torch.rand(2, 9, 9) < 0.4
    y = masked_conv2d(x, w, b, m, 1, 1, backend="cpp")
    assert y.dtype == dtype
    torch.testing.assert_close(y, masked_conv2d_reference(x, w, b, m, 1, 1), **_tol(dtype, 54))


def test_non_contiguous_inputs():
    base = torch.randn(2, 12, 20, 22)
    x = base[:, ::2, 1:-1:1, ::2]  # channel-strided, offset, spatially strided view
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w = torch.randn(10, 6, 4, 4).transpose(2, 3)  # non-contiguous weight
    b = torch.randn(20)[::2]
    ho = x.shape[2] - 3
    wo = x.shape[3] - 3
    m = (torch.rand(2, 1, ho * 2, wo) < 0.5)[:, :, ::2]  # non-contiguous mask
    y = masked_conv2d(x, w, b, m, backend="cpp")
    torch.testing.assert_close(y, masked_conv2d_reference(x, w, b, m), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpp", "auto", "dense", "reference"])
def test_empty_and_full_masks(backend):
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3)
    b = torch.randn(16)
    empty = torch.zeros(2, 12, 12, dtype=torch.bool)
    y = masked_conv2d(x, w, b, empty, 1, 1, backend=backend)
    assert y.shape == (2, 16, 12, 12) and (y == 0).all()
    full = torch.ones(2, 12, 12, dtype=torch.bool)
    torch.testing.assert_close(masked_conv2d(x, w, b, full, 1, 1, backend=backend), F.conv2d(x, w, b, 1, 1),
                               rtol=1e-4, atol=1e-4)
    r = torch.randn(2, 16, 12, 12)
    torch.testing.assert_close(masked_conv2d(x, w, b, empty, 1, 1, residual=r, backend=backend), r)


def test_no_mask_is_plain_conv():
    x, w, b = torch.randn(2, 4, 7, 7), torch.randn(5, 4, 3, 3), torch.randn(5)
    assert torch.equal(masked_conv2d(x, w, b, None, 1, 1), F.conv2d(x, w, b, 1, 1))


def test_dense_fallback_equals_sparse_path():
    """backend='dense' (conv then mask) and 'cpp' (gather-GEMM-scatter) agree; 'auto' uses one of them."""
    x = torch.randn(2, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, 16, 3, 3), torch.randn(32)
    for density in (0.05, 0.5, 0.95):
        m = torch.rand(2, 7, 7) < density
        ys = [masked_conv2d(x, w, b, m, 1, 1, backend=be) for be in ("cpp", "dense", "auto")]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ys[0], ys[2], rtol=1e-4, atol=1e-4)


def test_block_mask_granularity():
    x = torch.randn(1, 3, 8, 8)
    w = torch.ones(1, 3, 1, 1)
    m = torch.tensor([[[True, False], [False, True]]])  # 2x2 blocks of 4x4 pixels
    y = masked_conv2d(x, w, None, m, backend="cpp")
    dense = x.sum(1, keepdim=True)
    assert torch.equal(y[..., :4, :4], dense[..., :4, :4]) and torch.equal(y[..., 4:, 4:], dense[..., 4:, 4:])
    assert (y[..., :4, 4:] == 0).all() and (y[..., 4:, :4] == 0).all()


def test_block_mask_partial_edge_blocks():
    # 10x10 output with b=4: edge blocks are 2 pixels wide.
    x, w = torch.randn(2, 5, 10, 10), torch.randn(6, 5, 3, 3)
    m = torch.rand(2, 3, 3) < 0.5
    m[:, 2, 2] = True
    y = masked_conv2d(x, w, None, m, 1, 1, backend="cpp")
    torch.testing.assert_close(y, masked_conv2d_reference(x, w, None, m, 1, 1, 1, 1, 4), rtol=1e-4, atol=1e-4)


def test_mask_with_channel_dim():
    x, w = torch.randn(2, 4, 9, 9), torch.randn(4, 4, 3, 3)
    m = torch.rand(2, 1, 9, 9) < 0.5
    torch.testing.assert_close(masked_conv2d(x, w, None, m, 1, 1), masked_conv2d(x, w, None, m[:, 0], 1, 1))


def test_resolve_block_size():
    assert resolve_block_size((56, 56), (56, 56)) == 1
    assert resolve_block_size((14, 14), (56, 56)) == 4
    assert resolve_block_size((2, 2), (7, 7), block_size=4) == 4
    assert resolve_block_size((2, 2), (8, 8)) == 4  # exact tiling wins over b = 5, 6, 7
    with pytest.raises(ValueError, match="block_size"):
        resolve_block_size((2, 2), (7, 7))  # b = 4, 5 and 6 all give 2x2
    with pytest.raises(ValueError, match="fits no block size"):
        resolve_block_size((5, 9), (56, 56))


def test_large_channels_cover_multiple_k_panels():
    # 300 channels: several weight panels, a long reduction (2700), remainder columns.
    x, w, b = torch.randn(1, 300, 6, 6), torch.randn(70, 300, 3, 3), torch.randn(70)
    m = torch.rand(1, 6, 6) < 0.6
    torch.testing.assert_close(masked_conv2d(x, w, b, m, 1, 1, backend="cpp"),
                               masked_conv2d_reference(x, w, b, m, 1, 1), rtol=1e-4, atol=2e-3)


def test_dense_crossover_rule():
    from dynconv_ext.ops import dense_crossover
    assert dense_crossover((64, 64, 3, 3), 8 * 56 * 56) == pytest.approx(0.9 - 48 / (8 * 56 * 56))
    assert dense_crossover((64, 64, 1, 1), 8 * 56 * 56) < dense_crossover((256, 256, 1, 1), 8 * 14 * 14)
    assert dense_crossover((256, 256, 3, 3), 14 * 14) < dense_crossover((256, 256, 3, 3), 8 * 14 * 14)
    assert dense_crossover((64, 64, 3, 3), 1) == 0.0  # a single output pixel: packing dominates
    # a weight whose packing the kernels keep (marked constant) pays none: no fall with few pixels
    assert dense_crossover((512, 512, 3, 3), 49) == 0.0
    assert dense_crossover((512, 512, 3, 3), 49, packed=True) > 1.0  # small outputs: the sparse kernel throughout
    assert dense_crossover((64, 64, 3, 3), 8 * 56 * 56, packed=True) == pytest.approx(0.9)
    assert dense_crossover((144, 1, 3, 3), 49, packed=True) < 1.0  # depthwise (nothing to pack): as before
    assert dense_crossover((144, 1, 3, 3), 8 * 56 * 56) < dense_crossover((144, 144, 3, 3), 8 * 56 * 56)  # depthwise
    assert 0.0 < dense_crossover((64, 64, 3, 3), 100, "cuda") <= 1.0  # CUDA: a placeholder crossover
    assert dense_crossover((64, 64, 3, 3), 100, "mps") > 1.0  # devices without a measurement: never dense


@pytest.mark.parametrize("backend", ["cpp", "dense", "auto", "reference"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_fused_activation(backend, with_residual, channels_last, activation):
    x = torch.randn(2, 6, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(7, 6, 3, 3), torch.randn(7)
    m = torch.rand(2, 9, 9) < 0.5
    r = torch.randn(2, 7, 9, 9) if with_residual else None  # negative residual values must survive at inactive pixels
    y = masked_conv2d(x, w, b, m, 1, 1, residual=r, activation=activation, backend=backend)
    conv = F.conv2d(x, w, b, 1, 1) + (r if r is not None else 0)
    act = conv.relu() if activation == "relu" else conv.clamp(0, 6)
    expected = torch.where(m[:, None], act, r if r is not None else torch.zeros(()))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_fused_activation_gradients(activation):
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 7, 7, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, 7, 7) < 0.5
    fn = lambda x_, w_, b_, r_: masked_conv2d(x_, w_, b_, m, 1, 1, residual=r_, activation=activation,  # noqa: E731
                                               backend="cpp")
    assert torch.autograd.gradcheck(fn, (x, w, b, r), eps=1e-6, atol=1e-6)


def test_bad_activation():
    with pytest.raises(ValueError, match="activation must be one of"):
        masked_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), None, torch.ones(1, 5, 5, dtype=torch.bool),
                      1, 1, activation="gelu")


@pytest.mark.parametrize("backend", ["cpp", "dense", "reference"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_residual(backend, channels_last):
    x = torch.randn(2, 6, 9, 9)
    w, b = torch.randn(6, 6, 3, 3), torch.randn(6)
    m = torch.rand(2, 9, 9) < 0.4
    r = torch.randn(2, 6, 9, 9)
    if channels_last:
        x, r = x.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    expected = masked_conv2d(x, w, b, m, 1, 1, residual=r, activation="relu", backend=backend)
    r2 = r.clone()
    with torch.no_grad():
        out = masked_conv2d(x, w, b, m, 1, 1, residual=r2, activation="relu", backend=backend, inplace=True)
    assert out.data_ptr() == r2.data_ptr()
    torch.testing.assert_close(r2, expected, rtol=1e-4, atol=1e-4)


def test_inplace_refuses_autograd_and_aliasing():
    x, w = torch.randn(1, 4, 6, 6, requires_grad=True), torch.randn(4, 4, 3, 3)
    m = torch.ones(1, 6, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="inference"):
        masked_conv2d(x, w, None, m, 1, 1, residual=torch.randn(1, 4, 6, 6), inplace=True)
    y = torch.randn(1, 4, 6, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="storage it reads"):
        masked_conv2d(y, w, None, m, 1, 1, residual=y, inplace=True)
    with torch.no_grad(), pytest.raises(ValueError, match="needs a residual"):
        masked_conv2d(y, w, None, m, 1, 1, inplace=True)


def test_inplace_op_opcheck():
    x, w = torch.randn(2, 4, 7, 7), torch.randn(4, 4, 3, 3)
    m = torch.rand(2, 7, 7) < 0.5
    r = torch.randn(2, 4, 7, 7)
    for threshold in (2.0, 0.0):
        torch.library.opcheck(torch.ops.dynconv.masked_conv2d_residual_.default,
                              (x, w, None, m, [1, 1], [1, 1], [1, 1], 1, 1, r.clone(), 1, threshold),
                              test_utils=("test_schema", "test_faketensor"))


def test_zero_inactive_false_keeps_active_values():
    x, w, b = torch.randn(2, 5, 8, 8), torch.randn(6, 5, 3, 3), torch.randn(6)
    m = torch.rand(2, 8, 8) < 0.5
    full = masked_conv2d(x, w, b, m, 1, 1, backend="cpp")
    part = masked_conv2d(x, w, b, m, 1, 1, backend="cpp", zero_inactive=False)
    sel = m[:, None].expand_as(full)
    assert torch.equal(part[sel], full[sel])  # active pixels identical; the rest unspecified


def test_shared_rows_index_map():
    from dynconv_ext.ops import active_rows
    x, w = torch.randn(2, 5, 9, 9), torch.randn(6, 5, 3, 3)
    m = torch.rand(2, 3, 3) < 0.5
    rows = active_rows(m, (9, 9), 3)
    assert rows.dtype == torch.int64 and torch.equal(rows, rows.sort().values)
    torch.testing.assert_close(masked_conv2d(x, w, None, m, 1, 1, rows=rows, backend="cpp"),
                               masked_conv2d(x, w, None, m, 1, 1, backend="cpp"))
    with pytest.raises(RuntimeError, match="rows has"):
        masked_conv2d(x, w, None, m, 1, 1, rows=rows[:-1], backend="cpp")
    # Right count, wrong content: rejected before any memory is indexed with it.
    bad_rows = {
        "unsorted": rows.flip(0),
        "out of range": torch.cat([rows[:-1], rows.new_tensor([2 * 9 * 9])]),
        "inactive pixel": torch.cat([rows[:-1], (~m).repeat_interleave(3, 1).repeat_interleave(3, 2)
                                     .reshape(-1).nonzero()[-1:, 0]]),
    }
    for name, bad in bad_rows.items():
        with pytest.raises(RuntimeError, match="not this mask's index map"):
            masked_conv2d(x, w, None, m, 1, 1, rows=bad, backend="cpp")


@pytest.mark.parametrize("pattern", ["first_and_last_off", "first_and_last_on", "single", "runs"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_inactive_pixels_are_zero_whatever_the_gaps(pattern, layout):
    # The channels-last kernel zeroes each gap between consecutive active pixels as it writes them (and the
    # tail after the last); memory starts as garbage so a missed gap shows.
    torch.manual_seed(3)
    x, w, b = torch.randn(3, 8, 7, 6), torch.randn(16, 8, 3, 3), torch.randn(16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    m = torch.zeros(3, 7, 6, dtype=torch.bool)
    if pattern == "first_and_last_off":
        m[1, 3, 2:5] = True
    elif pattern == "first_and_last_on":
        m[0, 0, 0] = m[2, 6, 5] = m[1, 2, 3] = True
    elif pattern == "single":
        m[2, 4, 1] = True
    else:
        m = torch.rand(3, 7, 6) < 0.4
    for _ in range(3):  # fresh outputs may reuse the previous call's (non-zero) memory
        torch.empty(3 * 16 * 7 * 6).fill_(float("nan"))
        out = masked_conv2d(x, w, b, m, 1, 1, backend="cpp")
        ref = (torch.nn.functional.conv2d(x, w, b, 1, 1) * m[:, None])
        torch.testing.assert_close(out, ref)
        assert torch.all(out.permute(0, 2, 3, 1)[~m] == 0)


@pytest.mark.parametrize("co,groups", [(1, 1), (5, 1), (8, 1), (9, 1), (12, 2), (16, 2), (18, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_narrow_and_wide_register_blocks_agree_with_reference(co, groups, dtype):
    # Groups with <= 8 output channels run the 8x8 register block, wider ones the 6x16 block; both must match
    # the dense reference at the boundary (8 vs 9 per group), with padding taps and a partial last block.
    torch.manual_seed(co * 10 + groups)
    x = torch.randn(3, 4 * groups, 9, 7, dtype=dtype).to(memory_format=torch.channels_last)
    w, b = torch.randn(co, 4, 3, 3, dtype=dtype), torch.randn(co, dtype=dtype)
    m = torch.rand(3, 9, 7) < 0.6
    out = masked_conv2d(x, w, b, m, 1, 1, groups=groups, backend="cpp")
    ref = torch.nn.functional.conv2d(x, w, b, 1, 1, 1, groups) * m[:, None]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("groups", [1, 2])
def test_few_rows_large_output_split_panels(groups):
    # A handful of active pixels and several weight panels: the panels are split across threads, with streaming
    # stores and zero gaps (the output is >= 4 MiB). 1 x 128 x 96 x 96 float = 4.5 MiB.
    torch.manual_seed(3 + groups)
    x = torch.randn(1, 64, 96, 96).to(memory_format=torch.channels_last)
    w, b = torch.randn(128, 64 // groups, 3, 3), torch.randn(128)
    m = torch.zeros(1, 96, 96, dtype=torch.bool)
    m[0, 0, 0] = m[0, 5, 7] = m[0, 5, 8] = m[0, 50, 60] = m[0, 95, 95] = True
    torch.empty(128 * 96 * 96).fill_(float("nan"))
    out = masked_conv2d(x, w, b, m, 1, 1, groups=groups, activation="relu", backend="cpp")
    ref = F.conv2d(x, w, b, 1, 1, 1, groups).relu()
    sel = m[:, None].expand_as(out)
    torch.testing.assert_close(out[sel], ref[sel], rtol=1e-4, atol=1e-3)
    assert torch.all(out[~sel] == 0)


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("groups", [1, 2])
def test_large_output_streaming_stores(activation, groups):
    # Channels-last float outputs of >= 4 MiB are written with streaming stores (rows and zero gaps); smaller
    # shapes in this file never reach that path. 1 x 64 x 128 x 128 float = 4 MiB exactly; a 1x1 kernel keeps
    # the reference cheap. Memory is filled with garbage first so a missed gap shows.
    torch.manual_seed(11 + groups)
    x = torch.randn(1, 32, 128, 128).to(memory_format=torch.channels_last)
    w, b = torch.randn(64, 32 // groups, 1, 1), torch.randn(64) * 3
    m = torch.rand(1, 128, 128) < 0.3
    m[0, 0, :5] = False  # a leading gap
    m[0, -1, -7:] = False  # a trailing gap
    m[0, 10, :] = m[0, 11, :40] = False  # a gap longer than the blocks zero while they compute (64 pixels)
    for zero in (True, False):
        torch.empty(64 * 128 * 128).fill_(float("nan"))
        out = masked_conv2d(x, w, b, m, groups=groups, activation=activation, backend="cpp", zero_inactive=zero)
        ref = F.conv2d(x, w, b, groups=groups)
        if activation == "relu":
            ref = ref.relu()
        elif activation == "relu6":
            ref = ref.clamp(0, 6)
        sel = m[:, None].expand_as(out)
        torch.testing.assert_close(out[sel], ref[sel], rtol=1e-5, atol=1e-5)
        if zero:
            assert torch.all(out[~sel] == 0)
    # A NaN input stays NaN through the fused activation, as in the scalar epilogue.
    x_nan = x.clone()
    x_nan[0, :, 5, 5] = float("nan")
    m_nan = m.clone()
    m_nan[0, 5, 5] = True
    out = masked_conv2d(x_nan, w, b, m_nan, groups=groups, activation=activation, backend="cpp")
    assert torch.isnan(out[0, :, 5, 5]).all()


@pytest.mark.parametrize("zero_in_kernel", ["1", "0"])
@pytest.mark.parametrize("density", [0.1, 0.5])
def test_large_output_zero_gaps_3x3(monkeypatch, zero_in_kernel, density):
    # With streaming stores the 6x64 block zeroes the inactive pixels before its rows a share per tap while it
    # computes (DYNCONV_EXT_ZERO_IN_KERNEL=0: before each macro block); a 3x3 conv spreads them over 9 taps.
    # 1 x 64 x 128 x 128 float output = 4 MiB; memory is filled with NaN first so a pixel left unwritten shows.
    monkeypatch.setenv("DYNCONV_EXT_ZERO_IN_KERNEL", zero_in_kernel)
    torch.manual_seed(5)
    x = torch.randn(1, 64, 128, 128).to(memory_format=torch.channels_last)
    w, b = torch.randn(64, 64, 3, 3) * 0.1, torch.randn(64)
    m = torch.rand(1, 128, 128) < density
    m[0, 0, :3] = False
    m[0, 20, 100:] = m[0, 21, :] = False  # a gap of 156 pixels, zeroed apart from the blocks
    m[0, -1, -1] = False
    torch.empty(64 * 128 * 128).fill_(float("nan"))
    out = masked_conv2d(x, w, b, m, 1, 1, backend="cpp")
    ref = F.conv2d(x, w, b, 1, 1)
    sel = m[:, None].expand_as(out)
    torch.testing.assert_close(out[sel], ref[sel], rtol=1e-4, atol=1e-4)
    assert torch.all(out[~sel] == 0)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_unchecked_entry_matches_masked_conv2d(mode):
    # masked_conv2d_unchecked (the gated blocks' entry, no Python-side validation) computes what masked_conv2d does:
    # pixel and block masks, stride, groups, residual (copied or in place), activation, unspecified inactive pixels;
    # in grad mode with tensors that require grad it hands over to masked_conv2d (gradients flow).
    from dynconv_ext.ops.masked_conv2d import masked_conv2d_unchecked
    torch.manual_seed(1)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(12, 4, 3, 3), torch.randn(12)
    pix = torch.rand(2, 5, 5) < 0.5
    blk = torch.rand(2, 1, 3, 3) < 0.5
    r = torch.randn(2, 12, 5, 5).contiguous(memory_format=torch.channels_last)
    ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}.get(mode, torch.enable_grad)
    with ctx():
        for m, bs in ((pix, None), (blk, 2)):
            kw = dict(block_size=bs, residual=r, activation="relu")
            torch.testing.assert_close(masked_conv2d_unchecked(x, w, b, m, (2, 2), 1, 1, 2, **kw),
                                       masked_conv2d(x, w, b, m, 2, 1, 1, 2, **kw), rtol=0, atol=0)
            want = masked_conv2d(x, w, None, m, 2, 1, 1, 2, block_size=bs)
            got = masked_conv2d_unchecked(x, w, None, m, 2, 1, 1, 2, block_size=bs, zero_inactive=False)
            active = (want != 0).any(1)
            torch.testing.assert_close(got.permute(1, 0, 2, 3)[:, active], want.permute(1, 0, 2, 3)[:, active])
        if mode != "grad":
            ri = r.clone()
            out = masked_conv2d_unchecked(x, w, b, pix, 2, 1, 1, 2, residual=ri, activation="relu", inplace=True)
            assert out is ri or out.data_ptr() == ri.data_ptr()
            torch.testing.assert_close(ri, masked_conv2d(x, w, b, pix, 2, 1, 1, 2, residual=r, activation="relu"))
    if mode == "grad":
        wg = w.clone().requires_grad_()
        y = masked_conv2d_unchecked(x, wg, b, pix, 2, 1, 1, 2)
        y.sum().backward()
        assert wg.grad is not None and wg.grad.abs().sum() > 0

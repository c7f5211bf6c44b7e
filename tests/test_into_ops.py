"""conv2d_into and resize_into (the fused concat ops) against their references: shapes, offsets, layouts,
channel-slice inputs, gradients, opcheck, torch.compile and bad input."""
import importlib
import random

import pytest
import torch
import torch.nn.functional as F

from dynconv_ext.ops import conv2d_into, resize_into
from dynconv_ext.reference import conv2d_into_reference, resize_into_reference

_NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NO_GPU])]
CUDA_ONLY = [pytest.param("cuda", marks=[pytest.mark.cuda, _NO_GPU])]
# fp16/bf16 (CUDA only) against a float64 reference of the same (rounded) inputs: fp32 accumulation, so the error
# is the output's rounding (half an ulp: 4.9e-4 relative for fp16, 3.9e-3 for bf16) plus a little.
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
_INTO = importlib.import_module("dynconv_ext.ops.conv2d_into")  # the module (the package exports the function)


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """float32 references on CUDA in full float32 (cuDNN convs may otherwise run in TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _has_cuda_op(op, device):
    """True where `device` is CUDA and this build has a CUDA kernel for dynconv::`op` (the functional then uses it;
    the tests also call it directly, so the CUDA kernel is what is checked, not the reference fallback)."""
    return device == "cuda" and op in _INTO._CUDA_OPS


def _conv_configs(n, seed=7):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        groups = rng.choice([1, 1, 1, 2, "dw"])
        cg, cog = rng.choice([1, 4, 9, 24]), rng.choice([1, 6, 12, 17, 32])
        if groups == "dw":
            groups, cg, cog = rng.choice([3, 8]), 1, 1
        k = rng.choice([1, 3, 3])
        out.append(dict(n=rng.randint(1, 3), cin=cg * groups, cout=cog * groups, k=k, groups=groups,
                        stride=rng.choice([1, 1, 2]), padding=k // 2, dilation=rng.choice([1, 1, 2]) if k > 1 else 1,
                        h=rng.randint(3, 13), bias=rng.random() < 0.8, act=rng.choice([None, "relu", "relu6"]),
                        in_slice=rng.random() < 0.6, cl_out=rng.random() < 0.7, pad_c=rng.randint(0, 9),
                        id=f"conv{i}"))
    return out


CONV_CONFIGS = _conv_configs(32)


def _conv_case(cfg, dtype=torch.float64, device="cpu"):
    n, cin, h = cfg["n"], cfg["cin"], cfg["h"]
    if cfg["in_slice"]:  # the filled prefix of a wider channels-last buffer, read in place
        src = torch.randn(n, cin + 5, h, h, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
        x = src[:, :cin]
    else:
        x = torch.randn(n, cin, h, h, dtype=dtype, device=device)
    w = torch.randn(cfg["cout"], cin // cfg["groups"], cfg["k"], cfg["k"], dtype=dtype, device=device)
    b = torch.randn(cfg["cout"], dtype=dtype, device=device) if cfg["bias"] else None
    ho = F.conv2d(x[:1], w, None, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"]).shape[-1]
    out = torch.randn(n, cfg["cout"] + 2 * cfg["pad_c"], ho, ho, dtype=dtype, device=device)
    if cfg["cl_out"]:
        out = out.contiguous(memory_format=torch.channels_last)
    return x, w, b, out


def _check_conv2d_into(cfg, dtype, device, tol):
    x, w, b, out = _conv_case(cfg, dtype, device)
    # The reference in float64 (of the same inputs): on CUDA a float32 reference conv may run in TF32.
    d = torch.float64
    expected = conv2d_into_reference(x.to(d), w.to(d), None if b is None else b.to(d), out.to(d, copy=True),
                                     cfg["pad_c"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"],
                                     cfg["act"])
    before = out.clone()
    lo, hi = cfg["pad_c"], cfg["pad_c"] + cfg["cout"]
    outs = [out]
    got = conv2d_into(x, w, b, out, cfg["pad_c"], cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"],
                      activation=cfg["act"])
    assert got is out
    if _has_cuda_op("conv2d_into_", device):  # the CUDA kernel itself, called directly
        direct = before.clone()
        act = {None: 0, "relu": 1, "relu6": 2}[cfg["act"]]
        torch.ops.dynconv.conv2d_into_(x, w, b, direct, cfg["pad_c"], [cfg["stride"]] * 2, [cfg["padding"]] * 2,
                                       [cfg["dilation"]] * 2, cfg["groups"], act)
        outs.append(direct)
    for o in outs:
        torch.testing.assert_close(o.to(d), expected, rtol=tol, atol=tol)
        assert torch.equal(o[:, :lo], before[:, :lo]) and torch.equal(o[:, hi:], before[:, hi:])  # untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=[c["id"] for c in CONV_CONFIGS])
def test_conv2d_into_matches_reference(cfg, dtype, device):
    _check_conv2d_into(cfg, dtype, device, 1e-4 if dtype == torch.float32 else 1e-10)


def _small_cout_configs(n, seed=11):
    """At most 8 output channels per group (the CPU kernel's fused small-channel path, float32 on AVX2, and its
    planar one on AVX-512): rows wide enough for several 8-pixel segments (16-pixel vectors) and a tail, every
    stride / padding / dilation mix that leaves border pixels on either side, groups, and a concat slice with
    neighbours on both sides."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k, d = rng.choice([(1, 1), (3, 1), (3, 2), (5, 1), (2, 1)])  # (kernel, dilation)
        groups = rng.choice([1, 1, 2, 3])
        out.append(dict(n=rng.randint(1, 2), cg=rng.choice([1, 3, 6, 22]), cog=rng.choice([1, 3, 5, 6, 7, 8, 9, 12, 16, 24, 31]),
                        groups=groups, k=k, dilation=d, stride=rng.choice([1, 1, 2, 3]), padding=rng.choice([0, 1, 2]),
                        h=rng.randint(5, 12), w=rng.randint(5, 41), bias=rng.random() < 0.8,
                        act=rng.choice([None, "relu", "relu6"]), lo=rng.choice([0, 3]), hi=rng.choice([0, 5]),
                        id=f"small{i}"))
    return out


@pytest.mark.parametrize("cfg", _small_cout_configs(32), ids=lambda c: c["id"])
def test_conv2d_into_small_cout_fused_path(cfg, monkeypatch):
    g = torch.Generator().manual_seed(0)
    n, cin, cout = cfg["n"], cfg["cg"] * cfg["groups"], cfg["cog"] * cfg["groups"]
    src = torch.randn(n, cin + 4, cfg["h"], cfg["w"], generator=g).contiguous(memory_format=torch.channels_last)
    x = src[:, :cin]  # read in place from a wider channels-last buffer, as MSDNet does
    x[0, 0, 1, 2] = float("nan")  # must reach exactly the outputs that read it, through ReLU and ReLU6 too
    w = torch.randn(cout, cfg["cg"], cfg["k"], cfg["k"], generator=g)
    b = torch.randn(cout, generator=g) if cfg["bias"] else None
    conv = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    if min(F.conv2d(x[:1, :, :, :], w, None, **conv).shape[-2:]) < 1:
        pytest.skip("empty output")
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), **conv)
    ref = {None: ref, "relu": ref.relu(), "relu6": ref.clamp(0, 6)}[cfg["act"]]
    lo, hi = cfg["lo"], cfg["hi"]
    results = {}
    # The planar path (AVX-512, one group, <= 8 channels, K > 1, dilation 1), the fused path and the general
    # implicit GEMM must agree; where a path does not cover the shape the next one runs.
    for path, (planar, fused) in {"planar": ("1", "1"), "fused": ("0", "1"), "gemm": ("0", "0")}.items():
        monkeypatch.setenv("DYNCONV_EXT_PLANAR_NARROW", planar)
        monkeypatch.setenv("DYNCONV_EXT_FUSED_NARROW", fused)
        out = torch.randn(n, lo + cout + hi, *ref.shape[-2:], generator=torch.Generator().manual_seed(1))
        out = out.contiguous(memory_format=torch.channels_last)
        before = out.clone()
        conv2d_into(x, w, b, out, lo, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"],
                    activation=cfg["act"])
        torch.testing.assert_close(out[:, lo:lo + cout].double(), ref, rtol=1e-4, atol=1e-4, equal_nan=True)
        assert torch.equal(out[:, :lo], before[:, :lo]) and torch.equal(out[:, lo + cout:], before[:, lo + cout:])
        results[path] = out
    for path in ("planar", "fused"):
        torch.testing.assert_close(results[path], results["gemm"], rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("shape", [(64, 8, 3, 1, 1, 5, 100), (7, 7, 5, 2, 2, 6, 67), (6, 6, 3, 3, 0, 9, 50),
                                   (2, 1, 2, 1, 1, 4, 33)], ids=lambda t: "c{}-{}k{}s{}p{}-{}x{}".format(*t))
def test_conv2d_into_planar_wide_rows(shape, monkeypatch):
    """Rows of several 32-pixel blocks plus a 16-pixel tail, many input channels, stride 2 and 3 (column phases),
    padding wider than the stride: the planar path (where AVX-512 runs it) against float64 F.conv2d."""
    cin, cout, k, stride, pad, h, w = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cin + 3, h, w, generator=g).contiguous(memory_format=torch.channels_last)[:, :cin]
    wt, b = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g)
    ref = F.conv2d(x.double(), wt.double(), b.double(), stride, pad).clamp(0, 6)
    monkeypatch.setenv("DYNCONV_EXT_PLANAR_NARROW", "1")
    out = torch.full((2, cout + 4, *ref.shape[-2:]), 7.0).contiguous(memory_format=torch.channels_last)
    conv2d_into(x, wt, b, out, 2, stride, pad, activation="relu6")
    torch.testing.assert_close(out[:, 2:2 + cout].double(), ref, rtol=1e-4, atol=1e-4)
    assert (out[:, :2] == 7).all() and (out[:, 2 + cout:] == 7).all()


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=[c["id"] for c in CONV_CONFIGS])
def test_conv2d_into_half_matches_reference(cfg, dtype, device):
    _check_conv2d_into(cfg, dtype, device, HALF_TOL[dtype])


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv2d_into_cuda_input_layouts(dtype, device):
    """The CUDA kernel reads NCHW, channels-last, channel-slice and spatially strided inputs, and writes NCHW and
    channels-last buffers; a wide layer (several column tiles, K > one reduction step) and a 1x1 conv."""
    torch.manual_seed(4)
    d = torch.float64
    base = torch.randn(2, 80, 13, 11, dtype=dtype, device=device)
    inputs = {"nchw": base[:, :70].contiguous(), "cl": base[:, :70].contiguous(memory_format=torch.channels_last),
              "slice": base.contiguous(memory_format=torch.channels_last)[:, 5:75],
              "strided": base.contiguous(memory_format=torch.channels_last)[:, 3:73, ::2, 1::2]}
    for name, x in inputs.items():
        for k, pad, co in ((3, 1, 130), (1, 0, 33)):
            w = torch.randn(co, 70, k, k, dtype=dtype, device=device) * 0.1
            b = torch.randn(co, dtype=dtype, device=device)
            ho, wo = x.shape[2] + 2 * pad - k + 1, x.shape[3] + 2 * pad - k + 1
            for cl in (False, True):
                out = torch.randn(2, co + 9, ho, wo, dtype=dtype, device=device)
                if cl:
                    out = out.contiguous(memory_format=torch.channels_last)
                expected = conv2d_into_reference(x.to(d), w.to(d), b.to(d), out.to(d, copy=True), 4, 1, pad, 1, 1,
                                                 "relu")
                conv2d_into(x, w, b, out, 4, 1, pad, activation="relu")
                tol = 1e-4 if dtype == torch.float32 else HALF_TOL[dtype]
                torch.testing.assert_close(out.to(d), expected, rtol=tol, atol=tol, msg=f"{name} k={k} cl={cl}")


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_into_dense_concat_chain_equals_torch_cat(device):
    """A DenseNet-style stack written into one buffer equals the same stack built with torch.cat."""
    torch.manual_seed(0)
    c0, growth, layers = 8, 6, 4
    dt = torch.float64
    x = torch.randn(2, c0, 10, 10, dtype=dt, device=device)
    ws = [torch.randn(growth, c0 + i * growth, 3, 3, dtype=dt, device=device) * 0.2 for i in range(layers)]
    bs = [torch.randn(growth, dtype=dt, device=device) for _ in range(layers)]
    feats = x
    for w, b in zip(ws, bs):
        feats = torch.cat([feats, torch.relu(F.conv2d(feats, w, b, 1, 1))], 1)
    buf = torch.empty(2, c0 + layers * growth, 10, 10, dtype=dt, device=device)
    buf = buf.contiguous(memory_format=torch.channels_last)
    buf[:, :c0] = x
    for i, (w, b) in enumerate(zip(ws, bs)):
        c = c0 + i * growth
        conv2d_into(buf[:, :c], w, b, buf, c, 1, 1, activation="relu")
    torch.testing.assert_close(buf, feats)


@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_conv2d_into_gradcheck(act):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 7, 3, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b, base):
        return conv2d_into(x, w, b, base.clone(), 2, 2, 1, activation=act)

    assert torch.autograd.gradcheck(fn, (x, w, b, base))


def test_conv2d_into_gradients_equal_cat():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 6, 6, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, requires_grad=True)
    y_cat = torch.cat([x, torch.relu(F.conv2d(x, w, None, 1, 1))], 1)
    g = torch.randn_like(y_cat)
    ref = torch.autograd.grad(y_cat, (x, w), g)
    buf = torch.zeros(2, 9, 6, 6).contiguous(memory_format=torch.channels_last)
    y = conv2d_into(x, w, None, resize_into(x, buf, 0), 5, 1, 1, activation="relu")
    got = torch.autograd.grad(y, (x, w), g)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", [((4, 4), (8, 8)), ((8, 8), (4, 4)), ((7, 7), (7, 7)), ((5, 3), (11, 6)),
                                   ((1, 1), (3, 3)), ((3, 3), (1, 1)), ((16, 16), (8, 8))])
@pytest.mark.parametrize("layout", ["cl", "nchw", "slice"])
def test_resize_into_matches_reference(sizes, layout, dtype, device):
    (h, w), (H, W) = sizes
    torch.manual_seed(3)
    if layout == "slice":
        x = torch.randn(2, 9, h, w, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)[:, 2:7]
    else:
        x = torch.randn(2, 5, h, w, dtype=dtype, device=device)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
    out = torch.randn(2, 12, H, W, dtype=dtype, device=device)
    if layout != "nchw":
        out = out.contiguous(memory_format=torch.channels_last)
    _check_resize_into(x, out, dtype, device)


def _check_resize_into(x, out, dtype, device):
    half = dtype in HALF_TOL
    # half types: a float64 reference of the same inputs (the kernel interpolates in fp32 and rounds once)
    if half:
        expected = resize_into_reference(x.double(), out.double(), 4)
    else:
        expected = resize_into_reference(x, out.clone(), 4)
    before = out.clone()
    outs = [out]
    assert resize_into(x, out, 4) is out
    if _has_cuda_op("resize_into_", device):  # the CUDA kernel itself, called directly
        direct = before.clone()
        torch.ops.dynconv.resize_into_(x, direct, 4)
        outs.append(direct)
    tol = HALF_TOL[dtype] if half else 1e-5 if dtype == torch.float32 else 1e-12
    for o in outs:
        torch.testing.assert_close(o.to(expected.dtype), expected, rtol=tol, atol=tol)
        assert torch.equal(o[:, :4], before[:, :4]) and torch.equal(o[:, 9:], before[:, 9:])


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sizes", [((4, 4), (8, 8)), ((8, 8), (4, 4)), ((7, 7), (7, 7)), ((5, 3), (11, 6))])
@pytest.mark.parametrize("layout", ["cl", "nchw", "slice"])
def test_resize_into_half_matches_reference(sizes, layout, dtype, device):
    (h, w), (H, W) = sizes
    torch.manual_seed(3)
    if layout == "slice":
        x = torch.randn(2, 9, h, w, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)[:, 2:7]
    else:
        x = torch.randn(2, 5, h, w, dtype=dtype, device=device)
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
    out = torch.randn(2, 12, H, W, dtype=dtype, device=device)
    if layout != "nchw":
        out = out.contiguous(memory_format=torch.channels_last)
    _check_resize_into(x, out, dtype, device)


@pytest.mark.parametrize("sizes", [((3, 4), (6, 7)), ((6, 6), (3, 3)), ((4, 4), (4, 4))])
def test_resize_into_gradcheck(sizes):
    (h, w), (H, W) = sizes
    x = torch.randn(1, 3, h, w, dtype=torch.float64, requires_grad=True)
    base = torch.randn(1, 5, H, W, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, base: resize_into(x, base.clone(), 1), (x, base))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_into_ops(device):
    if device == "cuda" and not (_has_cuda_op("conv2d_into_", device) and _has_cuda_op("resize_into_", device)):
        pytest.skip("this build has no CUDA kernels for the fused concat ops")
    x = torch.randn(2, 4, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 4, 3, 3, device=device)
    out = torch.zeros(2, 8, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.dynconv.conv2d_into_.default,
                          (x, w, torch.randn(3, device=device), out, 2, [1, 1], [1, 1], [1, 1], 1, 1))
    torch.library.opcheck(torch.ops.dynconv.resize_into_.default, (torch.randn(2, 3, 3, 3, device=device), out, 4))
    if device == "cuda":  # the half types, a depthwise conv, an NCHW buffer and a same-size copy
        h = torch.randn(2, 6, 5, 5, device=device, dtype=torch.float16)
        hout = torch.zeros(2, 10, 5, 5, device=device, dtype=torch.float16)
        torch.library.opcheck(torch.ops.dynconv.conv2d_into_.default,
                              (h, torch.randn(6, 1, 3, 3, device=device, dtype=torch.float16), None, hout, 3,
                               [1, 1], [1, 1], [1, 1], 6, 2))
        torch.library.opcheck(torch.ops.dynconv.resize_into_.default, (h.bfloat16(), hout.bfloat16(), 4))


def test_compile_fullgraph():
    def net(x, w1, w2):
        buf = torch.zeros(x.shape[0], 4 + 6 + 6, 8, 8).contiguous(memory_format=torch.channels_last)
        resize_into(x, buf, 0)
        conv2d_into(buf[:, :4], w1, None, buf, 4, 1, 1, activation="relu")
        conv2d_into(buf[:, :10], w2, None, buf, 10, 1, 1, activation="relu")
        return buf

    x, w1, w2 = torch.randn(2, 4, 4, 4), torch.randn(6, 4, 3, 3), torch.randn(6, 10, 3, 3)
    with torch.no_grad():
        expected = net(x, w1, w2)
        got = torch.compile(net, fullgraph=True, backend="aot_eager")(x, w1, w2)
    torch.testing.assert_close(got, expected)


def test_bad_input_names_the_argument():
    x, w = torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3)
    out = torch.zeros(2, 8, 6, 6)
    with pytest.raises(ValueError, match="channel_offset"):
        conv2d_into(x, w, None, out, 6, 1, 1)
    with pytest.raises(ValueError, match="out must be"):
        conv2d_into(x, w, None, torch.zeros(2, 8, 5, 5), 0, 1, 1)
    with pytest.raises(ValueError, match="input must be 4-D"):
        conv2d_into(x[0], w, None, out, 0, 1, 1)
    with pytest.raises(TypeError, match="out dtype"):
        conv2d_into(x, w, None, out.double(), 0, 1, 1)
    with pytest.raises(ValueError, match="weight expects"):
        conv2d_into(torch.randn(2, 5, 6, 6), w, None, out, 0, 1, 1)
    with pytest.raises(ValueError, match="activation"):
        conv2d_into(x, w, None, out, 0, 1, 1, activation="gelu")
    buf = torch.zeros(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="overlaps"):
        conv2d_into(buf[:, :4], w, None, buf, 2, 1, 1)
    with pytest.raises(ValueError, match="channel_offset"):
        resize_into(torch.randn(2, 4, 3, 3), out, 5)
    with pytest.raises(ValueError, match="batch"):
        resize_into(torch.randn(3, 4, 3, 3), out, 0)
    with pytest.raises(ValueError, match="backend"):
        resize_into(torch.randn(2, 4, 3, 3), out, 0, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):  # (CPU tensors only under TRITON_INTERPRET=1)
        conv2d_into(x, w, None, out, 0, 1, 1, backend="triton")
    # direct op calls are checked in C++ too
    with pytest.raises(RuntimeError, match="channel_offset"):
        torch.ops.dynconv.conv2d_into_(x, w, None, out, 7, [1, 1], [1, 1], [1, 1], 1, 0)


def test_unchecked_variants_match_and_fall_back():
    """conv2d_into_unchecked / resize_into_unchecked (the models' fused paths): the same result as the checked
    functionals; with autograd or another backend they go through the checked functionals (gradients flow)."""
    from dynconv_ext.ops.conv2d_into import conv2d_into_unchecked
    from dynconv_ext.ops.resize_into import resize_into_unchecked
    torch.manual_seed(5)
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(5, 6, 3, 3), torch.randn(5)
    out_a = torch.randn(2, 12, 9, 9).contiguous(memory_format=torch.channels_last)
    out_b = out_a.clone()
    conv2d_into(x, w, b, out_a, 4, 1, 1, activation="relu6")
    conv2d_into_unchecked(x, w, b, out_b, 4, [1, 1], [1, 1], [1, 1], 1, 2)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for backend in ("reference", "cpp"):
        r = torch.randn(2, 12, 9, 9).contiguous(memory_format=torch.channels_last)
        conv2d_into_unchecked(x, w, b, r, 4, [1, 1], [1, 1], [1, 1], 1, 2, backend=backend)
        torch.testing.assert_close(r[:, 4:9], out_a[:, 4:9], rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    y = conv2d_into_unchecked(xg, w, b, torch.zeros(2, 5, 9, 9), 0, [1, 1], [1, 1], [1, 1], 1, 1)
    y.sum().backward()
    xr = x.clone().requires_grad_(True)
    F.conv2d(xr, w, b, 1, 1).relu().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-4)
    lo = torch.randn(2, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    big_a = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    big_b = big_a.clone()
    resize_into(lo, big_a, 1)
    resize_into_unchecked(lo, big_b, 1)
    torch.testing.assert_close(big_a, big_b, rtol=0, atol=0)

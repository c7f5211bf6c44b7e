"""CUDA-device checks of the GPU backends (skipped, visibly, without a GPU)."""
import importlib

import pytest
import torch

import dynconv_ext
from dynconv_ext.ops import active_rows, conv2d_into, masked_conv2d, resize_into
from dynconv_ext.reference import (conv2d_into_reference, expand_block_mask, masked_conv2d_reference,
                                   resize_into_reference)

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


# The first call of each shape autotunes (several configs run on the same buffers): these shapes are fresh keys,
# so the checks also cover the residual (read, never accumulated into) and reset_to_zero of the atomic buffers.
# The fp32 and fp16 relu cases of case0, case3 and case4 passed under TRITON_INTERPRET=1 on CPU tensors (once,
# by hand: too slow for CI); bf16 cannot be checked there (the
# interpreter's tl.dot on bf16 returns garbage), so bf16 is first checked on a GPU.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-2), (torch.float16, 5e-2), (torch.bfloat16, 2.5e-1)])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("case", [
    # cin, cout, k, stride, padding, dilation, groups, block
    (32, 48, 3, 1, 1, 1, 1, 1),
    (64, 64, 3, 2, 1, 1, 1, 4),
    (32, 64, 1, 1, 0, 1, 1, 2),
    (48, 48, 3, 1, 2, 2, 3, 1),
    (32, 32, 3, 1, 1, 1, 32, 2),   # depthwise
])
def test_triton_backward_dtypes(dtype, tol, activation, case):
    cin, cout, k, s, p, d, groups, block = case
    x = torch.randn(3, cin, 17, 15, device="cuda")
    w = torch.randn(cout, cin // groups, k, k, device="cuda") / (cin // groups * k * k) ** 0.5
    b = torch.randn(cout, device="cuda") * 0.1
    ho = (17 + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (15 + 2 * p - d * (k - 1) - 1) // s + 1
    r = torch.randn(3, cout, ho, wo, device="cuda")
    m = torch.rand(3, -(-ho // block), -(-wo // block), device="cuda") < 0.4
    g = torch.randn(3, cout, ho, wo, device="cuda")
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b, r)]
    y = masked_conv2d(*leaves[:3], m, s, p, d, groups, block_size=block, residual=leaves[3], activation=activation,
                      backend="triton")
    got = torch.autograd.grad(y, leaves, g.to(dtype))
    ref_leaves = [t.detach().to(dtype).float().requires_grad_() for t in (x, w, b, r)]
    ref = masked_conv2d_reference(*ref_leaves[:3], m, s, p, d, groups, block, ref_leaves[3], activation)
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
    want = torch.autograd.grad(ref, ref_leaves, g)
    for name, a, r_ in zip(("input", "weight", "bias", "residual"), got, want):
        assert a.dtype == dtype, name
        scale = max(1.0, r_.abs().max().item())  # weight/bias grads sum many rows: compare relative to their size
        torch.testing.assert_close(a.float() / scale, r_ / scale, rtol=tol, atol=tol, msg=lambda msg: f"{name}: {msg}")


def test_triton_empty_and_full_masks_backward():
    x = torch.randn(2, 16, 9, 9, device="cuda", requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    for m in (torch.zeros(2, 9, 9, dtype=torch.bool, device="cuda"), torch.ones(2, 9, 9, dtype=torch.bool, device="cuda")):
        g = torch.randn(2, 16, 9, 9, device="cuda")
        got = torch.autograd.grad(masked_conv2d(x, w, b, m, 1, 1, activation="relu", backend="triton"), (x, w, b), g)
        want = torch.autograd.grad(masked_conv2d_reference(x, w, b, m, 1, 1, activation="relu"), (x, w, b), g)
        for a, r in zip(got, want):
            torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def test_triton_op_opcheck():
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda")
    pm = torch.rand(2, 9, 9, device="cuda") < 0.5
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_triton.default,
                          (x, w, None, pm, [1, 1], [1, 1], [1, 1], 1, None, 0))
    b, r = torch.randn(8, device="cuda"), torch.randn(2, 8, 9, 9, device="cuda")
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_triton.default,
                          (x, w, b, pm, [1, 1], [1, 1], [1, 1], 1, r, 2))


@pytest.mark.parametrize("activation", [0, 1])
@pytest.mark.parametrize("output_mask", [[True, True, True], [True, False, False], [False, True, True]])
def test_triton_backward_op_opcheck(activation, output_mask):
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w = torch.randn(16, 4, 3, 3, device="cuda")
    pm = torch.rand(2, 5, 5, device="cuda") < 0.5
    y = torch.ops.dynconv.masked_conv2d_triton(x, w, None, pm, [2, 2], [1, 1], [1, 1], 2, None, activation)
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_triton_backward.default,
                          (torch.randn_like(y), x, w, pm, y if activation else None, [2, 2], [1, 1], [1, 1], 2,
                           activation, output_mask))


def test_triton_compile_fullgraph_trains():
    x = torch.randn(2, 16, 10, 10, device="cuda", requires_grad=True)
    w = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
    m = torch.rand(2, 10, 10, device="cuda") < 0.5

    def f(x, w):
        return masked_conv2d(x, w, None, m, 1, 1, activation="relu", backend="triton").square().sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w), (x, w))
    want = torch.autograd.grad(masked_conv2d_reference(x, w, None, m, 1, 1, activation="relu").square().sum(), (x, w))
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def test_auto_on_cuda_is_correct():
    x = torch.randn(2, 8, 9, 9, device="cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda")
    m = torch.rand(2, 9, 9, device="cuda") < 0.5
    torch.testing.assert_close(masked_conv2d(x, w, None, m, 1, 1), masked_conv2d_reference(x, w, None, m, 1, 1))


# ---------------------------------------------------------------------------------------------------
# The CUDA C++ kernels (backend="cuda"): csrc/cuda/masked_conv2d_cuda.cu
# ---------------------------------------------------------------------------------------------------
cuda_kernel = pytest.mark.skipif(
    not (dynconv_ext.build_info()["cuda"]
         and torch._C._dispatch_has_kernel_for_dispatch_key("dynconv::masked_conv2d", "CUDA")),
    reason="dynconv_ext was built without its CUDA kernels")

NEVER = 2.0  # dense_threshold above 1: always the sparse kernel
TOL = {torch.float32: 2e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _ref64(x, w, b, m, stride, padding, dilation, groups, block, residual=None, activation=None):
    """The reference in float64 (cuDNN does not use TF32 there), for comparing any dtype."""
    d = (lambda t: None if t is None else t.double())
    return masked_conv2d_reference(d(x), d(w), d(b), m, stride, padding, dilation, groups, block, d(residual),
                                   activation)


def _close(got, ref, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def _mask(n, ho, wo, block, density, device="cuda"):
    return torch.rand(n, -(-ho // block), -(-wo // block), device=device) < density


@cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("block", [1, 2, 4, 8])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_cuda_forward_matches_reference(dtype, block, channels_last):
    # 19x19: edge blocks are partial for b = 2, 4, 8; 40 and 72 output channels: partial column tiles.
    x = torch.randn(3, 24, 19, 19, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(72, 24, 3, 3, device="cuda") * 0.1).to(dtype)
    b = torch.randn(72, device="cuda", dtype=dtype)
    m = _mask(3, 19, 19, block, 0.4)
    y = masked_conv2d(x, w, b, m, 1, 1, block_size=block, backend="cuda")
    assert y.dtype == dtype and y.shape == (3, 72, 19, 19)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    _close(y, _ref64(x, w, b, m, 1, 1, 1, 1, block), dtype)


GEOMETRIES = [  # (C, Co, kernel, stride, padding, dilation, groups)
    (16, 32, (1, 1), 1, 0, 1, 1),
    (16, 32, (1, 1), 2, 0, 1, 1),
    (24, 40, (3, 3), 2, 1, 1, 1),
    (8, 16, (3, 3), 1, 2, 2, 1),
    (16, 24, (3, 5), (2, 1), (1, 2), (1, 2), 4),
    (96, 130, (3, 3), 1, 1, 1, 1),      # K = 864 and three column tiles
    (32, 160, (3, 3), 1, 1, 1, 2),      # 80 output channels per group: two column tiles per group
    (32, 32, (3, 3), 1, 1, 1, 32),      # depthwise
    (16, 32, (3, 3), 2, 1, 1, 16),      # depthwise with a channel multiplier of 2
    (12, 12, (5, 5), 1, 2, 1, 12),      # depthwise 5x5
    (3, 16, (7, 7), 2, 3, 1, 1),        # stem-like: 3 input channels
]


@cuda_kernel
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[f"g{i}" for i in range(len(GEOMETRIES))])
@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_geometries(geom, block, dtype):
    c, co, k, stride, padding, dilation, groups = geom
    x = torch.randn(2, c, 17, 15, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(co, c // groups, *k, device="cuda") * 0.2).to(dtype)
    b = torch.randn(co, device="cuda", dtype=dtype)
    ho, wo = masked_conv2d(x, w, b, None, stride, padding, dilation, groups).shape[-2:]
    m = _mask(2, ho, wo, block, 0.5)
    y = masked_conv2d(x, w, b, m, stride, padding, dilation, groups, block_size=block, backend="cuda")
    _close(y, _ref64(x, w, b, m, stride, padding, dilation, groups, block), dtype)


@cuda_kernel
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("res_layout", ["nchw", "nhwc", "strided"])
def test_cuda_residual_and_activation(activation, groups, dtype, res_layout):
    x = torch.randn(2, 8, 12, 12, device="cuda", dtype=dtype)
    w = torch.randn(8, 8 // groups, 3, 3, device="cuda", dtype=dtype)
    b = torch.randn(8, device="cuda", dtype=dtype)
    r = torch.randn(2, 8, 12, 12, device="cuda", dtype=dtype) * 4
    if res_layout == "nhwc":
        r = r.contiguous(memory_format=torch.channels_last)
    elif res_layout == "strided":
        r = torch.randn(2, 8, 12, 24, device="cuda", dtype=dtype)[..., ::2]
    m = _mask(2, 6, 6, 2, 0.5)
    y = masked_conv2d(x, w, b, m, 1, 1, groups=groups, residual=r, activation=activation, backend="cuda")
    ref = _ref64(x, w, b, m, 1, 1, 1, groups, 2, r, activation)
    _close(y, ref, dtype)
    # In place: active pixels written into the residual, inactive ones untouched (bit-exact).
    r2 = r.clone()
    with torch.no_grad():
        out = masked_conv2d(x, w, b, m, 1, 1, groups=groups, residual=r2, activation=activation, backend="cuda",
                            inplace=True)
    assert out.data_ptr() == r2.data_ptr()
    _close(r2, ref, dtype)
    inactive = ~expand_block_mask(m, 2, (12, 12)).expand_as(r)
    assert torch.equal(r2[inactive], r[inactive])


@cuda_kernel
@pytest.mark.parametrize("density", [0.0, 1.0], ids=["empty", "full"])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_empty_and_full_masks(density, residual):
    x = torch.randn(2, 16, 10, 10, device="cuda")
    w = torch.randn(24, 16, 3, 3, device="cuda")
    b = torch.randn(24, device="cuda")
    r = torch.randn(2, 24, 10, 10, device="cuda") if residual else None
    m = torch.full((2, 10, 10), bool(density), device="cuda")
    y = masked_conv2d(x, w, b, m, 1, 1, residual=r, backend="cuda")
    _close(y, _ref64(x, w, b, m, 1, 1, 1, 1, 1, r), torch.float32)
    if density == 0.0:
        assert torch.equal(y, r if residual else torch.zeros_like(y))


@cuda_kernel
def test_cuda_zero_inactive_false_and_rows():
    x = torch.randn(2, 16, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, device="cuda")
    m = _mask(2, 14, 14, 1, 0.3)
    ref = _ref64(x, w, None, m, 1, 1, 1, 1, 1)
    pm = expand_block_mask(m, 1, (14, 14)).expand_as(ref)
    y = masked_conv2d(x, w, None, m, 1, 1, backend="cuda", zero_inactive=False)
    _close(y[pm], ref[pm], torch.float32)  # inactive pixels are unspecified
    rows = active_rows(m, (14, 14))
    assert rows.device.type == "cuda"
    _close(masked_conv2d(x, w, None, m, 1, 1, backend="cuda", rows=rows), ref, torch.float32)
    with pytest.raises(RuntimeError, match="rows"):
        masked_conv2d(x, w, None, m, 1, 1, backend="cuda", rows=rows.cpu())


@cuda_kernel
@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.9, 1.0, NEVER])
@pytest.mark.parametrize("residual", [False, True])
def test_cuda_dense_threshold_paths(threshold, residual):
    """Dense fallback (cuDNN then mask) and sparse kernel agree, on either side of the threshold."""
    x = torch.randn(2, 16, 12, 12, device="cuda", dtype=torch.float64)
    w = torch.randn(24, 16, 3, 3, device="cuda", dtype=torch.float64)
    b = torch.randn(24, device="cuda", dtype=torch.float64)
    r = torch.randn(2, 24, 12, 12, device="cuda", dtype=torch.float64) if residual else None
    m = _mask(2, 12, 12, 1, 0.5)
    ref = _ref64(x, w, b, m, 1, 1, 1, 1, 1, r, "relu")
    y = torch.ops.dynconv.masked_conv2d(x, w, b, m, [1, 1], [1, 1], [1, 1], 1, 1, r, 1, threshold, True, None)
    _close(y, ref, torch.float64)
    gi, gw, gb = torch.ops.dynconv.masked_conv2d_backward(torch.ones_like(ref), x, w, m, [1, 1], [1, 1], [1, 1], 1, 1,
                                                          [True, True, True], threshold)
    gi0, gw0, gb0 = torch.ops.dynconv.masked_conv2d_backward(torch.ones_like(ref), x, w, m, [1, 1], [1, 1], [1, 1], 1,
                                                             1, [True, True, True], 0.0)
    for a, e in ((gi, gi0), (gw, gw0), (gb, gb0)):
        _close(a, e.double(), torch.float64)


@cuda_kernel
@pytest.mark.parametrize("geom", [GEOMETRIES[2], GEOMETRIES[4], GEOMETRIES[6], GEOMETRIES[8]],
                         ids=["stride2", "groups4", "groups2_wide", "depthwise_x2"])
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_cuda_backward_matches_reference(geom, block, activation):
    c, co, k, stride, padding, dilation, groups = geom
    dt = torch.float64
    x = torch.randn(2, c, 13, 11, device="cuda", dtype=dt, requires_grad=True)
    w = torch.randn(co, c // groups, *k, device="cuda", dtype=dt, requires_grad=True)
    b = torch.randn(co, device="cuda", dtype=dt, requires_grad=True)
    ho, wo = masked_conv2d(x.detach(), w.detach(), None, None, stride, padding, dilation, groups).shape[-2:]
    r = torch.randn(2, co, ho, wo, device="cuda", dtype=dt, requires_grad=True)
    m = _mask(2, ho, wo, block, 0.5)
    g = torch.randn(2, co, ho, wo, device="cuda", dtype=dt)
    y = masked_conv2d(x, w, b, m, stride, padding, dilation, groups, block_size=block, residual=r,
                      activation=activation, backend="cuda")
    got = torch.autograd.grad(y, (x, w, b, r), g)
    ref = torch.autograd.grad(masked_conv2d_reference(x, w, b, m, stride, padding, dilation, groups, block, r,
                                                      activation), (x, w, b, r), g)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


@cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_backward_low_precision(dtype):
    x = torch.randn(2, 32, 14, 14, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(48, 32, 3, 3, device="cuda") * 0.1).to(dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    m = _mask(2, 7, 7, 2, 0.5)
    g = torch.randn(2, 48, 14, 14, device="cuda", dtype=dtype)
    got = torch.autograd.grad(masked_conv2d(x, w, None, m, 1, 1, backend="cuda"), (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.autograd.grad(masked_conv2d_reference(x64, w64, None, m, 1, 1, 1, 1, 2), (x64, w64), g.double())
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for a, e in zip(got, ref):
        scale = e.abs().max().item()
        torch.testing.assert_close(a.double() / scale, e / scale, rtol=0, atol=2 * TOL[dtype])


@cuda_kernel
def test_cuda_gradcheck():
    x = torch.randn(1, 4, 6, 6, device="cuda", dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, device="cuda", dtype=torch.float64, requires_grad=True)
    m = _mask(1, 3, 3, 2, 0.6)
    # atomicAdd reductions may sum in a different order on each call: allow rounding-level differences.
    assert torch.autograd.gradcheck(
        lambda x, w, b: masked_conv2d(x, w, b, m, 2, 1, groups=2, block_size=2, backend="cuda"), (x, w, b),
        nondet_tol=1e-10)


@cuda_kernel
def test_cuda_opcheck():
    dt = torch.float64  # atomicAdd reductions: float64 keeps order effects far below opcheck's tolerances
    x = torch.randn(2, 8, 9, 9, device="cuda", dtype=dt, requires_grad=True)
    w = torch.randn(16, 4, 3, 3, device="cuda", dtype=dt, requires_grad=True)
    b = torch.randn(16, device="cuda", dtype=dt, requires_grad=True)
    r = torch.randn(2, 16, 9, 9, device="cuda", dtype=dt)
    m = _mask(2, 5, 5, 2, 0.5)
    args = (x, w, b, m, [1, 1], [1, 1], [1, 1], 2, 2)
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d.default, args + (None, 1, NEVER, True, None))
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d.default, args + (r, 2, NEVER, True, None))
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d.default, args + (None, 0, 0.3, True, None))
    plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_residual_.default, plain + (r.clone(), 1, NEVER, None))
    go = torch.randn(2, 16, 9, 9, device="cuda", dtype=dt)
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_backward.default,
                          (go, plain[0], plain[1], m, [1, 1], [1, 1], [1, 1], 2, 2, [True, True, True], NEVER))
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_backward.default,
                          (go, plain[0], plain[1], m, [1, 1], [1, 1], [1, 1], 2, 2, [False, True, False], NEVER))


@cuda_kernel
def test_cuda_forward_does_not_sync():
    x = torch.randn(2, 16, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, device="cuda")
    m = _mask(2, 4, 4, 4, 0.5)
    masked_conv2d(x, w, None, m, 1, 1, backend="cuda")  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masked_conv2d(x, w, None, m, 1, 1, backend="cuda")
        masked_conv2d(x, w[:16, :1].contiguous(), None, m, 1, 1, groups=16, backend="cuda")  # depthwise kernel
        masked_conv2d(x, w, None, m, 1, 1, residual=torch.zeros(2, 32, 16, 16, device="cuda"), activation="relu",
                      backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda_kernel
@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_cuda_graph_capture(backend):
    """The forward captures into a CUDA graph (no host sync) and replays with new mask contents: the active
    count lives on the device. backend="auto" (threshold <= 1) takes the sparse path while capturing."""
    x = torch.randn(2, 16, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 3, 3, device="cuda")
    b = torch.randn(32, device="cuda")
    m = _mask(2, 8, 8, 2, 0.3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            masked_conv2d(x, w, b, m, 1, 1, backend=backend)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = masked_conv2d(x, w, b, m, 1, 1, backend=backend)
    for density in (0.1, 0.7, 1.0, 0.0):
        m.copy_(_mask(2, 8, 8, 2, density))
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _close(y, _ref64(x, w, b, m, 1, 1, 1, 1, 2), torch.float32)


@cuda_kernel
def test_cuda_auto_uses_cuda_kernel_and_matches():
    x = torch.randn(2, 16, 12, 12, device="cuda")
    w = torch.randn(16, 16, 3, 3, device="cuda")
    for density in (0.2, 0.8):  # either side of the CUDA placeholder crossover
        m = _mask(2, 12, 12, 1, density)
        _close(masked_conv2d(x, w, None, m, 1, 1), _ref64(x, w, None, m, 1, 1, 1, 1, 1), torch.float32)


@cuda_kernel
def test_cuda_bad_input_names_argument():
    x = torch.randn(1, 8, 8, 8, device="cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda")
    m = torch.rand(1, 8, 8, device="cuda") < 0.5
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.dynconv.masked_conv2d(x, w.cpu(), None, m, [1, 1], [1, 1], [1, 1], 1, 1, None, 0, NEVER, True, None)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.dynconv.masked_conv2d(x, w, None, m.cpu(), [1, 1], [1, 1], [1, 1], 1, 1, None, 0, NEVER, True, None)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.dynconv.masked_conv2d_backward(torch.randn(1, 8, 8, 8), x, w, m, [1, 1], [1, 1], [1, 1], 1, 1,
                                                 [True, True, True], NEVER)


# ---------------------------------------------------------------------------------------------------
# The Triton kernels of the fused concat ops (backend="triton"): dynconv_ext/triton/conv2d_into.py, resize_into.py
# ---------------------------------------------------------------------------------------------------
INTO_TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _into_input(n, c, h, w, dtype, in_slice):
    if in_slice:  # a channel slice of a wider channels-last buffer, read in place
        buf = torch.randn(n, c + 9, h, w, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        return buf[:, 4:4 + c]
    return torch.randn(n, c, h, w, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["slice-nhwc", "nchw-nchw", "slice-nchw"])
@pytest.mark.parametrize("case", [
    # cin, cout, k, stride, padding, dilation, groups, activation
    (64, 48, 3, 1, 1, 1, 1, "relu"),
    (40, 72, 3, 2, 1, 1, 1, None),
    (96, 32, 1, 1, 0, 1, 1, "relu6"),
    (48, 48, 3, 1, 2, 2, 3, "relu"),     # groups of 16 input channels (dot path), dilated
    (32, 32, 3, 1, 1, 1, 32, "relu6"),   # depthwise (rank-1 path)
    (3, 24, 3, 2, 1, 1, 1, "relu"),      # RGB stem (rank-1 path)
], ids=["3x3", "s2", "1x1", "g3d2", "dw", "stem"])
def test_triton_conv2d_into_matches_reference(dtype, layout, case):
    cin, cout, k, s, p, d, groups, act = case
    in_slice, cl_out = layout.startswith("slice"), layout.endswith("nhwc")
    x = _into_input(3, cin, 17, 15, dtype, in_slice)
    w = (torch.randn(cout, cin // groups, k, k, device="cuda") / (cin // groups * k * k) ** 0.5).to(dtype)
    b = (torch.randn(cout, device="cuda") * 0.1).to(dtype)
    ho = (17 + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (15 + 2 * p - d * (k - 1) - 1) // s + 1
    off, extra = 5, 7
    out = torch.randn(3, off + cout + extra, ho, wo, device="cuda", dtype=dtype)
    if cl_out:
        out = out.contiguous(memory_format=torch.channels_last)
    before = out.clone()
    conv2d_into(x, w, b, out, off, s, p, d, groups, activation=act, backend="triton")
    ref = conv2d_into_reference(x.double(), w.double(), b.double(), before.double(), off, s, p, d, groups, act)
    tol = INTO_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert torch.equal(out[:, :off], before[:, :off]) and torch.equal(out[:, off + cout:], before[:, off + cout:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("sizes", [((7, 9), (14, 17)), ((28, 28), (14, 14)), ((12, 10), (12, 10)), ((5, 6), (1, 1)),
                                   ((1, 1), (8, 8))], ids=["up", "down", "same", "to1", "from1"])
@pytest.mark.parametrize("layout", ["slice-nhwc", "nchw-nchw"])
def test_triton_resize_into_matches_reference(dtype, sizes, layout):
    (h, w), (H, W) = sizes
    x = _into_input(2, 70, h, w, dtype, layout.startswith("slice"))
    off = 3
    out = torch.randn(2, off + 70 + 5, H, W, device="cuda", dtype=dtype)
    if layout.endswith("nhwc"):
        out = out.contiguous(memory_format=torch.channels_last)
    before = out.clone()
    resize_into(x, out, off, backend="triton")
    ref = resize_into_reference(x.double(), before.double(), off)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert torch.equal(out[:, :off], before[:, :off]) and torch.equal(out[:, off + 70:], before[:, off + 70:])


def test_triton_into_dense_block_in_one_buffer():
    c0, growth, layers = 32, 16, 4
    buf = torch.randn(2, c0 + layers * growth, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    ref = buf.double()
    for i in range(layers):
        c = c0 + i * growth
        w, b = torch.randn(growth, c, 3, 3, device="cuda") / (9 * c) ** 0.5, torch.randn(growth, device="cuda")
        conv2d_into(buf[:, :c], w, b, buf, c, 1, 1, activation="relu", backend="triton")
        conv2d_into_reference(ref[:, :c], w.double(), b.double(), ref, c, 1, 1, 1, 1, "relu")
    torch.testing.assert_close(buf.double(), ref, rtol=1e-3, atol=1e-3)


def test_triton_into_grads_match_reference():
    x = torch.randn(2, 24, 9, 9, device="cuda", requires_grad=True)
    w = (torch.randn(16, 24, 3, 3, device="cuda") * 0.1).requires_grad_()
    b = torch.randn(16, device="cuda", requires_grad=True)
    g = torch.randn(2, 20, 9, 9, device="cuda")
    y = conv2d_into(x, w, b, torch.zeros(2, 20, 9, 9, device="cuda"), 4, 1, 1, activation="relu", backend="triton")
    yr = conv2d_into_reference(x, w, b, torch.zeros(2, 20, 9, 9, device="cuda"), 4, 1, 1, 1, 1, "relu")
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(yr, (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3)
    z = torch.randn(2, 8, 5, 5, device="cuda", requires_grad=True)
    y = resize_into(z, torch.zeros(2, 10, 9, 9, device="cuda"), 1, backend="triton")
    yr = resize_into_reference(z, torch.zeros(2, 10, 9, 9, device="cuda"), 1)
    g = torch.randn_like(yr)
    torch.testing.assert_close(torch.autograd.grad(y, z, g)[0], torch.autograd.grad(yr, z, g)[0])


def test_triton_into_ops_opcheck():
    importlib.import_module("dynconv_ext.triton.ops")  # registers the ops
    x = torch.randn(2, 16, 9, 9, device="cuda").contiguous(memory_format=torch.channels_last)
    out = torch.zeros(2, 30, 9, 9, device="cuda").contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.dynconv.conv2d_into_triton.default,
                          (x, torch.randn(12, 8, 3, 3, device="cuda"), torch.randn(12, device="cuda"), out, 3,
                           [1, 1], [1, 1], [1, 1], 2, 1))
    torch.library.opcheck(torch.ops.dynconv.conv2d_into_triton.default,
                          (x, torch.randn(12, 16, 1, 1, device="cuda"), None, out, 0, [1, 1], [0, 0], [1, 1], 1, 0))
    torch.library.opcheck(torch.ops.dynconv.resize_into_triton.default, (torch.randn(2, 6, 4, 5, device="cuda"), out, 20))


def test_triton_into_compile_fullgraph():
    x = torch.randn(2, 16, 10, 10, device="cuda")
    w, b = torch.randn(8, 16, 3, 3, device="cuda") * 0.1, torch.randn(8, device="cuda")
    c = torch.randn(2, 4, 5, 5, device="cuda")

    def f(x, w, b, c, impl):
        buf = torch.zeros(2, 12, 10, 10, device="cuda").contiguous(memory_format=torch.channels_last)
        if impl == "triton":
            conv2d_into(x, w, b, buf, 0, 1, 1, activation="relu", backend="triton")
            resize_into(c, buf, 8, backend="triton")
        else:
            conv2d_into_reference(x, w, b, buf, 0, 1, 1, 1, 1, "relu")
            resize_into_reference(c, buf, 8)
        return buf * 2

    got = torch.compile(f, fullgraph=True)(x, w, b, c, "triton")
    torch.testing.assert_close(got, f(x, w, b, c, "reference"), rtol=1e-3, atol=1e-3)

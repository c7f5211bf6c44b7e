"""Checks the CUDA kernels of masked_conv2d, conv2d_into_ and resize_into_ without a GPU: builds
python/tools/cuda_host_emulation.cpp (the device code of csrc/cuda/*_kernels.cuh run as host threads) and compares
with dynconv_ext.reference: masked_conv2d forward (all dtypes, masks, groups, depthwise, residual, activations, in
place) and backward (float64); conv2d_into (all dtypes, groups, depthwise, channel-slice / strided / NCHW inputs,
NCHW / channels-last output slices, several row and column tiles) and resize_into (up / down / same size, layouts,
channel slices, all dtypes, the grid-stride loop).

    python python/tools/cuda_host_emulation.py [all|masked|into]   # from the repository root; minutes to build
"""
import os
import sys
import tempfile

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from dynconv_ext.reference import expand_block_mask  # noqa: E402
from dynconv_ext.reference import conv2d_into_reference, resize_into_reference  # noqa: E402
from dynconv_ext.reference import masked_conv2d_reference as ref  # noqa: E402

build_dir = os.path.join(tempfile.gettempdir(), "dynconv_cuda_host_emulation")
os.makedirs(build_dir, exist_ok=True)
m = load("dynconv_cuda_host_emulation", [os.path.join(ROOT, "python", "tools", "cuda_host_emulation.cpp")],
         extra_cflags=["-O1", "-std=c++20"], build_directory=build_dir, verbose=False)
torch.manual_seed(0)
def cfg_run(N, C, H, W, Co, k, stride, pad, dil, G, block, dens, dtype=torch.float64, res=False, act=0, cl=True,
            inplace=False, zero=True, use_count=True):
    x = torch.randn(N, C, H, W, dtype=dtype)
    if cl: x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(Co, C // G, *k, dtype=dtype) * 0.3
    b = torch.randn(Co, dtype=dtype)
    Ho = (H + 2*pad[0] - dil[0]*(k[0]-1) - 1)//stride[0] + 1; Wo = (W + 2*pad[1] - dil[1]*(k[1]-1) - 1)//stride[1] + 1
    mask = torch.rand(N, -(-Ho//block), -(-Wo//block)) < dens
    r = torch.randn(N, Co, Ho, Wo, dtype=dtype) if res else None
    r0 = r.clone() if res else None
    out, rows, count = m.forward(x, w, b, mask, list(stride), list(pad), list(dil), G, block, r, act, inplace, zero, use_count)
    actname = {0: None, 1: "relu", 2: "relu6"}[act]
    e = ref(x.double(), w.double(), b.double(), mask, stride, pad, dil, G, block, None if r0 is None else r0.double(), actname)
    pm = expand_block_mask(mask, block, (Ho, Wo)).expand_as(e)
    tol = 1e-9 if dtype == torch.float64 else 2e-2
    sel = pm if not zero and not res else torch.ones_like(pm)
    assert torch.allclose(out.double()[sel], e[sel], atol=tol, rtol=tol), (out.double() - e).abs().max()
    assert int(count) == int(pm[:, 0].sum()), (int(count), int(pm.sum()))
    assert sorted(rows[:int(count)].tolist()) == torch.nonzero(pm[:, 0].reshape(-1)).reshape(-1).tolist()
    if inplace: assert out.data_ptr() == r.data_ptr()
    # backward (float64)
    if dtype == torch.float64 and not res and act == 0:
        go = torch.randn(N, Co, Ho, Wo, dtype=dtype)
        gi, gw = m.backward(go, x, w, mask, list(stride), list(pad), list(dil), G, block)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        gx, gww = torch.autograd.grad(ref(xr, wr, None, mask, stride, pad, dil, G, block), (xr, wr), go)
        assert torch.allclose(gi, gx, atol=1e-9), (gi - gx).abs().max()
        assert torch.allclose(gw, gww, atol=1e-9), (gw - gww).abs().max()
cases = [
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=1, dens=0.5),
    dict(N=2, C=20, H=11, W=7, Co=70, k=(3, 3), stride=(2, 1), pad=(1, 2), dil=(1, 2), G=1, block=2, dens=0.6),
    dict(N=1, C=16, H=10, W=10, Co=24, k=(3, 5), stride=(1, 1), pad=(1, 2), dil=(1, 1), G=4, block=4, dens=0.7, cl=False),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=8, block=1, dens=0.5),  # depthwise x2
    dict(N=2, C=8, H=9, W=9, Co=16, k=(1, 1), stride=(1, 1), pad=(0, 0), dil=(1, 1), G=1, block=8, dens=0.5),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=1, dens=0.5, res=True, act=1),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=8, block=1, dens=0.5, res=True, act=2, inplace=True),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=1, dens=0.5, res=True, act=2, inplace=True, cl=False),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=1, dens=0.5, zero=False),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=1, dens=0.0),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=1, dens=1.0, use_count=False),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=2, dens=0.5, dtype=torch.float16),
    dict(N=2, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=8, block=2, dens=0.5, dtype=torch.bfloat16, res=True, act=1),
    dict(N=1, C=40, H=6, W=6, Co=8, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=2, block=1, dens=0.9, dtype=torch.float32),
]

# ---------------------------------------------------------------------------------------------------------------
# conv2d_into_ and resize_into_
# ---------------------------------------------------------------------------------------------------------------
INTO_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def into_run(N, C, H, W, Co, k, stride, pad, dil, G, act, layout, cl_out, off, extra, dtype):
    src = torch.randn(N, C + 7, H + 3, W + 2, dtype=dtype)
    if layout == "nchw":  # not readable in place: copied to channels-last
        x = src[:, :C, :H, :W].contiguous()
    elif layout == "cl":
        x = src[:, :C, :H, :W].contiguous(memory_format=torch.channels_last)
    elif layout == "slice":  # a channel slice of a channels-last buffer, read in place
        x = src.contiguous(memory_format=torch.channels_last)[:, 3:3 + C, :H, :W]
    else:  # "strided": channel slice with spatial steps (pixel strides not those of a dense image)
        big = torch.randn(N, C + 7, 2 * H, 2 * W, dtype=dtype).contiguous(memory_format=torch.channels_last)
        x = big[:, 2:2 + C, ::2, 1::2]
    w = torch.randn(Co, C // G, *k, dtype=dtype) * 0.3
    b = torch.randn(Co, dtype=dtype) if act != 1 else None
    Ho = (H + 2*pad[0] - dil[0]*(k[0]-1) - 1)//stride[0] + 1; Wo = (W + 2*pad[1] - dil[1]*(k[1]-1) - 1)//stride[1] + 1
    out = torch.randn(N, off + Co + extra, Ho, Wo, dtype=dtype)
    if cl_out: out = out.contiguous(memory_format=torch.channels_last)
    d = torch.float64
    e = conv2d_into_reference(x.to(d), w.to(d), None if b is None else b.to(d), out.to(d, copy=True), off, stride,
                              pad, dil, G, {0: None, 1: "relu", 2: "relu6"}[act])
    before = out.clone()
    m.conv2d_into(x, w, b, out, off, list(stride), list(pad), list(dil), G, act)
    tol = INTO_TOL[dtype]
    assert torch.allclose(out.to(d), e, atol=tol, rtol=tol), (out.to(d) - e).abs().max()
    assert torch.equal(out[:, :off], before[:, :off]) and torch.equal(out[:, off + Co:], before[:, off + Co:])


def resize_run(N, C, hw, HW, layout, dtype, blocks):
    (h, w), (H, W) = hw, HW
    if layout == "slice":
        x = torch.randn(N, C + 4, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)[:, 2:2 + C]
    else:
        x = torch.randn(N, C, h, w, dtype=dtype)
        if layout == "cl": x = x.contiguous(memory_format=torch.channels_last)
    out = torch.randn(N, C + 7, H, W, dtype=dtype)
    if layout != "nchw": out = out.contiguous(memory_format=torch.channels_last)
    e = resize_into_reference(x.double(), out.double(), 3)
    before = out.clone()
    m.resize_into(x, out, 3, blocks)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, INTO_TOL[dtype])
    assert torch.allclose(out.double(), e, atol=tol, rtol=tol), (out.double() - e).abs().max()
    assert torch.equal(out[:, :3], before[:, :3]) and torch.equal(out[:, 3 + C:], before[:, 3 + C:])
    if (h, w) == (H, W):  # a copy: bit-exact
        assert torch.equal(out[:, 3:3 + C], x)


into_cases = [
    # several row tiles (P = 2*13*11 > 64), several column tiles (Co > 64), K = 9*20 > kBK, partial tiles
    dict(N=2, C=20, H=13, W=11, Co=70, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, act=1, layout="slice",
         cl_out=True, off=5, extra=3),
    dict(N=2, C=20, H=13, W=11, Co=130, k=(3, 3), stride=(2, 1), pad=(1, 2), dil=(1, 2), G=1, act=0,
         layout="strided", cl_out=True, off=0, extra=0),
    dict(N=1, C=16, H=10, W=9, Co=24, k=(3, 5), stride=(1, 2), pad=(1, 2), dil=(1, 1), G=4, act=2, layout="nchw",
         cl_out=False, off=7, extra=2),
    dict(N=3, C=8, H=9, W=9, Co=16, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(2, 2), G=8, act=2, layout="slice",
         cl_out=True, off=4, extra=1),  # depthwise x2
    dict(N=2, C=8, H=7, W=12, Co=8, k=(3, 3), stride=(2, 2), pad=(1, 1), dil=(1, 1), G=8, act=0, layout="strided",
         cl_out=False, off=0, extra=5),  # depthwise, strided input, NCHW out
    dict(N=2, C=33, H=8, W=8, Co=17, k=(1, 1), stride=(1, 1), pad=(0, 0), dil=(1, 1), G=1, act=1, layout="cl",
         cl_out=True, off=9, extra=0),
    dict(N=1, C=40, H=6, W=6, Co=8, k=(3, 3), stride=(1, 1), pad=(0, 0), dil=(1, 1), G=2, act=0, layout="slice",
         cl_out=False, off=1, extra=1),
    dict(N=2, C=1, H=5, W=5, Co=3, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, act=0, layout="nchw",
         cl_out=True, off=0, extra=0),  # one input channel (Cg = 1, G = 1: the depthwise kernel)
]
resize_cases = [((4, 4), (8, 8)), ((8, 8), (4, 4)), ((7, 7), (7, 7)), ((5, 3), (11, 6)), ((1, 1), (3, 3)),
                ((3, 3), (1, 1)), ((16, 16), (8, 8)), ((2, 9), (5, 4))]


def run_masked():
    for i, c in enumerate(cases):
        cfg_run(**c); print("ok", i, flush=True)
    # grad_weight with more rows than one split (kWgradRowsPerBlock = 256) and K > 64
    cfg_run(N=3, C=12, H=16, W=16, Co=10, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=1, dens=0.8)
    print("ok split")


def run_into():
    for i, c in enumerate(into_cases):
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            into_run(**c, dtype=dtype)
        print("ok conv2d_into", i, flush=True)
    # a DenseNet-style chain in one channels-last buffer: each layer reads the filled prefix of the buffer it writes
    for dtype in (torch.float64, torch.float32):
        c0, growth, layers = 8, 6, 4
        x = torch.randn(2, c0, 10, 10, dtype=dtype)
        ws = [torch.randn(growth, c0 + i * growth, 3, 3, dtype=dtype) * 0.2 for i in range(layers)]
        feats = x.double()
        for w in ws:
            feats = torch.cat([feats, torch.relu(torch.nn.functional.conv2d(feats, w.double(), None, 1, 1))], 1)
        buf = torch.zeros(2, c0 + layers * growth, 10, 10, dtype=dtype).contiguous(memory_format=torch.channels_last)
        m.resize_into(x, buf, 0, 2)
        for i, w in enumerate(ws):
            m.conv2d_into(buf[:, :c0 + i * growth], w, None, buf, c0 + i * growth, [1, 1], [1, 1], [1, 1], 1, 1)
        assert torch.allclose(buf.double(), feats, atol=INTO_TOL[dtype], rtol=INTO_TOL[dtype])
    print("ok conv2d_into chain", flush=True)
    for i, (hw, HW) in enumerate(resize_cases):
        for layout in ("cl", "nchw", "slice"):
            for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
                resize_run(2, 5, hw, HW, layout, dtype, blocks=3)
        print("ok resize_into", i, flush=True)


what = sys.argv[1] if len(sys.argv) > 1 else "all"
if what in ("all", "masked"):
    run_masked()
if what in ("all", "into"):
    run_into()

"""Checks the CUDA kernels of masked_conv2d without a GPU: builds python/tools/cuda_host_emulation.cpp (the device
code of csrc/cuda/masked_conv2d_kernels.cuh run as host threads) and compares forward (all dtypes, masks, groups,
depthwise, residual, activations, in place) and backward (float64) with dynconv_ext.reference.

    python python/tools/cuda_host_emulation.py      # from the repository root; a few minutes to build
"""
import os
import sys
import tempfile

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from dynconv_ext.reference import expand_block_mask  # noqa: E402
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
for i, c in enumerate(cases):
    cfg_run(**c); print("ok", i, flush=True)
# grad_weight with more rows than one split (kWgradRowsPerBlock = 256) and K > 64
cfg_run(N=3, C=12, H=16, W=16, Co=10, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), G=1, block=1, dens=0.8)
print("ok split")

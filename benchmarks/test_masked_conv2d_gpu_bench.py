"""GPU: masked_conv2d (Triton and CUDA C++ backends, side by side) vs cuDNN dense conv on ResNet-50 3x3
layers (`pytest --benchmark -k gpu`).

Batch 32, channels-last, float16 (and float32), block masks (b = 4) and pixel masks; CUDA-event timing with
warm-up, medians of interleaved rounds. Skipped without a CUDA GPU. The CUDA C++ column is "nan" where the
extension was built without its CUDA kernels. Both sparse backends run at every density (no dense fallback).
"""
import pytest
import torch
import torch.nn.functional as F

import dynconv_ext
from dynconv_ext.ops import masked_conv2d
from dynconv_ext.profile import conv2d_macs

pytestmark = [pytest.mark.benchmark, pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")]

COLUMNS = [
    ("layer", "layer", "{}"), ("dtype", "dtype", "{}"), ("mask", "mask", "{}"), ("density", "density", "{:.2f}"),
    ("active", "active", "{:.3f}"), ("macs_executed_M", "MACs exec (M)", "{:.0f}"),
    ("triton_ms", "triton ms", "{:.3f}"), ("cuda_ms", "cuda ms", "{:.3f}"), ("dense_ms", "cuDNN ms", "{:.3f}"),
    ("reference_ms", "dense+mask ms", "{:.3f}"),
    ("speedup", "triton speedup", "{:.2f}x"), ("cuda_speedup", "cuda speedup", "{:.2f}x"),
    ("ideal_speedup", "ideal", "{:.2f}x"),
]


def _cuda_kernel_built():
    return dynconv_ext.build_info()["cuda"] and torch._C._dispatch_has_kernel_for_dispatch_key(
        "dynconv::masked_conv2d", "CUDA")


def _cuda_medians(fns, reps):
    import random
    rng = random.Random(0)
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for _ in range(reps):
        names = list(fns)
        rng.shuffle(names)
        for name in names:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


@pytest.mark.parametrize("channels,size", [(64, 56), (128, 28), (256, 14)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("block", [4, 1])
@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_triton_and_cuda_vs_cudnn(channels, size, dtype, block, density, bench_rows, bench_columns, request):
    torch.manual_seed(0)
    n = 32
    x = torch.randn(n, channels, size, size, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(channels, channels, 3, 3, device="cuda", dtype=dtype) * 0.05).contiguous(
        memory_format=torch.channels_last)
    b = torch.randn(channels, device="cuda", dtype=dtype)
    mask = torch.rand(n, -(-size // block), -(-size // block), device="cuda") < density
    reps = max(10, request.config.getoption("--bench-reps"))
    fns = {
        "triton": lambda: masked_conv2d(x, w, b, mask, 1, 1, block_size=block, backend="triton"),
        "dense": lambda: F.conv2d(x, w, b, 1, 1),
        "reference": lambda: masked_conv2d(x, w, b, mask, 1, 1, block_size=block, backend="reference"),
    }
    if _cuda_kernel_built():
        fns["cuda"] = lambda: masked_conv2d(x, w, b, mask, 1, 1, block_size=block, backend="cuda")
    with torch.inference_mode():
        t = _cuda_medians(fns, reps)
    cuda_ms = t.get("cuda", float("nan"))
    active = float(mask.float().mean())
    bench_columns["masked_conv2d_gpu"] = COLUMNS
    bench_rows.setdefault("masked_conv2d_gpu", []).append({
        "layer": f"{channels}ch {size}x{size} 3x3 N{n}", "dtype": str(dtype).replace("torch.", ""),
        "mask": "pixel" if block == 1 else f"block{block}", "density": density, "active": active,
        "macs_executed_M": conv2d_macs(w.shape, active * n * size * size) / 1e6,
        "triton_ms": t["triton"], "cuda_ms": cuda_ms, "dense_ms": t["dense"], "reference_ms": t["reference"],
        "speedup": t["dense"] / t["triton"], "cuda_speedup": t["dense"] / cuda_ms,
        "ideal_speedup": 1.0 / max(active, 1e-6),
    })
    assert t["triton"] > 0

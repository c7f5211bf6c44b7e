"""MAC-vs-latency of masked_conv2d on ResNet layer shapes (run with `pytest --benchmark`).

Each case times dense NCHW, dense channels-last, ours (auto and the sparse kernel) and the plain-PyTorch
gather-scatter in alternation (dynconv_ext.profile.interleaved_medians, bursts of
masked_conv_table.TABLE_BURST calls: warm medians, plus the cold first call of each burst); pytest-benchmark's fixture
additionally records the distribution of our op's time.
"""
import pytest
import torch

from dynconv_ext.ops import masked_conv2d
from dynconv_ext.profile.masked_conv_table import default_cases, measure_case, random_mask

pytestmark = pytest.mark.benchmark

CASES = default_cases(batches=(1, 8), densities=(0.1, 0.25, 0.5, 0.75, 1.0), blocks=(1, 4), kernels=(3, 1))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.layer.replace(' ', '_')}-n{c.batch}-{c.mask_kind}-d{c.density}"
                                             for c in CASES])
def test_masked_conv2d_forward(case, bench_rows, benchmark, request):
    reps = request.config.getoption("--bench-reps")
    row = measure_case(case, reps=reps, torch_baseline=case.batch == 8 or case.kernel == 3)
    bench_rows.setdefault("masked_conv2d_cpu_forward", []).append(row)
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str))})
    x = torch.randn(case.batch, case.channels, case.size, case.size).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(case.channels, case.channels, case.kernel, case.kernel), torch.randn(case.channels)
    mask = random_mask(case.batch, case.size, case.block, case.density)
    with torch.inference_mode():
        benchmark.pedantic(masked_conv2d, args=(x, w, b, mask, 1, case.kernel // 2),
                           kwargs=dict(block_size=case.block), rounds=reps, warmup_rounds=1)
    assert row["auto_ms"] > 0


TRAIN_CASES = [(64, 56, 8, 0.25), (64, 56, 8, 0.5), (128, 28, 8, 0.25)]


@pytest.mark.parametrize("channels,size,batch,density", TRAIN_CASES)
def test_masked_conv2d_forward_backward(channels, size, batch, density, bench_rows, bench_columns, request):
    """Forward + backward (input, weight, bias grads) of a 3x3 conv: ours vs dense (channels-last)."""
    from dynconv_ext.profile import conv2d_macs, interleaved_medians
    from dynconv_ext.profile.masked_conv_table import COLUMNS
    bench_columns["masked_conv2d_cpu_fwd_bwd"] = [c for c in COLUMNS if c[0] != "cold_speedup"]  # single calls
    reps = max(5, request.config.getoption("--bench-reps") // 2)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(channels, channels, 3, 3, requires_grad=True)
    b = torch.randn(channels, requires_grad=True)
    mask = torch.rand(batch, size, size) < density
    g = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    x_nchw = x.detach().contiguous().requires_grad_()

    def dense(xx):
        torch.autograd.grad(torch.nn.functional.conv2d(xx, w, b, 1, 1), (xx, w, b), g)

    def ours():
        torch.autograd.grad(masked_conv2d(x, w, b, mask, 1, 1), (x, w, b), g)

    t = interleaved_medians({"dense_cl": lambda: dense(x), "dense_nchw": lambda: dense(x_nchw), "ours": ours},
                            reps=reps, grad=True)
    dense_ms = min(t["dense_cl"], t["dense_nchw"])
    active = int(mask.sum())
    bench_rows.setdefault("masked_conv2d_cpu_fwd_bwd", []).append({
        "layer": f"{channels}ch {size}x{size} 3x3", "batch": batch, "mask": "pixel", "density": density,
        "active": active / mask.numel(), "macs_executed_M": 3 * conv2d_macs(w.shape, active) / 1e6,
        "macs_dense_M": 3 * conv2d_macs(w.shape, mask.numel()) / 1e6, "auto_ms": t["ours"],
        "sparse_kernel_ms": t["ours"], "dense_ms": dense_ms, "speedup": dense_ms / t["ours"],
        "kernel_speedup": dense_ms / t["ours"], "ideal_speedup": mask.numel() / max(active, 1),
        "torch_gather_scatter_ms": float("nan"), "auto_cold_ms": float("nan"), "dense_cold_ms": float("nan"),
        "cold_speedup": float("nan"),
    })
    assert t["ours"] > 0

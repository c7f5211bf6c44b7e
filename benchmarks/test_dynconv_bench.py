"""End-to-end latency of dynconv_resnet32 (CIFAR, 32x32, batch 64) and dynconv_resnet50 (224x224, batch 8) vs the
same networks run densely (`pytest --benchmark -k dynconv`).

Masks of a given density are drawn per block (spatially coherent, like learned DynConv masks) and passed
to the model, so the gates' choices do not matter here; executed MACs are counted by the model.
"""
from typing import Callable, NamedTuple

import pytest
import torch

from dynconv_ext import models
from dynconv_ext.profile import interleaved_medians

pytestmark = pytest.mark.benchmark


def _model_row(name, batch, mask, density, t, net, eager_keys=("dense_nchw", "dense_cl")):
    """One result row from interleaved timings `t` (ms) and the model's MAC counts of its last forward."""
    macs = models.executed_macs(net)
    dense_ms = min(t[k] for k in eager_keys)
    folded = t.get("dense_folded", float("nan"))
    return {
        "model": name, "batch": batch, "mask": mask, "density": density,
        "active": float(torch.stack([s["density"] for s in macs["per_block"]]).mean()),
        "macs_executed_M": float(macs["executed"].mean()) / 1e6, "macs_dense_M": macs["dense"] / 1e6,
        "ours_ms": t["ours"], "dense_eager_ms": dense_ms, "dense_folded_ms": folded,
        "speedup_eager": dense_ms / t["ours"], "speedup_folded": folded / t["ours"],
        "ideal_speedup": macs["dense"] / float(macs["executed"].mean()),
    }

# Per-sample MACs; "dense eager" = the same network in PyTorch eager (BN separate), the faster of NCHW and
# channels-last; "dense folded" = with BN folded into the convs, as the gated path does (the fairer baseline).
COLUMNS = [
    ("model", "model", "{}"), ("batch", "N", "{}"), ("mask", "mask", "{}"), ("density", "density", "{:.2f}"),
    ("active", "active", "{:.3f}"), ("macs_executed_M", "MACs exec (M/img)", "{:.1f}"),
    ("macs_dense_M", "MACs dense (M/img)", "{:.1f}"), ("ours_ms", "ours ms", "{:.1f}"),
    ("dense_eager_ms", "dense eager ms", "{:.1f}"), ("dense_folded_ms", "dense BN-folded ms", "{:.1f}"),
    ("speedup_eager", "vs eager", "{:.2f}x"), ("speedup_folded", "vs BN-folded", "{:.2f}x"),
    ("ideal_speedup", "ideal (MACs)", "{:.2f}x"),
]


class ModelSpec(NamedTuple):
    factory: Callable
    batch: int
    size: int
    block_sizes: tuple
    min_reps: int  # repetitions: max(min_reps, --bench-reps // reps_divisor)
    reps_divisor: int
    folded_baseline: bool  # whether the model has forward_dense(..., fold_bn=True)


MODEL_SPECS = {
    "dynconv_resnet32": ModelSpec(models.dynconv_resnet32, 64, 32, (1, 4), 5, 2, True),
    "dynconv_resnet50": ModelSpec(models.dynconv_resnet50, 8, 224, (1, 4), 3, 3, True),
    "dynconv_mobilenetv2": ModelSpec(models.dynconv_mobilenetv2, 8, 224, (1,), 3, 3, True),
}
MODEL_CASES = [(name, b, d) for name, spec in MODEL_SPECS.items() for b in spec.block_sizes
               for d in (0.25, 0.5, 0.75, 1.0)]


@pytest.mark.parametrize("name,block_size,density", MODEL_CASES,
                         ids=[f"{n}-b{b}-d{d}" for n, b, d in MODEL_CASES])
def test_dynconv_model_forward(name, block_size, density, bench_rows, bench_columns, request):
    spec = MODEL_SPECS[name]
    torch.manual_seed(0)
    reps = max(spec.min_reps, request.config.getoption("--bench-reps") // spec.reps_divisor)
    net = spec.factory(block_size=block_size).eval()
    x = torch.randn(spec.batch, 3, spec.size, spec.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    masks = models.block_masks(net, x, density, coherent=True)
    fns = {"dense_nchw": lambda: net.forward_dense(x), "dense_cl": lambda: net.forward_dense(x_cl),
           "ours": lambda: net(x_cl, masks)}
    if spec.folded_baseline:
        fns["dense_folded"] = lambda: net.forward_dense(x_cl, fold_bn=True)
    t = interleaved_medians(fns, reps=reps)
    with torch.no_grad():
        net(x_cl, masks)
    table = f"{name}_cpu"
    bench_columns[table] = COLUMNS
    kind = "pixel" if block_size == 1 else f"block{block_size}"
    bench_rows.setdefault(table, []).append(_model_row(name, spec.batch, kind, density, t, net))
    assert t["ours"] > 0


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_dynconv_resnet32_trained_masks(budget, bench_rows, bench_columns, request):
    """Masks chosen by gates trained on the built-in data (scikit-learn digits at 32x32), not drawn at random."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    import torch.nn.functional as F
    from dynconv_ext.nn import SparsityCriterion
    torch.manual_seed(0)
    d = sklearn_datasets.load_digits()
    x_all = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, size=(32, 32),
                          mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y_all = torch.tensor(d.target)
    net = models.dynconv_resnet32().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    crit = SparsityCriterion(budget)
    steps = 150
    for step in range(steps):
        idx = torch.randint(0, len(y_all), (64,))
        loss = F.cross_entropy(net(x_all[idx]), y_all[idx]) + crit(models.executed_macs(net)["per_block"], step / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x_cl = x_all[:64].contiguous(memory_format=torch.channels_last)
    reps = max(5, request.config.getoption("--bench-reps") // 2)
    t = interleaved_medians({"dense_cl": lambda: net.forward_dense(x_cl),
                             "dense_folded": lambda: net.forward_dense(x_cl, fold_bn=True),
                             "ours": lambda: net(x_cl)}, reps=reps)
    with torch.no_grad():
        net(x_cl)
    bench_columns["dynconv_resnet32_trained_cpu"] = COLUMNS
    bench_rows.setdefault("dynconv_resnet32_trained_cpu", []).append(
        _model_row(f"dynconv_resnet32 (trained, budget {budget})", 64, "learned", budget, t, net, ("dense_cl",)))
    assert t["ours"] > 0

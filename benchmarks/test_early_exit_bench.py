"""Early-exit networks on CPU (`pytest --benchmark -k early_exit`): MSDNet and RANet with the fused concat ops vs
torch.cat, budgeted-batch throughput vs running every exit at several priors, and RANet vs VGG-16 / ResNet-50
per-image latency at CIFAR size. Untrained weights: exit proportions come from thresholds calibrated on a
separate random batch, so the measured gains depend only on how many samples leave where."""
import pytest

from dynconv_ext.profile import early_exit_table as eet

pytestmark = pytest.mark.benchmark


@pytest.mark.parametrize("name", list(eet.EARLY_EXIT_MODELS))
def test_early_exit_fused_vs_cat(name, bench_rows, bench_columns, request):
    reps = max(3, request.config.getoption("--bench-reps") // 3)
    bench_columns["early_exit_fused_cpu"] = eet.FUSED_COLUMNS
    row = eet.measure_fused_vs_cat(name, batch=256, reps=reps)
    bench_rows.setdefault("early_exit_fused_cpu", []).append(row)
    assert row["fused_ms"] > 0


@pytest.mark.parametrize("name", ["msdnet_cifar", "ranet_cifar"])
def test_early_exit_budgeted_batch(name, bench_rows, bench_columns, request):
    reps = max(3, request.config.getoption("--bench-reps") // 3)
    bench_columns["early_exit_budgeted_cpu"] = eet.BUDGET_COLUMNS
    rows = eet.measure_budgeted(name, priors=(0.5, 0.8, 1.0, 1.2), batch=256, reps=reps)
    bench_rows.setdefault("early_exit_budgeted_cpu", []).extend(rows)
    assert all(r["macs_avg_M"] <= r["macs_full_M"] for r in rows)


def test_early_exit_vs_static_networks(bench_rows, bench_columns, request):
    bench_columns["early_exit_vs_static_cpu"] = eet.STATIC_COLUMNS
    bench_rows.setdefault("early_exit_vs_static_cpu", []).extend(
        eet.measure_static_comparison(batch=1, reps=max(10, request.config.getoption("--bench-reps"))))

"""python/examples/train_early_exit.py runs as a user would run it: built-in data, joint training of all exits,
the anytime table, the budgeted-batch sweep with EarlyExitRunner, --eval-only, RANet, DDP on CPU."""
import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "python", "examples", "train_early_exit.py")
pytest.importorskip("sklearn")
if not os.path.exists(PROGRAM):
    pytest.skip("not a source checkout", allow_module_level=True)

# Tiny: few steps, small batches, a subset of the validation images, one timed round, one thread.
QUICK = ["--data", "digits", "--batch-size", "16", "--eval-batch-size", "32", "--eval-samples", "64",
         "--timing-reps", "1", "--priors", "0.1,0.5,1,2", "--threads", "1", "--no-progress"]


def _run(args, timeout=600):
    res = subprocess.run([sys.executable, PROGRAM] + args, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    return res


def _csv(out, name):
    with open(os.path.join(out, name)) as f:
        return list(csv.DictReader(f))


def _check_evaluation(out, num_exits, num_priors):
    anytime = _csv(out, "anytime.csv")
    assert [int(r["exit"]) for r in anytime] == list(range(1, num_exits + 1))
    macs = [float(r["macs_M"]) for r in anytime]
    assert all(a < b for a, b in zip(macs, macs[1:]))
    assert all(0 <= float(r["accuracy"]) <= 1 and float(r["latency_ms_per_image"]) > 0 for r in anytime)
    budgeted = _csv(out, "budgeted.csv")
    assert len(budgeted) == num_priors
    for r in budgeted:
        assert macs[0] - 1e-6 <= float(r["avg_macs_M"]) <= macs[-1] + 1e-6
        assert float(r["latency_ms_per_image"]) > 0 and float(r["all_exits_ms_per_image"]) > 0
        assert sum(int(c) for c in r["exit_histogram"].split()) == 32  # the test half of 64 images
        assert float(r["sim_agree"]) > 0.9  # the runtime answers as the simulated evaluation does
    # A larger prior sends samples to later exits: more MACs on average.
    avg = [float(r["avg_macs_M"]) for r in sorted(budgeted, key=lambda r: float(r["prior"]))]
    assert avg[0] <= avg[-1]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert os.path.exists(os.path.join(out, "budgeted.png"))
    assert os.path.exists(os.path.join(out, "exit_histogram.png"))


def test_msdnet_trains_evaluates_and_reloads(tmp_path):
    out = str(tmp_path / "msd")
    res = _run(["--model", "msdnet_cifar_budgeted", "--epochs", "2", "--steps", "8", "--lr", "0.1",
                "--out", out] + QUICK)
    rows = _csv(out, "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert len(rows[0]["val_acc_per_exit"].split()) == 5
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))
    _check_evaluation(out, num_exits=5, num_priors=4)
    assert "anytime prediction" in res.stdout and "budgeted batches" in res.stdout
    assert "exit histogram at p=1" in res.stdout and "#" in res.stdout
    # Evaluate the checkpoint again; the histogram prior joins the sweep when it is not in --priors.
    os.remove(os.path.join(out, "budgeted.csv"))
    res = _run(["--model", "msdnet_cifar_budgeted", "--eval-only", "--prior", "0.7", "--out", out] + QUICK)
    assert "exit histogram at p=0.7" in res.stdout
    _check_evaluation(out, num_exits=5, num_priors=5)
    assert len(_csv(out, "log.csv")) == 2  # --eval-only leaves the training log alone
    # Continue training from the checkpoint for one more (short) epoch.
    _run(["--model", "msdnet_cifar_budgeted", "--resume", "--epochs", "3", "--steps", "2", "--out", out] + QUICK)
    assert [r["epoch"] for r in _csv(out, "log.csv")] == ["1", "2", "3"]


def test_ranet_quick_run(tmp_path):
    out = str(tmp_path / "ranet")
    _run(["--model", "ranet_cifar", "--epochs", "1", "--steps", "2", "--lr-schedule", "step", "--out", out] + QUICK)
    assert len(_csv(out, "log.csv")) == 1
    _check_evaluation(out, num_exits=8, num_priors=4)


def test_ddp_two_processes_on_cpu(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", PROGRAM,
           "--model", "msdnet_cifar_budgeted", "--epochs", "1", "--steps", "2", "--out", out] + QUICK
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert len(_csv(out, "log.csv")) == 1
    assert len(_csv(out, "anytime.csv")) == 5


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet50"], "invalid choice"),
    (["--data", "cifar10:/nonexistent"], "not found"),
    (["--priors", "0.5,-1"], "must be > 0"),
    (["--eval-only"], "not found"),
    (["--model", "msdnet_imagenet"], "takes 224x224 images"),
])
def test_bad_arguments(tmp_path, args, message):
    res = subprocess.run([sys.executable, PROGRAM, "--out", str(tmp_path / "bad"), "--no-progress"] + args,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]

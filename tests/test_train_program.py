"""python/examples/train_dynconv.py runs as a user would run it: built-in data, a budget, DDP on CPU."""
import csv
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = os.path.join(ROOT, "python", "examples", "train_dynconv.py")
pytest.importorskip("sklearn")
if not os.path.exists(PROGRAM):
    pytest.skip("not a source checkout", allow_module_level=True)


def _rows(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


def test_training_lowers_loss_and_moves_density_to_budget(tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, PROGRAM, "--data", "digits", "--epochs", "3", "--steps", "20", "--batch-size", "32",
           "--budget", "0.5", "--lr", "0.1", "--threads", "2", "--eval-before", "--no-progress", "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    before, first, last = rows[0], rows[1], rows[-1]
    assert float(before["val_density"]) > 0.9  # gates start (almost) fully on
    assert abs(float(last["val_density"]) - 0.5) < abs(float(before["val_density"]) - 0.5)
    assert float(last["task_loss"]) < float(first["task_loss"])
    assert float(last["val_macs_M"]) < float(last["dense_macs_M"])
    assert os.path.exists(os.path.join(out, "checkpoint.pt"))
    # Evaluate the checkpoint.
    res = subprocess.run([sys.executable, PROGRAM, "--data", "digits", "--eval-only", "--no-progress", "--out", out],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "eval: acc" in res.stdout, res.stderr[-3000:]


def test_ddp_two_processes_on_cpu(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", PROGRAM,
           "--data", "digits", "--epochs", "1", "--steps", "2", "--batch-size", "16", "--threads", "1",
           "--no-progress", "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert len(_rows(out)) == 1


def test_bad_data_argument(tmp_path):
    res = subprocess.run([sys.executable, PROGRAM, "--data", "cifar10:/nonexistent", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "not found" in res.stderr

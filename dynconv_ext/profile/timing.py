"""Interleaved timing: candidates run in a shuffled order every round, so a noisy machine's drifts and cache
states hit all alike."""
import contextlib
import os
import platform
import random
import statistics
import time
from typing import Callable, Dict

import torch


def interleaved_medians(fns: Dict[str, Callable[[], object]], reps: int = 15, warmup: int = 2,
                        min_time_s: float = 0.0, grad: bool = False) -> Dict[str, float]:
    """Median wall time (ms) of each callable, measured in alternation, after `warmup` calls each.

    Runs under torch.inference_mode() unless grad=True (for forward+backward candidates).
    With min_time_s > 0, repetitions continue (past `reps`) until every candidate has run that long.
    """
    with contextlib.nullcontext() if grad else torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {name: [] for name in fns}
        rng = random.Random(0)
        start = time.perf_counter()
        i = 0
        while i < reps or (time.perf_counter() - start) < min_time_s * len(fns):
            # A fresh (seeded) order every round: whichever candidate runs right after another pays for
            # the caches that one evicted, so no candidate may always follow the same one. (Rotating the
            # start is not enough: it keeps the cyclic neighbours.)
            names = list(fns)
            rng.shuffle(names)
            for name in names:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
            i += 1
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def machine_description() -> str:
    """CPU model and thread count, for result files."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"

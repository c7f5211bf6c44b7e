"""Interleaved timing: candidates run in a shuffled order every round, so a noisy machine's drifts and cache
states hit all alike."""
import contextlib
import os
import platform
import random
import statistics
import time
from typing import Callable, Dict, Optional

import torch


def with_env_switch(fn: Callable[[], object], var: str, on: bool) -> Callable[[], object]:
    """`fn` with the kernel switch `var` set to "1" or "0" before every call: the CPU kernel reads its switches
    (DYNCONV_EXT_STREAM_STORES, DYNCONV_EXT_FUSED_NARROW) on each call, so both settings can be interleaved in one
    process (python/tools/*_ab.py)."""
    value = "1" if on else "0"

    def run():
        os.environ[var] = value
        return fn()
    return run


def with_attrs(fn: Callable[[], object], obj: object, **values) -> Callable[[], object]:
    """`fn` with attributes of `obj` (a module's function, a class's method, a flag) set to `values` for each call
    and put back after it: a Python-level switch timed both ways in one process, as with_env_switch is for the
    kernels' switches."""
    def run():
        old = {name: getattr(obj, name) for name in values}
        for name, value in values.items():
            setattr(obj, name, value)
        try:
            return fn()
        finally:
            for name, value in old.items():
                setattr(obj, name, value)
    return run


def interleaved_medians(fns: Dict[str, Callable[[], object]], reps: int = 15, warmup: int = 2,
                        min_time_s: float = 0.0, grad: bool = False, burst: int = 1,
                        cold: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Median wall time (ms) of each callable, measured in alternation, after `warmup` calls each.

    Runs under torch.inference_mode() unless grad=True (for forward+backward candidates).
    With min_time_s > 0, repetitions continue (past `reps`) until every candidate has run that long.
    With burst > 1, each turn calls a candidate `burst` times back to back and times all but the first
    (warm timings, as a layer called in a loop sees them): the first call after another candidate pays for
    that one's evicted caches and, with glibc's malloc, often for page-faulting a freshly returned output
    buffer (~1.8 ms for a 6 MB output on the 2-core dev machine), which made per-call medians bimodal.
    Pass a dict as `cold` to receive the median of those first calls too (ms).
    """
    if burst < 1:
        raise ValueError(f"interleaved_medians: burst must be >= 1, got {burst}")
    with contextlib.nullcontext() if grad else torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {name: [] for name in fns}
        firsts = {name: [] for name in fns}
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
                for call in range(burst):
                    t0 = time.perf_counter()
                    fns[name]()
                    dt = time.perf_counter() - t0
                    if call == 0:
                        firsts[name].append(dt)
                    if burst == 1 or call > 0:
                        times[name].append(dt)
            i += 1
    if cold is not None:
        cold.update({name: statistics.median(t) * 1e3 for name, t in firsts.items()})
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

"""The benchmark timing helpers: warm bursts vs cold first calls, and the layer table's row format."""
import time

import pytest

from dynconv_ext.profile import interleaved_medians
from dynconv_ext.profile.masked_conv_table import COLUMNS, Case, format_markdown, measure_case


def test_burst_separates_cold_first_calls_from_warm_ones():
    last = {"name": None}

    def make(name):
        def fn():
            # Slow right after the other candidate ran (a "cold" call), fast when it follows itself.
            time.sleep(0.02 if last["name"] not in (None, name) else 0.001)
            last["name"] = name
        return fn

    cold = {}
    warm = interleaved_medians({"a": make("a"), "b": make("b")}, reps=5, warmup=0, burst=3, cold=cold)
    for name in ("a", "b"):
        assert warm[name] < 10 < cold[name]  # ms: warm calls ~1 ms, first calls of a turn ~20 ms


def test_burst_one_times_every_call():
    calls = []
    t = interleaved_medians({"a": lambda: calls.append(1)}, reps=4, warmup=1, burst=1)
    assert len(calls) == 5 and t["a"] >= 0


def test_burst_must_be_positive():
    with pytest.raises(ValueError, match="burst"):
        interleaved_medians({"a": lambda: None}, burst=0)


def test_layer_table_row_has_every_column():
    row = measure_case(Case(8, 10, 3, 1, 1, 0.5), reps=2, torch_baseline=False)
    assert row["cold_speedup"] > 0 and row["speedup"] > 0
    table = format_markdown([row])
    assert table.count("\n") == 2 and all(header in table for _, header, _ in COLUMNS)

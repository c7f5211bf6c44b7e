"""Collects benchmark rows and prints (and optionally writes) the MAC-vs-latency tables at the end."""
import os

import pytest
import torch

_TABLES = {}
_COLUMNS = {}  # table name -> columns for format_markdown (default: the layer table's)


@pytest.fixture(scope="session")
def bench_rows():
    """Tests append their result rows to bench_rows[table_name]."""
    return _TABLES


@pytest.fixture(scope="session")
def bench_columns():
    """Tests may set bench_columns[table_name] = [(key, header, fmt), ...]."""
    return _COLUMNS


@pytest.fixture(scope="session", autouse=True)
def _pin_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _TABLES:
        return
    from dynconv_ext.profile import machine_description
    from dynconv_ext.profile.masked_conv_table import COLUMNS, TIMING_NOTE, format_markdown, plot, write_csv
    machine = machine_description()
    out = config.getoption("--bench-out")
    for name, rows in _TABLES.items():
        terminalreporter.write_sep("=", f"{name}: MAC-vs-latency ({machine})")
        cols = _COLUMNS.get(name)
        terminalreporter.write_line(format_markdown(rows, cols))
        if out:
            os.makedirs(out, exist_ok=True)
            write_csv(rows, os.path.join(out, f"{name}.csv"))
            with open(os.path.join(out, f"{name}.md"), "w") as f:
                note = f"{TIMING_NOTE}\n\n" if name == "masked_conv2d_cpu_forward" else ""
                f.write(f"# {name}\n\nMachine: {machine}\n\nCommand: `pytest --benchmark --bench-out {out}`\n\n"
                        f"{note}{format_markdown(rows, cols)}\n")
            if cols is None or name.startswith("masked_conv2d_cpu"):
                plot(rows, os.path.join(out, f"{name}.png"), title=machine)
            elif name == "early_exit_budgeted_cpu":
                from dynconv_ext.profile.early_exit_table import plot_budgeted
                plot_budgeted(rows, os.path.join(out, f"{name}.png"), title=machine)
            terminalreporter.write_line(f"wrote {out}/{name}.{{md,csv}}")
    models = {n: r for n, r in _TABLES.items() if n.startswith("dynconv_") and not n.endswith("trained_cpu")}
    if out and models:
        from dynconv_ext.profile.masked_conv_table import plot_models
        if plot_models(models, os.path.join(out, "dynconv_models_cpu.png"), title=machine):
            terminalreporter.write_line(f"wrote {out}/dynconv_models_cpu.png")

"""Root pytest configuration: `pytest --benchmark` runs the timing suites in benchmarks/, plain `pytest` skips them."""


def pytest_addoption(parser):
    group = parser.getgroup("dynconv_ext")
    group.addoption("--benchmark", action="store_true", default=False,
                    help="run the benchmarks (tests marked 'benchmark') and only them")
    group.addoption("--bench-out", default=None,
                    help="with --benchmark: folder to write result tables (.md, .csv) and plots to")
    group.addoption("--bench-reps", type=int, default=15, help="with --benchmark: repetitions per candidate")


def pytest_collection_modifyitems(config, items):
    run_bench = config.getoption("--benchmark")
    selected, deselected = [], []
    for item in items:
        is_bench = item.get_closest_marker("benchmark") is not None
        (selected if is_bench == run_bench else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected

"""Command line: `python -m dynconv_ext info | bench | crossover | exits`."""
import argparse
import os
import sys

import torch


def cmd_info(_args) -> int:
    import dynconv_ext
    from dynconv_ext import _extension
    print(f"dynconv_ext {dynconv_ext.__version__}")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    err = _extension.load_error()
    if err is not None:
        print(f"extension    NOT LOADED: {err}")
        return 1
    info = dynconv_ext.build_info()
    print(f"built with   torch {info['torch']}")
    print("backends:")
    kernel_notes = {"avx512f": "AVX-512 blocks for outputs wider than 8-16 channels per group and the backward "
                               "GEMMs, AVX2 otherwise; "
                               "DYNCONV_EXT_AVX512=0 keeps all on AVX2",
                    "avx2_fma": "AVX2+FMA blocks", "generic": "portable loops: no AVX2 on this CPU"}
    kernel = info["cpu_kernel"]
    print(f"  cpp-cpu    built ({kernel} kernel: {kernel_notes.get(kernel, kernel)})")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
    print(f"  cuda       {'built' if info['cuda'] else 'not built'}; {gpu}")
    try:
        import triton
        triton_state = (f"triton {triton.__version__}: forward and backward kernels (checked under "
                        f"TRITON_INTERPRET=1; "
                        f"{'usable on this GPU' if torch.cuda.is_available() else 'needs a CUDA GPU'})")
    except ImportError:
        triton_state = "triton not installed"
    print(f"  triton     {triton_state}")
    print("  reference  always (pure PyTorch)")
    print(f"threads      {torch.get_num_threads()}")
    return 0


def cmd_bench(args) -> int:
    from dynconv_ext.profile import machine_description
    from dynconv_ext.profile.masked_conv_table import (TIMING_NOTE, default_cases, format_markdown, plot, run_table,
                                                       write_csv)
    torch.set_num_threads(args.threads)
    cases = default_cases(batches=args.batch, densities=args.densities, blocks=args.blocks, kernels=args.kernels)
    machine = machine_description()
    print(f"masked_conv2d vs dense conv, float32, forward; {machine}", flush=True)
    rows = run_table(cases, reps=args.reps, progress=not args.no_progress, torch_baseline=not args.no_torch_baseline)
    table = format_markdown(rows)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(rows, os.path.join(args.out, "masked_conv2d_cpu.csv"))
        with open(os.path.join(args.out, "masked_conv2d_cpu.md"), "w") as f:
            f.write(f"# masked_conv2d on CPU\n\nMachine: {machine}\n\nCommand: `python -m dynconv_ext bench "
                    f"{' '.join(sys.argv[2:])}`\n\n{TIMING_NOTE}\n\n{table}\n")
        if plot(rows, os.path.join(args.out, "masked_conv2d_cpu.png"), title=machine):
            print(f"plot: {os.path.join(args.out, 'masked_conv2d_cpu.png')}")
        print(f"wrote {args.out}/masked_conv2d_cpu.{{csv,md}}")
    return 0


def cmd_crossover(args) -> int:
    """Densities at which the sparse kernel stops beating dense conv, per layer shape."""
    from dynconv_ext.profile.masked_conv_table import Case, measure_case
    torch.set_num_threads(args.threads)
    densities = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]
    print("| layer | N | crossover density (kernel >= dense) |\n|---|---|---|")
    for (c, s) in ((64, 56), (128, 28), (256, 14)):
        for k in (3, 1):
            for n in args.batch:
                cross = None
                for d in densities:
                    r = measure_case(Case(c, s, k, n, 1, d), reps=args.reps, torch_baseline=False)
                    if r["sparse_kernel_ms"] >= r["dense_ms"]:
                        cross = r["active"]
                        break
                print(f"| {c}ch {s}x{s} {k}x{k} | {n} | {cross if cross is None else round(cross, 2)} |", flush=True)
    return 0


def cmd_exits(args) -> int:
    """Early-exit networks: fused concat ops vs torch.cat, and budgeted batches vs every exit."""
    from dynconv_ext.profile import machine_description
    from dynconv_ext.profile import early_exit_table as eet
    from dynconv_ext.profile.masked_conv_table import format_markdown, write_csv
    torch.set_num_threads(args.threads)
    machine = machine_description()
    print(f"early-exit networks, float32, CIFAR size, batch {args.batch}; {machine}", flush=True)
    fused, budget = [], []
    for name in args.models:
        fused.append(eet.measure_fused_vs_cat(name, batch=args.batch, reps=args.reps))
        print(format_markdown(fused[-1:], eet.FUSED_COLUMNS), flush=True)
        budget += eet.measure_budgeted(name, priors=args.priors, batch=args.batch, reps=args.reps)
    tables = {"early_exit_fused_cpu": (fused, eet.FUSED_COLUMNS), "early_exit_budgeted_cpu": (budget, eet.BUDGET_COLUMNS)}
    for name, (rows, cols) in tables.items():
        print(f"\n{name}\n{format_markdown(rows, cols)}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            write_csv(rows, os.path.join(args.out, f"{name}.csv"))
            with open(os.path.join(args.out, f"{name}.md"), "w") as f:
                f.write(f"# {name}\n\nMachine: {machine}\n\nCommand: `python -m dynconv_ext exits "
                        f"{' '.join(sys.argv[2:])}`\n\n{format_markdown(rows, cols)}\n")
    if args.out and eet.plot_budgeted(budget, os.path.join(args.out, "early_exit_budgeted_cpu.png"), title=machine):
        print(f"plot: {os.path.join(args.out, 'early_exit_budgeted_cpu.png')}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynconv_ext", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and which backends were built")
    b = sub.add_parser("bench", help="MAC-vs-latency table of masked_conv2d on ResNet layer shapes")
    b.add_argument("--batch", type=int, nargs="+", default=[8])
    b.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    b.add_argument("--blocks", type=int, nargs="+", default=[1, 4], help="mask block sizes (1 = pixel masks)")
    b.add_argument("--kernels", type=int, nargs="+", default=[3, 1])
    b.add_argument("--reps", type=int, default=15)
    b.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    b.add_argument("--out", help="folder for .csv, .md and .png results")
    b.add_argument("--no-progress", action="store_true")
    b.add_argument("--no-torch-baseline", action="store_true", help="skip the plain-PyTorch gather-scatter column")
    c = sub.add_parser("crossover", help="measure the density where dense conv overtakes the sparse kernel")
    c.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    c.add_argument("--reps", type=int, default=15)
    c.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    e = sub.add_parser("exits", help="MSDNet/RANet: fused vs torch.cat, budgeted batch vs all exits")
    e.add_argument("--models", nargs="+", default=["msdnet_cifar", "ranet_cifar"],
                   choices=["msdnet_cifar", "msdnet_cifar_budgeted", "ranet_cifar"])
    e.add_argument("--batch", type=int, default=256)
    e.add_argument("--priors", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.2])
    e.add_argument("--reps", type=int, default=5)
    e.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    e.add_argument("--out", help="folder for .csv, .md and .png results")
    args = p.parse_args(argv)
    return {"info": cmd_info, "bench": cmd_bench, "crossover": cmd_crossover, "exits": cmd_exits}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

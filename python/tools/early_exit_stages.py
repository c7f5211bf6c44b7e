"""Per-stage time and MAC rate of an early-exit network, and its fused-vs-torch.cat forward, on this machine.

    python python/tools/early_exit_stages.py --model msdnet_cifar --batch 256
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 python python/tools/early_exit_stages.py

(the second form keeps glibc from returning large freed blocks to the OS, so fresh tensors stop page-faulting)
"""
import argparse
import os
import time

import torch

from dynconv_ext.profile import early_exit_table as eet
from dynconv_ext.profile.timing import interleaved_medians, machine_description


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="msdnet_cifar", choices=list(eet.EARLY_EXIT_MODELS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    net = eet.build(args.model)
    x = eet._cifar_input(args.batch)
    macs = net.exit_macs()
    malloc = "raised" if os.environ.get("MALLOC_MMAP_THRESHOLD_") else "default"
    print(f"{args.model}, batch {args.batch}, fused path; glibc mmap threshold {malloc}; {machine_description()}")
    with torch.inference_mode():
        best = None
        for _ in range(args.reps):  # per-stage times of the fastest full pass
            t0 = time.perf_counter()
            state = net.begin(x)
            times = [time.perf_counter() - t0]
            for k in range(net.num_exits):
                t0 = time.perf_counter()
                state, _ = net.step(state, k)
                times.append(time.perf_counter() - t0)
            if best is None or sum(times) < sum(best):
                best = times
    print("| stage | ms | MACs (M/img) | GMAC/s |\n|---|---|---|---|")
    print(f"| stem | {best[0] * 1e3:.1f} | (in exit 1) | |")
    for k, (t, m) in enumerate(zip(best[1:], macs)):
        print(f"| exit {k + 1} | {t * 1e3:.1f} | {m / 1e6:.1f} | {m * args.batch / t / 1e9:.1f} |")

    def run(fused):
        def fn():
            net.fused = fused
            return net(x)
        return fn
    t = interleaved_medians({"fused": run(True), "cat": run(False)}, reps=args.reps, warmup=1)
    print(f"\nwhole network: fused {t['fused']:.0f} ms, torch.cat {t['cat']:.0f} ms, "
          f"fused vs cat {t['cat'] / t['fused']:.2f}x")


if __name__ == "__main__":
    main()

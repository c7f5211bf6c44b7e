"""Where an early-exit network's fused path spends its conv time: every conv2d_into call of the first stages,
grouped by shape, timed inside the network and again alone (the same arguments, back to back, warm caches).

    python python/tools/early_exit_conv_profile.py --model msdnet_cifar --batch 256 --stages 1

In-network time over alone time is what the layer loses to the data it finds out of cache (the previous
layers streamed the whole batch through memory); MAC rates say how far a shape is from the FMA peak.
"""
import argparse
import collections
import importlib
import os
import statistics
import time

import torch

from dynconv_ext.profile import early_exit_table as eet
from dynconv_ext.profile.timing import machine_description

MODULES = {"msdnet_cifar": "dynconv_ext.models.msdnet", "ranet_cifar": "dynconv_ext.models.ranet"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="msdnet_cifar", choices=list(MODULES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--stages", type=int, default=1, help="exits run after the stem")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    net = eet.build(args.model)
    x = eet._cifar_input(args.batch)
    mod = importlib.import_module(MODULES[args.model])
    op = mod.conv2d_into_unchecked
    calls = collections.defaultdict(list)  # shape key -> [(seconds, call args)]

    def timed(inp, w, b, out, off, *rest, **kw):
        t0 = time.perf_counter()
        r = op(inp, w, b, out, off, *rest, **kw)
        calls[(inp.shape[2], inp.shape[1], w.shape[0], w.shape[2], rest[0][0], out.shape[1])].append(
            (time.perf_counter() - t0, (inp, w, b, out, off) + tuple(rest), kw))
        return r

    mod.conv2d_into_unchecked = timed
    try:
        with torch.inference_mode():
            for rep in range(args.reps + 1):
                if rep == 1:
                    calls.clear()  # the first pass warms the buffer pool and the packed weights
                state = net.begin(x)
                for k in range(args.stages):
                    state, _ = net.step(state, k)
    finally:
        mod.conv2d_into_unchecked = op
    rows = []
    for key, entries in calls.items():
        ms = sum(e[0] for e in entries) / args.reps * 1e3
        H, ci, co, ks, s, _ = key
        n_calls = len(entries) // args.reps
        macs = args.batch * (H // s) ** 2 * ci * co * ks * ks * n_calls
        rows.append((ms, key, n_calls, macs, entries[-1][1:]))
    rows.sort(key=lambda r: -r[0])
    total = sum(r[0] for r in rows)
    print(f"{args.model}, batch {args.batch}, stem + {args.stages} stage(s), fused path; {machine_description()}")
    print(f"conv2d_into total {total:.1f} ms a pass ({len(rows)} shapes)\n")
    print("| input HxW | C_in | C_out | k | stride | out buffer C | calls | in network ms | GMAC/s | alone ms | "
          "in network / alone |\n|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for ms, (H, ci, co, ks, s, cb), n, macs, (call, kw) in rows[:args.top]:
            alone = []
            for _ in range(5):
                t0 = time.perf_counter()
                op(*call, **kw)
                alone.append(time.perf_counter() - t0)
            alone_ms = statistics.median(alone[1:]) * 1e3 * n
            print(f"| {H}x{H} | {ci} | {co} | {ks} | {s} | {cb} | {n} | {ms:.2f} | {macs / ms / 1e6:.1f} | "
                  f"{alone_ms:.2f} | {ms / alone_ms:.2f} |")


if __name__ == "__main__":
    main()

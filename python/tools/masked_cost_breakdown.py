"""Where a masked conv call's time goes: the same layer with a random pixel mask, without zeroing the inactive
pixels, with the same count of active pixels packed at the start of each image, with one active pixel (the fixed
cost), interleaved in one process (the op called directly, backend "cpp"; warm calls: each turn times all but the first of --burst calls).

    python python/tools/masked_cost_breakdown.py [--density 0.25] [--batch 8] [--channels 64] [--size 56]

random - random_nozero ~ the zeroing; random - compact ~ the scattered rows (input reuse lost between pixels that
are not neighbours); one_px_nozero ~ the fixed cost (weight packing, index map, dispatch, parallel regions).
"""
import argparse
import os

import torch
import torch.nn.functional as F

import dynconv_ext.ops  # noqa: F401  (registers torch.ops.dynconv)
from dynconv_ext.profile.timing import interleaved_medians, machine_description


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--burst", type=int, default=4, help="calls per turn; the first (cold) is not timed")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, c, h = args.batch, args.channels, args.size
    x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, c, 3, 3) * 0.05, torch.randn(c)
    random_mask = torch.rand(n, h, h) < args.density
    compact = torch.zeros(n, h, h, dtype=torch.bool)
    compact.view(n, -1)[:, :int(random_mask.sum()) // n] = True
    one_px = torch.zeros(n, h, h, dtype=torch.bool)
    one_px[0, 0, 0] = True
    op = torch.ops.dynconv.masked_conv2d

    def call(m, zero=True):
        return lambda: op(x, w, b, m, [1, 1], [1, 1], [1, 1], 1, 1, None, 0, 2.0, zero, None)
    t = interleaved_medians({"random": call(random_mask), "random_nozero": call(random_mask, False),
                             "compact": call(compact), "compact_nozero": call(compact, False),
                             "one_px_nozero": call(one_px, False), "dense": lambda: F.conv2d(x, w, b, 1, 1)},
                            reps=args.reps, burst=args.burst)
    print(f"3x3 {c}ch {h}x{h} batch {n}, density {args.density}; {machine_description()}")
    print("| case | ms |\n|---|---|")
    for k, v in t.items():
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()

"""What the masked conv's scattered rows cost: the same count of active pixels laid out in different patterns
(interleaved in one process, the op called directly, no zeroing of inactive pixels, warm calls).

    python python/tools/scattered_rows_probe.py [--batch 8] [--size 56]

random: Bernoulli(0.25); compact: the same count packed at the start of each image; stride4 / stride2: every 4th /
2nd pixel in raster order; rows4: every 4th image row in full; pairs: 2 of every 8 pixels. random / compact is the
scattered-row cost; running it at a batch whose input fits L2 (e.g. --batch 2) separates L2 misses from lost L1
input reuse.
"""
import argparse
import os

import torch

import dynconv_ext.ops  # noqa: F401  (registers torch.ops.dynconv)
from dynconv_ext.profile.timing import interleaved_medians, machine_description


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    n, c, h = args.batch, args.channels, args.size
    x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, c, 3, 3) * 0.05, torch.randn(c)
    rm = torch.rand(n, h, h) < 0.25
    k = int(rm.sum()) // n
    flat = lambda: torch.zeros(n, h * h, dtype=torch.bool)  # noqa: E731
    compact, stride4, stride2, pairs = flat(), flat(), flat(), flat()
    compact[:, :k] = True
    stride4[:, ::4] = True
    stride2[:, :2 * k:2] = True
    pairs.view(n, -1, 8)[:, :, :2] = True
    rows4 = torch.zeros(n, h, h, dtype=torch.bool)
    rows4[:, ::4, :] = True
    masks = {"random": rm, "compact": compact.view(n, h, h), "stride4": stride4.view(n, h, h),
             "stride2": stride2.view(n, h, h), "rows4": rows4, "pairs": pairs.view(n, h, h)}
    op = torch.ops.dynconv.masked_conv2d
    fns = {name: (lambda m=m: op(x, w, b, m, [1, 1], [1, 1], [1, 1], 1, 1, None, 0, 2.0, False, None))
           for name, m in masks.items()}
    t = interleaved_medians(fns, reps=args.reps, burst=4)
    print(f"3x3 {c}ch {h}x{h} batch {n}, no zeroing; {machine_description()}")
    print("| pattern | active pixels | ms | / compact |\n|---|---|---|---|")
    for name, m in masks.items():
        print(f"| {name} | {int(m.sum())} | {t[name]:.3f} | {t[name] / t['compact']:.3f} |")


if __name__ == "__main__":
    main()

"""What reading a channel prefix of a wide concat buffer (and writing a slice of one) costs MSDNet's fine-scale
convolutions (CPU).

    python python/tools/concat_read_cost.py [--batch 256] [--reps 9]

A dense-connectivity layer reads the first C_in channels of every pixel of its scale's channels-last concat
buffer (64 channels at MSDNet CIFAR's 32x32 scale, 67 MB at batch 256). For each layer shape the same
conv2d_into call is timed, interleaved in one process, on
  * `prefix`: the C_in-channel prefix of the wide buffer (what the model does),
  * `own`: a contiguous C_in-channel tensor (the same values, nothing else in its cache lines),
  * `copy`: torch's copy of that prefix into a contiguous tensor (a memory-only reference: no arithmetic),
`planar` is the same 1x1 conv on an NCHW copy of the buffer, whose channel prefix is one block per image, as
torch's batched matrix product written into a slice of an NCHW output buffer (`torch.baddbmm`, then ReLU): a
layout probe, not a kernel of ours; and `batch 16 in cache` is `own` and `prefix` at batch 16 (a 4 MB buffer), scaled to the batch: the same access
patterns with the data near the core.
Each turn calls a candidate 3 times and times the last two.
The second table is the write side: a 3x3 growth conv writing its 6 channels into a channel slice of the buffer
(what the fused MSDNet does) or into a tensor of its own.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from dynconv_ext.ops.conv2d_into import conv2d_into
from dynconv_ext.profile.timing import interleaved_medians, machine_description

# (C_in, C_out, H, buffer channels): MSDNet CIFAR's 1x1 bottlenecks at the 32x32 scale, one at 16x16.
LAYERS = [(16, 6, 32, 64), (22, 6, 32, 64), (28, 6, 32, 64), (58, 6, 32, 64), (44, 24, 16, 160)]
# (C_in, C_out, H, buffer channels, channel offset): 3x3 growth convs writing into a scale's buffer.
WRITES = [(6, 6, 32, 64, 16), (6, 6, 32, 64, 40), (12, 6, 16, 140, 100)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    small = 16
    print(f"1x1 conv2d_into, ReLU, batch {args.batch}; {machine_description()}")
    print("| C_in | C_out | H | buffer ch | prefix: ms | GMAC/s | own: ms | GMAC/s | copy of prefix: ms | "
          "batch 16 in cache, scaled: own ms | prefix ms | prefix / own | planar (torch baddbmm): ms | prefix / planar |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for cin, cout, h, cap in LAYERS:
            buf = torch.randn(args.batch, cap, h, h, generator=g).contiguous(memory_format=torch.channels_last)
            prefix = buf[:, :cin]
            own = prefix.contiguous(memory_format=torch.channels_last)
            own_small = own[:small].contiguous(memory_format=torch.channels_last)
            prefix_small = buf[:small].clone(memory_format=torch.channels_last)[:, :cin]
            w, b = torch.randn(cout, cin, 1, 1, generator=g), torch.randn(cout, generator=g)
            out = torch.empty(args.batch, cout, h, h).contiguous(memory_format=torch.channels_last)
            out_small = out[:small].contiguous(memory_format=torch.channels_last)
            dst = torch.empty_like(own)
            planar = buf.contiguous()[:, :cin].reshape(args.batch, cin, h * h)  # a view: one block per image
            out_planar = torch.empty(args.batch, cout, h * h)
            wm, bm = w.view(cout, cin).expand(args.batch, cout, cin), b.view(1, cout, 1)
            fns = {
                "prefix": lambda x=prefix, w=w, b=b, o=out: conv2d_into(x, w, b, o, 0, activation="relu"),
                "own": lambda x=own, w=w, b=b, o=out: conv2d_into(x, w, b, o, 0, activation="relu"),
                "copy": lambda d=dst, x=prefix: d.copy_(x),
                "small": lambda x=own_small, w=w, b=b, o=out_small: conv2d_into(x, w, b, o, 0, activation="relu"),
                "small_prefix": lambda x=prefix_small, w=w, b=b, o=out_small: conv2d_into(x, w, b, o, 0,
                                                                                      activation="relu"),
                "planar": lambda x=planar, w=wm, b=bm, o=out_planar: torch.baddbmm(b, w, x, out=o).relu_(),
            }
            fns["planar"]()
            torch.testing.assert_close(out_planar.view(args.batch, cout, h, h),
                                       F.conv2d(prefix, w, b).relu(), rtol=1e-4, atol=1e-4)
            t = interleaved_medians(fns, reps=args.reps, burst=3)  # warm calls: `small` stays in cache
            macs = args.batch * h * h * cin * cout / 1e9
            in_l3 = t["small"] * args.batch / small
            in_l3_prefix = t["small_prefix"] * args.batch / small
            print(f"| {cin} | {cout} | {h} | {cap} | {t['prefix']:.2f} | {macs / t['prefix'] * 1e3:.1f} | "
                  f"{t['own']:.2f} | {macs / t['own'] * 1e3:.1f} | {t['copy']:.2f} | {in_l3:.2f} | {in_l3_prefix:.2f} | "
                  f"{t['prefix'] / t['own']:.2f}x | {t['planar']:.2f} | {t['prefix'] / t['planar']:.2f}x |")

        print(f"\n3x3 conv2d_into (padding 1), ReLU, batch {args.batch}: output into a buffer slice or its own tensor")
        print("| C_in | C_out | H | buffer ch | offset | into slice: ms | own tensor: ms | slice / own |")
        print("|---|---|---|---|---|---|---|---|")
        for cin, cout, h, cap, off in WRITES:
            x = torch.randn(args.batch, cin, h, h, generator=g).contiguous(memory_format=torch.channels_last)
            w, b = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(cout, generator=g)
            buf = torch.zeros(args.batch, cap, h, h).contiguous(memory_format=torch.channels_last)
            own = torch.zeros(args.batch, cout, h, h).contiguous(memory_format=torch.channels_last)
            fns = {"slice": lambda x=x, w=w, b=b, o=buf, off=off: conv2d_into(x, w, b, o, off, 1, 1, activation="relu"),
                   "own": lambda x=x, w=w, b=b, o=own: conv2d_into(x, w, b, o, 0, 1, 1, activation="relu")}
            t = interleaved_medians(fns, reps=args.reps, burst=3)
            print(f"| {cin} | {cout} | {h} | {cap} | {off} | {t['slice']:.2f} | {t['own']:.2f} | "
                  f"{t['slice'] / t['own']:.2f}x |")


if __name__ == "__main__":
    main()

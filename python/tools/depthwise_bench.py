"""The CPU depthwise kernel on both instruction-set paths against oneDNN, and its masked crossover, in one process.

    python python/tools/depthwise_bench.py [--reps 9]

Part 1: dense depthwise 3x3 (conv2d_into, channels-last) on the AVX-512 and the AVX2 path (DYNCONV_EXT_AVX512,
read per call) and F.conv2d. Part 2: masked_conv2d(backend="cpp") on MobileNetV2's depthwise layers (batch 8,
random pixel masks, ReLU6, inactive pixels left unspecified as the gated blocks do) against oneDNN's dense conv +
clamp: the evidence for `auto`'s depthwise crossover. Part 3: a single-channel plain conv (groups 1) into a slice
of a 92-channel buffer, as RANet's 1-channel units run.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from dynconv_ext.ops import masked_conv2d
from dynconv_ext.ops.conv2d_into import conv2d_into
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_env_switch


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"depthwise CPU kernel; {machine_description()}")
    print("\n| N | C | HxW | ours AVX-512 ms | ours AVX2 ms | F.conv2d ms |\n|---|---|---|---|---|---|")
    for n, c, h in [(256, 16, 32), (8, 96, 32), (8, 13, 32), (8, 144, 56)]:
        x, w = cl(torch.randn(n, c, h, h, generator=g)), torch.randn(c, 1, 3, 3, generator=g)
        out = cl(torch.zeros(n, c, h, h))
        call = (lambda x=x, w=w, out=out, c=c: conv2d_into(x, w, None, out, 0, 1, 1, groups=c))
        t = interleaved_medians({"512": with_env_switch(call, "DYNCONV_EXT_AVX512", True),
                                 "2": with_env_switch(call, "DYNCONV_EXT_AVX512", False),
                                 "F": lambda x=x, w=w, c=c: F.conv2d(x, w, None, 1, 1, 1, c)}, reps=args.reps)
        print(f"| {n} | {c} | {h}x{h} | {t['512']:.3f} | {t['2']:.3f} | {t['F']:.3f} |")
    os.environ.pop("DYNCONV_EXT_AVX512", None)
    densities = (0.25, 0.5, 0.75, 1.0)
    print("\nmasked depthwise 3x3, batch 8: dense (oneDNN + clamp) ms / sparse kernel ms")
    print("| C | HxW | dense ms | " + " | ".join(f"d={d}" for d in densities) + " |\n|---|---|---|"
          + "---|" * len(densities))
    for c, h in [(144, 56), (192, 28), (384, 14), (576, 14), (960, 7)]:
        x = cl(torch.randn(8, c, h, h, generator=g))
        w, b = torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, generator=g)
        fns = {"dense": lambda x=x, w=w, b=b, c=c: F.conv2d(x, w, b, 1, 1, 1, c).clamp_(0, 6)}
        for d in densities:
            m = torch.rand(8, h, h, generator=g) < d
            fns[d] = (lambda m=m, x=x, w=w, b=b, c=c: masked_conv2d(x, w, b, m, 1, 1, 1, c, backend="cpp",
                                                                    activation="relu6", zero_inactive=False))
        t = interleaved_medians(fns, reps=args.reps)
        print(f"| {c} | {h}x{h} | {t['dense']:.3f} | "
              + " | ".join(f"{t[d]:.3f} ({t['dense'] / t[d]:.2f}x)" for d in densities) + " |")
    x = cl(torch.randn(256, 1, 32, 32, generator=g))
    w, b = torch.randn(1, 1, 3, 3, generator=g), torch.randn(1, generator=g)
    buf = cl(torch.zeros(256, 92, 32, 32))
    t = interleaved_medians({"into": lambda: conv2d_into(x, w, b, buf, 91, 1, 1, activation="relu")},
                            reps=args.reps)
    print(f"\nsingle-channel 3x3 conv, batch 256, 32x32, into channel 91 of a 92-channel buffer: {t['into']:.2f} ms")


if __name__ == "__main__":
    main()

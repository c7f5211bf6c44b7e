"""The masked conv's dense fallback against its sparse kernel for weights marked constant (packing cached), at
density 0.95 with ReLU fused and zero_inactive=False (a gated block's first conv), on ResNet layer shapes at
batch 1-8 (interleaved, one process). What the packed small-output rule of dense_crossover rests on.

    python python/tools/packed_fallback_probe.py
"""
import os

import torch

import dynconv_ext.ops  # noqa: F401  (registers torch.ops.dynconv)
from dynconv_ext.ops import mark_constant_weight
from dynconv_ext.profile.timing import interleaved_medians, machine_description

SHAPES = [(1, 16, 32), (1, 32, 16), (1, 64, 8), (1, 64, 56), (1, 128, 28), (1, 256, 14), (1, 512, 7), (8, 16, 32),
          (8, 32, 16), (8, 64, 8), (8, 256, 14), (8, 512, 7), (4, 64, 28), (2, 128, 28)]


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    op = torch.ops.dynconv.masked_conv2d
    print(f"dense fallback vs sparse kernel, marked weights, density 0.95; {machine_description()}")
    print("| N | C | HxW | k | out pixels | dense fallback us | sparse us | fallback / sparse |\n|---|---|---|---|---|---|---|---|")
    for n, c, h in SHAPES:
        for k in (3, 1):
            x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
            w, b = mark_constant_weight(torch.randn(c, c, k, k) * 0.1), torch.randn(c)
            m = torch.rand(n, h, h) < 0.95
            p = k // 2

            def call(threshold, x=x, w=w, b=b, m=m, p=p):  # threshold 0: dense fallback; 2: sparse kernel
                return lambda: op(x, w, b, m, [1, 1], [p, p], [1, 1], 1, 1, None, 1, threshold, False, None)
            t = interleaved_medians({"dense": call(0.0), "sparse": call(2.0)}, reps=11, burst=4)
            print(f"| {n} | {c} | {h}x{h} | {k} | {n * h * h} | {t['dense'] * 1e3:.1f} | {t['sparse'] * 1e3:.1f} | "
                  f"{t['dense'] / t['sparse']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

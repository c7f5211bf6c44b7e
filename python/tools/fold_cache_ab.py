"""Gated DynConv blocks in eval: BN folded once and kept (packed) vs folded and repacked on every forward
(interleaved in one process, in a fresh order every round).

    python python/tools/fold_cache_ab.py [--rounds 9]

The gated blocks cache their BN-folded weights between eval forwards (GatedBlock._folded) and mark them constant, so
the CPU kernels keep them packed; "fresh" replaces that with folding on every call (the behaviour before). The
models' own gates choose the masks (untrained weights, so densities are whatever they give), the same input both
ways.
"""
import argparse
import os

import torch

from dynconv_ext import models
from dynconv_ext.nn.blocks import GatedBlock, fold_bn
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_attrs

CASES = [("dynconv_resnet32", models.dynconv_resnet32, 1, 32), ("dynconv_resnet32", models.dynconv_resnet32, 64, 32),
         ("dynconv_resnet50", models.dynconv_resnet50, 1, 224), ("dynconv_resnet50", models.dynconv_resnet50, 8, 224),
         ("dynconv_mobilenetv2", models.dynconv_mobilenetv2, 1, 224),
         ("dynconv_mobilenetv2", models.dynconv_mobilenetv2, 8, 224)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    def fresh(self, pairs):
        return [fold_bn(c, b) for c, b in pairs]

    print(f"gated blocks' fold cache on vs off (interleaved, one process); {machine_description()}")
    print("| model | N | cached ms | fresh ms | speedup |\n|---|---|---|---|---|")
    for name, factory, n, size in CASES:
        torch.manual_seed(0)
        net = factory().eval()
        x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)

        forward = (lambda net=net, x=x: net(x))
        t = interleaved_medians({"cached": forward, "fresh": with_attrs(forward, GatedBlock, _folded=fresh)},
                                reps=args.rounds)
        on, off = t["cached"], t["fresh"]  # ms
        print(f"| {name} | {n} | {on:.2f} | {off:.2f} | {off / on:.3f}x |")


if __name__ == "__main__":
    main()

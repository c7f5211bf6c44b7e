"""The gated DynConv blocks' bookkeeping at small batches: today's path against the same models with the three
pieces it replaced put back (interleaved in one process, a fresh order every round), next to the dense forward.

    python python/tools/gated_overhead_ab.py [--rounds 9]

"now": stats computed only when read (GatedBlock.last_stats), the gate's identity pooling skipped, the mask
dilation one C++ op (dynconv::dilate_mask), the convs called without Python-side validation
(masked_conv2d_unchecked). "before": every forward reads last_stats (the stats computed each time, as they were),
the gate pools at its input's own size, the dilation runs as shifted torch copies, the convs go through the checked
masked_conv2d. "dense": the
same network computed densely with BN folded (forward_dense(fold_bn=True)). The gates are re-initialized at random
(zero bias, normal weights): untrained ones execute everything through dense convs.
"""
import argparse
import importlib
import os

import torch
import torch.nn.functional as F

from dynconv_ext import models
from dynconv_ext.nn.gates import MaskUnit
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_attrs

dm = importlib.import_module("dynconv_ext.ops.dilate_mask")
blocks_mod = importlib.import_module("dynconv_ext.nn.blocks")
CASES = [("dynconv_resnet32", models.dynconv_resnet32, 1, 32), ("dynconv_resnet32", models.dynconv_resnet32, 8, 32),
         ("dynconv_mobilenetv2", models.dynconv_mobilenetv2, 1, 224),
         ("dynconv_resnet50", models.dynconv_resnet50, 1, 224)]


def pooled_logits(self, x, out_hw):  # MaskUnit.logits as it was: always pooled
    hm, wm = -(-out_hw[0] // self.block_size), -(-out_hw[1] // self.block_size)
    return self.conv(F.adaptive_avg_pool2d(x, (hm, wm)))[:, 0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from dynconv_ext.ops import masked_conv2d as conv_checked

    def torch_dilate(mask, kernel, dilation=1):
        return mask if kernel == 1 else dm._dilate_torch(mask, kernel, dilation)

    print(f"gated blocks' bookkeeping: now vs before (interleaved, one process); {machine_description()}")
    print("| model | N | mean density | now ms | before ms | before / now | dense (BN folded) ms | dense / now |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, factory, n, size in CASES:
        torch.manual_seed(0)
        net = factory().eval()
        models.randomize_gates(net, std=1.0)
        x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            net(x)
        dens, blocks = models.mean_density(net), models.gated_blocks(net)

        def forward_reading_stats(net=net, x=x, blocks=blocks):  # the stats computed every forward, as they were
            out = net(x)
            for b in blocks:
                b.last_stats
            return out
        before = with_attrs(with_attrs(forward_reading_stats, MaskUnit, logits=pooled_logits), blocks_mod,
                            dilate_mask=torch_dilate, masked_conv2d_unchecked=conv_checked)
        t = interleaved_medians({"now": lambda: net(x), "before": before,
                                 "dense": lambda: net.forward_dense(x, fold_bn=True)}, reps=args.rounds, burst=2)
        print(f"| {name} | {n} | {dens:.2f} | {t['now']:.2f} | {t['before']:.2f} | "
              f"{t['before'] / t['now']:.2f}x | {t['dense']:.2f} | {t['dense'] / t['now']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

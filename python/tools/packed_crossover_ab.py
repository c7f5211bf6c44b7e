"""backend="auto"'s dense crossover with and without knowing that a weight's packing is cached, on the gated
DynConv models in eval (interleaved in one process, a fresh order every round).

    python python/tools/packed_crossover_ab.py [--rounds 9]

Every sparse call packs its weight unless the weight is marked constant (the gated blocks mark their BN-folded
weights); the crossover subtracts ~48 / output pixels for that packing, which at batch 1 in deep layers (7x7: 49
pixels) pushed every call onto the dense conv. "aware" (what the op does now) drops that term for marked weights;
"blind" (before) applies it to every weight. The gates are re-initialized at random (untrained ones execute
everything, through dense convs): zero bias, normal weights of the given std.
"""
import argparse
import importlib
import os

import torch

from dynconv_ext import models
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_attrs

mc = importlib.import_module("dynconv_ext.ops.masked_conv2d")
CASES = [("dynconv_resnet50", models.dynconv_resnet50, 1, 224), ("dynconv_resnet50", models.dynconv_resnet50, 8, 224),
         ("dynconv_resnet32", models.dynconv_resnet32, 1, 32), ("dynconv_mobilenetv2", models.dynconv_mobilenetv2, 1, 224),
         ("dynconv_mobilenetv2", models.dynconv_mobilenetv2, 8, 224)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--gate-std", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    aware = mc.dense_crossover

    def blind(weight_shape, out_pixels, device_type="cpu", packed=False):
        return aware(weight_shape, out_pixels, device_type, packed=False)

    print(f"auto's crossover aware of cached packing vs blind to it (interleaved, one process); "
          f"{machine_description()}")
    print("| model | N | mean density | aware ms | blind ms | blind / aware |\n|---|---|---|---|---|---|")
    for name, factory, n, size in CASES:
        torch.manual_seed(0)
        net = factory().eval()
        models.randomize_gates(net, std=args.gate_std)
        x = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            net(x)
        forward = (lambda net=net, x=x: net(x))
        t = interleaved_medians({"aware": forward, "blind": with_attrs(forward, mc, dense_crossover=blind)},
                                reps=args.rounds)
        print(f"| {name} | {n} | {models.mean_density(net):.2f} | {t['aware']:.2f} | {t['blind']:.2f} | "
              f"{t['blind'] / t['aware']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

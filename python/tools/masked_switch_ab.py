"""A CPU kernel switch of the masked conv on vs off, interleaved in one process (warm calls, float32).

    python python/tools/masked_switch_ab.py [--var DYNCONV_EXT_WEIGHT_PREFETCH] [--reps 21]

The switches are read on every call, so both settings share one process:
  DYNCONV_EXT_WEIGHT_PREFETCH  the AVX-512 6x64 / 8x32 blocks prefetch weight panels larger than L1 (48 KiB), 4
                               reduction steps ahead (a 3x3 conv of 64 input channels has a 144 KiB panel, streamed
                               from L2 once per 6- or 8-row block)
  DYNCONV_EXT_FUSED_EPILOGUE   those blocks store their rows from the registers (bias, residual, activation,
                               streaming stores) instead of through a C tile and an epilogue pass
  DYNCONV_EXT_ZERO_IN_KERNEL   those blocks zero the inactive pixels before their rows a share per tap while they
                               compute, instead of before each macro block in one burst
  DYNCONV_EXT_ZMM16            9-16 output channels per group on the AVX-512 8x16 block instead of the AVX2 6x16
                               one (use with --shapes narrow: CIFAR ResNet's 16-channel layers)
Prints masked_conv2d (backend="cpp", random pixel masks) both ways on the ResNet layer shapes.
"""
import argparse
import os

import torch

from dynconv_ext.ops import masked_conv2d
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_env_switch

# (N, C, H, k): the ResNet layer shapes of the benchmark; the 1x1 64-channel panel (16 KiB) is not prefetched
SHAPES = {"resnet": [(8, 64, 56, 3), (8, 128, 28, 3), (8, 256, 14, 3), (8, 64, 56, 1), (8, 256, 14, 1), (1, 64, 56, 3),
                     (1, 256, 14, 3)],
          "narrow": [(1, 16, 32, 3), (8, 16, 32, 3), (64, 16, 32, 3), (8, 16, 32, 1), (64, 16, 32, 1), (8, 12, 32, 3)]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--var", default="DYNCONV_EXT_WEIGHT_PREFETCH")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--shapes", choices=list(SHAPES), default="resnet")
    p.add_argument("--model", action="store_true", help="also the gated ResNet-32 (random gates) at batch 8 and 64")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    var = args.var
    print(f"{var} on vs off (interleaved, one process, warm calls); {machine_description()}")
    print("| N | C | HxW | k | panel KiB | density | on: ms | off: ms | speedup |\n|---|---|---|---|---|---|---|---|---|")
    for n, c, h, k in SHAPES[args.shapes]:
        x = torch.randn(n, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c, c, k, k, generator=g) * 0.05, torch.randn(c, generator=g)
        nr = 16 if c <= 16 else 64 if c % 64 == 0 and c * k * k <= 1152 else 32
        for d in args.densities:
            m = torch.rand(n, h, h, generator=g) < d
            call = (lambda m=m, x=x, w=w, b=b, k=k: masked_conv2d(x, w, b, m, 1, k // 2, backend="cpp"))
            t = interleaved_medians({"on": with_env_switch(call, var, True), "off": with_env_switch(call, var, False)},
                                    reps=args.reps, warmup=3, burst=4)
            print(f"| {n} | {c} | {h}x{h} | {k} | {c * k * k * nr * 4 // 1024} | {d} | {t['on']:.3f} | {t['off']:.3f} | "
                  f"{t['off'] / t['on']:.3f}x |")
    if args.model:
        # the gated CIFAR ResNet-32 in eval, gates re-initialized at random (untrained ones execute everything)
        from dynconv_ext import models
        print("\n| model | N | on: ms | off: ms | speedup |\n|---|---|---|---|---|")
        for n in (8, 64):
            torch.manual_seed(0)
            net = models.dynconv_resnet32().eval()
            models.randomize_gates(net, std=1.0)
            x = torch.randn(n, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            fwd = (lambda net=net, x=x: net(x))
            t = interleaved_medians({"on": with_env_switch(fwd, var, True), "off": with_env_switch(fwd, var, False)},
                                    reps=args.reps, warmup=3, burst=2)
            print(f"| dynconv_resnet32 | {n} | {t['on']:.2f} | {t['off']:.2f} | {t['off'] / t['on']:.3f}x |")
    os.environ.pop(var, None)


if __name__ == "__main__":
    main()

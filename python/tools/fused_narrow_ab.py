"""The fused narrow-output conv path of the CPU kernel on vs off, timed interleaved in one process.

    python python/tools/fused_narrow_ab.py [--reps 9] [--model-reps 5] [--no-model]

Dense convolutions with at most 32 output channels per group (conv2d_into: MSDNet's and RANet's growth and
bottleneck layers) take forward_dense_fused unless DYNCONV_EXT_FUSED_NARROW=0; the variable is read on every call, so
each candidate sets it before it runs and both settings share one process and one machine state. On AVX-512
CPUs the KxK convs to <= 8 channels take the planar path under both settings (planar_narrow_ab.py compares
that one; run with DYNCONV_EXT_PLANAR_NARROW=0 to put them back on the fused path here). Prints the
MSDNet CIFAR layer shapes that dominate its fine scale (batch 256, written into a channel slice of a wider
channels-last buffer, ReLU), then the whole network and its budgeted-batch runner.
"""
import argparse
import os

import torch

from dynconv_ext.ops.conv2d_into import conv2d_into
from dynconv_ext.profile import early_exit_table as eet
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_env_switch

VAR = "DYNCONV_EXT_FUSED_NARROW"

# (C_in, C_out, kernel, stride, H, buffer channels): MSDNet CIFAR's narrow units at its three scales.
LAYERS = [(58, 6, 1, 1, 32, 64), (22, 6, 1, 1, 32, 64), (6, 6, 3, 1, 32, 64), (6, 6, 3, 2, 32, 64),
          (12, 6, 3, 1, 16, 48), (100, 24, 1, 1, 16, 160), (24, 12, 3, 2, 16, 160), (48, 12, 3, 1, 8, 300)]


def layer_table(reps: int, batch: int, var: str = VAR, layers=LAYERS, names=("fused", "not fused")):
    g = torch.Generator().manual_seed(0)
    print(f"\nconv2d_into, batch {batch}, into a channel slice of a channels-last buffer, ReLU")
    print(f"| C_in | C_out | k | stride | H | {names[0]}: ms | GMAC/s | {names[1]}: ms | GMAC/s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cin, cout, k, s, h, cap in layers:
        ho = (h + 2 * (k // 2) - k) // s + 1
        x = torch.randn(batch, cin, h, h, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g)
        out = torch.zeros(batch, cap, ho, ho).contiguous(memory_format=torch.channels_last)
        off = cap - cout
        call = (lambda x=x, w=w, b=b, out=out, off=off, s=s, k=k:
                conv2d_into(x, w, b, out, off, s, k // 2, activation="relu"))
        t = interleaved_medians({"on": with_env_switch(call, var, True), "off": with_env_switch(call, var, False)},
                                reps=reps)
        macs = batch * ho * ho * cout * cin * k * k / 1e9
        print(f"| {cin} | {cout} | {k} | {s} | {h} | {t['on']:.2f} | {macs / t['on'] * 1e3:.1f} | {t['off']:.2f} | "
              f"{macs / t['off'] * 1e3:.1f} | {t['off'] / t['on']:.2f}x |")


def model_table(reps: int, batch: int, priors=(0.5, 1.0), var: str = VAR, names=("fused", "not fused")):
    t = eet.measure_switch_ab("msdnet_cifar", var, batch, reps, priors)
    print(f"\nmsdnet_cifar, batch {batch}: all exits and budgeted batch (gain = all exits / budgeted, same setting)")
    print(f"| run | {names[0]}: ms | {names[1]}: ms | speedup |\n|---|---|---|---|")
    print("\n".join(eet.switch_ab_rows(t, priors)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--model-reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fused small-channel path on vs off (interleaved, one process); {machine_description()}")
    layer_table(args.reps, args.batch)
    if not args.no_model:
        model_table(args.model_reps, args.batch)
    os.environ.pop(VAR, None)


if __name__ == "__main__":
    main()

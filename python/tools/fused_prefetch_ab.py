"""The fused conv path's software prefetches on vs off, interleaved in one process.

    python python/tools/fused_prefetch_ab.py [--reps 9] [--model-reps 5] [--no-model]

conv2d_into's fused narrow-output path (forward_dense_fused) prefetches, segment by segment, the input rows that the
next output row reads and the current one does not, and, when the output is a channel slice of a wider buffer, the
next row's output lines for writing, unless DYNCONV_EXT_FUSED_PREFETCH=0 (read on every call, so both settings
share one process). It matters where a channel slice of a wide channels-last concat buffer is read or written: a
few cache lines per pixel at the buffer's full pixel stride. Prints MSDNet CIFAR's fine-scale layer shapes read in
place from such a buffer (into their own outputs: the read prefetch alone), then whole networks and the
budgeted-batch runner (both prefetches).
"""
import argparse
import os

import torch

from dynconv_ext.ops.conv2d_into import conv2d_into
from dynconv_ext.profile import early_exit_table as eet
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_env_switch

VAR = "DYNCONV_EXT_FUSED_PREFETCH"

# (C_in read, C_out, kernel, stride, H, input buffer channels): MSDNet CIFAR's fine-scale units.
LAYERS = [(16, 6, 1, 1, 32, 64), (28, 6, 1, 1, 32, 64), (58, 6, 1, 1, 32, 64), (6, 6, 3, 1, 32, 64),
          (6, 6, 3, 2, 32, 64), (16, 32, 3, 2, 32, 64), (44, 12, 1, 1, 16, 140), (12, 6, 3, 1, 16, 140)]


def layer_table(reps: int, batch: int):
    g = torch.Generator().manual_seed(0)
    print(f"\nconv2d_into, batch {batch}: input = the first C_in channels of a channels-last buffer, own output, ReLU")
    print("| C_in | C_out | k | stride | H | buffer | prefetch: ms | GMAC/s | no prefetch: ms | GMAC/s | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for cin, cout, k, s, h, cap in LAYERS:
        ho = (h + 2 * (k // 2) - k) // s + 1
        buf = torch.randn(batch, cap, h, h, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(cout, cin, k, k, generator=g), torch.randn(cout, generator=g)
        out = torch.zeros(batch, cout, ho, ho).contiguous(memory_format=torch.channels_last)
        call = (lambda x=buf[:, :cin], w=w, b=b, out=out, s=s, k=k:
                conv2d_into(x, w, b, out, 0, s, k // 2, activation="relu"))
        t = interleaved_medians({"on": with_env_switch(call, VAR, True), "off": with_env_switch(call, VAR, False)},
                                reps=reps)
        macs = batch * ho * ho * cout * cin * k * k / 1e9
        print(f"| {cin} | {cout} | {k} | {s} | {h} | {cap} | {t['on']:.2f} | {macs / t['on'] * 1e3:.1f} | "
              f"{t['off']:.2f} | {macs / t['off'] * 1e3:.1f} | {t['off'] / t['on']:.2f}x |")


def model_table(reps: int, batch: int, priors=(0.5, 1.0)):
    print(f"\nbatch {batch}: all exits and the budgeted-batch runner (gain = all exits / budgeted, same setting)")
    print("| model | run | prefetch: ms | no prefetch: ms | speedup |\n|---|---|---|---|---|")
    for name in ("msdnet_cifar", "ranet_cifar"):
        t = eet.measure_switch_ab(name, VAR, batch, reps, priors)
        print("\n".join(eet.switch_ab_rows(t, priors, prefix=f"| {name} ")))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--model-reps", type=int, default=5)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 64])
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fused-path prefetches on vs off (interleaved, one process); {machine_description()}")
    for batch in args.batch:
        layer_table(args.reps, batch)
        if not args.no_model:
            model_table(args.model_reps, batch)
    os.environ.pop(VAR, None)


if __name__ == "__main__":
    main()

"""Dense convs with few input channels: a kernel row's taps merged into one run of KW * C channels vs one tap per
kernel position (interleaved in one process, in a fresh order every round; DYNCONV_EXT_MERGED_TAPS=1 / 0).

    python python/tools/merged_taps_ab.py [--rounds 9]

Each case is conv2d_into (ReLU) from a contiguous channels-last input into a channel slice of a buffer, as the
early-exit networks' stems run: (N, C_in, H, C_out, buffer channels, k, padding). Also times MSDNet's and RANet's
stem stage (begin) and whole network at batch 256.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from dynconv_ext.ops.conv2d_into import conv2d_into
from dynconv_ext.profile import early_exit_table as eet
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_env_switch

CASES = [(256, 3, 32, 16, 64, 3, 1), (8, 3, 56, 64, 64, 3, 1), (256, 3, 32, 32, 32, 3, 1), (16, 4, 32, 24, 24, 3, 1),
         (4, 3, 64, 16, 16, 5, 2)]


def timed(fn, var, rounds):
    """(switch on, switch off) median ms of fn, interleaved."""
    t = interleaved_medians({"on": with_env_switch(fn, var, True), "off": with_env_switch(fn, var, False)},
                            reps=rounds)
    os.environ.pop(var, None)
    return t["on"], t["off"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    var = "DYNCONV_EXT_MERGED_TAPS"
    print(f"merged kernel-row taps on vs off (interleaved, one process); {machine_description()}")
    print("| case (N, C_in, H, C_out, buffer C, k, pad) | merged ms | per tap ms | speedup |\n|---|---|---|---|")
    for n, c, h, co, bc, k, pad in CASES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(co, c, k, k, generator=g), torch.randn(co, generator=g)
        ho = h + 2 * pad - k + 1
        out = torch.empty(n, bc, ho, ho).contiguous(memory_format=torch.channels_last)
        conv2d_into(x, w, b, out, 0, padding=pad, activation="relu")
        torch.testing.assert_close(out[:, :co], F.conv2d(x, w, b, padding=pad).relu(), rtol=1e-4, atol=1e-4)
        on, off = timed(lambda: conv2d_into(x, w, b, out, 0, padding=pad, activation="relu"), var, args.rounds)
        print(f"| {(n, c, h, co, bc, k, pad)} | {on:.3f} | {off:.3f} | {off / on:.2f}x |")
    print("\n| model (batch 256) | stage | merged ms | per tap ms | speedup |\n|---|---|---|---|---|")
    for name in ("msdnet_cifar", "ranet_cifar"):
        net, x = eet.build(name), eet._cifar_input(256)
        on, off = timed(lambda: net.begin(x), var, args.rounds)
        print(f"| {name} | begin (stem) | {on:.2f} | {off:.2f} | {off / on:.2f}x |")
        on, off = timed(lambda: net(x), var, max(3, args.rounds // 2))
        print(f"| {name} | whole network | {on:.1f} | {off:.1f} | {off / on:.3f}x |")


if __name__ == "__main__":
    main()

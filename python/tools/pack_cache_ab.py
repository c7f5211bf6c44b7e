"""A SparseConv2d whose weight is marked constant (dynconv_ext.ops.mark_constant_weight): packed once and kept,
vs repacked on every call (DYNCONV_EXT_PACK_CACHE=0, read per call), interleaved in one process.

    python python/tools/pack_cache_ab.py [--reps 21]
"""
import argparse
import os

import torch

from dynconv_ext.nn import SparseConv2d
from dynconv_ext.ops import mark_constant_weight
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_env_switch

VAR = "DYNCONV_EXT_PACK_CACHE"
CASES = [(1, 64, 56), (1, 256, 14), (1, 512, 7), (8, 256, 14)]  # (N, C, H): 3x3 C->C convs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"marked-constant weight kept packed vs repacked (interleaved, one process, warm calls); {machine_description()}")
    print("| layer | N | density | kept: ms | repacked: ms | speedup |\n|---|---|---|---|---|---|")
    for n, c, h in CASES:
        conv = SparseConv2d(c, c, 3, padding=1).eval()
        mark_constant_weight(conv.weight)
        x = torch.randn(n, c, h, h).contiguous(memory_format=torch.channels_last)
        for d in (0.25, 0.5):
            m = torch.rand(n, h, h) < d
            fn = (lambda m=m, conv=conv, x=x: conv(x, m))
            with torch.no_grad():
                t = interleaved_medians({"on": with_env_switch(fn, VAR, True), "off": with_env_switch(fn, VAR, False)},
                                        reps=args.reps, warmup=3, burst=4)
            print(f"| {c}ch {h}x{h} 3x3 | {n} | {d} | {t['on']:.3f} | {t['off']:.3f} | {t['off'] / t['on']:.2f}x |")
    os.environ.pop(VAR, None)


if __name__ == "__main__":
    main()

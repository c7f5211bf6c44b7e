"""Gated DynConv networks with the masked conv's AVX-512 additions of 2026-12-02 on vs off, interleaved in one process.

    python python/tools/dynconv_kernel_switches_ab.py [--reps 9] [--density 0.5]

"on": the defaults; "off": DYNCONV_EXT_WEIGHT_PREFETCH, DYNCONV_EXT_FUSED_EPILOGUE and DYNCONV_EXT_SPLIT_PANELS all
0 (weight-panel prefetch, register epilogue, panel split for few-row convs; read on every call). Masks: spatially
coherent per-block masks of the given density (models.block_masks), as in `pytest --benchmark -k dynconv`.
"""
import argparse
import os

import torch

from dynconv_ext import models
from dynconv_ext.profile.timing import interleaved_medians, machine_description

VARS = ("DYNCONV_EXT_WEIGHT_PREFETCH", "DYNCONV_EXT_FUSED_EPILOGUE", "DYNCONV_EXT_SPLIT_PANELS")
CASES = (("dynconv_resnet50", 8, 224), ("dynconv_resnet50", 1, 224), ("dynconv_resnet32", 64, 32))


def switched(value: str, fn):
    def run():
        for v in VARS:
            os.environ[v] = value
        return fn()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"masked-conv kernel additions on vs off (interleaved, one process); {machine_description()}")
    print("| model | N | active | on: ms | off: ms | speedup |\n|---|---|---|---|---|---|")
    for name, batch, size in CASES:
        net = getattr(models, name)().eval()
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        masks = models.block_masks(net, x, args.density, coherent=True)
        fn = (lambda net=net, x=x, masks=masks: net(x, masks))
        with torch.inference_mode():
            fn()
            active = float(torch.stack([s["density"] for s in models.executed_macs(net)["per_block"]]).mean())
        t = interleaved_medians({"on": switched("1", fn), "off": switched("0", fn)}, reps=args.reps, warmup=2)
        print(f"| {name} | {batch} | {active:.2f} | {t['on']:.1f} | {t['off']:.1f} | {t['off'] / t['on']:.2f}x |")
    for v in VARS:
        os.environ.pop(v, None)


if __name__ == "__main__":
    main()

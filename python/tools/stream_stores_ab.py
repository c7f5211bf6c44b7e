"""Streaming (non-temporal) output stores of the CPU kernel on vs off, timed interleaved in one process.

    python python/tools/stream_stores_ab.py [--reps 15] [--model-reps 6] [--no-model]

The kernel writes channels-last float outputs of >= 4 MiB with streaming stores unless
DYNCONV_EXT_STREAM_STORES=0; the variable is read on every call, so each candidate below sets it before it
runs and both settings share one process, one machine state and one dense baseline. Prints the masked_conv2d
layer speedups over dense (3x3 64ch 56x56, batch 8, random pixel masks) and dynconv_resnet50 (batch 8, 224x224,
coherent masks) latencies, which also show whether the next layer pays for an output that left the caches.
"""
import argparse
import os

import torch
import torch.nn.functional as F

from dynconv_ext import models
from dynconv_ext.ops import masked_conv2d
from dynconv_ext.profile.masked_conv_table import random_mask
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_env_switch

VAR = "DYNCONV_EXT_STREAM_STORES"


def with_setting(fn, on: bool):
    return with_env_switch(fn, VAR, on)


def layer_table(reps: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 56, 56, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, 64, 3, 3, generator=g), torch.randn(64, generator=g)
    fns = {"dense": lambda: F.conv2d(x, w, b, 1, 1)}
    densities = (0.1, 0.25, 0.5)
    for d in densities:
        m = random_mask(8, 56, 1, d, g)
        call = (lambda m=m: masked_conv2d(x, w, b, m, 1, 1))
        fns[f"on{d}"], fns[f"off{d}"] = with_setting(call, True), with_setting(call, False)
    t = interleaved_medians(fns, reps=reps, burst=4)
    print(f"\nmasked_conv2d 3x3 64ch 56x56 batch 8, pixel masks, backend='auto'; dense {t['dense']:.2f} ms")
    print("| density | streaming on: ms | speedup | streaming off: ms | speedup |\n|---|---|---|---|---|")
    for d in densities:
        on, off = t[f"on{d}"], t[f"off{d}"]
        print(f"| {d:.2f} | {on:.3f} | {t['dense'] / on:.2f}x | {off:.3f} | {t['dense'] / off:.2f}x |")


def model_table(reps: int):
    torch.manual_seed(0)
    net = models.dynconv_resnet50(block_size=1).eval()
    x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    fns, densities = {}, (0.25, 0.5)
    for d in densities:
        masks = models.block_masks(net, x, d, coherent=True)
        call = (lambda masks=masks: net(x, masks))
        fns[f"on{d}"], fns[f"off{d}"] = with_setting(call, True), with_setting(call, False)
    t = interleaved_medians(fns, reps=reps)
    print("\ndynconv_resnet50 batch 8, 224x224, coherent masks (gated blocks: intermediates read by the next conv)")
    print("| density | streaming on: ms | streaming off: ms | off / on |\n|---|---|---|---|")
    for d in densities:
        print(f"| {d:.2f} | {t[f'on{d}']:.1f} | {t[f'off{d}']:.1f} | {t[f'off{d}'] / t[f'on{d}']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--model-reps", type=int, default=6)
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"streaming stores on vs off (interleaved, one process); {machine_description()}")
    layer_table(args.reps)
    if not args.no_model:
        model_table(args.model_reps)
    os.environ.pop(VAR, None)


if __name__ == "__main__":
    main()

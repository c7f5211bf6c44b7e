"""The planar (pixel-vector) path for dense convs to <= 8 channels on vs off, timed interleaved in one process.

    python python/tools/planar_narrow_ab.py [--reps 9] [--model-reps 5] [--no-model] [--priors 0.5 1.0]

On AVX-512 CPUs, dense KxK convolutions (K > 1) with at most 8 output channels and one group take
forward_planar_narrow (csrc/cpu/planar_narrow.cpp) unless DYNCONV_EXT_PLANAR_NARROW=0; off, they take the fused
channel-vector path (forward_dense_fused). The variable is read on every call, so both settings share one process.
Prints MSDNet CIFAR's 3x3 layers to 6 channels and a few other narrow shapes (ReLU, into a channel slice of a
wider channels-last buffer where the network has one), then the whole MSDNet and its budgeted-batch runner.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fused_narrow_ab import layer_table, model_table  # noqa: E402

from dynconv_ext.profile.timing import machine_description  # noqa: E402

VAR = "DYNCONV_EXT_PLANAR_NARROW"
NAMES = ("planar", "fused")
# (C_in, C_out, kernel, stride, H, buffer channels)
LAYERS = [(6, 6, 3, 1, 32, 64), (6, 6, 3, 2, 32, 140), (12, 6, 3, 1, 16, 140), (6, 8, 3, 1, 56, 8),
          (3, 4, 5, 2, 64, 4), (8, 2, 3, 1, 28, 2)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--model-reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--priors", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"planar narrow path on vs off (interleaved, one process); {machine_description()}")
    layer_table(args.reps, args.batch, VAR, LAYERS, NAMES)
    if not args.no_model:
        model_table(args.model_reps, args.batch, tuple(args.priors), VAR, NAMES)
    os.environ.pop(VAR, None)


if __name__ == "__main__":
    main()

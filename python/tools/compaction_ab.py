"""Budgeted-batch early exit with in-place batch compactions vs gathering the remaining samples (interleaved in
one process, in a fresh order every round).

    python python/tools/compaction_ab.py [--models msdnet_cifar ranet_cifar] [--priors 0.5 0.8 1.0 1.2]

EarlyExitRunner(compact_in_place=True) refills the places of the exited samples with the samples beyond the kept
prefix, in the pooled buffers themselves (only those move); False gathers every remaining sample into other pooled
buffers. Prints both times and the speedup per model and prior (batch 256 at CIFAR size, thresholds calibrated on a
separate batch as in `python -m dynconv_ext exits`).
"""
import argparse
import os

import torch

from dynconv_ext.inference import EarlyExitRunner, confidences, exit_prior, thresholds_from_confidences
from dynconv_ext.profile import early_exit_table as eet
from dynconv_ext.profile.timing import interleaved_medians, machine_description


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["msdnet_cifar", "ranet_cifar"], choices=list(eet.EARLY_EXIT_MODELS))
    p.add_argument("--priors", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.2])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"in-place vs gathered batch compactions (interleaved, one process); {machine_description()}")
    print("| model | prior p | in place ms | gathered ms | speedup |\n|---|---|---|---|---|")
    for name in args.models:
        net = eet.build(name)
        calib, x = eet._cifar_input(args.batch, seed=1), eet._cifar_input(args.batch, seed=2)
        with torch.inference_mode():
            conf = confidences(net(calib))
        for prior in args.priors:
            th = thresholds_from_confidences(conf, exit_prior(prior, net.num_exits))
            runners = {True: EarlyExitRunner(net, th, compact_in_place=True),
                       False: EarlyExitRunner(net, th, compact_in_place=False)}
            with torch.inference_mode():
                a, b = runners[True](x), runners[False](x)  # same answers either way
            assert torch.equal(a.exits, b.exits) and torch.equal(a.predictions, b.predictions)
            t = interleaved_medians({"in_place": lambda: runners[True](x), "gathered": lambda: runners[False](x)},
                                    reps=args.rounds, warmup=1)
            on, off = t["in_place"], t["gathered"]  # ms
            print(f"| {name} | {prior} | {on:.1f} | {off:.1f} | {off / on:.3f}x |")


if __name__ == "__main__":
    main()

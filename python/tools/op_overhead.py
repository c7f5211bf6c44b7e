"""Per-call costs around the kernels. Parts 1-2, masked_conv2d's eager dispatch: the fast path (below the autograd key when autograd records
nothing, _MaskedConv2dFn when it does) against every call through the autograd kernel registered with
torch.library (masked_conv2d.EAGER_FAST_PATH = False), interleaved in one process.

    python python/tools/op_overhead.py [--rounds 15]

Part 1: one small layer (SparseConv2d 8->8 3x3 on 8x8, batch 1, half the pixels), per call, under torch.no_grad(),
in grad mode with weights that require grad (forward only, and forward + backward), and under inference_mode
(where the registered kernel is skipped anyway: both rows should match); nn.Conv2d for scale.
Part 2: the gated DynConv models in eval at batch 1 under torch.no_grad() (a plain `with torch.no_grad(): net(x)`),
their gates re-initialized at random (untrained ones execute everything, through dense convs). (Their training
forward is dense, masks multiplied in: it does not call the op.)
Part 3: MSDNet / RANet CIFAR at batch 1 (eval, inference_mode) with the fold caches' key (weights_signature, ~1000
parameters and buffers checked once a forward) taken in C++ or in Python.
"""
import argparse
import importlib
import os

import torch

from dynconv_ext import models
from dynconv_ext.nn import SparseConv2d
from dynconv_ext.profile.timing import interleaved_medians, machine_description, with_attrs

# (the module: dynconv_ext.ops.masked_conv2d as an attribute is the function of the same name)
mc = importlib.import_module("dynconv_ext.ops.masked_conv2d")


def in_mode(fn, ctx):
    def run():
        with ctx():
            return fn()
    return run


def ab(fn, ctx, rounds, burst=3):
    fn = in_mode(fn, ctx)
    t = interleaved_medians({"fast": fn, "registered": with_attrs(fn, mc, EAGER_FAST_PATH=False)},
                            reps=rounds, grad=True, burst=burst)
    return t["fast"], t["registered"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200, help="calls per timed sample in part 1")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"masked_conv2d eager dispatch: fast path vs registered autograd (interleaved, one process); "
          f"{machine_description()}\n")

    conv = SparseConv2d(8, 8, 3, padding=1)
    dense = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    m = torch.rand(1, 8, 8) < 0.5
    k = args.calls

    def loop(f):
        def run():
            for _ in range(k):
                f()
        return run

    def step(module, *a):
        def run():
            module.zero_grad(set_to_none=True)
            module(*a).sum().backward()
        return run

    print("| SparseConv2d 8->8 3x3, 8x8, batch 1 | fast us/call | registered us/call | registered / fast | "
          "nn.Conv2d us/call |\n|---|---|---|---|---|")
    rows = [("no_grad, forward", loop(lambda: conv(x, m)), torch.no_grad, loop(lambda: dense(x))),
            ("grad mode, forward", loop(lambda: conv(x, m)), torch.enable_grad, loop(lambda: dense(x))),
            ("grad mode, forward + backward", loop(step(conv, x, m)), torch.enable_grad, loop(step(dense, x))),
            ("inference_mode, forward", loop(lambda: conv(x, m)), torch.inference_mode, loop(lambda: dense(x)))]
    for name, fn, ctx, ref in rows:
        fast, reg = ab(fn, ctx, args.rounds)
        ref_ms = interleaved_medians({"ref": in_mode(ref, ctx)}, reps=args.rounds, grad=True)["ref"]
        us = 1e3 / k
        print(f"| {name} | {fast * us:.1f} | {reg * us:.1f} | {reg / fast:.2f}x | {ref_ms * us:.1f} |")

    print("\n| model | N | mode | mean density | fast ms | registered ms | registered / fast |\n"
          "|---|---|---|---|---|---|---|")
    for name, factory, n, size in [("dynconv_resnet32", models.dynconv_resnet32, 1, 32),
                                   ("dynconv_resnet50", models.dynconv_resnet50, 1, 224),
                                   ("dynconv_mobilenetv2", models.dynconv_mobilenetv2, 1, 224)]:
        torch.manual_seed(0)
        net = factory().eval()
        models.randomize_gates(net, std=1.0)
        xi = torch.randn(n, 3, size, size).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            net(xi)
        fast, reg = ab(lambda: net(xi), torch.no_grad, args.rounds)
        print(f"| {name} | {n} | eval, no_grad | {models.mean_density(net):.2f} | {fast:.2f} | {reg:.2f} | "
              f"{reg / fast:.2f}x |")

    # Part 3: the fold caches' key, taken in C++ (weights_signature) or in Python, once per forward.
    from dynconv_ext.models import early_exit as ee
    from dynconv_ext.profile import early_exit_table as eet
    print("\n| model | N | C++ stamps ms | Python stamps ms | Python / C++ |\n|---|---|---|---|---|")
    for name in ("msdnet_cifar", "ranet_cifar"):
        net = eet.build(name)
        xi = eet._cifar_input(1)
        forward = (lambda net=net, xi=xi: net(xi))
        t = interleaved_medians({"native": forward, "python": with_attrs(forward, ee, _native_stamps=None)},
                                reps=args.rounds, burst=3)
        print(f"| {name} | 1 | {t['native']:.2f} | {t['python']:.2f} | {t['python'] / t['native']:.2f}x |")


if __name__ == "__main__":
    main()

"""The CPU kernels' AVX-512 blocks against their AVX2 ones, interleaved in one process (CPU).

    python python/tools/avx512_ab.py [--reps 9] [--skip-msdnet]

On a CPU with AVX-512F the float32 convolutions with more than 8 output channels per group run on AVX-512
register blocks (tile_gemm.h); DYNCONV_EXT_AVX512=0, read by the kernels on every call, sends them back to the
AVX2 ones, so both can be timed in one process, turn about. Rows: the core issue's masked 3x3 conv (64ch 56x56,
batch 8, random pixel masks) and two more ResNet layers at densities 0.1-1.0, against PyTorch's dense conv
(oneDNN, the faster of NCHW and channels-last), and MSDNet CIFAR's whole network at batch 256 (conv2d_into).
Outputs of the two paths are checked equal (the blocks accumulate each output in the same order).
"""
import argparse
import os

import torch
import torch.nn.functional as F

import dynconv_ext
from dynconv_ext.ops import masked_conv2d
from dynconv_ext.profile.timing import interleaved_medians, machine_description

LAYERS = [(64, 56), (128, 28), (256, 14)]
DENSITIES = [0.1, 0.25, 0.5, 1.0]


def _isa(flag, fn):
    def call():
        os.environ["DYNCONV_EXT_AVX512"] = flag
        return fn()
    return call


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--skip-msdnet", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if dynconv_ext.build_info()["cpu_kernel"] != "avx512f":
        raise SystemExit("this CPU has no AVX-512F (or DYNCONV_EXT_AVX512=0 is set): nothing to compare")
    g = torch.Generator().manual_seed(0)
    print(f"masked_conv2d 3x3, batch 8, pixel masks, backend='cpp'; {machine_description()}")
    print("| layer | density | AVX2 ms | AVX-512 ms | AVX-512 gain | dense ms | speedup AVX2 | speedup AVX-512 |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for c, h in LAYERS:
            x = torch.randn(8, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
            xn = x.contiguous()
            w, b = torch.randn(c, c, 3, 3, generator=g) * 0.05, torch.randn(c, generator=g)
            for d in DENSITIES:
                m = torch.rand(8, 1, h, h, generator=g) < d
                run = lambda: masked_conv2d(x, w, b, m, padding=1, backend="cpp")  # noqa: E731
                a2, a5 = _isa("0", run)(), _isa("1", run)()
                assert torch.equal(a2, a5), "AVX2 and AVX-512 outputs differ"
                t = interleaved_medians({"avx2": _isa("0", run), "avx512": _isa("1", run),
                                         "dense_cl": lambda: F.conv2d(x, w, b, padding=1),
                                         "dense_nchw": lambda: F.conv2d(xn, w, b, padding=1)}, reps=args.reps)
                dense = min(t["dense_cl"], t["dense_nchw"])
                print(f"| {c}ch {h}x{h} | {d:.2f} | {t['avx2']:.2f} | {t['avx512']:.2f} | "
                      f"{t['avx2'] / t['avx512']:.2f}x | {dense:.2f} | {dense / t['avx2']:.2f}x | "
                      f"{dense / t['avx512']:.2f}x |")
        if not args.skip_msdnet:
            from dynconv_ext import models
            net = models.msdnet_cifar(num_classes=100).eval()
            xb = torch.randn(256, 3, 32, 32, generator=g)
            run = lambda: net(xb)  # noqa: E731
            o2, o5 = _isa("0", run)(), _isa("1", run)()
            assert all(torch.equal(u, v) for u, v in zip(o2, o5)), "AVX2 and AVX-512 logits differ"
            t = interleaved_medians({"avx2": _isa("0", run), "avx512": _isa("1", run)}, reps=max(3, args.reps // 2))
            print(f"\nMSDNet CIFAR whole network (fused path), batch 256: AVX2 {t['avx2']:.0f} ms, "
                  f"AVX-512 {t['avx512']:.0f} ms, gain {t['avx2'] / t['avx512']:.2f}x")
    os.environ.pop("DYNCONV_EXT_AVX512", None)


if __name__ == "__main__":
    main()

"""What writing into a wide concat buffer costs a narrow conv: MSDNet's 6->6 3x3 at 32x32, batch 256, into
output buffers of 6, 16 and 64 channels (the layer's 6 channels at the end), and 8 calls at batch 32 into a
64-channel buffer; interleaved in one process.

    python python/tools/concat_write_cost.py
"""
import torch

from dynconv_ext.ops import conv2d_into
from dynconv_ext.profile.timing import interleaved_medians


def channels_last_zeros(*shape):
    return torch.zeros(*shape).contiguous(memory_format=torch.channels_last)


def main():
    torch.manual_seed(0)
    x = torch.randn(256, 6, 32, 32).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, 6, 3, 3), torch.randn(6)
    fns = {}
    for cap in (6, 16, 64):
        out = channels_last_zeros(256, cap, 32, 32)
        fns[f"buffer {cap} ch"] = lambda out=out, cap=cap: conv2d_into(x, w, b, out, cap - 6, 1, 1, activation="relu")
    chunk, chunk_out = x[:32].contiguous(memory_format=torch.channels_last), channels_last_zeros(32, 64, 32, 32)
    fns["batch 32 x8, 64 ch"] = lambda: [conv2d_into(chunk, w, b, chunk_out, 58, 1, 1, activation="relu")
                                         for _ in range(8)]
    for name, ms in interleaved_medians(fns, reps=11).items():
        print(f"{name}: {ms:.2f} ms")


if __name__ == "__main__":
    main()

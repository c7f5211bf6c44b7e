"""Triton kernel of resize_into: bilinear resampling (align_corners=True) written into a channel slice.

`_resize_into_kernel`: each program owns BLOCK_P output pixels x BLOCK_C channels (channels the fast axis, so the
loads and stores of a channels-last buffer are contiguous runs of channels). Per output pixel it computes the
source coordinates as PyTorch does (``src = dst * (in - 1) / (out - 1)``, 0 when the output size is 1; the upper
neighbour clamped to the last row/column), loads the four neighbours through the input's strides (a channel-slice
view of a channels-last buffer is read in place), blends them in fp32 and stores through `out`'s strides at
channels ``channel_offset + c``. When the sizes agree (COPY) it is a strided copy. It reads only the input and
writes only the slice, so autotuning reruns are harmless. Offsets in int64.

`resize_into_triton` is the launcher (CPU tensors under TRITON_INTERPRET=1 only, for tests); it is registered as
the op dynconv::resize_into_triton (ops.py).
"""
from .masked_conv2d import INTERPRET, TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from .masked_conv2d import _launch, split_pixel

    def _resize_configs():
        """(BLOCK_P, BLOCK_C, warps); one small config under the interpreter."""
        entries = [(16, 16, 1)] if INTERPRET else \
            [(64, 32, 4), (32, 64, 4), (128, 16, 4), (16, 128, 4), (128, 32, 8), (64, 64, 8)]
        return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w) for p, c, w in entries]

    @triton.autotune(configs=_resize_configs(), key=["P", "C", "h", "w", "sx_c", "so_c", "COPY"])
    @triton.jit
    def _resize_into_kernel(
        x_ptr, out_ptr,
        P, C, h, w, H, W, c_off, scale_h, scale_w,
        sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
        COPY: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        pix = tl.where(p_ok, offs_p, 0).to(tl.int64)
        n, oh, ow = split_pixel(pix, H, W)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        mask = p_ok[:, None] & c_ok[None, :]
        x_c = offs_c.to(tl.int64)[None, :] * sx_c
        x_n = (n * sx_n)[:, None] + x_c
        if COPY:
            v = tl.load(x_ptr + x_n + (oh * sx_h + ow * sx_w)[:, None], mask=mask, other=0.0)
        else:
            src_h = oh.to(tl.float32) * scale_h
            src_w = ow.to(tl.float32) * scale_w
            h0 = tl.minimum(src_h.to(tl.int64), h - 1)  # src >= 0: truncation is floor
            w0 = tl.minimum(src_w.to(tl.int64), w - 1)
            lh = src_h - h0.to(tl.float32)
            lw = src_w - w0.to(tl.float32)
            h1 = tl.minimum(h0 + 1, h - 1)
            w1 = tl.minimum(w0 + 1, w - 1)
            r0 = x_n + (h0 * sx_h)[:, None]
            r1 = x_n + (h1 * sx_h)[:, None]
            c0 = (w0 * sx_w)[:, None]
            c1 = (w1 * sx_w)[:, None]
            x00 = tl.load(x_ptr + r0 + c0, mask=mask, other=0.0).to(tl.float32)
            x01 = tl.load(x_ptr + r0 + c1, mask=mask, other=0.0).to(tl.float32)
            x10 = tl.load(x_ptr + r1 + c0, mask=mask, other=0.0).to(tl.float32)
            x11 = tl.load(x_ptr + r1 + c1, mask=mask, other=0.0).to(tl.float32)
            lw2 = lw[:, None]
            lh2 = lh[:, None]
            top = (1.0 - lw2) * x00 + lw2 * x01
            bot = (1.0 - lw2) * x10 + lw2 * x11
            v = (1.0 - lh2) * top + lh2 * bot
        o_offs = (n * so_n + oh * so_h + ow * so_w)[:, None] + (c_off + offs_c).to(tl.int64)[None, :] * so_c
        tl.store(out_ptr + o_offs, v.to(out_ptr.dtype.element_ty), mask=mask)

    def resize_into_triton(input, out, channel_offset):
        """Launcher: ``out[:, channel_offset : channel_offset + C]`` = input resampled bilinearly (align_corners=True)
        to out's spatial size (a copy when the sizes agree), in place, through both tensors' strides. The caller has
        checked the shapes and that the input does not overlap the written slice."""
        n, c, h, w = input.shape
        H, W = out.shape[-2:]
        p = n * H * W
        if p == 0 or c == 0:
            return
        copy = (h, w) == (H, W)
        scale_h = (h - 1) / (H - 1) if H > 1 else 0.0
        scale_w = (w - 1) / (W - 1) if W > 1 else 0.0
        grid = lambda meta: (triton.cdiv(p, meta["BLOCK_P"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
        _launch(_resize_into_kernel)[grid](
            input, out, p, c, h, w, H, W, channel_offset, float(scale_h), float(scale_w),
            *input.stride(), *out.stride(), COPY=copy)

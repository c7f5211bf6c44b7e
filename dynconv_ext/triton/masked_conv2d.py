"""Triton forward kernel of masked_conv2d: implicit GEMM over the active output rows.

Data flow (no host synchronisation, so CUDA graphs and torch.compile can capture it):
  pixel mask [N*Ho*Wo] -> `compact_rows`: cumsum + scatter into a fixed-capacity buffer (active rows
  first, raster order) and the active count as a device tensor -> a grid sized for the capacity whose
  programs past the count exit at once -> each program gathers BLOCK_M rows' receptive fields from the
  channels-last input tap by tap (the gather is the operand load), multiplies by the packed weights
  with tl.dot, adds bias, and adds the result onto the output rows (zeros, or the residual).

`masked_conv2d_triton` is the launcher; under TRITON_INTERPRET=1 it runs on CPU tensors (how CI checks
it). On CUDA it is registered as the op dynconv::masked_conv2d_triton through torch.library.triton_op.
"""
import os

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    TRITON_AVAILABLE = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def compact_rows(pixel_mask_flat: torch.Tensor):
    """Active positions of a flat bool mask, first and in order, in a buffer of the mask's length.

    Returns (rows int64 [P + 1], count int32 [1]); rows[count:] is unspecified. No host sync.
    """
    p = pixel_mask_flat.numel()
    active = pixel_mask_flat.to(torch.int32)
    pos = torch.cumsum(active, 0, dtype=torch.int32) - 1
    # Inactive positions all write to the spare slot p, which nothing reads.
    target = torch.where(pixel_mask_flat, pos.to(torch.int64), torch.full_like(pos, p, dtype=torch.int64))
    rows = torch.empty(p + 1, dtype=torch.int64, device=pixel_mask_flat.device)
    rows.scatter_(0, target, torch.arange(p, dtype=torch.int64, device=pixel_mask_flat.device))
    count = active.sum(dtype=torch.int32).reshape(1)
    return rows, count


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[Co, Cg, KH, KW] -> [G, KH*KW*Cg, Cog]: the reduction index k = tap*Cg + c, output channels last."""
    co, cg, kh, kw = weight.shape
    w = weight.reshape(groups, co // groups, cg, kh, kw).permute(0, 3, 4, 2, 1)
    return w.reshape(groups, kh * kw * cg, co // groups).contiguous()


if TRITON_AVAILABLE:

    def _configs():
        if INTERPRET:  # the interpreter runs every config; one is enough to check correctness
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for (bm, bn, bk, w, s) in [
                (64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                (128, 128, 32, 8, 3), (64, 64, 64, 4, 4), (32, 64, 32, 4, 2),
            ]
        ]

    @triton.autotune(configs=_configs(), key=["Cg", "Cog", "KH", "KW", "P"])
    @triton.jit
    def _masked_conv2d_fwd_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, rows_ptr, count_ptr,
        P, H, W, C, Ho, Wo, Co, Cg, Cog,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        count = tl.load(count_ptr)
        if pid_m * BLOCK_M < count:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < count
            pix = tl.load(rows_ptr + offs_m, mask=m_ok, other=0)  # int64 flat output pixel
            hw = Ho * Wo
            n = pix // hw
            rem = pix - n * hw
            ho = rem // Wo
            wo = rem - ho * Wo
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Cog
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            K = KH * KW * Cg
            for kh in tl.static_range(KH):
                for kw in tl.static_range(KW):
                    hi = ho * stride_h - pad_h + kh * dil_h
                    wi = wo * stride_w - pad_w + kw * dil_w
                    in_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                    x_row = ((n * H + hi) * W + wi) * C + g * Cg  # channels-last pixel start
                    for c0 in range(0, Cg, BLOCK_K):
                        offs_k = c0 + tl.arange(0, BLOCK_K)
                        k_ok = offs_k < Cg
                        a = tl.load(x_ptr + x_row[:, None] + offs_k[None, :],
                                    mask=in_ok[:, None] & k_ok[None, :], other=0.0)
                        wk = g * K + (kh * KW + kw) * Cg + offs_k
                        b = tl.load(w_ptr + wk[:, None] * Cog + offs_n[None, :],
                                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                        if IEEE:
                            acc += tl.dot(a, b, input_precision="ieee")
                        else:
                            acc += tl.dot(a, b)
            co = g * Cog + offs_n
            if HAS_BIAS:
                acc += tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            o_ptrs = out_ptr + pix[:, None] * Co + co[None, :]
            o_mask = m_ok[:, None] & n_ok[None, :]
            prev = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)  # zeros, or the residual
            tl.store(o_ptrs, (prev + acc).to(out_ptr.dtype.element_ty), mask=o_mask)

    def masked_conv2d_triton(input, weight, bias, pixel_mask, stride, padding, dilation, groups, residual=None):
        """Launches the kernel. pixel_mask: bool [N, Ho, Wo]. Returns a channels-last [N, Co, Ho, Wo]."""
        n, c, h, w = input.shape
        co, cg, kh, kw = weight.shape
        ho, wo = pixel_mask.shape[-2:]
        x = input.contiguous(memory_format=torch.channels_last)
        wp = pack_weight(weight, groups)
        if residual is None:
            out = torch.empty((n, co, ho, wo), dtype=input.dtype, device=input.device,
                              memory_format=torch.channels_last).zero_()
        else:
            out = residual.contiguous(memory_format=torch.channels_last).clone(memory_format=torch.channels_last)
        rows, count = compact_rows(pixel_mask.reshape(-1))
        p = rows.numel() - 1
        ieee = input.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        grid = lambda meta: (triton.cdiv(p, meta["BLOCK_M"]), triton.cdiv(co // groups, meta["BLOCK_N"]), groups)  # noqa: E731
        kernel = _masked_conv2d_fwd_kernel if INTERPRET else torch.library.wrap_triton(_masked_conv2d_fwd_kernel)
        kernel[grid](
            x, wp, bias if bias is not None else wp, out, rows, count,
            p, h, w, c, ho, wo, co, cg, co // groups,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kh, KW=kw, HAS_BIAS=bias is not None, IEEE=ieee,
        )
        return out

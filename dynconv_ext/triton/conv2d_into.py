"""Triton kernel of conv2d_into: a dense convolution written straight into a channel slice of a wider buffer.

`_conv2d_into_kernel` is an implicit GEMM over all M = N*Ho*Wo output pixels (M) x the output channels of a group
(N), reduced over K = KH*KW*Cg (tap by tap, input channels in BLOCK_K chunks). The input is addressed through
its own four strides, so a channel-slice view of a channels-last buffer (the filled prefix of a dense block) is
read in place, and so is any other layout (NCHW, strided); the packed weights are [G, KH*KW*Cg, Cog]
(`pack_weight`). The epilogue adds the bias, applies the activation (0 none, 1 ReLU, 2 ReLU6) and stores through
`out`'s strides at channels `channel_offset + g*Cog + ...`: channels outside the slice are never touched. The
kernel only reads the input and writes the slice, so a rerun (autotuning runs every config on the same buffers)
gives the same result. Offsets are computed in int64.

Two reduction paths (a constexpr chosen by the launcher): tl.dot on [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles
(fp32 accumulation; IEEE fp32 unless TF32 is allowed) when a group has at least 16 input channels, and rank-1
updates channel by channel (fp32 FMAs) for fewer (depthwise convs, RGB stems), where a 16-deep dot would mostly
multiply padding.

`conv2d_into_triton` is the launcher; under TRITON_INTERPRET=1 it runs on CPU tensors (how the tests check it).
It is registered as the op dynconv::conv2d_into_triton (ops.py).
"""
from .masked_conv2d import INTERPRET, TRITON_AVAILABLE, pack_weight

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from .masked_conv2d import _activate, _launch, _use_ieee, split_pixel

    def _conv_configs():
        """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); one small config under the interpreter."""
        if INTERPRET:
            entries = [(16, 16, 16, 1, 1)]
        else:
            entries = [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
                       (64, 64, 64, 4, 4), (128, 32, 32, 4, 3), (32, 64, 32, 4, 2), (128, 16, 16, 4, 2)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for m, n, k, w, s in entries]

    @triton.autotune(configs=_conv_configs(), key=["M", "Cg", "Cog", "KH", "KW", "sx_c", "so_c", "DOT"])
    @triton.jit
    def _conv2d_into_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        M, H, W, Ho, Wo, Cg, Cog, c_off,
        sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, DOT: tl.constexpr,
        IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        pix = tl.where(m_ok, offs_m, 0).to(tl.int64)
        n, ho, wo = split_pixel(pix, Ho, Wo)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Cog
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        K = KH * KW * Cg
        x_base = n * sx_n + (g * Cg).to(tl.int64) * sx_c
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                hi = ho * stride_h - pad_h + kh * dil_h
                wi = wo * stride_w - pad_w + kw * dil_w
                in_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                x_row = x_base + hi * sx_h + wi * sx_w
                w_tap = g * K + (kh * KW + kw) * Cg  # first packed weight row of this tap
                if DOT:
                    for c0 in range(0, Cg, BLOCK_K):
                        offs_k = c0 + tl.arange(0, BLOCK_K)
                        k_ok = offs_k < Cg
                        a = tl.load(x_ptr + x_row[:, None] + offs_k[None, :].to(tl.int64) * sx_c,
                                    mask=in_ok[:, None] & k_ok[None, :], other=0.0)
                        b = tl.load(w_ptr + (w_tap + offs_k)[:, None] * Cog + offs_n[None, :],
                                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                        if IEEE:
                            acc += tl.dot(a, b, input_precision="ieee")
                        else:
                            acc += tl.dot(a, b)
                else:
                    x_c = x_row  # int64 offsets of channel c, advanced channel by channel
                    for c in range(0, Cg):
                        a = tl.load(x_ptr + x_c, mask=in_ok, other=0.0).to(tl.float32)
                        b = tl.load(w_ptr + (w_tap + c) * Cog + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                        acc += a[:, None] * b[None, :]
                        x_c += sx_c
        co = g * Cog + offs_n
        if HAS_BIAS:
            acc += tl.load(b_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc = _activate(acc, ACT)
        o_offs = (n * so_n + ho * so_h + wo * so_w)[:, None] + (c_off + co).to(tl.int64)[None, :] * so_c
        tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def conv2d_into_triton(input, weight, bias, out, channel_offset, stride, padding, dilation, groups,
                           activation: int = 0):
        """Launcher: ``out[:, channel_offset : channel_offset + C_out] = act(conv2d(input, weight, bias))`` in place
        (activation: 0 none, 1 ReLU, 2 ReLU6). The input and out are addressed through their strides (no copies);
        the caller has checked the shapes and that the input does not overlap the written slice."""
        n, c, h, w = input.shape
        co, cg, kh, kw = weight.shape
        ho, wo = out.shape[-2:]
        cog = co // groups
        m = n * ho * wo
        if m == 0 or co == 0:
            return
        wp = pack_weight(weight, groups)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cog, meta["BLOCK_N"]), groups)  # noqa: E731
        _launch(_conv2d_into_kernel)[grid](
            input, wp, bias if bias is not None else wp, out,
            m, h, w, ho, wo, cg, cog, channel_offset,
            *input.stride(), *out.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kh, KW=kw, HAS_BIAS=bias is not None, ACT=int(activation), DOT=cg >= 16,
            IEEE=_use_ieee(input.dtype),
        )

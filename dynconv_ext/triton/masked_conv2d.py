"""Triton kernels of masked_conv2d: implicit GEMMs over the active output rows, forward and backward.

Data flow (no host synchronisation, so CUDA graphs and torch.compile can capture it):
  pixel mask [N*Ho*Wo] -> `compact_rows`: cumsum + scatter into a fixed-capacity buffer (active rows
  first, raster order) and the active count as a device tensor -> a grid sized for the capacity whose
  programs past the count exit at once.

Forward (`_masked_conv2d_fwd_kernel`): each program gathers BLOCK_M rows' receptive fields from the
channels-last input tap by tap (the gather is the operand load), multiplies by the packed weights with
tl.dot (fp32 accumulation), and in the epilogue adds bias and the residual, applies the activation
(0 none, 1 ReLU, 2 ReLU6) and stores the active rows. Inactive rows of the output are zeros, or the
residual (a copy made before the launch); the kernel reads the residual, never the output, so a rerun
(autotuning runs every config on the same buffers) gives the same result.

Backward (the gradient counts only at active pixels and, with a fused activation, where the saved output
shows the activation did not clip; both are applied as the kernels load grad_output):
  * `_masked_conv2d_bwd_weight_kernel`: grad_weight = A^T G over the active rows (A gathered from the
    input as in the forward), per tile (tap, input-channel block, output-channel block) of the packed
    weight; SPLIT programs share the rows and add their fp32 partial sums atomically into an fp32 buffer
    (reset_to_zero for autotuning); grad_bias (column sums of G) is fused in. Not bitwise deterministic.
  * `_touched_inputs_kernel` marks the input pixels some active output reads; `compact_rows` lists them;
    `_masked_conv2d_bwd_input_kernel` pulls each such pixel's gradient (sum over taps of G rows of the
    output pixels that read it times the tap's transposed weights) in fp32 registers and stores it once:
    no atomics, deterministic. Pixels nobody reads stay zero.
Groups are the grid's third axis in every kernel (depthwise works but wastes most of a >= 16-wide tile).

`masked_conv2d_triton` and `masked_conv2d_triton_backward` are the launchers; under TRITON_INTERPRET=1 they
run on CPU tensors (how CI checks them). They are registered as the ops dynconv::masked_conv2d_triton and
dynconv::masked_conv2d_triton_backward through torch.library.triton_op (ops.py).
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


ACT_NONE, ACT_RELU, ACT_RELU6 = 0, 1, 2  # the `activation` codes of the ops (as in the C++ op)


def unpack_weight_grad(gw: torch.Tensor, weight_shape, groups: int) -> torch.Tensor:
    """Inverse of `pack_weight`: [G, KH*KW*Cg, Cog] -> [Co, Cg, KH, KW]."""
    co, cg, kh, kw = weight_shape
    return gw.reshape(groups, kh, kw, cg, co // groups).permute(0, 4, 3, 1, 2).reshape(co, cg, kh, kw)


if TRITON_AVAILABLE:

    def _configs(entries, single):
        """autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K[, SPLIT], warps, stages) tuples; under the
        interpreter only `single` (the interpreter would run every config, and autotuning there is slow)."""
        def cfg(e):
            names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT")[: len(e) - 2]
            return triton.Config(dict(zip(names, e[:-2])), num_warps=e[-2], num_stages=e[-1])
        if INTERPRET:
            return [cfg(single)]
        return [cfg(e) for e in entries]

    _FWD_CONFIGS = _configs(
        [(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
         (128, 128, 32, 8, 3), (64, 64, 64, 4, 4), (32, 64, 32, 4, 2)],
        single=(16, 16, 16, 1, 1))
    # grad_input (pull over input pixels): M = touched input pixels, N = input channels of a group,
    # K = output channels of the group (per tap).
    _BWD_INPUT_CONFIGS = _FWD_CONFIGS
    # grad_weight: M = K*KH*KW reduction rows of the packed weight (BLOCK_K: input channels of one tap),
    # N = output channels, reduced over BLOCK_M active rows at a time; SPLIT programs share the rows.
    _BWD_WEIGHT_CONFIGS = _configs(
        [(64, 64, 32, 32, 4, 3), (64, 64, 64, 16, 4, 3), (32, 64, 32, 64, 4, 2),
         (64, 128, 64, 16, 8, 3), (128, 64, 64, 8, 8, 3), (64, 32, 32, 64, 4, 3)],
        single=(16, 16, 16, 2, 1, 1))

    @triton.jit
    def _activate(v, ACT: tl.constexpr):
        if ACT == 1:
            v = tl.maximum(v, 0.0)
        elif ACT == 2:
            v = tl.minimum(tl.maximum(v, 0.0), 6.0)
        return v

    @triton.jit
    def split_pixel(pix, H, W):
        """(n, h, w) of flat pixels pix = (n * H + h) * W + w (int64)."""
        hw = H * W
        n = pix // hw
        rem = pix - n * hw
        h = rem // W
        return n, h, rem - h * W

    @triton.jit
    def _unclipped_grad(g, o, ACT: tl.constexpr):
        """grad_output where the fused activation passed its input through (o: the saved output)."""
        if ACT == 1:
            g = tl.where(o <= 0.0, tl.zeros_like(g), g)
        elif ACT == 2:
            g = tl.where((o <= 0.0) | (o >= 6.0), tl.zeros_like(g), g)
        return g

    @triton.autotune(configs=_FWD_CONFIGS, key=["Cg", "Cog", "KH", "KW", "P"])
    @triton.jit
    def _masked_conv2d_fwd_kernel(
        x_ptr, w_ptr, b_ptr, r_ptr, out_ptr, rows_ptr, count_ptr,
        P, H, W, C, Ho, Wo, Co, Cg, Cog,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
        ACT: tl.constexpr, IEEE: tl.constexpr,
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
            n, ho, wo = split_pixel(pix, Ho, Wo)
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
            o_offs = pix[:, None] * Co + co[None, :]
            o_mask = m_ok[:, None] & n_ok[None, :]
            if HAS_RES:  # read from the residual, never from out: reruns (autotuning) give the same result
                acc += tl.load(r_ptr + o_offs, mask=o_mask, other=0.0).to(tl.float32)
            acc = _activate(acc, ACT)
            tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)

    @triton.autotune(configs=_BWD_WEIGHT_CONFIGS, key=["Cg", "Cog", "KH", "KW", "P"],
                     reset_to_zero=["gw_ptr", "gb_ptr"])
    @triton.jit
    def _masked_conv2d_bwd_weight_kernel(
        x_ptr, g_ptr, o_ptr, gw_ptr, gb_ptr, rows_ptr, count_ptr,
        P, H, W, C, Ho, Wo, Co, Cg, Cog,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
        ACT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    ):
        """grad_weight[g] (+)= A^T G over the active rows, A gathered from the input like the forward's
        operand. Program (t, s, g): tile t = (tap, input-channel block, output-channel block) of the packed
        [G, KH*KW*Cg, Cog] fp32 gradient; rows s*BLOCK_M, (s + SPLIT)*BLOCK_M, ... of the compacted list;
        partial sums go to the fp32 buffer by atomic adds. Programs of tap 0 and channel block 0 also sum
        the grad rows into grad_bias."""
        pid_t = tl.program_id(0)
        pid_s = tl.program_id(1)
        g = tl.program_id(2)
        count = tl.load(count_ptr)
        if pid_s * BLOCK_M < count:
            n_blocks = tl.cdiv(Cog, BLOCK_N)
            k_blocks = tl.cdiv(Cg, BLOCK_K)
            pid_n = pid_t % n_blocks
            rest = pid_t // n_blocks
            kb = rest % k_blocks
            tap = rest // k_blocks
            kh = tap // KW
            kw = tap - kh * KW
            offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = offs_k < Cg
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Cog
            co = g * Cog + offs_n
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            bacc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for m0 in range(pid_s * BLOCK_M, count, SPLIT * BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                m_ok = offs_m < count
                pix = tl.load(rows_ptr + offs_m, mask=m_ok, other=0)
                g_offs = pix[:, None] * Co + co[None, :]
                g_mask = m_ok[:, None] & n_ok[None, :]
                gt = tl.load(g_ptr + g_offs, mask=g_mask, other=0.0)
                if ACT != 0:
                    gt = _unclipped_grad(gt, tl.load(o_ptr + g_offs, mask=g_mask, other=0.0), ACT)
                if HAS_W:
                    n, ho, wo = split_pixel(pix, Ho, Wo)
                    hi = ho * stride_h - pad_h + kh * dil_h
                    wi = wo * stride_w - pad_w + kw * dil_w
                    in_ok = m_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
                    x_row = ((n * H + hi) * W + wi) * C + g * Cg
                    a_t = tl.load(x_ptr + x_row[None, :] + offs_k[:, None],  # A^T tile [BLOCK_K, BLOCK_M]
                                  mask=in_ok[None, :] & k_ok[:, None], other=0.0)
                    if IEEE:
                        acc += tl.dot(a_t, gt, input_precision="ieee")
                    else:
                        acc += tl.dot(a_t, gt)
                if HAS_BIAS:
                    bacc += tl.sum(gt.to(tl.float32), axis=0)
            if HAS_W:
                wk = g * (KH * KW * Cg) + tap * Cg + offs_k
                tl.atomic_add(gw_ptr + wk[:, None] * Cog + offs_n[None, :], acc,
                              mask=k_ok[:, None] & n_ok[None, :])
            if HAS_BIAS:
                if rest == 0:
                    tl.atomic_add(gb_ptr + co, bacc, mask=n_ok)

    @triton.jit
    def _touched_inputs_kernel(
        m_ptr, t_ptr, Q, H, W, Ho, Wo,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """t[input pixel] = 1 where some tap of some active output pixel reads it (its gradient is nonzero)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < Q
        n, hi, wi = split_pixel(offs, H, W)
        hit = tl.zeros((BLOCK,), dtype=tl.int32)
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                th = hi + pad_h - kh * dil_h
                tw = wi + pad_w - kw * dil_w
                ho = tl.where(th >= 0, th, 0) // stride_h
                wo = tl.where(tw >= 0, tw, 0) // stride_w
                tap_ok = ok & (th >= 0) & (tw >= 0) & (ho * stride_h == th) & (wo * stride_w == tw) \
                    & (ho < Ho) & (wo < Wo)
                v = tl.load(m_ptr + (n * Ho + ho) * Wo + wo, mask=tap_ok, other=0)
                hit = tl.maximum(hit, v.to(tl.int32))
        tl.store(t_ptr + offs, hit.to(tl.uint8), mask=ok)

    @triton.autotune(configs=_BWD_INPUT_CONFIGS, key=["Cg", "Cog", "KH", "KW", "Q"])
    @triton.jit
    def _masked_conv2d_bwd_input_kernel(
        g_ptr, o_ptr, w_ptr, m_ptr, gi_ptr, rows_ptr, count_ptr,
        Q, H, W, C, Ho, Wo, Co, Cg, Cog,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """grad_input by pulling: each program owns BLOCK_M touched input pixels x BLOCK_N channels of group g
        and sums, tap by tap, the (masked, unclipped) grad rows of the output pixels that read them times the
        tap's weights. Every touched pixel is written once (no atomics); the rest stay zero."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        g = tl.program_id(2)
        count = tl.load(count_ptr)
        if pid_m * BLOCK_M < count:
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < count
            pix = tl.load(rows_ptr + offs_m, mask=m_ok, other=0)  # int64 flat input pixel
            n, hi, wi = split_pixel(pix, H, W)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
            n_ok = offs_n < Cg
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            K = KH * KW * Cg
            for kh in tl.static_range(KH):
                for kw in tl.static_range(KW):
                    th = hi + pad_h - kh * dil_h
                    tw = wi + pad_w - kw * dil_w
                    ho = tl.where(th >= 0, th, 0) // stride_h
                    wo = tl.where(tw >= 0, tw, 0) // stride_w
                    ok = m_ok & (th >= 0) & (tw >= 0) & (ho * stride_h == th) & (wo * stride_w == tw) \
                        & (ho < Ho) & (wo < Wo)
                    opix = (n * Ho + ho) * Wo + wo
                    ok = ok & (tl.load(m_ptr + opix, mask=ok, other=0) != 0)  # only active outputs
                    w_row = g * K + (kh * KW + kw) * Cg + offs_n  # packed weight rows of this tap
                    for c0 in range(0, Cog, BLOCK_K):
                        offs_k = c0 + tl.arange(0, BLOCK_K)
                        k_ok = offs_k < Cog
                        g_offs = opix[:, None] * Co + g * Cog + offs_k[None, :]
                        g_mask = ok[:, None] & k_ok[None, :]
                        a = tl.load(g_ptr + g_offs, mask=g_mask, other=0.0)
                        if ACT != 0:
                            a = _unclipped_grad(a, tl.load(o_ptr + g_offs, mask=g_mask, other=0.0), ACT)
                        b = tl.load(w_ptr + w_row[None, :] * Cog + offs_k[:, None],  # W^T tile [BLOCK_K, BLOCK_N]
                                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                        if IEEE:
                            acc += tl.dot(a, b, input_precision="ieee")
                        else:
                            acc += tl.dot(a, b)
            tl.store(gi_ptr + pix[:, None] * C + g * Cg + offs_n[None, :], acc.to(gi_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])

    class _InterpretedLaunch:
        """Under TRITON_INTERPRET=1 wrap_triton hands the kernel back as is, so a launch with fake tensors (the
        triton_op's fake kernel is its Python function, run on FakeTensors, also wrapped as FunctionalTensors, by opcheck and torch.compile) would run
        the interpreter on them: skip such launches (the outputs' shapes are already allocated)."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                from torch._subclasses.fake_tensor import is_fake  # also sees through functional wrappers
                if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                    return None
                return self.kernel[grid](*args, **kwargs)
            return launch

    def _launch(kernel):
        return _InterpretedLaunch(kernel) if INTERPRET else torch.library.wrap_triton(kernel)

    def _use_ieee(dtype) -> bool:
        return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32

    def masked_conv2d_triton(input, weight, bias, pixel_mask, stride, padding, dilation, groups, residual=None,
                             activation: int = ACT_NONE):
        """Forward launcher. pixel_mask: bool [N, Ho, Wo]; activation: 0 none, 1 ReLU, 2 ReLU6, applied at active
        pixels to conv + bias (+ residual). Returns a channels-last [N, Co, Ho, Wo]."""
        n, c, h, w = input.shape
        co, cg, kh, kw = weight.shape
        ho, wo = pixel_mask.shape[-2:]
        x = input.contiguous(memory_format=torch.channels_last)
        wp = pack_weight(weight, groups)
        if residual is None:
            res = None
            out = torch.empty((n, co, ho, wo), dtype=input.dtype, device=input.device,
                              memory_format=torch.channels_last).zero_()
        else:
            res = residual.contiguous(memory_format=torch.channels_last)
            out = res.clone(memory_format=torch.channels_last)  # inactive pixels keep the residual
        rows, count = compact_rows(pixel_mask.reshape(-1))
        p = rows.numel() - 1
        grid = lambda meta: (triton.cdiv(p, meta["BLOCK_M"]), triton.cdiv(co // groups, meta["BLOCK_N"]), groups)  # noqa: E731
        _launch(_masked_conv2d_fwd_kernel)[grid](
            x, wp, bias if bias is not None else wp, res if res is not None else out, out, rows, count,
            p, h, w, c, ho, wo, co, cg, co // groups,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RES=res is not None, ACT=int(activation),
            IEEE=_use_ieee(input.dtype),
        )
        return out

    def masked_conv2d_triton_backward(grad_output, input, weight, pixel_mask, output, stride, padding, dilation,
                                      groups, activation, output_mask):
        """Backward launcher: (grad_input, grad_weight, grad_bias), each an empty tensor where output_mask is False.

        grad_output counts only at active pixels and, with a fused activation (activation != 0; `output` is then
        the forward's result), only where the activation did not clip. grad_weight and grad_bias accumulate in
        fp32 buffers (atomic adds); grad_input is pulled per input pixel in fp32 registers; both are cast to the
        parameters' dtype at the end. grad_input is channels-last.
        """
        n, c, h, w = input.shape
        co, cg, kh, kw = weight.shape
        ho, wo = pixel_mask.shape[-2:]
        cog = co // groups
        act = int(activation)
        gout = grad_output.contiguous(memory_format=torch.channels_last)
        out = output.contiguous(memory_format=torch.channels_last) if act != ACT_NONE else gout
        pm = pixel_mask.reshape(-1)
        pm8 = pm.to(torch.uint8)  # a byte copy, not a dtype view (simpler for torch.compile's functionalization)
        conv = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
        ieee = _use_ieee(input.dtype)
        gi, gw, gb = (input.new_empty((0,)) for _ in range(3))  # distinct: outputs of an op may not alias
        if output_mask[0]:
            q = n * h * w
            touched = torch.empty(q, dtype=torch.uint8, device=input.device)
            _launch(_touched_inputs_kernel)[(triton.cdiv(q, 256),)](
                pm8, touched, q, h, w, ho, wo, *conv, KH=kh, KW=kw, BLOCK=256)
            trows, tcount = compact_rows(touched != 0)
            gi = torch.empty((n, c, h, w), dtype=input.dtype, device=input.device,
                             memory_format=torch.channels_last).zero_()
            grid = lambda meta: (triton.cdiv(q, meta["BLOCK_M"]), triton.cdiv(cg, meta["BLOCK_N"]), groups)  # noqa: E731
            _launch(_masked_conv2d_bwd_input_kernel)[grid](
                gout, out, pack_weight(weight, groups), pm8, gi, trows, tcount,
                q, h, w, c, ho, wo, co, cg, cog, *conv, KH=kh, KW=kw, ACT=act, IEEE=ieee)
        if output_mask[1] or output_mask[2]:
            has_w = bool(output_mask[1])
            x = input.contiguous(memory_format=torch.channels_last)
            rows, count = compact_rows(pm)
            p = rows.numel() - 1
            gw32 = torch.zeros((groups, kh * kw * cg, cog) if has_w else (1,), dtype=torch.float32,
                               device=input.device)
            gb32 = torch.zeros((co,) if output_mask[2] else (1,), dtype=torch.float32, device=input.device)

            def grid(meta):
                tiles = triton.cdiv(cog, meta["BLOCK_N"])
                if has_w:
                    tiles *= kh * kw * triton.cdiv(cg, meta["BLOCK_K"])
                return (tiles, meta["SPLIT"], groups)

            _launch(_masked_conv2d_bwd_weight_kernel)[grid](
                x, gout, out, gw32, gb32, rows, count,
                p, h, w, c, ho, wo, co, cg, cog, *conv,
                KH=kh, KW=kw, HAS_W=has_w, HAS_BIAS=bool(output_mask[2]), ACT=act, IEEE=ieee)
            if has_w:
                gw = unpack_weight_grad(gw32, weight.shape, groups).to(weight.dtype).contiguous()
            if output_mask[2]:
                gb = gb32.to(weight.dtype)
        return gi, gw, gb

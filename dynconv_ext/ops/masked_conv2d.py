"""masked_conv2d: a convolution computed only at the output pixels a mask selects.

    out = masked_conv2d(input, weight, bias, mask, stride, padding, dilation, groups)

equals ``F.conv2d(input, weight, bias, stride, padding, dilation, groups)`` where ``mask`` is True and
0 elsewhere (no bias there), but only the selected pixels are computed: run time falls with the mask's
density. With ``residual=r`` the result is ``r + conv`` at selected pixels and ``r`` elsewhere (the
residual add of a gated block, without a dense intermediate).

Masks
    * pixel granularity: bool ``[N, Ho, Wo]`` or ``[N, 1, Ho, Wo]`` (the output's spatial size);
    * block granularity: bool ``[N, ceil(Ho/b), ceil(Wo/b)]`` (or with the channel dim), one entry per
      ``b x b`` block of output pixels (edge blocks may be partial); ``b`` is inferred from the shape
      (the ``b`` that tiles the output exactly, else the only ``b`` that fits), or given as
      ``block_size`` when the shape alone is ambiguous.

Backends (``backend=``)
    ``"auto"``      CPU: the C++ kernel, which computes densely and masks above the measured crossover
                    density where that is faster. CUDA: the CUDA C++ kernel when built (dense cuDNN conv
                    then mask at and above an *unmeasured* placeholder crossover of 0.5 active density;
                    deciding reads the active count on the host, one sync per call), else the reference
                    (the Triton kernel is opt-in until it has been measured on a GPU)
    ``"cpp"``       the CPU gather-GEMM-scatter kernel at every density (no dense fallback)
    ``"cuda"``      the CUDA C++ implicit-GEMM kernel at every density (no dense fallback, no host sync:
                    CUDA-graph capturable); float32/64, float16, bfloat16. Raises where it is not built
    ``"triton"``    the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests):
                    forward with bias, residual and activation fused in the epilogue; backward (grad_input,
                    grad_weight, grad_bias) as Triton implicit GEMMs over the active pixels, fp32 accumulation.
                    Block masks are expanded to pixel masks; groups, stride, padding, dilation supported (depthwise
                    is correct but not tuned: tiles are >= 16 channels wide)
    ``"dense"``     dense convolution then masking, through the same op
    ``"reference"`` pure PyTorch (``dynconv_ext.reference``), differentiable by autograd

Gradients reach ``input``, ``weight``, ``bias`` and ``residual`` and equal those of the dense reference
``F.conv2d(...) * mask``; only the selected pixels contribute.
"""
import importlib
from typing import Optional, Tuple, Union

import torch

from .. import _extension
from ..reference import masked_conv2d_reference

BACKENDS = ("auto", "cpp", "cuda", "triton", "dense", "reference")
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}  # the op's `activation` codes

IntOr2 = Union[int, Tuple[int, int]]

# When backend="auto" computes densely (then masks) instead of sparsely, on CPU. Measured with
# `python -m dynconv_ext crossover` and `bench` on a 2-core AVX2 machine (benchmarks/results/): on large
# outputs the sparse kernel loses to oneDNN's dense conv only above ~0.9 density for kxk kernels; 1x1
# convs are memory-bound, and with few channels (64) they lose above ~0.6 (0.45 before the per-call overhead
# cuts of 2026-11-22; the layer table of that day: kernel 1.15-1.28x at 0.5, 0.84-1.02x at 0.75), with 128+
# above ~0.8.
# Every sparse call also packs the weights (~0.6 ns per weight, while a MAC costs ~1/80 ns per row),
# so with R output pixels the crossover falls by about 0.6e-9 * 80e9 / R = 48 / R.
_CPU_CROSSOVER_KXK = 0.9
# Depthwise convs (one input channel per group) do ~9 MACs per loaded value: memory-bound like 1x1s. On the 2-core
# AVX-512 Xeon (MobileNetV2's depthwise layers 144ch 56x56 ... 960ch 7x7, batch 8, random pixel masks, ReLU6;
# dense = oneDNN conv + clamp; python/tools/depthwise_bench.py, benchmarks/results/depthwise_cpu_xeon.md) the
# sparse kernel was 1.55-1.97x at density 0.25, 1.06-1.35x at 0.5 and 0.96-1.15x at 0.75 (losing on the large
# layers, which carry most of the time).
_CPU_CROSSOVER_DEPTHWISE = 0.65
_CPU_CROSSOVER_1X1 = {"narrow": 0.6, "wide": 0.8}  # C_in/groups < 128, >= 128
_CPU_PACKING_ROWS = 48.0
_CPU_PACKED_SPARSE_PIXELS = 4096  # output pixels up to which a packed (constant) weight never goes dense
# CUDA: a conservative PLACEHOLDER, not measured yet (no GPU was available when the CUDA kernel was
# written). The CUDA C++ kernel is a SIMT implicit GEMM while cuDNN uses tensor cores, so it is unlikely
# to win above half density; replace with the crossover from benchmarks/test_masked_conv2d_gpu_bench.py.
# A threshold <= 1 makes the op read the active count on the host (one sync per call).
_CUDA_CROSSOVER = 0.5
_NEVER = 2.0  # a density above 1: always sparse
# Set on the tensors mark_constant_weight declares constant (the C++ cache keeps their packing).
_CONSTANT_FLAG = "_dynconv_constant_weight"


def records_grad(*tensors) -> bool:
    """Whether autograd records an op on these tensors (None entries ignored): grad mode on and one requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def dense_crossover(weight_shape, out_pixels: int, device_type: str = "cpu", packed: bool = False) -> float:
    """The active density at and above which backend="auto" computes densely (then masks).

    Args:
        weight_shape: the conv weight's shape ``[C_out, C_in/groups, kH, kW]``.
        out_pixels: ``N * Ho * Wo`` of the output.
        device_type: ``"cpu"`` (measured), ``"cuda"`` (an unmeasured placeholder), other devices: never dense.
        packed: the weight is marked constant (:func:`mark_constant_weight`), so the CPU kernel keeps it packed
            and a sparse call pays no packing: the crossover does not fall with few output pixels.
    """
    if device_type == "cuda":
        return _CUDA_CROSSOVER  # unmeasured placeholder (see above)
    if device_type != "cpu":
        return _NEVER
    if tuple(weight_shape[-2:]) == (1, 1):
        base = _CPU_CROSSOVER_1X1["narrow" if weight_shape[1] < 128 else "wide"]
    elif weight_shape[1] == 1:
        base = _CPU_CROSSOVER_DEPTHWISE
    else:
        base = _CPU_CROSSOVER_KXK
    if packed:
        # Small outputs (batch 1-8 in a deep stage): there oneDNN's dense conv reorders the weight on every call and
        # loses to the sparse kernel with its cached packing even at density 0.95 (with ReLU, both ways): 1.12-4.3x
        # on ResNet layer shapes of <= 3136 output pixels, 0.96x on two (16ch 32x32 batch 8, 256ch 14x14 batch 8), on
        # the 2-core AVX-512 Xeon (benchmarks/results/packed_crossover_ab_cpu_xeon_2026-12-04.md).
        if weight_shape[1] > 1 and out_pixels <= _CPU_PACKED_SPARSE_PIXELS:
            return _NEVER
        return base
    return max(0.0, base - _CPU_PACKING_ROWS / max(int(out_pixels), 1))


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise TypeError(f"masked_conv2d: {name} must be an int or a pair of ints, got {value!r}") from None


def _output_size(h, w, kh, kw, stride, padding, dilation):
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def resolve_block_size(mask_hw, out_hw, block_size: Optional[int] = None) -> int:
    """The block size b for which a mask of spatial size mask_hw covers an output of out_hw."""
    hm, wm = mask_hw
    ho, wo = out_hw

    def fits(b):
        return -(-ho // b) == hm and -(-wo // b) == wm

    if block_size is not None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"masked_conv2d: block_size must be a positive int, got {block_size!r}")
        if not fits(block_size):
            raise ValueError(
                f"masked_conv2d: mask of spatial size {hm}x{wm} does not match block_size={block_size} "
                f"for an output of {ho}x{wo} (expected {-(-ho // block_size)}x{-(-wo // block_size)})"
            )
        return block_size
    if (hm, wm) == (ho, wo):
        return 1
    candidates = [b for b in range(2, max(ho, wo) + 1) if fits(b)]
    if not candidates:
        raise ValueError(
            f"masked_conv2d: mask of spatial size {hm}x{wm} fits no block size for an output of {ho}x{wo}; "
            f"a pixel mask must be {ho}x{wo}, a block mask ceil({ho}/b) x ceil({wo}/b)"
        )
    exact = [b for b in candidates if ho == hm * b and wo == wm * b]
    if exact:  # the block size that tiles the output exactly is the natural reading
        return exact[0]
    if len(candidates) > 1:
        raise ValueError(
            f"masked_conv2d: mask of spatial size {hm}x{wm} fits block sizes {candidates} for an output of "
            f"{ho}x{wo}; pass block_size= to choose"
        )
    return candidates[0]


def _validate(input, weight, bias, mask, stride, padding, dilation, groups, residual):
    # On the per-call path of every layer: each tensor attribute is read once (an attribute read costs
    # 0.1-0.5 us, which adds up at batch 1).
    if not isinstance(input, torch.Tensor) or input.dim() != 4:
        raise ValueError(f"masked_conv2d: input must be a 4-D tensor [N, C, H, W], got "
                         f"{tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("masked_conv2d: weight must be a 4-D tensor [C_out, C_in/groups, kH, kW]")
    dtype, device = input.dtype, input.device
    n, c_in, h, w = input.shape
    c_out, w_cin, kh, kw = weight.shape
    if not dtype.is_floating_point:
        raise TypeError(f"masked_conv2d: input must be a floating-point tensor, got {dtype}")
    if weight.dtype != dtype:
        raise TypeError(f"masked_conv2d: weight dtype {weight.dtype} differs from input dtype {dtype}")
    if weight.device != device:
        raise ValueError(f"masked_conv2d: weight is on {weight.device}, input on {device}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"masked_conv2d: groups must be a positive int, got {groups!r}")
    if c_in % groups != 0:
        raise ValueError(f"masked_conv2d: groups={groups} does not divide the input channels ({c_in})")
    if c_out % groups != 0:
        raise ValueError(f"masked_conv2d: groups={groups} does not divide the output channels ({c_out})")
    if w_cin * groups != c_in:
        raise ValueError(
            f"masked_conv2d: input has {c_in} channels but weight expects {w_cin * groups} "
            f"(weight.shape[1]={w_cin} x groups={groups})"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (c_out,):
            raise ValueError(f"masked_conv2d: bias must have shape ({c_out},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias!r}")
        if bias.dtype != dtype:
            raise TypeError(f"masked_conv2d: bias dtype {bias.dtype} differs from input dtype {dtype}")
        if bias.device != device:
            raise ValueError(f"masked_conv2d: bias is on {bias.device}, input on {device}")
    if stride[0] < 1 or stride[1] < 1:
        raise ValueError(f"masked_conv2d: stride must be >= 1, got {stride}")
    if dilation[0] < 1 or dilation[1] < 1:
        raise ValueError(f"masked_conv2d: dilation must be >= 1, got {dilation}")
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"masked_conv2d: padding must be >= 0, got {padding}")
    ho, wo = _output_size(h, w, kh, kw, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(f"masked_conv2d: input of {h}x{w} is too small for the "
                         f"kernel {(kh, kw)} (output would be {ho}x{wo})")
    if residual is not None:
        want = (n, c_out, ho, wo)
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != want:
            raise ValueError(f"masked_conv2d: residual must have the output's shape {want}, got "
                             f"{tuple(residual.shape) if isinstance(residual, torch.Tensor) else residual!r}")
        if residual.dtype != dtype:
            raise TypeError(f"masked_conv2d: residual dtype {residual.dtype} differs from input dtype {dtype}")
        if residual.device != device:
            raise ValueError(f"masked_conv2d: residual is on {residual.device}, input on {device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"masked_conv2d: mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masked_conv2d: mask must be a bool tensor (e.g. `gate > 0`), got {mask.dtype}")
        if mask.device != device:
            raise ValueError(f"masked_conv2d: mask is on {mask.device}, input on {device}")
        mshape = mask.shape
        if len(mshape) == 4 and mshape[1] != 1:
            raise ValueError(f"masked_conv2d: a 4-D mask must be [N, 1, Hm, Wm], got {tuple(mshape)}")
        if len(mshape) not in (3, 4):
            raise ValueError(f"masked_conv2d: mask must be [N, Hm, Wm] or [N, 1, Hm, Wm], got {tuple(mshape)}")
        if mshape[0] != n:
            raise ValueError(f"masked_conv2d: mask batch ({mshape[0]}) differs from input batch ({n})")
    return ho, wo


def masked_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    stride: IntOr2 = 1,
    padding: IntOr2 = 0,
    dilation: IntOr2 = 1,
    groups: int = 1,
    *,
    block_size: Optional[int] = None,
    residual: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    backend: str = "auto",
    inplace: bool = False,
    zero_inactive: bool = True,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Convolution computed only where ``mask`` is True (see the module docstring for the full contract).

    Args:
        input: ``[N, C, H, W]`` float tensor (NCHW or channels-last; channels-last avoids a layout copy).
        weight: ``[C_out, C/groups, kH, kW]``.
        bias: ``[C_out]`` or None; added only at selected pixels.
        mask: bool pixel mask ``[N, (1,) Ho, Wo]`` or block mask ``[N, (1,) ceil(Ho/b), ceil(Wo/b)]``;
            None means every pixel (plain ``F.conv2d``, plus ``residual``).
        stride, padding, dilation, groups: as in ``torch.nn.functional.conv2d`` (padding as ints).
        block_size: ``b`` of a block mask, when the mask's shape alone is ambiguous.
        residual: optional ``[N, C_out, Ho, Wo]`` tensor the result is added onto.
        activation: None, ``"relu"`` or ``"relu6"``, applied at selected pixels to conv (+ residual), fused in the
            kernel's epilogue; unselected pixels keep the residual (or 0) untouched.
        backend: ``"auto"``, ``"cpp"``, ``"cuda"``, ``"triton"``, ``"dense"`` or ``"reference"``.
        zero_inactive: False leaves unselected pixels *unspecified* (whatever memory held) instead of 0 when
            there is no residual: for intermediates that are only ever read where they were computed (the
            hidden tensors of a gated block). Saves a memory pass; never use it for a tensor users see.
        rows: the mask's index map from :func:`active_rows`, when several convs of a block share one mask
            (built once, used by each). ``"cpp"``: a CPU tensor, checked to be exactly the mask's index map
            (strictly increasing, in range, active pixels; the check costs about what building it does, so on
            CPU this buys no speed);
            ``"cuda"``: a CUDA int64 tensor on the input's device, *not* checked against the mask (that would
            need a host sync); when omitted the CUDA kernel compacts the mask on the device itself.
        inplace: with a residual, write the result into ``residual`` and return it: only active pixels are
            touched (no copy of the residual). Inference only: refuses tensors that require grad.

    Returns:
        ``[N, C_out, Ho, Wo]`` tensor in the input's memory format.
    """
    if backend not in BACKENDS:
        raise ValueError(f"masked_conv2d: backend must be one of {BACKENDS}, got {backend!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"masked_conv2d: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if isinstance(padding, str):
        raise ValueError("masked_conv2d: padding must be ints here; SparseConv2d accepts 'same'/'valid'")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    ho, wo = _validate(input, weight, bias, mask, stride, padding, dilation, groups, residual)
    if inplace:
        if residual is None:
            raise ValueError("masked_conv2d: inplace=True needs a residual to write into")
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual)):
            raise ValueError("masked_conv2d: inplace=True is for inference; use it under torch.no_grad() or "
                             "torch.inference_mode(), or pass inplace=False")
        if input.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr():
            raise ValueError("masked_conv2d: inplace=True cannot write into the storage it reads (input is residual)")
    if mask is None:
        # The conv output is fresh and ours: add and activate in place (no extra 4-MB allocations).
        out = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
        if residual is not None:
            out.add_(residual)
        if activation == "relu":
            out.relu_()
        elif activation == "relu6":
            out.clamp_(0, 6)
        return out
    if mask.dim() == 4:
        mask = mask[:, 0]
    block = resolve_block_size(tuple(mask.shape[-2:]), (ho, wo), block_size)
    device_type = input.device.type
    on_cpu = device_type == "cpu"
    if backend in ("cuda", "triton") and on_cpu and not (backend == "triton" and _triton_interpreter()):
        raise ValueError(f"masked_conv2d: backend={backend!r} needs CUDA tensors; on CPU use 'auto' or 'cpp'")
    if backend == "cpp" and not on_cpu:
        raise ValueError(f"masked_conv2d: backend='cpp' is the CPU kernel; input is on {input.device}")
    if backend == "cuda" and not _has_device_kernel("cuda"):
        raise ValueError("masked_conv2d: backend='cuda': this build of dynconv_ext has no CUDA C++ kernels "
                         "(rebuild with nvcc on PATH, or use 'triton' or 'reference')")
    if backend == "cuda" and input.device.type != "cuda":
        raise ValueError(f"masked_conv2d: backend='cuda' needs CUDA tensors; input is on {input.device}")
    if backend == "triton":
        from ..reference import expand_block_mask
        importlib.import_module("dynconv_ext.triton.ops")  # registers the dynconv::masked_conv2d_triton* ops
        pixel_mask = expand_block_mask(mask, block, (ho, wo))[:, 0]
        out = torch.ops.dynconv.masked_conv2d_triton(input, weight, bias, pixel_mask, list(stride), list(padding),
                                                     list(dilation), groups, residual, ACTIVATIONS[activation])
        return residual.copy_(out) if inplace else out
    use_reference = backend == "reference" or (not on_cpu and not _has_device_kernel(device_type))
    if use_reference:
        out = masked_conv2d_reference(input, weight, bias, mask, stride, padding, dilation, groups, block, residual,
                                      activation)
        return residual.copy_(out) if inplace else out
    if on_cpu and input.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"masked_conv2d: CPU kernels support float32 and float64, got {input.dtype}")
    _extension.require_extension()
    if backend == "auto":
        threshold = _auto_threshold(weight, input.shape[0] * ho * wo, device_type)
    else:
        threshold = {"cpp": _NEVER, "cuda": _NEVER, "dense": 0.0}[backend]
    return _call_op((input, weight, bias, mask, list(stride), list(padding), list(dilation), groups, block, residual,
                     ACTIVATIONS[activation], threshold), inplace, zero_inactive, rows)


def masked_conv2d_unchecked(input, weight, bias, mask, stride, padding, dilation=1, groups: int = 1, *,
                            block_size: Optional[int] = None, residual=None, activation: Optional[str] = None,
                            inplace: bool = False, zero_inactive: bool = True, rows=None) -> torch.Tensor:
    """:func:`masked_conv2d` (backend ``"auto"``) for callers that built every argument themselves (the gated DynConv
    blocks' inference paths, two or three convs a block): no Python-side validation, which cost ~8 us a call at batch
    1 against ~10 us for the whole C++ op on a small conv; the C++ kernel still checks shapes, dtypes and the mask.
    ``block_size=None`` means a pixel mask (no inference of the block size from the mask's shape). Anything but CPU
    tensors with a mask, outside autograd and torch.compile, goes through :func:`masked_conv2d`."""
    if (mask is None or input.device.type != "cpu" or _extension.load_error() is not None
            or torch.compiler.is_compiling() or records_grad(input, weight, bias, residual)):
        return masked_conv2d(input, weight, bias, mask, stride, padding, dilation, groups, block_size=block_size,
                             residual=residual, activation=activation, inplace=inplace, zero_inactive=zero_inactive,
                             rows=rows)
    st = [stride, stride] if isinstance(stride, int) else list(stride)
    pd = [padding, padding] if isinstance(padding, int) else list(padding)
    dl = [dilation, dilation] if isinstance(dilation, int) else list(dilation)
    n, _, h, w = input.shape
    ho, wo = _output_size(h, w, weight.shape[2], weight.shape[3], st, pd, dl)
    if mask.dim() == 4:
        mask = mask[:, 0]
    block = 1 if block_size is None else block_size
    return _call_op((input, weight, bias, mask, st, pd, dl, groups, block, residual, ACTIVATIONS[activation],
                     _auto_threshold(weight, n * ho * wo, "cpu")), inplace, zero_inactive, rows)


def _auto_threshold(weight: torch.Tensor, out_pixels: int, device_type: str) -> float:
    """backend="auto"'s crossover for this weight (marked-constant CPU weights count as packed)."""
    return dense_crossover(weight.shape, out_pixels, device_type,
                           packed=device_type == "cpu" and getattr(weight, _CONSTANT_FLAG, False))


def _call_op(args: tuple, inplace: bool, zero_inactive: bool, rows) -> torch.Tensor:
    """The op on its 12 leading arguments (input ... dense_threshold), as _eager_dispatch says to reach it."""
    op, tail = ((torch.ops.dynconv.masked_conv2d_residual_, (rows,)) if inplace
                else (torch.ops.dynconv.masked_conv2d, (zero_inactive, rows)))
    input, weight, bias, residual = args[0], args[1], args[2], args[9]
    how = _eager_dispatch(input, weight, bias, residual)
    if how == _BELOW_AUTOGRAD:
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, *tail)
    if how == _RECORD and not inplace:  # (masked_conv2d refused inplace with tensors that require grad)
        return _MaskedConv2dFn.apply(*args, *tail)
    return op(*args, *tail)


# How an eager call reaches the op's kernels. The autograd kernel registered below from Python
# (torch.library.register_autograd) costs ~6 us a call when it records nothing and ~60 us when it does (torch's
# fill_defaults rebuilds the schema's argument list once per argument) on the 2-core Xeon
# (python python/tools/op_overhead.py), against ~8 us for the whole C++ op on a small conv. So eager calls skip
# it: below the autograd key when autograd records nothing, through _MaskedConv2dFn (the same backward, at
# Function.apply's cost) when it does. inference_mode (no autograd key) and torch.compile (which traces the
# registered autograd) get the plain call.
# EAGER_FAST_PATH = False sends every call through the registered autograd (for one-process A/Bs).
_PLAIN, _BELOW_AUTOGRAD, _RECORD = 0, 1, 2
EAGER_FAST_PATH = True


def _eager_dispatch(input, weight, bias, residual) -> int:
    # (is_compiling first: dynamo cannot trace is_inference_mode_enabled)
    if not EAGER_FAST_PATH or torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return _PLAIN
    return _RECORD if records_grad(input, weight, bias, residual) else _BELOW_AUTOGRAD


def active_rows(mask: torch.Tensor, out_hw, block_size: int = 1) -> torch.Tensor:
    """The index map of a mask: int64 flat output pixels ``(n * Ho + ho) * Wo + wo`` where it is True, in
    raster order. Build it once and pass it as ``rows=`` to every conv of a block that uses the same mask."""
    from ..reference import expand_block_mask
    if mask.dim() == 4:
        mask = mask[:, 0]
    return torch.nonzero(expand_block_mask(mask, block_size, out_hw).reshape(-1)).reshape(-1)


def _triton_interpreter() -> bool:
    """TRITON_INTERPRET=1: Triton runs kernels on CPU tensors (slowly); how the tests check the Triton backend."""
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def _has_device_kernel(device_type: str) -> bool:
    key = {"cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("dynconv::masked_conv2d", key)


# ---------------------------------------------------------------------------------------------------
# Fake kernels (shapes only, never data) and autograd for the dynconv::masked_conv2d operators.
# ---------------------------------------------------------------------------------------------------
def _out_memory_format(t: torch.Tensor):
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


if _extension.load_error() is None:

    @torch.library.register_fake("dynconv::masked_conv2d")
    def _masked_conv2d_fake(input, weight, bias, mask, stride, padding, dilation, groups, block_size, residual,
                            activation, dense_threshold, zero_inactive=True, rows=None):
        ho, wo = _output_size(input.shape[2], input.shape[3], weight.shape[2], weight.shape[3], stride, padding,
                              dilation)
        return input.new_empty((input.shape[0], weight.shape[0], ho, wo)).contiguous(
            memory_format=_out_memory_format(input))

    @torch.library.register_fake("dynconv::masked_conv2d_residual_")
    def _masked_conv2d_residual_fake(input, weight, bias, mask, stride, padding, dilation, groups, block_size,
                                     residual, activation, dense_threshold, rows=None):
        return residual

    @torch.library.register_fake("dynconv::masked_conv2d_backward")
    def _masked_conv2d_backward_fake(grad_output, input, weight, mask, stride, padding, dilation, groups,
                                     block_size, output_mask, dense_threshold):
        gi = torch.empty_like(input, memory_format=_out_memory_format(input)) if output_mask[0] \
            else input.new_empty((0,))
        gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] \
            else input.new_empty((0,))
        gb = input.new_empty((weight.shape[0],)) if output_mask[2] else input.new_empty((0,))
        return gi, gw, gb

    def _setup_context(ctx, inputs, output):
        (input, weight, bias, mask, stride, padding, dilation, groups, block_size, residual, activation,
         threshold, _zero_inactive, _rows) = inputs
        # With a fused ReLU the backward needs to know where it clipped: keep the output.
        ctx.save_for_backward(input, weight, mask, output if activation else None)
        ctx.activation = activation
        ctx.conv_args = (stride, padding, dilation, groups, block_size)
        ctx.threshold = threshold
        ctx.has_bias = bias is not None

    def _backward(ctx, grad_output):
        input, weight, mask, output = ctx.saved_tensors
        stride, padding, dilation, groups, block_size = ctx.conv_args
        need = ctx.needs_input_grad
        if output is not None:
            from ..reference import expand_block_mask
            active = expand_block_mask(mask, block_size, output.shape[-2:])
            clipped = output <= 0
            if ctx.activation == 2:  # ReLU6 is flat above 6 as well
                clipped = clipped | (output >= 6)
            grad_output = torch.where(active & clipped, torch.zeros_like(grad_output), grad_output)
        output_mask = [need[0], need[1], need[2] and ctx.has_bias]
        gi = gw = gb = None
        if any(output_mask):
            gi, gw, gb = torch.ops.dynconv.masked_conv2d_backward(
                grad_output, input, weight, mask, stride, padding, dilation, groups, block_size, output_mask,
                ctx.threshold)
        return (gi if output_mask[0] else None, gw if output_mask[1] else None, gb if output_mask[2] else None,
                None, None, None, None, None, None, grad_output if need[9] else None, None, None, None, None)

    torch.library.register_autograd("dynconv::masked_conv2d", _backward, setup_context=_setup_context)

    class _MaskedConv2dFn(torch.autograd.Function):
        """The registered autograd above as a Function, for eager calls that record (see _eager_dispatch): the
        same _setup_context and _backward, without the registered kernel's per-call schema walk."""

        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                output = torch.ops.dynconv.masked_conv2d(*inputs)
            _setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, grad_output):
            return _backward(ctx, grad_output)

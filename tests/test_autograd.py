"""Gradients of masked_conv2d equal those of the dense reference F.conv2d(...) * mask; opcheck passes."""
import pytest
import torch

from dynconv_ext.ops import masked_conv2d
from dynconv_ext.reference import masked_conv2d_reference

GRAD_CASES = [
    # (n, cin, cout, h, w, k, stride, padding, dilation, groups, block, density)
    (2, 4, 6, 7, 7, (3, 3), 1, 1, 1, 1, 1, 0.5),
    (1, 6, 4, 9, 8, (3, 3), 2, 1, 1, 2, 2, 0.6),
    (2, 3, 5, 6, 9, (1, 1), 1, 0, 1, 1, 3, 0.5),
    (1, 4, 4, 8, 8, (3, 3), 1, 2, 2, 4, 1, 0.4),  # depthwise, dilated
    (2, 5, 7, 10, 10, (5, 3), (1, 2), (2, 1), 1, 1, 4, 0.7),
    (1, 20, 18, 5, 5, (3, 3), 1, 1, 1, 1, 1, 1.0),
    (1, 4, 4, 5, 5, (3, 3), 1, 1, 1, 1, 1, 0.0),
]


def _inputs(case, dtype, requires_grad=True):
    n, cin, cout, h, w, k, stride, padding, dilation, groups, block, density = case
    x = torch.randn(n, cin, h, w, dtype=dtype, requires_grad=requires_grad)
    wt = torch.randn(cout, cin // groups, *k, dtype=dtype, requires_grad=requires_grad)
    b = torch.randn(cout, dtype=dtype, requires_grad=requires_grad)
    ho = torch.nn.functional.conv2d(x.detach(), wt.detach(), None, stride, padding, dilation, groups).shape[-2:]
    m = torch.rand(n, -(-ho[0] // block), -(-ho[1] // block)) < density
    return x, wt, b, m, (stride, padding, dilation, groups), block, ho


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck_float64(case):
    x, w, b, m, args, block, _ = _inputs(case, torch.float64)
    fn = lambda x_, w_, b_: masked_conv2d(x_, w_, b_, m, *args, block_size=block, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("backend", ["cpp", "dense", "auto"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grads_match_reference(case, backend, channels_last):
    x, w, b, m, args, block, ho = _inputs(case, torch.float32)
    if channels_last:
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(x.shape[0], w.shape[0], *ho)
    y = masked_conv2d(x, w, b, m, *args, block_size=block, backend=backend)
    got = torch.autograd.grad(y, (x, w, b), g)
    ref = torch.autograd.grad(masked_conv2d_reference(x, w, b, m, *args, block), (x, w, b), g)
    for a, r, name in zip(got, ref, ("input", "weight", "bias")):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-3, msg=lambda s: f"grad {name}: {s}")


def test_residual_gets_grad_output():
    x, w, b, m, args, block, ho = _inputs(GRAD_CASES[0], torch.float64)
    r = torch.randn(x.shape[0], w.shape[0], *ho, dtype=torch.float64, requires_grad=True)
    fn = lambda x_, w_, r_: masked_conv2d(x_, w_, None, m, *args, residual=r_, backend="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, r), eps=1e-6, atol=1e-6)


def test_only_requested_grads():
    x, w, b, m, args, block, ho = _inputs(GRAD_CASES[0], torch.float32, requires_grad=False)
    w.requires_grad_()
    y = masked_conv2d(x, w, b, m, *args, backend="cpp")
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    ref = torch.autograd.grad(masked_conv2d_reference(x, w, b, m, *args).sum(), (w,))[0]
    torch.testing.assert_close(gw, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [GRAD_CASES[0], GRAD_CASES[1], GRAD_CASES[3]])
@pytest.mark.parametrize("threshold", [2.0, 0.0])  # sparse path, dense-fallback path
def test_opcheck(case, threshold):
    x, w, b, m, (stride, padding, dilation, groups), block, ho = _inputs(case, torch.float32)
    stride, padding, dilation = [[v, v] if isinstance(v, int) else list(v) for v in (stride, padding, dilation)]
    r = torch.randn(x.shape[0], w.shape[0], *ho, requires_grad=True)
    for bias, residual in ((b, None), (None, r)):
        torch.library.opcheck(torch.ops.dynconv.masked_conv2d.default,
                              (x, w, bias, m, stride, padding, dilation, groups, block, residual, 0, threshold, True))
    g = torch.randn(x.shape[0], w.shape[0], *ho)
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_backward.default,
                          (g, x.detach(), w.detach(), m, stride, padding, dilation, groups, block,
                           [True, True, False], threshold))


@pytest.mark.parametrize("threads,batch", [(1, 3), (2, 1), (2, 4)])
def test_grad_input_paths(threads, batch):
    """grad_input has two strategies: per-sample scatter-add (batch >= threads) and gather (batch < threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(batch, 6, 9, 9, dtype=torch.float64, requires_grad=True)
        w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
        m = torch.rand(batch, 5, 5) < 0.5
        g = torch.randn(batch, 8, 5, 5, dtype=torch.float64)
        got = torch.autograd.grad(masked_conv2d(x, w, None, m, 2, 1, backend="cpp"), x, g)[0]
        ref = torch.autograd.grad(masked_conv2d_reference(x, w, None, m, 2, 1), x, g)[0]
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(old)


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def _raw_op(x, w, b, m, args, block, residual=None, activation=0):
    """The op itself, through the autograd kernel registered with torch.library."""
    stride, padding, dilation, groups = args
    return torch.ops.dynconv.masked_conv2d(x, w, b, m, _pair(stride), _pair(padding), _pair(dilation), groups, block,
                                           residual, activation, 2.0, True, None)


@pytest.mark.parametrize("case", [GRAD_CASES[0], GRAD_CASES[1], GRAD_CASES[4]])
@pytest.mark.parametrize("relu", [False, True])
def test_eager_function_matches_registered_autograd(case, relu):
    # Eager calls that record go through _MaskedConv2dFn, not the autograd kernel registered with torch.library
    # (which torch.compile and opcheck use): both must give the same output and gradients.
    x, w, b, m, args, block, ho = _inputs(case, torch.float64)
    r = torch.randn(x.shape[0], w.shape[0], *ho, dtype=torch.float64, requires_grad=True)
    g = torch.randn(x.shape[0], w.shape[0], *ho, dtype=torch.float64)
    y = masked_conv2d(x, w, b, m, *args, block_size=block, residual=r, activation="relu" if relu else None,
                      backend="cpp")
    assert "MaskedConv2dFn" in type(y.grad_fn).__name__
    ref = _raw_op(x, w, b, m, args, block, residual=r, activation=1 if relu else 0)
    assert "MaskedConv2dFn" not in type(ref.grad_fn).__name__
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    got = torch.autograd.grad(y, (x, w, b, r), g)
    want = torch.autograd.grad(ref, (x, w, b, r), g)
    for a, e, name in zip(got, want, ("input", "weight", "bias", "residual")):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda s: f"grad {name}: {s}")


@pytest.mark.parametrize("mode", ["no_grad", "no_requires_grad", "inference_mode"])
def test_unrecorded_calls_return_plain_tensors(mode):
    # Without anything to record (the op then runs below its autograd key) the result is the same values and
    # carries no autograd history.
    x, w, b, m, args, block, _ = _inputs(GRAD_CASES[0], torch.float32, requires_grad=(mode != "no_requires_grad"))
    want = masked_conv2d_reference(x.detach(), w.detach(), b.detach(), m, *args, block)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with ctx():
        y = masked_conv2d(x, w, b, m, *args, block_size=block, backend="cpp")
    assert y.grad_fn is None and not y.requires_grad
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)

"""The Triton kernels (forward and backward), run by Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 must
be set before triton is imported, so the checks run in a subprocess (which inherits PYTHONPATH, hence the same
dynconv_ext as this session: checked). Shapes are tiny: the interpreter runs every program in Python."""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow

PRELUDE = textwrap.dedent(r"""
    import os
    import torch
    import dynconv_ext
    from dynconv_ext.ops import masked_conv2d
    from dynconv_ext.reference import expand_block_mask, masked_conv2d_reference
    from dynconv_ext.triton.masked_conv2d import compact_rows, masked_conv2d_triton
    from dynconv_ext.triton import ops  # noqa: F401  (registers the dynconv::masked_conv2d_triton* ops)

    assert os.environ.get("TRITON_INTERPRET") == "1"
    print("MODULE", dynconv_ext.__file__)
    torch.manual_seed(0)

    def out_hw(h, w, k, s, p, d):
        return ((h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1, (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)
""")

FORWARD = PRELUDE + textwrap.dedent(r"""
    # compact_rows: active positions first, in order, and their count, without leaving the device.
    m = torch.tensor([False, True, True, False, True, False])
    rows, count = compact_rows(m)
    assert int(count) == 3 and rows[:3].tolist() == [1, 2, 4], (rows, count)

    cases = [
        # n, cin, cout, h, w, k, stride, padding, dilation, groups, block, density, bias, residual, activation
        (2, 8, 16, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 0.5, True, False, None),
        (1, 20, 24, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1), 1, 2, 0.6, False, True, "relu"),
        (2, 6, 6, 8, 8, (1, 1), (1, 1), (0, 0), (1, 1), 2, 4, 0.5, True, False, "relu6"),
        (1, 4, 4, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), 4, 1, 0.4, True, True, "relu6"),  # depthwise, dilated
        (1, 33, 17, 5, 6, (3, 1), (1, 2), (1, 0), (1, 1), 1, 1, 1.0, True, False, "relu"),  # odd channels, full
        (1, 8, 8, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 0.0, True, True, "relu"),     # empty mask
    ]
    for (n, cin, cout, h, w, k, s, p, d, g, b, dens, has_bias, has_res, act) in cases:
        x = torch.randn(n, cin, h, w)
        wt = torch.randn(cout, cin // g, *k) * 0.3
        bias = torch.randn(cout) if has_bias else None
        ho, wo = out_hw(h, w, k, s, p, d)
        mask = torch.rand(n, -(-ho // b), -(-wo // b)) < dens
        res = torch.randn(n, cout, ho, wo) if has_res else None
        ref = masked_conv2d_reference(x, wt, bias, mask, s, p, d, g, b, residual=res, activation=act)
        y = masked_conv2d(x, wt, bias, mask, s, p, d, g, block_size=b, residual=res, activation=act, backend="triton")
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        assert y.is_contiguous(memory_format=torch.channels_last)
        # the launcher with a pixel mask and an activation code, as the op sees it
        pm = expand_block_mask(mask, b, (ho, wo))[:, 0]
        code = {None: 0, "relu": 1, "relu6": 2}[act]
        torch.testing.assert_close(masked_conv2d_triton(x, wt, bias, pm, s, p, d, g, res, code), ref,
                                   rtol=1e-4, atol=1e-4)
    print(f"OK {len(cases)} cases")
""")

BACKWARD = PRELUDE + textwrap.dedent(r"""
    cases = [
        # n, cin, cout, h, w, k, stride, padding, dilation, groups, block, density, bias, residual, activation
        (2, 8, 16, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 0.5, True, False, None),
        (1, 12, 20, 9, 8, (3, 3), (2, 2), (1, 1), (1, 1), 1, 2, 0.6, True, True, "relu"),    # stride 2, block mask
        (2, 6, 6, 7, 7, (3, 3), (1, 1), (2, 2), (2, 2), 6, 1, 0.5, True, True, "relu6"),     # depthwise, dilated
        (1, 8, 12, 6, 6, (1, 3), (1, 1), (0, 1), (1, 1), 2, 1, 0.6, False, True, None),      # groups=2, 1x3
        (1, 17, 18, 5, 6, (3, 3), (2, 1), (1, 1), (1, 2), 1, 1, 1.0, True, False, "relu"),   # odd, full mask
        (1, 8, 8, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 0.0, True, True, "relu6"),    # empty mask
    ]
    for (n, cin, cout, h, w, k, s, p, d, g, b, dens, has_bias, has_res, act) in cases:
        x = torch.randn(n, cin, h, w, requires_grad=True)
        wt = (torch.randn(cout, cin // g, *k) * 0.3).requires_grad_()
        bias = torch.randn(cout, requires_grad=True) if has_bias else None
        ho, wo = out_hw(h, w, k, s, p, d)
        mask = torch.rand(n, -(-ho // b), -(-wo // b)) < dens
        res = torch.randn(n, cout, ho, wo, requires_grad=True) if has_res else None
        leaves = [t for t in (x, wt, bias, res) if t is not None]
        ref = masked_conv2d_reference(x, wt, bias, mask, s, p, d, g, b, residual=res, activation=act)
        y = masked_conv2d(x, wt, bias, mask, s, p, d, g, block_size=b, residual=res, activation=act, backend="triton")
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        go = torch.randn_like(ref)
        want = torch.autograd.grad(ref, leaves, go)
        got = torch.autograd.grad(y, leaves, go)
        for name, a, r in zip(("input", "weight", "bias", "residual"), got, want):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")
        # only some gradients: the op returns empty tensors for the others (and skips their kernels)
        pm = expand_block_mask(mask, b, (ho, wo))[:, 0]
        code = {None: 0, "relu": 1, "relu6": 2}[act]
        out = y.detach() if code else None
        for om in ([True, False, False], [False, False, has_bias], [False, True, False]):
            gi, gw, gb = torch.ops.dynconv.masked_conv2d_triton_backward(
                go, x.detach(), wt.detach(), pm, out, list(s), list(p), list(d), g, code, om)
            for flag, t, r in zip(om, (gi, gw, gb), want[:2] + ((want[2],) if has_bias else (None,))):
                if flag:
                    torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-4)
                else:
                    assert t.numel() == 0

    # opcheck's checks that do not trace into the kernels (under the interpreter wrap_triton cannot turn a kernel
    # launch into a graph node, so AOT-dispatch tracing would see launches skipped; the GPU suite runs them all)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x, wt, b = torch.randn(2, 8, 6, 6), torch.randn(16, 8, 3, 3), torch.randn(16)
    pm, r = torch.rand(2, 6, 6) < 0.5, torch.randn(2, 16, 6, 6)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_triton.default, (x, wt, b, pm, *conv, r, 2), test_utils=utils)
    y = torch.ops.dynconv.masked_conv2d_triton(x, wt, b, pm, *conv, r, 2)
    torch.library.opcheck(torch.ops.dynconv.masked_conv2d_triton_backward.default,
                          (torch.randn_like(y), x, wt, pm, y, *conv, 2, [True, True, True]), test_utils=utils)
    print(f"OK {len(cases)} cases")
""")


def _run(script):
    import dynconv_ext
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # the subprocess imported the same dynconv_ext as this session (PYTHONPATH is inherited)
    assert f"MODULE {dynconv_ext.__file__}" in out.stdout, (out.stdout[:500], dynconv_ext.__file__)
    return out.stdout


def test_triton_forward_under_interpreter():
    assert "OK 6 cases" in _run(FORWARD)


def test_triton_backward_under_interpreter():
    assert "OK 6 cases" in _run(BACKWARD)

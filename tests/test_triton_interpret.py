"""The Triton kernels (forward and backward), run by Triton's interpreter on CPU tensors. TRITON_INTERPRET=1 must
be set before triton is imported, so the checks run in a subprocess (which inherits PYTHONPATH, hence the same
dynconv_ext as this session: checked). Shapes are tiny: the interpreter runs every program in Python."""
import os
import subprocess
import tempfile
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


INTO = PRELUDE + textwrap.dedent(r"""
    from dynconv_ext.ops import conv2d_into, resize_into
    from dynconv_ext.reference import conv2d_into_reference, resize_into_reference

    def make_input(n, c, h, w, in_slice, dtype=torch.float32):
        if in_slice:  # a channel slice (not the prefix) of a wider channels-last buffer, read in place
            buf = torch.randn(n, c + 7, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
            return buf[:, 3:3 + c]
        return torch.randn(n, c, h, w, dtype=dtype)

    def make_out(n, c, h, w, cl, lo, width, dtype=torch.float32):
        out = torch.randn(n, c, h, w, dtype=dtype)
        if cl:
            out = out.contiguous(memory_format=torch.channels_last)
        out[:, lo:lo + width] = float("nan")  # the slice is only written, never read
        return out

    conv_cases = [
        # n, cin, cout, h, w, k, stride, padding, dilation, groups, bias, activation, in_slice, cl_out, extra, off
        (2, 16, 12, 6, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "relu", True, True, 5, 3),     # dot path
        (1, 20, 18, 7, 7, (3, 3), (2, 2), (1, 1), (1, 1), 1, False, None, False, False, 3, 0),   # stride 2, K tail
        (1, 6, 8, 5, 6, (1, 3), (1, 2), (0, 1), (1, 1), 2, True, "relu6", False, True, 4, 4),    # rank-1, groups 2
        (2, 4, 4, 6, 6, (3, 3), (1, 1), (2, 2), (2, 2), 4, True, "relu", True, False, 2, 1),     # depthwise, dilated
        (1, 32, 6, 4, 5, (3, 1), (1, 1), (1, 0), (1, 1), 2, True, None, True, True, 0, 2),       # dot, groups 2, 3x1
    ]
    for (n, cin, cout, h, w, k, s, p, d, g, has_bias, act, in_slice, cl, extra, off) in conv_cases:
        x = make_input(n, cin, h, w, in_slice)
        wt = torch.randn(cout, cin // g, *k) * 0.3
        bias = torch.randn(cout) if has_bias else None
        ho, wo = out_hw(h, w, k, s, p, d)
        out = make_out(n, cout + extra + off, ho, wo, cl, off, cout)
        before = out.clone()
        ref = conv2d_into_reference(x, wt, bias, out.clone(), off, s, p, d, g, act)
        got = conv2d_into(x, wt, bias, out, off, s, p, d, g, activation=act, backend="triton")
        assert got is out
        torch.testing.assert_close(out[:, off:off + cout], ref[:, off:off + cout], rtol=1e-4, atol=1e-4)
        assert torch.equal(out[:, :off], before[:, :off]) and torch.equal(out[:, off + cout:], before[:, off + cout:])
        assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

    # half precision (fp32 accumulation): fp16 on both paths; bf16 only on the rank-1 path (the interpreter's tl.dot
    # on bf16 returns garbage, so the bf16 dot path is first checked on a GPU: tests/test_gpu.py)
    for dt, cin in ((torch.float16, 16), (torch.float16, 6), (torch.bfloat16, 6)):
        x = make_input(1, cin, 5, 5, True, dt)
        wt, b = (torch.randn(8, cin, 3, 3) * 0.2).to(dt), torch.randn(8).to(dt)
        out = make_out(1, 11, 5, 5, True, 2, 8, dt)
        conv2d_into(x, wt, b, out, 2, 1, 1, activation="relu", backend="triton")
        ref = conv2d_into_reference(x.double(), wt.double(), b.double(), out.double(), 2, 1, 1, 1, 1, "relu")
        tol = 1e-2 if dt == torch.float16 else 6e-2
        torch.testing.assert_close(out[:, 2:10].double(), ref[:, 2:10], rtol=tol, atol=tol)

    # a dense block written into one channels-last buffer: each layer reads the filled prefix in place
    buf = torch.randn(1, 8 + 3 * 6, 5, 5).contiguous(memory_format=torch.channels_last)
    ref_buf = buf.clone()
    for i in range(3):
        c = 8 + 6 * i
        wt, b = torch.randn(6, c, 3, 3) * 0.2, torch.randn(6)
        conv2d_into(buf[:, :c], wt, b, buf, c, 1, 1, activation="relu", backend="triton")
        conv2d_into_reference(ref_buf[:, :c], wt, b, ref_buf, c, 1, 1, 1, 1, "relu")
    torch.testing.assert_close(buf, ref_buf, rtol=1e-4, atol=1e-4)

    # gradients through the functional (its autograd wraps the op)
    x = torch.randn(1, 6, 5, 5, requires_grad=True)
    wt = (torch.randn(4, 6, 3, 3) * 0.3).requires_grad_()
    b = torch.randn(4, requires_grad=True)
    y = conv2d_into(x, wt, b, torch.zeros(1, 7, 5, 5), 2, 1, 1, activation="relu6", backend="triton")
    yr = conv2d_into_reference(x, wt, b, torch.zeros(1, 7, 5, 5), 2, 1, 1, 1, 1, "relu6")
    go = torch.randn_like(yr)
    for a, r in zip(torch.autograd.grad(y, (x, wt, b), go), torch.autograd.grad(yr, (x, wt, b), go)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)

    resize_cases = [
        # n, c, (h, w) -> (H, W), in_slice, cl_out, extra, off, dtype
        (2, 5, (3, 4), (7, 9), True, True, 3, 2, torch.float32),     # up
        (1, 20, (9, 8), (4, 3), False, False, 0, 1, torch.float32),  # down, two channel blocks
        (1, 6, (5, 5), (5, 5), True, False, 2, 0, torch.float32),    # same size: a strided copy
        (1, 3, (4, 6), (1, 1), False, True, 1, 1, torch.float32),    # to 1x1 (scale 0)
        (2, 4, (1, 3), (4, 7), True, True, 0, 4, torch.float32),     # from one row
        (1, 5, (3, 4), (6, 5), True, True, 2, 1, torch.float16),     # fp16 (blended in fp32)
    ]
    for (n, c, (h, w), (H, W), in_slice, cl, extra, off, dt) in resize_cases:
        x = make_input(n, c, h, w, in_slice, dt)
        out = make_out(n, c + extra + off, H, W, cl, off, c, dt)
        before = out.clone()
        ref = resize_into_reference(x.float(), out.clone().float(), off)
        got = resize_into(x, out, off, backend="triton")
        assert got is out
        tol = 1e-5 if dt == torch.float32 else 2e-3
        torch.testing.assert_close(out[:, off:off + c].float(), ref[:, off:off + c], rtol=tol, atol=tol)
        if (h, w) == (H, W):
            assert torch.equal(out[:, off:off + c], x)
        assert torch.equal(out[:, :off], before[:, :off]) and torch.equal(out[:, off + c:], before[:, off + c:])
    x = torch.randn(1, 3, 3, 3, requires_grad=True)
    y = resize_into(x, torch.zeros(1, 4, 5, 5), 1, backend="triton")
    yr = resize_into_reference(x, torch.zeros(1, 4, 5, 5), 1)
    go = torch.randn_like(yr)
    torch.testing.assert_close(torch.autograd.grad(y, x, go)[0], torch.autograd.grad(yr, x, go)[0])

    try:  # the Triton backend takes float32, float16 and bfloat16 only
        resize_into(torch.randn(1, 2, 3, 3, dtype=torch.float64), torch.zeros(1, 2, 4, 4, dtype=torch.float64), 0,
                    backend="triton")
        raise AssertionError("float64 accepted")
    except TypeError as e:
        assert "float32, float16 and bfloat16" in str(e), e

    # opcheck's checks that do not trace into the kernels (see BACKWARD)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    out = torch.zeros(2, 12, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.dynconv.conv2d_into_triton.default,
                          (x, torch.randn(6, 4, 3, 3), torch.randn(6), out, 3, [1, 1], [1, 1], [1, 1], 2, 1),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.dynconv.resize_into_triton.default,
                          (torch.randn(2, 4, 3, 3), out, 5), test_utils=utils)
    print(f"OK {len(conv_cases)} conv {len(resize_cases)} resize cases")
""")


def _run(script):
    import dynconv_ext
    env = dict(os.environ, TRITON_INTERPRET="1")
    # cwd outside the source tree: `python -c` puts the cwd first on sys.path, which would shadow the installed
    # package with the (unbuilt) source checkout
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    # the subprocess imported the same dynconv_ext as this session (PYTHONPATH is inherited)
    assert f"MODULE {dynconv_ext.__file__}" in out.stdout, (out.stdout[:500], dynconv_ext.__file__)
    return out.stdout


def test_triton_forward_under_interpreter():
    assert "OK 6 cases" in _run(FORWARD)


def test_triton_backward_under_interpreter():
    assert "OK 6 cases" in _run(BACKWARD)


def test_triton_into_ops_under_interpreter():
    assert "OK 5 conv 6 resize cases" in _run(INTO)

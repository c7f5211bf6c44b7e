"""The Triton forward kernel, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set
before triton is imported, so the checks run in a subprocess)."""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent(r"""
    import torch
    from dynconv_ext.triton.masked_conv2d import masked_conv2d_triton, compact_rows
    from dynconv_ext.reference import expand_block_mask, masked_conv2d_reference

    torch.manual_seed(0)
    # compact_rows: active positions first, in order, and their count, without leaving the device.
    m = torch.tensor([False, True, True, False, True, False])
    rows, count = compact_rows(m)
    assert int(count) == 3 and rows[:3].tolist() == [1, 2, 4], (rows, count)

    cases = [
        # n, cin, cout, h, w, k, stride, padding, dilation, groups, block, density, bias, residual
        (2, 8, 16, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 0.5, True, False),
        (1, 20, 24, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1), 1, 2, 0.6, False, True),
        (2, 6, 6, 8, 8, (1, 1), (1, 1), (0, 0), (1, 1), 2, 4, 0.5, True, False),
        (1, 4, 4, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), 4, 1, 0.4, True, True),    # depthwise, dilated
        (1, 33, 17, 5, 6, (3, 1), (1, 2), (1, 0), (1, 1), 1, 1, 1.0, True, False), # odd channels, full mask
        (1, 8, 8, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, 0.0, True, True),    # empty mask
    ]
    for (n, cin, cout, h, w, k, s, p, d, g, b, dens, has_bias, has_res) in cases:
        x = torch.randn(n, cin, h, w)
        wt = torch.randn(cout, cin // g, *k)
        bias = torch.randn(cout) if has_bias else None
        ho = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
        wo = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
        mask = torch.rand(n, -(-ho // b), -(-wo // b)) < dens
        res = torch.randn(n, cout, ho, wo) if has_res else None
        pm = expand_block_mask(mask, b, (ho, wo))[:, 0]
        y = masked_conv2d_triton(x, wt, bias, pm, s, p, d, g, residual=res)
        ref = masked_conv2d_reference(x, wt, bias, mask, s, p, d, g, b, residual=res)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        assert y.is_contiguous(memory_format=torch.channels_last)
    print(f"OK {len(cases)} cases")
""")


def test_triton_forward_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "OK 6 cases" in out.stdout

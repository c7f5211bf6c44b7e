"""The extension is built, registered, and reports its configuration."""
import os
import subprocess
import sys

import torch

import dynconv_ext


def test_ops_registered_for_cpu():
    for op in ("masked_conv2d", "masked_conv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynconv::{op}", "CPU")


def test_build_info_matches_torch():
    info = dynconv_ext.build_info()
    assert info["torch"] == torch.__version__.split("+")[0]
    assert info["cpu_kernel"] in ("avx2_fma", "generic")


def test_cuda_kernels_registered_when_built_with_cuda():
    if not dynconv_ext.build_info()["cuda"]:
        import pytest
        pytest.skip("extension built without CUDA sources")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dynconv::masked_conv2d", "CUDA")


def test_info_command_runs():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "dynconv_ext", "info"], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(dynconv_ext.__file__)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cpp-cpu" in out.stdout and "torch" in out.stdout

"""The extension is built, registered, and reports its configuration."""
import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dynconv_ext


def test_ops_registered_for_cpu():
    for op in ("masked_conv2d", "masked_conv2d_backward", "conv2d_into_", "resize_into_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynconv::{op}", "CPU"), op


def test_build_info_matches_torch():
    info = dynconv_ext.build_info()
    assert info["torch"] == torch.__version__.split("+")[0]
    assert info["cpu_kernel"] in ("avx512f", "avx2_fma", "generic")


def test_cuda_kernels_registered_when_built_with_cuda():
    if not dynconv_ext.build_info()["cuda"]:
        pytest.skip("extension built without CUDA sources (build_info cuda=0)")
    for op in ("masked_conv2d", "masked_conv2d_residual_", "masked_conv2d_backward", "conv2d_into_", "resize_into_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dynconv::{op}", "CUDA"), op
    # and the fused concat functionals route CUDA tensors to them (not to the reference)
    into = importlib.import_module("dynconv_ext.ops.conv2d_into")  # the module (the package exports the function)
    assert into._CUDA_OPS == {"conv2d_into_", "resize_into_"}


def test_ci_builds_cuda_sources_when_toolkit_present():
    """In CI, a machine with nvcc and a CUDA build of torch must produce cuda=1: a silently skipped CUDA
    build (setup.py falling back to the CPU-only extension) fails here instead of passing unnoticed."""
    if os.environ.get("CI") != "true":
        pytest.skip("only checked in CI (CI=true)")
    if os.environ.get("DYNCONV_EXT_CUDA") == "0":
        pytest.skip("CUDA sources switched off with DYNCONV_EXT_CUDA=0")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: no CUDA sources are compiled")
    from torch.utils.cpp_extension import CUDA_HOME
    if shutil.which("nvcc") is None and CUDA_HOME is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine: no CUDA sources are compiled")
    assert dynconv_ext.build_info()["cuda"], (
        "nvcc and a CUDA torch are present but dynconv_ext was built without its CUDA kernels "
        f"(build_info: {dynconv_ext.build_info()})")


def test_info_command_runs():
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "dynconv_ext", "info"], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(dynconv_ext.__file__)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cpp-cpu" in out.stdout and "torch" in out.stdout

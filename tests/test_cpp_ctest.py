"""The libtorch (CMake) build of csrc/ compiles and its C++ test passes through ctest."""
import os
import shutil
import subprocess

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake/ctest not installed")
@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "CMakeLists.txt")), reason="not a source checkout")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # noqa: E731
    cfg = run("cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
              "-DCMAKE_BUILD_TYPE=Release")
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    assert (build / "compile_commands.json").exists()
    bld = run("cmake", "--build", str(build), "-j2")
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    test = run("ctest", "--test-dir", str(build), "--output-on-failure")
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-3000:]
    assert "100% tests passed" in test.stdout

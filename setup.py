"""Builds dynconv_ext._C from csrc/.

Environment switches:
  DYNCONV_EXT_CUDA=0/1     force the CUDA sources off / on (default: on when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST     CUDA archs (default "8.0;9.0" when no GPU is visible)
  DYNCONV_EXT_DEBUG=1      -O0 -g builds
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _set_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; where nvcc is a wrapper script (e.g. /usr/local/bin/nvcc) that
    guess has no lib64/libcudart.so and the link fails. Point CUDA_HOME at a toolkit that has one instead."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guesses = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    guesses.append("/usr/local/cuda")

    def has_cudart(home):
        return bool(glob.glob(os.path.join(home, "lib64", "libcudart.so*")) or
                    glob.glob(os.path.join(home, "targets", "*", "lib", "libcudart.so*")))

    if guesses and not has_cudart(guesses[0]):
        for home in guesses[1:]:
            if os.path.isfile(os.path.join(home, "bin", "nvcc")) and has_cudart(home):
                os.environ["CUDA_HOME"] = home
                return


_set_cuda_home()
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    flag = os.environ.get("DYNCONV_EXT_CUDA")
    cu_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if flag == "0" or not cu_sources:
        return False
    found = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if flag == "1" and not found:
        raise RuntimeError("DYNCONV_EXT_CUDA=1 but torch has no CUDA or nvcc was not found")
    return found


def extension():
    debug = os.environ.get("DYNCONV_EXT_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # csrc/python/: the Python module itself (PyInit__C and helpers on Python objects); the CMake build leaves it out.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")) +
                     glob.glob(os.path.join("csrc", "python", "*.cpp")))
    cxx = opt + ["-fopenmp"]
    kwargs = dict(name="dynconv_ext._C", sources=sources, py_limited_api=False,
                  extra_link_args=["-fopenmp"])
    cuda = want_cuda()
    if cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        kwargs["sources"] += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvidia_inc = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
        if os.path.isdir(nvidia_inc):
            kwargs["include_dirs"] = [nvidia_inc]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DDYNCONV_WITH_CUDA"],
                                        "nvcc": opt + ["-DDYNCONV_WITH_CUDA", "-lineinfo"]}
        ext = CUDAExtension(**kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext = CppExtension(**kwargs)
    print(f"dynconv_ext build: torch {torch.__version__}, CUDA sources {'ON' if cuda else 'OFF'}"
          f"{' (arch ' + os.environ.get('TORCH_CUDA_ARCH_LIST', '') + ')' if cuda else ''}, "
          f"{'debug' if debug else 'release'}, {len(ext.sources)} sources")
    return ext


setup(
    packages=find_packages(include=["dynconv_ext", "dynconv_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

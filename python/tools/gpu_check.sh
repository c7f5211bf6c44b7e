#!/usr/bin/env bash
# One-shot GPU verification for a session that has a GPU (e.g. the device tool's `run`):
# build, the whole test suite with the CUDA tests, compute-sanitizer on the Triton path, GPU benchmarks.
# Results go to ${OUT:-gpu_results}/ (logs, tables). Run from the repository root.
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
pip install --no-build-isolation . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
python -m dynconv_ext info | tee "$OUT/info.txt"
# Tests, CUDA included (CPU benchmarks deselected).
python -m pytest -q -x tests 2>&1 | tail -30 | tee "$OUT/tests.txt"
# Memory and race checks of the GPU tests (the Triton and the CUDA C++ kernels).
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --target-processes all python -m pytest -q -x tests/test_gpu.py \
      > "$OUT/sanitizer_$tool.txt" 2>&1
    tail -5 "$OUT/sanitizer_$tool.txt"
    # the fused concat ops' CUDA kernels (conv2d_into_, resize_into_)
    compute-sanitizer --tool "$tool" --target-processes all python -m pytest -q -x tests/test_into_ops.py -k cuda \
      > "$OUT/sanitizer_into_$tool.txt" 2>&1
    tail -5 "$OUT/sanitizer_into_$tool.txt"
  done
fi
# Benchmarks: Triton vs cuDNN tables (markdown + csv in $OUT).
python -m pytest -q --benchmark -k gpu --bench-out "$OUT" 2>&1 | tail -60 | tee "$OUT/bench.txt"

// CUDA kernel of dynconv::resize_into_: bilinear resampling (align_corners=True) written into a channel slice of a
// wider buffer; a plain copy when the sizes agree. Same contract as the CPU kernel (csrc/cpu/resize_into_cpu.cpp).
// One thread per output element, in the output slice's memory order (channels innermost for a channels-last
// buffer, so neighbouring threads read and write neighbouring channels); input and output through their strides,
// so channel-slice views are read and written in place. fp16/bf16 interpolate in fp32, as PyTorch does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../into_checks.h"
#include "resize_into_kernels.cuh"

namespace dynconv::cuda {
namespace {

constexpr int kResizeThreads = 256;

void resize_into_cuda_(const at::Tensor& input, const at::Tensor& out, int64_t channel_offset) {
  const ResizeShape r = check_resize_into(input, out, channel_offset);
  TORCH_CHECK(input.is_cuda(), "resize_into (CUDA): input must be a CUDA tensor, got ", input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "resize_into (CUDA): dtype must be float32, float64, float16 or bfloat16, got ", dt);
  const int64_t N = r.N, C = r.C, H = r.H, W = r.W, Ho = r.Ho, Wo = r.Wo;
  if (N == 0 || C == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor slice = out.narrow(1, channel_offset, C);

  ResizeGeo g;
  g.N = N; g.C = C; g.H = H; g.W = W; g.Ho = Ho; g.Wo = Wo;
  g.xn = input.stride(0); g.xc = input.stride(1); g.xh = input.stride(2); g.xw = input.stride(3);
  g.yn = slice.stride(0); g.yc = slice.stride(1); g.yh = slice.stride(2); g.yw = slice.stride(3);
  // Channels innermost unless the output slice keeps a pixel's channels farther apart than a row's pixels (NCHW).
  g.channels_inner = C > 1 && g.yc < g.yw;
  g.same = H == Ho && W == Wo;

  const int64_t total = N * C * Ho * Wo;
  // Grid-stride loop: enough blocks to fill the GPU, bounded so the launch is valid for any size.
  const int64_t blocks = std::min<int64_t>((total + kResizeThreads - 1) / kResizeThreads, int64_t(1) << 20);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "resize_into_cuda", [&] {
    resize_into_kernel<scalar_t><<<static_cast<unsigned>(blocks), kResizeThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), slice.data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CUDA, m) { m.impl("resize_into_", &resize_into_cuda_); }

}  // namespace dynconv::cuda

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

#include "resize_into_kernels.cuh"

namespace dynconv::cuda {
namespace {

constexpr int kResizeThreads = 256;

void resize_into_cuda_(const at::Tensor& input, const at::Tensor& out, int64_t channel_offset) {
  TORCH_CHECK(input.dim() == 4 && out.dim() == 4, "resize_into: input and out must be 4-D, got ", input.dim(),
              "-D and ", out.dim(), "-D");
  TORCH_CHECK(input.scalar_type() == out.scalar_type(), "resize_into: out dtype ", out.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(input.is_cuda(), "resize_into (CUDA): input must be a CUDA tensor, got ", input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "resize_into (CUDA): dtype must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(out.device() == input.device(), "resize_into: out is on ", out.device(), ", input on ", input.device());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t Ho = out.size(2), Wo = out.size(3);
  TORCH_CHECK(out.size(0) == N, "resize_into: out batch (", out.size(0), ") differs from input batch (", N, ")");
  TORCH_CHECK(channel_offset >= 0 && channel_offset + C <= out.size(1), "resize_into: channel_offset (",
              channel_offset, ") + C (", C, ") exceeds out's ", out.size(1), " channels");
  TORCH_CHECK(H > 0 && W > 0 && Ho > 0 && Wo > 0, "resize_into: spatial sizes must be positive");
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

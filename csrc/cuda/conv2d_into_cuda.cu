// CUDA kernel of dynconv::conv2d_into_: a dense convolution written straight into a channel slice of a wider
// (concat) buffer. Same contract as the CPU kernel (csrc/cpu/conv2d_into_cpu.cpp):
//   out[:, channel_offset : channel_offset + Co] = act(conv2d(input, weight, bias, ...)), nothing else of out touched.
// It is masked_conv2d's implicit GEMM with every output pixel active (conv2d_into_kernels.cuh): no mask, no
// index compaction, no host sync. The input is read in place when its channel stride is 1 (a channels-last
// tensor or a channel slice of one, e.g. the filled prefix of a dense-connectivity buffer); any other layout is
// copied to channels-last first. The output slice may have any strides (coalesced when channels-last).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../conv_shape.h"
#include "../into_checks.h"
#include "conv2d_into_kernels.cuh"

namespace dynconv::cuda {
namespace {

Geo make_dense_geo(const ConvShape& s) {
  const int64_t lim = std::numeric_limits<int>::max();
  TORCH_CHECK(s.C <= lim && s.H <= lim && s.W <= lim && s.Co <= lim && s.k_per_group() <= lim &&
                  s.Ho * s.Wo <= lim && s.H * s.W <= lim && s.PH <= lim / 4 && s.PW <= lim / 4,
              "conv2d_into (CUDA): sizes exceed the kernel's 32-bit limits");
  Geo g;
  g.C = int(s.C); g.H = int(s.H); g.W = int(s.W); g.Co = int(s.Co); g.Cg = int(s.Cg); g.Cog = int(s.Cog);
  g.KH = int(s.KH); g.KW = int(s.KW); g.SH = int(s.SH); g.SW = int(s.SW); g.PH = int(s.PH); g.PW = int(s.PW);
  g.DH = int(s.DH); g.DW = int(s.DW); g.Ho = int(s.Ho); g.Wo = int(s.Wo); g.K = int(s.k_per_group());
  g.Hm = int(s.Ho); g.Wm = int(s.Wo); g.block = 1;
  g.N = s.N; g.P = s.out_pixels();
  return g;
}

unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "conv2d_into (CUDA): problem too large for one launch");
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

void conv2d_into_cuda_(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& out, int64_t channel_offset, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, int64_t activation) {
  const ConvShape s = make_conv_shape_unmasked(input, weight, bias, stride, padding, dilation, groups, "conv2d_into");
  TORCH_CHECK(input.is_cuda(), "conv2d_into (CUDA): input must be a CUDA tensor, got ", input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "conv2d_into (CUDA): dtype must be float32, float64, float16 or bfloat16, got ", dt);
  check_conv2d_into(s, input, out, channel_offset, activation);
  if (s.out_pixels() == 0 || s.Co == 0) return;
  const c10::cuda::CUDAGuard guard(input.device());
  const Geo g = make_dense_geo(s);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // In place when the channels are contiguous (any pixel strides), else one channels-last copy.
  const bool in_place = input.stride(1) == 1 || input.size(1) <= 1;
  const at::Tensor x = in_place ? input : input.contiguous(at::MemoryFormat::ChannelsLast);
  const InStrides xs{x.stride(0), x.stride(2), x.stride(3)};
  const at::Tensor slice = out.narrow(1, channel_offset, s.Co);
  const Strides4 os{slice.stride(0), slice.stride(1), slice.stride(2), slice.stride(3)};
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  const bool depthwise = s.Cg == 1;
  // GEMM path: weights packed [G][K][Cog], k = (kh*KW + kw)*Cg + c.
  const at::Tensor w = depthwise
                           ? weight.contiguous()
                           : weight.contiguous().view({s.G, s.Cog, s.Cg, s.KH, s.KW}).permute({0, 3, 4, 2, 1}).contiguous();
  int64_t grid_y = 1;
  if (!depthwise) {
    grid_y = s.G * ceil_div(s.Cog, kBN);
    TORCH_CHECK(grid_y <= 65535, "conv2d_into (CUDA): too many groups x output-channel tiles (", grid_y, ")");
  }
  const int act = static_cast<int>(activation);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "conv2d_into_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = slice.data_ptr<scalar_t>();
    if (depthwise) {
      dense_forward_depthwise_kernel<scalar_t><<<blocks_for(g.P * g.Co, kThreads), kThreads, 0, stream>>>(
          xp, xs, wp, bp, g, op, os, act);
    } else {
      const dim3 grid(blocks_for(g.P, kBM), static_cast<unsigned>(grid_y));
      dense_forward_gemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(xp, xs, wp, bp, g, op, os, act);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CUDA, m) { m.impl("conv2d_into_", &conv2d_into_cuda_); }

}  // namespace dynconv::cuda

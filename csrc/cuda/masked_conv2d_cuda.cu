// CUDA kernels of dynconv::masked_conv2d, masked_conv2d_residual_ and masked_conv2d_backward.
//
// Same contract as the CPU kernels (csrc/cpu/masked_conv2d_cpu.cpp). Pipeline of a sparse forward:
//   1. compact_rows: the mask (pixel or b x b block cells) is expanded on the device and the flat output
//      pixels of the active set are written into a fixed-capacity int64 buffer of N*Ho*Wo entries, with
//      the count in a device counter (one atomicAdd per warp). Rows of one warp stay in raster order; the
//      order of warps is not deterministic, which changes nothing: each active pixel is computed by
//      exactly one thread with a fixed reduction order.
//   2. fill_inactive: inactive output pixels get 0 (or the residual); skipped for the in-place residual
//      variant (inactive pixels untouched) and for zero_inactive=False without a residual.
//   3. an implicit GEMM over the full capacity grid (rows = active pixels, columns = output channels of a
//      group, reduction = kH*kW*C/groups): the A operand is gathered from the channels-last input in the
//      operand load, bias / residual / activation are applied in the epilogue, and the store scatters to
//      the output pixel through its strides (NCHW or NHWC). Blocks beyond the device count exit at once,
//      so there is no host sync and the launch is CUDA-graph capturable. Depthwise-like groups (one input
//      channel per group) use a direct kernel instead (a GEMM would be one column wide).
//
// Dense fallback: at and above `dense_threshold` active density the dense cuDNN conv is used, then masked.
// Deciding that needs the count on the host, so:
//   * dense_threshold > 1 (backend="cuda"): never dense, never a sync;
//   * dense_threshold <= 0 (backend="dense"): always dense, no sync;
//   * otherwise the density is known without a sync when `rows` is given (its length), else the device
//     count is copied to the host (one sync). While the current stream is being captured into a CUDA
//     graph that copy is not allowed, so the sparse path is taken.
// `rows`, when given, must be a CUDA int64 tensor on the input's device holding the mask's active pixels
// (dynconv_ext.ops.active_rows); on CUDA its entries are not checked against the mask (that would need a
// sync): entries outside [0, N*Ho*Wo) are skipped, and pixels of the mask missing from `rows` are left 0.
//
// Backward (correctness over speed): grad_bias is a masked ATen sum; grad_weight is an implicit GEMM
// A^T G over the active rows, split over rows and reduced with atomicAdd into an fp32 (fp64 for double)
// buffer; grad_input is the GEMM dA = G W^T whose epilogue scatter-adds each entry into its input pixel
// (atomicAdd into an fp32 buffer, cast at the end).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <limits>
#include <tuple>

#include "../conv_shape.h"
#include "masked_conv2d_kernels.cuh"

namespace dynconv::cuda {
namespace {

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

Geo make_geo(const ConvShape& s) {
  const int64_t lim = std::numeric_limits<int>::max();
  TORCH_CHECK(s.C <= lim && s.H <= lim && s.W <= lim && s.Co <= lim && s.k_per_group() <= lim &&
                  s.Ho * s.Wo <= lim && s.H * s.W <= lim && s.PH <= lim / 4 && s.PW <= lim / 4,
              "masked_conv2d (CUDA): sizes exceed the kernel's 32-bit limits");
  Geo g;
  g.C = int(s.C); g.H = int(s.H); g.W = int(s.W); g.Co = int(s.Co); g.Cg = int(s.Cg); g.Cog = int(s.Cog);
  g.KH = int(s.KH); g.KW = int(s.KW); g.SH = int(s.SH); g.SW = int(s.SW); g.PH = int(s.PH); g.PW = int(s.PW);
  g.DH = int(s.DH); g.DW = int(s.DW); g.Ho = int(s.Ho); g.Wo = int(s.Wo); g.K = int(s.k_per_group());
  g.Hm = int(s.Hm); g.Wm = int(s.Wm); g.block = int(s.block);
  g.N = s.N; g.P = s.out_pixels();
  return g;
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
unsigned grid_1d(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "masked_conv2d (CUDA): problem too large for one launch");
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

void check_cuda_inputs(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, " (CUDA): input must be a CUDA tensor, got ", input.device());
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              " (CUDA): dtype must be float32, float64, float16 or bfloat16, got ", dt);
}

// [N, Hm, Wm] block mask -> [N, 1, Ho, Wo] pixel mask, with views and one copy (no host sync).
at::Tensor device_pixel_mask(const at::Tensor& mask, const ConvShape& s) {
  const int64_t b = s.block;
  at::Tensor m = mask;
  if (b > 1) {
    m = m.view({s.N, s.Hm, 1, s.Wm, 1}).expand({s.N, s.Hm, b, s.Wm, b}).reshape({s.N, s.Hm * b, s.Wm * b});
    m = m.narrow(1, 0, s.Ho).narrow(2, 0, s.Wo);
  }
  return m.unsqueeze(1);
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The active set of a mask on the device: rows [capacity] and a device count (`count` undefined when
// the rows were given and their length is the count).
struct DeviceRows {
  at::Tensor rows, count;
  int64_t capacity = 0;
};

DeviceRows make_rows(const ConvShape& s, const Geo& g, const at::Tensor& mask_c, const std::optional<at::Tensor>& given,
                     const at::Tensor& input, cudaStream_t stream) {
  DeviceRows d;
  if (given.has_value() && given->defined()) {
    TORCH_CHECK(given->scalar_type() == at::kLong && given->dim() == 1 && given->device() == input.device(),
                "masked_conv2d: rows must be a 1-D int64 tensor on the input's device (", input.device(),
                "), got ", given->scalar_type(), " ", given->sizes(), " on ", given->device());
    TORCH_CHECK(given->numel() <= s.out_pixels(), "masked_conv2d: rows has ", given->numel(),
                " entries but the output has only ", s.out_pixels(), " pixels");
    d.rows = given->contiguous();
    d.capacity = d.rows.numel();
    return d;
  }
  d.rows = at::empty({std::max<int64_t>(s.out_pixels(), 1)}, input.options().dtype(at::kLong));
  d.count = at::zeros({1}, input.options().dtype(at::kLong));
  d.capacity = s.out_pixels();
  compact_rows_kernel<<<grid_1d(g.P, kThreads), kThreads, 0, stream>>>(
      mask_c.data_ptr<bool>(), g, d.rows.data_ptr<int64_t>(),
      reinterpret_cast<unsigned long long*>(d.count.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

// Dense or sparse? See the header comment: syncs only when 0 < threshold <= 1 and the count lives on the
// device. May shrink d.capacity to the exact count when it was read.
bool decide_dense(double threshold, int64_t out_pixels, DeviceRows& d) {
  if (threshold <= 0.0) return true;
  if (threshold > 1.0 || out_pixels == 0) return false;
  int64_t n_active;
  if (!d.count.defined()) {
    n_active = d.capacity;
  } else {
    if (capturing()) return false;
    n_active = d.count.item<int64_t>();  // the one host sync of this op
    d.capacity = n_active;
    d.count = at::Tensor();
  }
  return n_active > 0 && double(n_active) / double(out_pixels) >= threshold;
}

const int64_t* count_ptr(const DeviceRows& d) { return d.count.defined() ? d.count.data_ptr<int64_t>() : nullptr; }

at::Tensor masked_conv2d_cuda_impl(const at::Tensor& input, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                   int64_t groups, int64_t block_size, const std::optional<at::Tensor>& residual,
                                   int64_t activation, double dense_threshold, bool inplace, bool zero_inactive,
                                   const std::optional<at::Tensor>& given_rows) {
  check_cuda_inputs(input, "masked_conv2d");
  const ConvShape s = make_conv_shape(input, weight, bias, mask, stride, padding, dilation, groups, block_size);
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "masked_conv2d: activation must be 0 (none), 1 (relu) or 2 (relu6), got ", activation);
  const int act = static_cast<int>(activation);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_residual(s, input, *residual);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto fmt = input.suggest_memory_format();
  if (s.out_pixels() == 0) {  // empty batch
    if (inplace) return *residual;
    return has_res ? residual->clone(fmt) : at::empty({s.N, s.Co, s.Ho, s.Wo}, input.options().memory_format(fmt));
  }
  const Geo g = make_geo(s);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor mask_c = mask.contiguous();

  // The index map is built first (asynchronously): the sparse path needs it, and the density decision
  // reads its count when the threshold asks for one.
  const bool must_dense = dense_threshold <= 0.0;
  DeviceRows d;
  if (!must_dense) d = make_rows(s, g, mask_c, given_rows, input, stream);
  if (must_dense || decide_dense(dense_threshold, s.out_pixels(), d)) {
    // Dense fallback: cuDNN conv, then act(conv + residual) at active pixels, residual (or 0) elsewhere.
    at::Tensor y = at::conv2d(input, weight, bias, stride, padding, dilation, groups);
    if (has_res) y.add_(*residual);
    if (act == 1) y.relu_();
    if (act == 2) y.clamp_(0, 6);
    const at::Tensor pm = device_pixel_mask(mask_c, s);
    if (inplace) return residual->copy_(at::where(pm, y, *residual));
    y = has_res ? at::where(pm, y, *residual) : at::where(pm, y, at::Scalar(0));
    return y.contiguous(fmt);
  }

  at::Tensor out = inplace ? *residual : at::empty({s.N, s.Co, s.Ho, s.Wo}, input.options().memory_format(fmt));
  const Strides4 os = strides_of(out);
  const Strides4 rs = has_res ? strides_of(*residual) : Strides4{0, 0, 0, 0};
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  const bool fill = !inplace && (has_res || zero_inactive);
  const bool depthwise = s.Cg == 1;
  at::Tensor w;
  if (d.capacity > 0) {
    w = depthwise ? weight.contiguous()
                  : weight.contiguous().view({s.G, s.Cog, s.Cg, s.KH, s.KW}).permute({0, 3, 4, 2, 1}).contiguous();
  }
  int64_t grid_y = 1;
  if (!depthwise) {
    grid_y = s.G * ceil_div(s.Cog, kBN);
    TORCH_CHECK(grid_y <= 65535, "masked_conv2d (CUDA): too many groups x output-channel tiles (", grid_y, ")");
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "masked_conv2d_cuda", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? residual->const_data_ptr<scalar_t>() : nullptr;
    if (fill) {
      const int64_t total = s.out_pixels() * s.Co;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), 65536 * 8));
      fill_inactive_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          mask_c.data_ptr<bool>(), g, op, os, fmt == at::MemoryFormat::ChannelsLast, rp, rs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (d.capacity == 0) return;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const int64_t* rows = d.rows.const_data_ptr<int64_t>();
    if (depthwise) {
      forward_depthwise_kernel<scalar_t><<<grid_1d(d.capacity * s.Co, kThreads), kThreads, 0, stream>>>(
          xp, wp, bp, rows, count_ptr(d), d.capacity, g, op, os, rp, rs, act);
    } else {
      const dim3 grid(grid_1d(d.capacity, kBM), static_cast<unsigned>(grid_y));
      forward_gemm_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(xp, wp, bp, rows, count_ptr(d), d.capacity, g, op,
                                                                  os, rp, rs, act);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor masked_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t groups, int64_t block_size,
                              const std::optional<at::Tensor>& residual, int64_t activation, double dense_threshold,
                              bool zero_inactive, const std::optional<at::Tensor>& rows) {
  return masked_conv2d_cuda_impl(input, weight, bias, mask, stride, padding, dilation, groups, block_size, residual,
                                 activation, dense_threshold, /*inplace=*/false, zero_inactive, rows);
}

at::Tensor masked_conv2d_residual_cuda_(const at::Tensor& input, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups, int64_t block_size, at::Tensor& residual, int64_t activation,
                                        double dense_threshold, const std::optional<at::Tensor>& rows) {
  masked_conv2d_cuda_impl(input, weight, bias, mask, stride, padding, dilation, groups, block_size, residual,
                          activation, dense_threshold, /*inplace=*/true, /*zero_inactive=*/true, rows);
  return residual;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t block_size,
    std::array<bool, 3> output_mask, double dense_threshold) {
  check_cuda_inputs(input, "masked_conv2d_backward");
  const ConvShape s = make_conv_shape(input, weight, std::nullopt, mask, stride, padding, dilation, groups, block_size);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.Co &&
                  grad_output.size(2) == s.Ho && grad_output.size(3) == s.Wo,
              "masked_conv2d_backward: grad_output has shape ", grad_output.sizes(), ", expected [", s.N, ", ", s.Co,
              ", ", s.Ho, ", ", s.Wo, "]");
  TORCH_CHECK(grad_output.device() == input.device(), "masked_conv2d_backward: grad_output is on ",
              grad_output.device(), ", input on ", input.device());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "masked_conv2d_backward: grad_output dtype ",
              grad_output.scalar_type(), " differs from input dtype ", input.scalar_type());
  const c10::cuda::CUDAGuard guard(input.device());
  const auto empty = [&] { return at::empty({0}, input.options()); };
  const at::Tensor mask_c = mask.contiguous();
  const at::Tensor pm = device_pixel_mask(mask_c, s);

  DeviceRows d;
  bool dense = dense_threshold <= 0.0;
  const Geo g = make_geo(s);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (!dense && s.out_pixels() > 0 && (output_mask[0] || output_mask[1])) {
    d = make_rows(s, g, mask_c, std::nullopt, input, stream);
    dense = decide_dense(dense_threshold, s.out_pixels(), d);
  }
  if (dense) {
    const at::Tensor gm = at::where(pm, grad_output, at::Scalar(0));
    auto [gi, gw, gb] = at::convolution_backward(gm, input, weight, at::IntArrayRef{s.Co}, stride, padding, dilation,
                                                 false, {0, 0}, groups, output_mask);
    return {output_mask[0] ? gi : empty(), output_mask[1] ? gw : empty(), output_mask[2] ? gb : empty()};
  }

  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor gb = empty();
  if (output_mask[2])  // a masked sum: inactive grad_output entries never reach it, whatever they hold
    gb = at::where(pm, grad_output, at::Scalar(0)).sum({0, 2, 3}, false, acc_type).to(input.scalar_type());
  at::Tensor gi = empty(), gw = empty();
  if (!output_mask[0] && !output_mask[1]) return {gi, gw, gb};
  at::Tensor gi_acc, gw_acc;
  if (output_mask[0]) gi_acc = at::zeros({s.N, s.H, s.W, s.C}, input.options().dtype(acc_type));
  if (output_mask[1]) gw_acc = at::zeros({s.G, s.KH, s.KW, s.Cg, s.Cog}, input.options().dtype(acc_type));

  if (s.out_pixels() > 0 && d.capacity > 0) {
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor go = grad_output.contiguous(at::MemoryFormat::ChannelsLast);  // coalesced channel reads
    const Strides4 gs = strides_of(go);
    const int64_t tiles_k = ceil_div(s.k_per_group(), kBN), tiles_co = ceil_div(s.Cog, kBN);
    TORCH_CHECK(s.G * tiles_k <= 65535 && s.G * tiles_co <= 65535,
                "masked_conv2d_backward (CUDA): too many groups x channel tiles");
    const int64_t* rows = d.rows.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "masked_conv2d_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if (output_mask[0]) {
        // Wt[g][co][k] = W[g*Cog + co, c, kh, kw], k = (kh*KW + kw)*Cg + c.
        const at::Tensor wt =
            weight.contiguous().view({s.G, s.Cog, s.Cg, s.KH, s.KW}).permute({0, 1, 3, 4, 2}).contiguous();
        const dim3 grid(grid_1d(d.capacity, kBM), static_cast<unsigned>(s.G * tiles_k));
        grad_input_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(go.const_data_ptr<scalar_t>(), gs,
                                                                   wt.const_data_ptr<scalar_t>(), rows, count_ptr(d),
                                                                   d.capacity, g, gi_acc.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (output_mask[1]) {
        const int64_t splits = ceil_div(d.capacity, kWgradRowsPerBlock);
        TORCH_CHECK(splits <= 65535, "masked_conv2d_backward (CUDA): too many active rows for one launch");
        const dim3 grid(static_cast<unsigned>(ceil_div(s.k_per_group(), kBM)),
                        static_cast<unsigned>(s.G * tiles_co), static_cast<unsigned>(splits));
        grad_weight_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(),
                                                                    go.const_data_ptr<scalar_t>(), gs, rows,
                                                                    count_ptr(d), d.capacity, g,
                                                                    gw_acc.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  if (output_mask[0])
    gi = gi_acc.permute({0, 3, 1, 2}).to(input.scalar_type()).contiguous(input.suggest_memory_format());
  if (output_mask[1])  // [G, KH, KW, Cg, Cog] -> [G, Cog, Cg, KH, KW] = [Co, Cg, KH, KW]
    gw = gw_acc.permute({0, 4, 3, 1, 2}).reshape({s.Co, s.Cg, s.KH, s.KW}).to(input.scalar_type()).contiguous();
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CUDA, m) {
  m.impl("masked_conv2d", &masked_conv2d_cuda);
  m.impl("masked_conv2d_residual_", &masked_conv2d_residual_cuda_);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cuda);
}

}  // namespace dynconv::cuda

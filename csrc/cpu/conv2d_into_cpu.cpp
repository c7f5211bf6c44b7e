// CPU kernel of dynconv::conv2d_into_: a dense convolution whose result goes straight into a channel slice
// of a wider (concat) buffer. It is the implicit GEMM of masked_conv2d with every output pixel active: the
// input is read in place even when it is a channel slice of a channels-last buffer (the filled prefix of a
// dense-connectivity concat), and the epilogue (bias, activation) writes each pixel's C_out values at the
// slice's channel offset, so neither side of the layer copies features.
#include <torch/library.h>

#include "../conv_shape.h"
#include "../into_checks.h"
#include "conv_rows_forward.h"

namespace dynconv::cpu {
namespace {

void conv2d_into_cpu_(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& out, int64_t channel_offset, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, int64_t activation) {
  const ConvShape s = make_conv_shape_unmasked(input, weight, bias, stride, padding, dilation, groups, "conv2d_into");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "conv2d_into (CPU): dtype must be float32 or float64, got ", input.scalar_type());
  check_conv2d_into(s, input, out, channel_offset, activation);
  const at::Tensor x = readable_in_place(input) ? input : input.contiguous(at::MemoryFormat::ChannelsLast);
  const InView iv = readable_in_place(input) ? in_view(input) : contiguous_in_view(s);
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  at::Tensor slice = out.narrow(1, channel_offset, s.Co);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_into_cpu", [&] {
    const OutView ov = out_view(slice);
    scalar_t* op = slice.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int act = static_cast<int>(activation);
    if (s.Cg == 1 && s.G > 1)  // depthwise; a single-channel plain conv is a (narrow) GEMM
      forward_depthwise<scalar_t>(s, xp, iv, weight, bp, /*rows=all*/ nullptr, s.out_pixels(), op, ov, false, act, nullptr);
    else
      forward_gemm<scalar_t>(s, xp, iv, weight, bp, /*rows=all*/ nullptr, s.out_pixels(), op, ov, false, act, nullptr);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CPU, m) { m.impl("conv2d_into_", &conv2d_into_cpu_); }

}  // namespace dynconv::cpu

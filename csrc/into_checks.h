// Argument checks shared by every backend of the fused concat ops (conv2d_into_, resize_into_); each backend adds
// only its own dtype rule.
#pragma once

#include <ATen/ATen.h>

#include "conv_shape.h"

namespace dynconv {

// conv2d_into_: the activation code and `out`, the buffer whose channels [channel_offset, channel_offset + Co)
// receive the conv's output (shape, dtype, device, room for the slice).
inline void check_conv2d_into(const ConvShape& s, const at::Tensor& input, const at::Tensor& out,
                              int64_t channel_offset, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "conv2d_into: activation must be 0 (none), 1 (relu) or 2 (relu6), got ", activation);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == s.N && out.size(2) == s.Ho && out.size(3) == s.Wo,
              "conv2d_into: out must be [", s.N, ", C, ", s.Ho, ", ", s.Wo, "], got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == input.scalar_type(), "conv2d_into: out dtype ", out.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(out.device() == input.device(), "conv2d_into: out is on ", out.device(), ", input on ", input.device());
  TORCH_CHECK(channel_offset >= 0 && channel_offset + s.Co <= out.size(1), "conv2d_into: channel_offset (",
              channel_offset, ") + C_out (", s.Co, ") exceeds out's ", out.size(1), " channels");
}

struct ResizeShape {
  int64_t N, C, H, W;  // input
  int64_t Ho, Wo;      // out's spatial size
};

// resize_into_: ranks, dtypes, devices, batch, room for the slice, non-empty spatial sizes.
inline ResizeShape check_resize_into(const at::Tensor& input, const at::Tensor& out, int64_t channel_offset) {
  TORCH_CHECK(input.dim() == 4 && out.dim() == 4, "resize_into: input and out must be 4-D, got ", input.dim(),
              "-D and ", out.dim(), "-D");
  TORCH_CHECK(input.scalar_type() == out.scalar_type(), "resize_into: out dtype ", out.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(out.device() == input.device(), "resize_into: out is on ", out.device(), ", input on ", input.device());
  const ResizeShape r{input.size(0), input.size(1), input.size(2), input.size(3), out.size(2), out.size(3)};
  TORCH_CHECK(out.size(0) == r.N, "resize_into: out batch (", out.size(0), ") differs from input batch (", r.N, ")");
  TORCH_CHECK(channel_offset >= 0 && channel_offset + r.C <= out.size(1), "resize_into: channel_offset (",
              channel_offset, ") + C (", r.C, ") exceeds out's ", out.size(1), " channels");
  TORCH_CHECK(r.H > 0 && r.W > 0 && r.Ho > 0 && r.Wo > 0, "resize_into: spatial sizes must be positive");
  return r;
}

}  // namespace dynconv

// Shape arithmetic and argument checks shared by every convolution op and backend.
#pragma once

#include <ATen/ATen.h>

namespace dynconv {

struct ConvShape {
  int64_t N, C, H, W;         // input
  int64_t Co, Cg, Cog, G;     // output channels, input/output channels per group, groups
  int64_t KH, KW;             // kernel
  int64_t SH, SW, PH, PW, DH, DW;
  int64_t Ho, Wo;             // output
  int64_t block;              // mask granularity (b x b output pixels)
  int64_t Hm, Wm;             // mask spatial size = ceil(Ho / block), ceil(Wo / block)

  int64_t taps() const { return KH * KW; }
  int64_t k_per_group() const { return KH * KW * Cg; }  // GEMM reduction length of one group
  int64_t out_pixels() const { return N * Ho * Wo; }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Validates the convolution arguments of an op (`op` names it in messages) and computes every size but the
// mask's. The Python functionals check the same things first with friendlier messages; these checks keep
// direct op calls safe.
inline ConvShape make_conv_shape_unmasked(const at::Tensor& input, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                          const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D [N, C, H, W], got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [Co, C/groups, kH, kW], got ", weight.dim(), "-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              op, ": stride, padding and dilation must have 2 elements");
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), op, ": input dtype ", input.scalar_type(),
              " and weight dtype ", weight.scalar_type(), " differ");
  ConvShape s;
  s.N = input.size(0); s.C = input.size(1); s.H = input.size(2); s.W = input.size(3);
  s.Co = weight.size(0); s.G = groups; s.KH = weight.size(2); s.KW = weight.size(3);
  TORCH_CHECK(s.C % groups == 0, op, ": groups (", groups, ") must divide the input channels (", s.C, ")");
  TORCH_CHECK(s.Co % groups == 0, op, ": groups (", groups, ") must divide the output channels (", s.Co, ")");
  s.Cg = s.C / groups; s.Cog = s.Co / groups;
  TORCH_CHECK(weight.size(1) == s.Cg, op, ": weight expects ", weight.size(1) * groups, " input channels, input has ",
              s.C);
  s.SH = stride[0]; s.SW = stride[1]; s.PH = padding[0]; s.PW = padding[1];
  s.DH = dilation[0]; s.DW = dilation[1];
  TORCH_CHECK(s.SH >= 1 && s.SW >= 1, op, ": stride must be >= 1");
  TORCH_CHECK(s.DH >= 1 && s.DW >= 1, op, ": dilation must be >= 1");
  TORCH_CHECK(s.PH >= 0 && s.PW >= 0, op, ": padding must be >= 0");
  s.Ho = (s.H + 2 * s.PH - s.DH * (s.KH - 1) - 1) / s.SH + 1;
  s.Wo = (s.W + 2 * s.PW - s.DW * (s.KW - 1) - 1) / s.SW + 1;
  TORCH_CHECK(s.Ho >= 1 && s.Wo >= 1, op, ": output would be empty (", s.Ho, "x", s.Wo, ")");
  TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(), ", input on ",
              input.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.Co, op, ": bias must have shape [", s.Co, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from input dtype ", input.scalar_type());
    TORCH_CHECK(bias->device() == input.device(), op, ": bias is on ", bias->device(), ", input on ",
                input.device());
  }
  s.block = 1; s.Hm = s.Ho; s.Wm = s.Wo;  // every pixel
  return s;
}

// make_conv_shape_unmasked plus the mask of masked_conv2d ([N, ceil(Ho/b), ceil(Wo/b)] bool, b = block_size).
inline ConvShape make_conv_shape(const at::Tensor& input, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, int64_t block_size) {
  ConvShape s = make_conv_shape_unmasked(input, weight, bias, stride, padding, dilation, groups, "masked_conv2d");
  TORCH_CHECK(block_size >= 1, "masked_conv2d: block_size must be >= 1, got ", block_size);
  s.block = block_size;
  s.Hm = ceil_div(s.Ho, block_size); s.Wm = ceil_div(s.Wo, block_size);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_conv2d: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == s.N && mask.size(1) == s.Hm && mask.size(2) == s.Wm,
              "masked_conv2d: mask must have shape [", s.N, ", ", s.Hm, ", ", s.Wm, "] for block_size ",
              block_size, " and output ", s.Ho, "x", s.Wo, ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == input.device(), "masked_conv2d: mask is on ", mask.device(),
              ", input on ", input.device());
  return s;
}

inline void check_residual(const ConvShape& s, const at::Tensor& input, const at::Tensor& residual) {
  TORCH_CHECK(residual.dim() == 4 && residual.size(0) == s.N && residual.size(1) == s.Co &&
                  residual.size(2) == s.Ho && residual.size(3) == s.Wo,
              "masked_conv2d: residual must have the output's shape [", s.N, ", ", s.Co, ", ", s.Ho, ", ",
              s.Wo, "], got ", residual.sizes());
  TORCH_CHECK(residual.scalar_type() == input.scalar_type(), "masked_conv2d: residual dtype ",
              residual.scalar_type(), " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(residual.device() == input.device(), "masked_conv2d: residual is on ", residual.device(),
              ", input on ", input.device());
}

// [N, Hm, Wm] block mask -> [N, 1, Ho, Wo] pixel mask (used by the dense fallback).
inline at::Tensor pixel_mask(const at::Tensor& mask, const ConvShape& s) {
  at::Tensor m = mask;
  if (s.block > 1) {
    m = m.repeat_interleave(s.block, 1).repeat_interleave(s.block, 2);
    m = m.narrow(1, 0, s.Ho).narrow(2, 0, s.Wo);
  }
  return m.unsqueeze(1);
}

}  // namespace dynconv

// All operator schemas of dynconv_ext, in one place. Kernels register per dispatch key in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels and autograd are registered from Python
// (dynconv_ext/ops/).
#include <torch/library.h>

#include <torch/version.h>

#include <string>
#include <vector>

#include "cpu/packed_weights.h"
#include "cpu/tile_gemm.h"

// (The Python module that loads these registrations is csrc/python/module.cpp.)

namespace dynconv {

std::string build_info() {
  std::string s = "torch=" + std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                  std::to_string(TORCH_VERSION_PATCH) + ";cpu_kernel=";
  s += cpu::tile_gemm_uses_avx512() ? "avx512f" : cpu::tile_gemm_uses_avx2() ? "avx2_fma" : "generic";
#ifdef DYNCONV_WITH_CUDA
  s += ";cuda=1";
#else
  s += ";cuda=0";
#endif
  return s;
}

void mark_constant_weight(const at::Tensor& weight) { cpu::mark_constant_weight(weight); }

std::vector<int64_t> packed_cache_stats() {
  const auto [n, bytes] = cpu::packed_cache_stats();
  return {n, bytes};
}

TORCH_LIBRARY(dynconv, m) {
  // out[n, :, p] = act(conv(input, weight, bias)[n, :, p] (+ residual)) where the mask is True at p;
  // 0 (or the residual, untouched) elsewhere. mask: bool [N, ceil(Ho/b), ceil(Wo/b)] with b = block_size.
  // activation: 0 = none, 1 = ReLU, 2 = ReLU6 (applied at active pixels only). Active density >= dense_threshold
  // computes densely and masks. zero_inactive=False leaves inactive pixels unspecified (for intermediates
  // that are read only where they were computed). rows: optional precomputed index map (int64 flat output
  // pixels of the active set, raster order, as dynconv_ext.ops.active_rows builds it), shared by the convs
  // of a block that use the same mask; checked against the mask's count.
  m.def(
      "masked_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor mask, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int block_size, Tensor? residual, int activation, float dense_threshold, "
      "bool zero_inactive=True, Tensor? rows=None) -> Tensor");
  // In-place variant for inference: writes act(residual + conv) into `residual` at active pixels only and
  // returns it; inactive pixels are not touched at all. No autograd.
  m.def(
      "masked_conv2d_residual_(Tensor input, Tensor weight, Tensor? bias, Tensor mask, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int block_size, Tensor(a!) residual, int activation, "
      "float dense_threshold, Tensor? rows=None) -> Tensor(a!)");
  // Gradients of masked_conv2d with respect to input, weight and bias (residual's gradient is
  // grad_output itself). Entries not asked for in output_mask are returned as empty tensors.
  m.def(
      "masked_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor mask, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int block_size, bool[3] output_mask, float dense_threshold) "
      "-> (Tensor, Tensor, Tensor)");
  // Writes act(conv2d(input, weight, bias)) into out[:, channel_offset : channel_offset + Co] in place (the
  // other channels are untouched): a concat without a copy. Returns nothing, so functionalization
  // (torch.compile) can handle the mutation. input may be a channel slice of a
  // channels-last buffer (read in place). activation as above.
  m.def(
      "conv2d_into_(Tensor input, Tensor weight, Tensor? bias, Tensor(a!) out, int channel_offset, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int activation) -> ()");
  // Writes input resampled bilinearly (align_corners=True) to out's spatial size into
  // out[:, channel_offset : channel_offset + C] in place (a copy when the sizes agree).
  m.def("resize_into_(Tensor input, Tensor(a!) out, int channel_offset) -> ()");
  // The pixels a kernel x kernel conv (stride 1, 'same' padding, dilation) reads for its outputs at mask
  // (bool [N, H, W]): the mask OR-ed with its shifts by multiples of dilation up to dilation * (kernel / 2).
  m.def("dilate_mask(Tensor mask, int kernel, int dilation) -> Tensor");
  m.def("build_info() -> str", &build_info);
  // Declares a weight constant while it lives: the CPU kernels may keep its packed layout across calls
  // (csrc/cpu/packed_weights.h). For tensors the caller owns and never modifies (folded inference weights).
  m.def("mark_constant_weight(Tensor weight) -> ()", &mark_constant_weight);
  // (packings kept, bytes held) of that cache, for tests.
  m.def("packed_cache_stats() -> int[]", &packed_cache_stats);
}

}  // namespace dynconv

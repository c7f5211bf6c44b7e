// C++ test of the CPU kernel of dynconv::masked_conv2d, called through the dispatcher (no Python).
// Each case is compared with a dense reference: at::conv2d, zeroed where the (block-expanded)
// mask is false, plus the residual. Exits non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <string>
#include <vector>

namespace {

using MaskedConv2dFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                  const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                  int64_t, const std::optional<at::Tensor>&, int64_t, double, bool,
                                  const std::optional<at::Tensor>&);

at::Tensor masked_conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, int64_t groups, int64_t block_size,
                         const std::optional<at::Tensor>& residual, double dense_threshold) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dynconv::masked_conv2d", "").typed<MaskedConv2dFn>();
  return op.call(input, weight, bias, mask, stride, padding, dilation, groups, block_size, residual,
                 /*activation=*/0, dense_threshold, /*zero_inactive=*/true, /*rows=*/std::nullopt);
}

int failures = 0, checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAIL  %s\n", what.c_str());
  }
}

struct Case {
  int64_t N, C, H, W, Co, K, stride, pad, groups, block;
  bool bias, residual, channels_last;
};

std::string describe(const Case& c, at::ScalarType dt, double thr) {
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "%s N=%ld C=%ld %ldx%ld Co=%ld k=%ld s=%ld p=%ld g=%ld block=%ld bias=%d res=%d cl=%d thr=%.1f",
                dt == at::kFloat ? "fp32" : "fp64", long(c.N), long(c.C), long(c.H), long(c.W), long(c.Co),
                long(c.K), long(c.stride), long(c.pad), long(c.groups), long(c.block), int(c.bias),
                int(c.residual), int(c.channels_last), thr);
  return buf;
}

// [N, Hm, Wm] block mask -> [N, 1, Ho, Wo] pixel mask.
at::Tensor expand_mask(const at::Tensor& mask, int64_t block, int64_t Ho, int64_t Wo) {
  return mask.repeat_interleave(block, 1).repeat_interleave(block, 2).narrow(1, 0, Ho).narrow(2, 0, Wo).unsqueeze(1);
}

void run_case(const Case& c, at::ScalarType dt, double dense_threshold) {
  const auto opts = at::TensorOptions().dtype(dt);
  at::Tensor x = at::randn({c.N, c.C, c.H, c.W}, opts);
  if (c.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = at::randn({c.Co, c.C / c.groups, c.K, c.K}, opts);
  const std::optional<at::Tensor> b = c.bias ? std::optional<at::Tensor>(at::randn({c.Co}, opts)) : std::nullopt;
  const int64_t Ho = (c.H + 2 * c.pad - c.K) / c.stride + 1, Wo = (c.W + 2 * c.pad - c.K) / c.stride + 1;
  const int64_t Hm = (Ho + c.block - 1) / c.block, Wm = (Wo + c.block - 1) / c.block;
  const at::Tensor mask = at::rand({c.N, Hm, Wm}) < 0.5;
  const std::optional<at::Tensor> res =
      c.residual ? std::optional<at::Tensor>(at::randn({c.N, c.Co, Ho, Wo}, opts)) : std::nullopt;
  const std::vector<int64_t> st{c.stride, c.stride}, pd{c.pad, c.pad}, dl{1, 1};
  const std::string name = describe(c, dt, dense_threshold);

  const at::Tensor out = masked_conv2d(x, w, b, mask, st, pd, dl, c.groups, c.block, res, dense_threshold);
  at::Tensor ref = at::conv2d(x, w, b, st, pd, dl, c.groups) * expand_mask(mask, c.block, Ho, Wo);
  if (res) ref = ref + *res;
  const double tol = dt == at::kFloat ? 1e-4 : 1e-10;
  const bool same_shape = out.sizes() == ref.sizes() && out.scalar_type() == dt;
  const double err = same_shape ? (out - ref).abs().max().item<double>() : -1.0;
  expect(same_shape && err < tol, name + "  max_abs_err=" + std::to_string(err));

  // All-false mask: zeros, or exactly the residual.
  const at::Tensor none = at::zeros_like(mask);
  const at::Tensor out0 = masked_conv2d(x, w, b, none, st, pd, dl, c.groups, c.block, res, dense_threshold);
  const at::Tensor want0 = res ? *res : at::zeros_like(ref);
  expect(out0.sizes() == ref.sizes() && at::equal(out0, want0), name + "  all-false mask");
}

}  // namespace

int main() {
  at::manual_seed(0);
  //      N  C  H  W  Co K  s  p  g  block bias  res    cl
  const Case cases[] = {
      {2, 4, 9, 11, 8, 3, 1, 1, 1, 1, true, false, false},   // 3x3, pixel mask
      {2, 4, 9, 11, 8, 3, 2, 1, 1, 2, false, true, false},   // stride 2, block mask, residual
      {1, 4, 8, 8, 6, 3, 1, 1, 2, 2, true, true, false},     // groups 2 (GEMM path, Cg = 2)
      {2, 2, 7, 9, 4, 3, 2, 1, 2, 1, true, false, false},    // groups 2 = C (depthwise path)
      {2, 6, 8, 7, 20, 1, 1, 0, 1, 1, true, true, false},    // 1x1, Co > 16 (two weight panels)
      {1, 8, 10, 10, 8, 1, 2, 0, 2, 2, false, false, true},  // 1x1 stride 2, channels-last input
      {1, 3, 13, 13, 5, 3, 1, 2, 1, 2, true, false, true},   // padding 2, odd sizes, channels-last
  };
  for (const at::ScalarType dt : {at::kFloat, at::kDouble})
    for (const Case& c : cases)
      for (const double thr : {2.0, 0.0})  // 2.0: always the sparse kernel; 0.0: dense fallback
        run_case(c, dt, thr);

  // A mask of the wrong shape must be rejected with c10::Error.
  bool threw = false;
  try {
    masked_conv2d(at::randn({1, 4, 8, 8}), at::randn({4, 4, 3, 3}), std::nullopt,
                  at::ones({1, 7, 8}, at::kBool), {1, 1}, {1, 1}, {1, 1}, 1, 1, std::nullopt, 2.0);
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "wrong-shaped mask throws c10::Error");

  std::printf("%s: %d of %d checks passed\n", failures ? "FAILED" : "OK", checks - failures, checks);
  return failures ? 1 : 0;
}

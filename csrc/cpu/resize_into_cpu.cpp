// CPU kernel of dynconv::resize_into_: bilinear resampling (align_corners=True, as RANet's fusion uses) written
// into a channel slice of a wider buffer; a plain copy when the sizes agree. Channels-last on both sides makes
// each output pixel a blend of four contiguous input vectors, vectorized over channels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../into_checks.h"
#include "conv_rows_forward.h"  // fused_prefetch_enabled

namespace dynconv::cpu {
namespace {

// Source coordinate of output index o for align_corners=True, split as PyTorch's upsample kernels do:
// i0 = floor(o * scale), i1 = i0 + (i0 < in - 1), weight of i1 = frac.
// Computed in the data type (float for float32, double for float64).
template <typename T>
struct Tap {
  int64_t i0, i1;
  T w1;
};
template <typename T>
std::vector<Tap<T>> taps(int64_t in, int64_t out) {
  std::vector<Tap<T>> t(static_cast<size_t>(out));
  const T scale = out > 1 ? T(in - 1) / T(out - 1) : T(0);
  for (int64_t o = 0; o < out; ++o) {
    const T src = scale * T(o);
    const int64_t i0 = static_cast<int64_t>(src);
    t[o] = {i0, i0 + (i0 < in - 1 ? 1 : 0), src - T(i0)};
  }
  return t;
}

void resize_into_cpu_(const at::Tensor& input, const at::Tensor& out, int64_t channel_offset) {
  const ResizeShape r = check_resize_into(input, out, channel_offset);
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "resize_into (CPU): dtype must be float32 or float64, got ", input.scalar_type());
  const int64_t N = r.N, C = r.C, H = r.H, W = r.W, Ho = r.Ho, Wo = r.Wo;
  if (N == 0 || C == 0) return;
  at::Tensor slice = out.narrow(1, channel_offset, C);
  const bool same = H == Ho && W == Wo;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "resize_into_cpu", [&] {
    using T = scalar_t;
    const std::vector<Tap<T>> th = taps<T>(H, Ho), tw = taps<T>(W, Wo);
    const T* x = input.data_ptr<T>();
    T* y = slice.data_ptr<T>();
    const int64_t xN = input.stride(0), xC = input.stride(1), xH = input.stride(2), xW = input.stride(3);
    const int64_t yN = slice.stride(0), yC = slice.stride(1), yH = slice.stride(2), yW = slice.stride(3);
    // A slice of a wider channels-last buffer is written a few channels per cache line (RANet writes 1-5 channels
    // into 68-105-channel buffers): prefetch the next row's output lines for writing, as conv2d_into's fused path
    // does (the same switch, DYNCONV_EXT_FUSED_PREFETCH=0, turns both off). RANet CIFAR batch 256 on the 2-core
    // AVX-512 Xeon, interleaved A/B of this prefetch alone: 1.03-1.04x on the whole network.
    const bool prefetch = fused_prefetch_enabled() && yC == 1 && yW > C;
    at::parallel_for(0, N * Ho, 1, [&](int64_t b, int64_t e) {
      for (int64_t nh = b; nh < e; ++nh) {
        const int64_t n = nh / Ho, ho = nh % Ho;
        if (prefetch && nh + 1 < e && ho + 1 < Ho) {
          T* next = y + n * yN + (ho + 1) * yH;
          for (int64_t wo = 0; wo < Wo; ++wo) __builtin_prefetch(next + wo * yW, 1);
        }
        const Tap<T>& a = th[ho];
        const T* r0 = x + n * xN + (same ? ho : a.i0) * xH;
        const T* r1 = x + n * xN + a.i1 * xH;
        const T lh1 = same ? T(0) : T(a.w1), lh0 = T(1) - lh1;
        T* yrow = y + n * yN + ho * yH;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          T* d = yrow + wo * yW;
          if (same) {
            const T* s0 = r0 + wo * xW;
            if (xC == 1 && yC == 1)
              for (int64_t c = 0; c < C; ++c) d[c] = s0[c];
            else
              for (int64_t c = 0; c < C; ++c) d[c * yC] = s0[c * xC];
            continue;
          }
          const Tap<T>& t = tw[wo];
          const T lw1 = T(t.w1), lw0 = T(1) - lw1;
          const T *p00 = r0 + t.i0 * xW, *p01 = r0 + t.i1 * xW, *p10 = r1 + t.i0 * xW, *p11 = r1 + t.i1 * xW;
          if (xC == 1 && yC == 1) {  // channels-last both sides: contiguous vectors
            for (int64_t c = 0; c < C; ++c)
              d[c] = lh0 * (lw0 * p00[c] + lw1 * p01[c]) + lh1 * (lw0 * p10[c] + lw1 * p11[c]);
          } else {
            for (int64_t c = 0; c < C; ++c) {
              const int64_t o = c * xC;
              d[c * yC] = lh0 * (lw0 * p00[o] + lw1 * p01[o]) + lh1 * (lw0 * p10[o] + lw1 * p11[o]);
            }
          }
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CPU, m) { m.impl("resize_into_", &resize_into_cpu_); }

}  // namespace dynconv::cpu

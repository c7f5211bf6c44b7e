// Device code of dynconv::resize_into_'s CUDA kernel (included by resize_into_cuda.cu and by the host emulation in
// python/tools/cuda_host_emulation.cpp; no host-API dependencies).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

namespace dynconv::cuda {
namespace {

struct ResizeGeo {
  int64_t N, C, H, W, Ho, Wo;
  int64_t xn, xc, xh, xw;  // input strides
  int64_t yn, yc, yh, yw;  // output (channel slice) strides
  bool channels_inner;     // element order: (n, ho, wo, c) when true (channels-last output), else (n, c, ho, wo)
  bool same;               // sizes agree: a copy
};

// Source index and weights along one axis, align_corners=True, as PyTorch's upsample_bilinear2d computes them:
// src = o * (in - 1) / (out - 1) in the accumulation type, i0 = floor(src), i1 = i0 + (i0 < in - 1), w1 = src - i0.
template <typename acc_t>
__device__ __forceinline__ void bilinear_tap(int64_t o, int64_t in, int64_t out, int64_t& i0, int64_t& i1, acc_t& w1) {
  const acc_t scale = out > 1 ? acc_t(in - 1) / acc_t(out - 1) : acc_t(0);
  const acc_t src = scale * acc_t(o);
  i0 = static_cast<int64_t>(src);
  if (i0 > in - 1) i0 = in - 1;  // rounding guard; src <= in - 1 mathematically
  i1 = i0 + (i0 < in - 1 ? 1 : 0);
  w1 = src - acc_t(i0);
}

// One thread per output element (grid-stride loop, int64 indices), walking the output slice in its memory order.
template <typename scalar_t>
__global__ void resize_into_kernel(const scalar_t* __restrict__ x, scalar_t* y, ResizeGeo g) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = g.N * g.C * g.Ho * g.Wo;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, c, ho, wo;
    if (g.channels_inner) {
      c = e % g.C;
      const int64_t p = e / g.C;
      wo = p % g.Wo;
      const int64_t q = p / g.Wo;
      ho = q % g.Ho;
      n = q / g.Ho;
    } else {
      wo = e % g.Wo;
      const int64_t p = e / g.Wo;
      ho = p % g.Ho;
      const int64_t q = p / g.Ho;
      c = q % g.C;
      n = q / g.C;
    }
    const scalar_t* xb = x + n * g.xn + c * g.xc;
    scalar_t* dst = y + n * g.yn + c * g.yc + ho * g.yh + wo * g.yw;
    if (g.same) {
      *dst = xb[ho * g.xh + wo * g.xw];
      continue;
    }
    int64_t h0, h1, w0, w1;
    acc_t lh1, lw1;
    bilinear_tap<acc_t>(ho, g.H, g.Ho, h0, h1, lh1);
    bilinear_tap<acc_t>(wo, g.W, g.Wo, w0, w1, lw1);
    const acc_t lh0 = acc_t(1) - lh1, lw0 = acc_t(1) - lw1;
    const acc_t v00 = static_cast<acc_t>(xb[h0 * g.xh + w0 * g.xw]);
    const acc_t v01 = static_cast<acc_t>(xb[h0 * g.xh + w1 * g.xw]);
    const acc_t v10 = static_cast<acc_t>(xb[h1 * g.xh + w0 * g.xw]);
    const acc_t v11 = static_cast<acc_t>(xb[h1 * g.xh + w1 * g.xw]);
    *dst = static_cast<scalar_t>(lh0 * (lw0 * v00 + lw1 * v01) + lh1 * (lw0 * v10 + lw1 * v11));
  }
}

}  // namespace
}  // namespace dynconv::cuda

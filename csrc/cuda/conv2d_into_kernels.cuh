// Device code of dynconv::conv2d_into_'s CUDA kernels (included by conv2d_into_cuda.cu and by the host emulation in
// python/tools/cuda_host_emulation.cpp; no host-API dependencies). It is masked_conv2d's forward with every output
// pixel active: the GEMM rows are the flat output pixels 0..N*Ho*Wo-1 themselves (no mask, no index map), the
// input is read through pixel strides (sN, sH, sW) with channel stride 1, so a channel slice of a channels-last
// concat buffer is read in place, and the epilogue stores through the output's strides (the channel slice being
// written). The tile loop, epilogue and activation are masked_conv2d's (masked_conv2d_kernels.cuh).
#pragma once

#include "masked_conv2d_kernels.cuh"

namespace dynconv::cuda {
namespace {

// Pixel strides of an input whose channel stride is 1 (element (n, c, h, w) at n*sN + h*sH + w*sW + c).
struct InStrides {
  int64_t n, h, w;
};

// Input element of im2row column k (k = tap*Cg + c) for an output pixel whose top-left input tap is (hi0, wi0);
// `xbase` = offset of (n, group's first channel, 0, 0). 0 in padding.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t gather_input_strided(const scalar_t* __restrict__ x, const Geo& g, const InStrides& xs,
                                                      int64_t xbase, int hi0, int wi0, int k) {
  const int tap = k / g.Cg, c = k - tap * g.Cg;
  const int kh = tap / g.KW, kw = tap - kh * g.KW;
  const int hi = hi0 + kh * g.DH, wi = wi0 + kw * g.DW;
  if (hi < 0 || hi >= g.H || wi < 0 || wi >= g.W) return acc_t(0);
  return static_cast<acc_t>(x[xbase + int64_t(hi) * xs.h + int64_t(wi) * xs.w + c]);
}

// Implicit GEMM over all output pixels. grid: x = tiles of kBM pixels (ceil(P / kBM)), y = groups x column tiles.
//   wp: weights packed [G][K][Cog] (k = tap*Cg + c); out: the channel slice being written (any strides).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) dense_forward_gemm_kernel(
    const scalar_t* __restrict__ x, InStrides xs, const scalar_t* __restrict__ wp, const scalar_t* __restrict__ bias,
    Geo g, scalar_t* out, Strides4 os, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  if (m0 >= g.P) return;  // uniform over the block, before any barrier
  const int tiles_n = (g.Cog + kBN - 1) / kBN;
  const int grp = blockIdx.y / tiles_n, n0 = (blockIdx.y % tiles_n) * kBN;

  __shared__ acc_t As[kBK][kBM + kPad];
  __shared__ acc_t Bs[kBK][kBN];
  __shared__ int64_t s_xbase[kBM], s_obase[kBM];
  __shared__ int s_hi[kBM], s_wi[kBM];
  __shared__ bool s_ok[kBM];
  if (threadIdx.x < kBM) {
    const int m = threadIdx.x;
    const int64_t p = m0 + m;
    if (p < g.P) {
      const Pix px = decode_pixel(g, p);
      s_xbase[m] = px.n * xs.n + int64_t(grp) * g.Cg;
      s_hi[m] = px.ho * g.SH - g.PH;
      s_wi[m] = px.wo * g.SW - g.PW;
      s_obase[m] = px.n * os.n + int64_t(px.ho) * os.h + int64_t(px.wo) * os.w;
      s_ok[m] = true;
    } else {
      s_xbase[m] = 0; s_obase[m] = 0;
      s_hi[m] = kInvalid; s_wi[m] = kInvalid;
      s_ok[m] = false;
    }
  }
  __syncthreads();

  acc_t acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);

  const int64_t wgrp = int64_t(grp) * g.K;
  const auto la = [&](int m, int kk, int64_t k0) -> acc_t {
    return gather_input_strided<scalar_t, acc_t>(x, g, xs, s_xbase[m], s_hi[m], s_wi[m], int(k0) + kk);
  };
  const auto lb = [&](int kk, int n, int64_t k0) -> acc_t {
    const int col = n0 + n;
    return col < g.Cog ? static_cast<acc_t>(wp[(wgrp + k0 + kk) * g.Cog + col]) : acc_t(0);
  };
  gemm_mainloop<false, false, acc_t>(0, g.K, acc, As, Bs, NoPrep{}, la, lb);

  gemm_epilogue<acc_t>(acc, [&](int m, int n, acc_t v) {
    const int col = n0 + n;
    if (!s_ok[m] || col >= g.Cog) return;
    const int co = grp * g.Cog + col;
    if (bias) v += static_cast<acc_t>(bias[co]);
    out[s_obase[m] + int64_t(co) * os.c] = static_cast<scalar_t>(apply_act(v, act));
  });
}

// One input channel per group (depthwise and its channel multipliers): one thread per (output pixel, output
// channel), consecutive threads on consecutive channels. w: [Co, 1, KH, KW] contiguous.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) dense_forward_depthwise_kernel(
    const scalar_t* __restrict__ x, InStrides xs, const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
    Geo g, scalar_t* out, Strides4 os, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t p = e / g.Co;
  if (p >= g.P) return;
  const int co = int(e - p * g.Co);
  const Pix px = decode_pixel(g, p);
  const int hi0 = px.ho * g.SH - g.PH, wi0 = px.wo * g.SW - g.PW;
  const int64_t xbase = px.n * xs.n + co / g.Cog;
  const scalar_t* wr = w + int64_t(co) * g.KH * g.KW;
  acc_t acc = acc_t(0);
  for (int kh = 0; kh < g.KH; ++kh) {
    const int hi = hi0 + kh * g.DH;
    if (hi < 0 || hi >= g.H) continue;
    for (int kw = 0; kw < g.KW; ++kw) {
      const int wi = wi0 + kw * g.DW;
      if (wi < 0 || wi >= g.W) continue;
      acc += static_cast<acc_t>(x[xbase + int64_t(hi) * xs.h + int64_t(wi) * xs.w]) *
             static_cast<acc_t>(wr[kh * g.KW + kw]);
    }
  }
  if (bias) acc += static_cast<acc_t>(bias[co]);
  out[px.n * os.n + int64_t(co) * os.c + int64_t(px.ho) * os.h + int64_t(px.wo) * os.w] =
      static_cast<scalar_t>(apply_act(acc, act));
}

}  // namespace
}  // namespace dynconv::cuda

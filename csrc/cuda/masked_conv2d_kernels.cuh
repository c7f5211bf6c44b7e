// Device code of dynconv::masked_conv2d's CUDA kernels (included by masked_conv2d_cuda.cu only; kept apart so
// that it has no host-API dependencies). See masked_conv2d_cuda.cu for the pipeline.
#pragma once

#include <ATen/OpMathType.h>

#include <climits>
#include <cstdint>

namespace dynconv::cuda {
namespace {

// GEMM tile: 64 x 64 outputs per block of 256 threads (4 x 4 per thread), reduction steps of 16.
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 16;
constexpr int kPad = 4;  // keeps the A tile's rows 16-byte aligned and spreads its banks
constexpr int kThreads = 256;
constexpr int kTM = 4;
constexpr int kTN = 4;
static_assert((kBM / kTM) * (kBN / kTN) == kThreads, "one thread per 4x4 sub-tile");
static_assert(kBM * kBK == 4 * kThreads && kBN * kBK == 4 * kThreads, "tile loads: 4 elements per thread");
constexpr int kWgradRowsPerBlock = 256;  // active rows one grad_weight block reduces over
constexpr int kInvalid = INT_MIN / 4;     // input row of a padding row: every tap falls out of bounds

// Convolution geometry in 32-bit ints (checked to fit on the host); offsets that scale with
// N*H*W*C are formed in int64.
struct Geo {
  int C, H, W, Co, Cg, Cog, KH, KW, SH, SW, PH, PW, DH, DW, Ho, Wo, K, Hm, Wm, block;
  int64_t N, P;  // batch, output pixels N*Ho*Wo
};

struct Strides4 {
  int64_t n, c, h, w;
};

template <typename acc_t>
__device__ __forceinline__ acc_t apply_act(acc_t v, int act) {
  if (act == 0) return v;
  v = v > acc_t(0) ? v : acc_t(0);
  return (act == 2 && v > acc_t(6)) ? acc_t(6) : v;
}

__device__ __forceinline__ bool pixel_active(const bool* mask, const Geo& g, int64_t n, int ho, int wo) {
  return mask[(n * g.Hm + ho / g.block) * g.Wm + wo / g.block];
}

// Number of rows a launch over `capacity` rows really has: the device count when there is one.
__device__ __forceinline__ int64_t active_count(const int64_t* count, int64_t capacity) {
  if (count == nullptr) return capacity;
  const int64_t c = *count;
  return c < capacity ? c : capacity;
}

// ---------------------------------------------------------------------------------------------
// 1. Index compaction. blockDim.x is a multiple of 32 and no thread leaves before the ballot.
// ---------------------------------------------------------------------------------------------
__global__ void compact_rows_kernel(const bool* __restrict__ mask, Geo g, int64_t* __restrict__ rows,
                                    unsigned long long* __restrict__ count) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  bool active = false;
  if (p < g.P) {
    const int64_t hw = int64_t(g.Ho) * g.Wo;
    const int64_t n = p / hw;
    const int r = int(p - n * hw), ho = r / g.Wo, wo = r - ho * g.Wo;
    active = pixel_active(mask, g, n, ho, wo);
  }
  const unsigned ballot = __ballot_sync(0xffffffffu, active);
  const int lane = threadIdx.x & 31;
  unsigned long long base = 0;
  if (lane == 0 && ballot != 0u) base = atomicAdd(count, static_cast<unsigned long long>(__popc(ballot)));
  base = __shfl_sync(0xffffffffu, base, 0);
  if (active) rows[base + __popc(ballot & ((1u << lane) - 1u))] = p;
}

// ---------------------------------------------------------------------------------------------
// 2. Inactive pixels: 0 or the residual. Walks the elements in the output's memory order.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void fill_inactive_kernel(const bool* __restrict__ mask, Geo g, scalar_t* __restrict__ out,
                                     Strides4 os, bool channels_last, const scalar_t* __restrict__ res,
                                     Strides4 rs) {
  const int64_t total = g.P * g.Co;
  const int64_t hw = int64_t(g.Ho) * g.Wo;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int64_t n, pix;
    int co;
    if (channels_last) {
      const int64_t p = e / g.Co;
      co = int(e - p * g.Co);
      n = p / hw;
      pix = p - n * hw;
    } else {
      const int64_t nc = e / hw;
      pix = e - nc * hw;
      n = nc / g.Co;
      co = int(nc - n * g.Co);
    }
    const int ho = int(pix / g.Wo), wo = int(pix - int64_t(ho) * g.Wo);
    if (pixel_active(mask, g, n, ho, wo)) continue;
    const scalar_t v = res ? res[n * rs.n + co * rs.c + ho * rs.h + wo * rs.w] : scalar_t(0);
    out[n * os.n + co * os.c + ho * os.h + wo * os.w] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Shared GEMM main loop: acc[kTM][kTN] += A[m0.., k] * B[k, n0..] over k in [k_begin, k_end).
//   la(m, kk, k0): element (m, k0 + kk) of A (m, kk local to the tile); lb(kk, n, k0) likewise for B;
//   prep(k0): per-step setup in shared memory before the loads (a __syncthreads follows it).
//   A_M_FAST: consecutive threads load consecutive m (else consecutive k) of the A tile, whichever is
//   contiguous in memory. B loads always run along n.
// ---------------------------------------------------------------------------------------------
struct NoPrep {
  __device__ void operator()(int64_t) const {}
};

template <bool A_M_FAST, bool HAS_PREP, typename acc_t, typename Prep, typename LA, typename LB>
__device__ __forceinline__ void gemm_mainloop(int64_t k_begin, int64_t k_end, acc_t (&acc)[kTM][kTN],
                                              acc_t (*As)[kBM + kPad], acc_t (*Bs)[kBN], const Prep& prep,
                                              const LA& la, const LB& lb) {
  const int t = threadIdx.x;
  const int tm = t / (kBN / kTN), tn = t % (kBN / kTN);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    prep(k0);
    if constexpr (HAS_PREP) __syncthreads();
    const int64_t klen = k_end - k0;  // valid reduction entries of this step (may exceed kBK)
    if constexpr (A_M_FAST) {
      const int m = t % kBM, kb = t / kBM;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int kk = kb + i * (kThreads / kBM);
        As[kk][m] = kk < klen ? la(m, kk, k0) : acc_t(0);
      }
    } else {
      const int kk = t % kBK, mb = t / kBK;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = mb + i * (kThreads / kBK);
        As[kk][m] = kk < klen ? la(m, kk, k0) : acc_t(0);
      }
    }
    {
      const int n = t % kBN, kb = t / kBN;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int kk = kb + i * (kThreads / kBN);
        Bs[kk][n] = kk < klen ? lb(kk, n, k0) : acc_t(0);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      acc_t a[kTM], b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = As[kk][tm * kTM + i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) b[j] = Bs[kk][tn * kTN + j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

// Calls epi(m, n, value) for each of this thread's outputs (m, n local to the tile).
template <typename acc_t, typename Epi>
__device__ __forceinline__ void gemm_epilogue(const acc_t (&acc)[kTM][kTN], const Epi& epi) {
  const int t = threadIdx.x;
  const int tm = t / (kBN / kTN), tn = t % (kBN / kTN);
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) epi(tm * kTM + i, tn * kTN + j, acc[i][j]);
}

// Decodes a flat output pixel p = (n*Ho + ho)*Wo + wo.
struct Pix {
  int64_t n;
  int ho, wo;
};
__device__ __forceinline__ Pix decode_pixel(const Geo& g, int64_t p) {
  const int64_t hw = int64_t(g.Ho) * g.Wo;
  const int64_t n = p / hw;
  const int r = int(p - n * hw);
  const int ho = r / g.Wo;
  return {n, ho, r - ho * g.Wo};
}

// Input element of im2row column k (k = tap*Cg + c) for an output pixel whose top-left input tap is
// (hi0, wi0); `xbase` = offset of (n, 0, 0, group's first channel) in the NHWC input. 0 in padding.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t gather_input(const scalar_t* __restrict__ x, const Geo& g, int64_t xbase, int hi0,
                                              int wi0, int k) {
  const int tap = k / g.Cg, c = k - tap * g.Cg;
  const int kh = tap / g.KW, kw = tap - kh * g.KW;
  const int hi = hi0 + kh * g.DH, wi = wi0 + kw * g.DW;
  if (hi < 0 || hi >= g.H || wi < 0 || wi >= g.W) return acc_t(0);
  return static_cast<acc_t>(x[xbase + (int64_t(hi) * g.W + wi) * g.C + c]);
}

// ---------------------------------------------------------------------------------------------
// 3a. Forward implicit GEMM. grid: x = row tiles over the capacity, y = groups x column tiles.
//   wp: weights packed [G][K][Cog] (k = tap*Cg + c). out/res: any strides (res may alias out).
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_gemm_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ wp, const scalar_t* __restrict__ bias,
    const int64_t* __restrict__ rows, const int64_t* __restrict__ count, int64_t capacity, Geo g,
    scalar_t* out, Strides4 os, const scalar_t* res, Strides4 rs, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = active_count(count, capacity);
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  if (m0 >= M) return;  // uniform over the block, before any barrier
  const int tiles_n = (g.Cog + kBN - 1) / kBN;
  const int grp = blockIdx.y / tiles_n, n0 = (blockIdx.y % tiles_n) * kBN;

  __shared__ acc_t As[kBK][kBM + kPad];
  __shared__ acc_t Bs[kBK][kBN];
  __shared__ int64_t s_xbase[kBM], s_obase[kBM], s_rbase[kBM];
  __shared__ int s_hi[kBM], s_wi[kBM];
  __shared__ bool s_ok[kBM];
  if (threadIdx.x < kBM) {
    const int m = threadIdx.x;
    const int64_t r = m0 + m;
    const int64_t p = r < M ? rows[r] : -1;
    if (p >= 0 && p < g.P) {
      const Pix px = decode_pixel(g, p);
      s_xbase[m] = px.n * g.H * g.W * g.C + int64_t(grp) * g.Cg;
      s_hi[m] = px.ho * g.SH - g.PH;
      s_wi[m] = px.wo * g.SW - g.PW;
      s_obase[m] = px.n * os.n + px.ho * os.h + px.wo * os.w;
      s_rbase[m] = px.n * rs.n + px.ho * rs.h + px.wo * rs.w;
      s_ok[m] = true;
    } else {
      s_xbase[m] = 0; s_obase[m] = 0; s_rbase[m] = 0;
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
    return gather_input<scalar_t, acc_t>(x, g, s_xbase[m], s_hi[m], s_wi[m], int(k0) + kk);
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
    if (res) v += static_cast<acc_t>(res[s_rbase[m] + co * rs.c]);
    out[s_obase[m] + co * os.c] = static_cast<scalar_t>(apply_act(v, act));
  });
}

// 3b. Forward, one input channel per group (depthwise and its channel multipliers): one thread per
// (active row, output channel); consecutive threads read consecutive channels of an NHWC pixel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_depthwise_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
    const int64_t* __restrict__ rows, const int64_t* __restrict__ count, int64_t capacity, Geo g,
    scalar_t* out, Strides4 os, const scalar_t* res, Strides4 rs, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = active_count(count, capacity);
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = e / g.Co;
  if (r >= M) return;
  const int co = int(e - r * g.Co);
  const int64_t p = rows[r];
  if (p < 0 || p >= g.P) return;
  const Pix px = decode_pixel(g, p);
  const int hi0 = px.ho * g.SH - g.PH, wi0 = px.wo * g.SW - g.PW;
  const int cin = co / g.Cog;
  const int64_t xbase = px.n * g.H * g.W * g.C + cin;
  const scalar_t* wr = w + int64_t(co) * g.KH * g.KW;
  acc_t acc = acc_t(0);
  for (int kh = 0; kh < g.KH; ++kh) {
    const int hi = hi0 + kh * g.DH;
    if (hi < 0 || hi >= g.H) continue;
    for (int kw = 0; kw < g.KW; ++kw) {
      const int wi = wi0 + kw * g.DW;
      if (wi < 0 || wi >= g.W) continue;
      acc += static_cast<acc_t>(x[xbase + (int64_t(hi) * g.W + wi) * g.C]) * static_cast<acc_t>(wr[kh * g.KW + kw]);
    }
  }
  if (bias) acc += static_cast<acc_t>(bias[co]);
  if (res) acc += static_cast<acc_t>(res[px.n * rs.n + co * rs.c + px.ho * rs.h + px.wo * rs.w]);
  out[px.n * os.n + co * os.c + px.ho * os.h + px.wo * os.w] = static_cast<scalar_t>(apply_act(acc, act));
}

// ---------------------------------------------------------------------------------------------
// 4a. grad_input: per group dA[M x K] = G[M x Cog] * Wt[Cog x K], each entry scatter-added into the
// input pixel it was gathered from. grid: x = row tiles, y = groups x K tiles.
//   go: grad_output (any strides); wt: weights packed [G][Cog][K]; gi: [N, H, W, C] accumulator.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_input_kernel(
    const scalar_t* __restrict__ go, Strides4 gs, const scalar_t* __restrict__ wt, const int64_t* __restrict__ rows,
    const int64_t* __restrict__ count, int64_t capacity, Geo g, at::opmath_type<scalar_t>* gi) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = active_count(count, capacity);
  const int64_t m0 = int64_t(blockIdx.x) * kBM;
  if (m0 >= M) return;
  const int tiles_n = (g.K + kBN - 1) / kBN;
  const int grp = blockIdx.y / tiles_n, n0 = (blockIdx.y % tiles_n) * kBN;

  __shared__ acc_t As[kBK][kBM + kPad];
  __shared__ acc_t Bs[kBK][kBN];
  __shared__ int64_t s_gbase[kBM], s_xbase[kBM];
  __shared__ int s_hi[kBM], s_wi[kBM];
  __shared__ bool s_ok[kBM];
  if (threadIdx.x < kBM) {
    const int m = threadIdx.x;
    const int64_t r = m0 + m;
    const int64_t p = r < M ? rows[r] : -1;
    s_ok[m] = p >= 0 && p < g.P;
    if (s_ok[m]) {
      const Pix px = decode_pixel(g, p);
      s_gbase[m] = px.n * gs.n + px.ho * gs.h + px.wo * gs.w + int64_t(grp) * g.Cog * gs.c;
      s_xbase[m] = px.n * g.H * g.W * g.C + int64_t(grp) * g.Cg;
      s_hi[m] = px.ho * g.SH - g.PH;
      s_wi[m] = px.wo * g.SW - g.PW;
    } else {
      s_gbase[m] = 0; s_xbase[m] = 0; s_hi[m] = kInvalid; s_wi[m] = kInvalid;
    }
  }
  __syncthreads();

  acc_t acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);

  const int64_t wgrp = int64_t(grp) * g.Cog;
  const auto la = [&](int m, int kk, int64_t k0) -> acc_t {  // G[row m, co = k0 + kk]
    return s_ok[m] ? static_cast<acc_t>(go[s_gbase[m] + (k0 + kk) * gs.c]) : acc_t(0);
  };
  const auto lb = [&](int kk, int n, int64_t k0) -> acc_t {  // Wt[co = k0 + kk, k = n0 + n]
    const int k = n0 + n;
    return k < g.K ? static_cast<acc_t>(wt[(wgrp + k0 + kk) * g.K + k]) : acc_t(0);
  };
  gemm_mainloop<false, false, acc_t>(0, g.Cog, acc, As, Bs, NoPrep{}, la, lb);

  gemm_epilogue<acc_t>(acc, [&](int m, int n, acc_t v) {
    const int k = n0 + n;
    if (!s_ok[m] || k >= g.K) return;
    const int tap = k / g.Cg, c = k - tap * g.Cg;
    const int kh = tap / g.KW, kw = tap - kh * g.KW;
    const int hi = s_hi[m] + kh * g.DH, wi = s_wi[m] + kw * g.DW;
    if (hi < 0 || hi >= g.H || wi < 0 || wi >= g.W) return;
    atomicAdd(gi + s_xbase[m] + (int64_t(hi) * g.W + wi) * g.C + c, v);
  });
}

// ---------------------------------------------------------------------------------------------
// 4b. grad_weight: per group dW[K x Cog] = A^T[K x M] * G[M x Cog], the M reduction split over
// blockIdx.z in chunks of kWgradRowsPerBlock rows, partial tiles atomically added into dw [G][K][Cog].
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) grad_weight_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ go, Strides4 gs, const int64_t* __restrict__ rows,
    const int64_t* __restrict__ count, int64_t capacity, Geo g, at::opmath_type<scalar_t>* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = active_count(count, capacity);
  const int64_t r_begin = int64_t(blockIdx.z) * kWgradRowsPerBlock;
  if (r_begin >= M) return;
  const int64_t r_end = r_begin + kWgradRowsPerBlock < M ? r_begin + kWgradRowsPerBlock : M;
  const int tiles_n = (g.Cog + kBN - 1) / kBN;
  const int grp = blockIdx.y / tiles_n, n0 = (blockIdx.y % tiles_n) * kBN;
  const int m0 = blockIdx.x * kBM;  // first im2row column k of this tile

  __shared__ acc_t As[kBK][kBM + kPad];
  __shared__ acc_t Bs[kBK][kBN];
  // Per reduction step: the kBK active rows being reduced over.
  __shared__ int64_t s_gbase[kBK], s_xbase[kBK];
  __shared__ int s_hi[kBK], s_wi[kBK];
  __shared__ bool s_ok[kBK];

  acc_t acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);

  const auto prep = [&](int64_t k0) {
    if (threadIdx.x < kBK) {
      const int kk = threadIdx.x;
      const int64_t r = k0 + kk;
      const int64_t p = r < r_end ? rows[r] : -1;
      s_ok[kk] = p >= 0 && p < g.P;
      if (s_ok[kk]) {
        const Pix px = decode_pixel(g, p);
        s_gbase[kk] = px.n * gs.n + px.ho * gs.h + px.wo * gs.w + int64_t(grp) * g.Cog * gs.c;
        s_xbase[kk] = px.n * g.H * g.W * g.C + int64_t(grp) * g.Cg;
        s_hi[kk] = px.ho * g.SH - g.PH;
        s_wi[kk] = px.wo * g.SW - g.PW;
      } else {
        s_gbase[kk] = 0; s_xbase[kk] = 0; s_hi[kk] = kInvalid; s_wi[kk] = kInvalid;
      }
    }
  };
  const auto la = [&](int m, int kk, int64_t) -> acc_t {  // A^T[k = m0 + m, row kk]
    const int k = m0 + m;
    if (k >= g.K || !s_ok[kk]) return acc_t(0);
    return gather_input<scalar_t, acc_t>(x, g, s_xbase[kk], s_hi[kk], s_wi[kk], k);
  };
  const auto lb = [&](int kk, int n, int64_t) -> acc_t {  // G[row kk, co = n0 + n]
    const int col = n0 + n;
    return (s_ok[kk] && col < g.Cog) ? static_cast<acc_t>(go[s_gbase[kk] + int64_t(col) * gs.c]) : acc_t(0);
  };
  gemm_mainloop<true, true, acc_t>(r_begin, r_end, acc, As, Bs, prep, la, lb);

  gemm_epilogue<acc_t>(acc, [&](int m, int n, acc_t v) {
    const int k = m0 + m, col = n0 + n;
    if (k >= g.K || col >= g.Cog) return;
    atomicAdd(dw + (int64_t(grp) * g.K + k) * g.Cog + col, v);
  });
}

}  // namespace
}  // namespace dynconv::cuda

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
#include <ATen/OpMathType.h>
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

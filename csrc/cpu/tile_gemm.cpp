#include "tile_gemm.h"

#include <algorithm>
#include <cstdlib>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DYNCONV_X86 1
#endif

namespace dynconv::cpu {
namespace {

// Portable kernel: the compiler vectorizes the j loop. Used for double and on non-AVX2 CPUs.
template <typename T>
void micro_generic(int64_t kc, const T* a, int64_t rs_a, int64_t cs_a, const T* b, T* c, int64_t ldc,
                   bool accumulate) {
  T acc[kMR][kNR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const T* bk = b + k * kNR;
    for (int64_t i = 0; i < kMR; ++i) {
      const T ai = a[i * rs_a + k * cs_a];
      for (int64_t j = 0; j < kNR; ++j) acc[i][j] += ai * bk[j];
    }
  }
  for (int64_t i = 0; i < kMR; ++i)
    for (int64_t j = 0; j < kNR; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

// Portable register block of MR rows x NR columns (6x16 or 8x8): for double and on non-AVX2 CPUs.
template <typename T, int64_t MR, int64_t NR>
void conv_block_generic(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc,
                        bool accumulate) {
  T acc[MR][NR] = {};
  for (int64_t t = 0; t < ntaps; ++t)
    for (int64_t k = 0; k < cg; ++k) {
      const T* bk = b + (t * cg + k) * NR;
      for (int64_t i = 0; i < MR; ++i) {
        const T ai = rows[t * MR + i][k];
        for (int64_t j = 0; j < NR; ++j) acc[i][j] += ai * bk[j];
      }
    }
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < NR; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

template <typename T>
void tile_generic(int64_t m, int64_t panels, int64_t kc, const T* a, int64_t rs_a, int64_t cs_a, const T* b,
                  int64_t panel_stride, T* c, int64_t ldc, bool accumulate) {
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t i = 0; i < m; i += kMR)
      micro_generic<T>(kc, a + i * rs_a, rs_a, cs_a, b + p * panel_stride, c + i * ldc + p * kNR, ldc, accumulate);
}

#ifdef DYNCONV_X86
// 6x16 float block: 12 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 ymm registers.
// Per k: 2 loads of B, 6 broadcasts of A, 12 FMAs, so the loop is bound by the two FMA pipes.
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t kc, const float* a, int64_t rs_a, int64_t cs_a,
                                                    const float* b, float* c, int64_t ldc, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float* a0 = a;
  const float* a1 = a + rs_a;
  const float* a2 = a + 2 * rs_a;
  const float* a3 = a + 3 * rs_a;
  const float* a4 = a + 4 * rs_a;
  const float* a5 = a + 5 * rs_a;
  int64_t off = 0;
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k, off += cs_a, b += kNR) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
    __m256 t = _mm256_broadcast_ss(a0 + off);
    c00 = _mm256_fmadd_ps(t, b0, c00); c01 = _mm256_fmadd_ps(t, b1, c01);
    t = _mm256_broadcast_ss(a1 + off);
    c10 = _mm256_fmadd_ps(t, b0, c10); c11 = _mm256_fmadd_ps(t, b1, c11);
    t = _mm256_broadcast_ss(a2 + off);
    c20 = _mm256_fmadd_ps(t, b0, c20); c21 = _mm256_fmadd_ps(t, b1, c21);
    t = _mm256_broadcast_ss(a3 + off);
    c30 = _mm256_fmadd_ps(t, b0, c30); c31 = _mm256_fmadd_ps(t, b1, c31);
    t = _mm256_broadcast_ss(a4 + off);
    c40 = _mm256_fmadd_ps(t, b0, c40); c41 = _mm256_fmadd_ps(t, b1, c41);
    t = _mm256_broadcast_ss(a5 + off);
    c50 = _mm256_fmadd_ps(t, b0, c50); c51 = _mm256_fmadd_ps(t, b1, c51);
  }
#define DYNCONV_STORE_ROW(i, lo, hi)                                                  \
  {                                                                                   \
    float* ci = c + (i) * ldc;                                                        \
    if (accumulate) {                                                                 \
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(ci));                                    \
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(ci + 8));                                \
    }                                                                                 \
    _mm256_storeu_ps(ci, lo);                                                         \
    _mm256_storeu_ps(ci + 8, hi);                                                     \
  }
  DYNCONV_STORE_ROW(0, c00, c01) DYNCONV_STORE_ROW(1, c10, c11) DYNCONV_STORE_ROW(2, c20, c21)
  DYNCONV_STORE_ROW(3, c30, c31) DYNCONV_STORE_ROW(4, c40, c41) DYNCONV_STORE_ROW(5, c50, c51)
#undef DYNCONV_STORE_ROW
}

__attribute__((target("avx2,fma"))) void tile_avx2(int64_t m, int64_t panels, int64_t kc, const float* a,
                                                   int64_t rs_a, int64_t cs_a, const float* b,
                                                   int64_t panel_stride, float* c, int64_t ldc, bool accumulate) {
  // Panel-outer order: one B panel (kc x 16, at most 16 KiB for kc <= 256) stays in L1 while
  // every 6-row block of the A tile streams past it.
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t i = 0; i < m; i += kMR)
      micro_avx2(kc, a + i * rs_a, rs_a, cs_a, b + p * panel_stride, c + i * ldc + p * kNR, ldc, accumulate);
}

// The register blocks' accumulation, shared by the C-tile kernels (conv_block_6x16 / conv_block_8x8) and the
// fused-store ones (conv_block_*_store_*): acc += sum over taps t and channels k of row(t, i)[k] * b[(t*cg+k)*NR].
// `row(t, i)` is where row i of tap t starts; inlined, so a strided row function keeps its pointers in registers.
struct Acc6x16 {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
};
// 12 accumulators + 2 B vectors + 1 broadcast = 15 of the 16 ymm registers. Per k: 2 loads of B, 6 broadcasts
// of A, 12 FMAs, so the loop is bound by the two FMA pipes.
template <typename RowAt>
__attribute__((target("avx2,fma"), always_inline)) inline Acc6x16 accumulate_6x16(int64_t ntaps, int64_t cg,
                                                                                  RowAt row, const float* b) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
         c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
         c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
         c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float *a0 = row(t, 0), *a1 = row(t, 1), *a2 = row(t, 2), *a3 = row(t, 3), *a4 = row(t, 4),
                *a5 = row(t, 5);
#pragma GCC unroll 4
    for (int64_t k = 0; k < cg; ++k, b += kNR) {
      const __m256 b0 = _mm256_loadu_ps(b);
      const __m256 b1 = _mm256_loadu_ps(b + 8);
      __m256 x = _mm256_broadcast_ss(a0 + k);
      c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
      x = _mm256_broadcast_ss(a1 + k);
      c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
      x = _mm256_broadcast_ss(a2 + k);
      c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
      x = _mm256_broadcast_ss(a3 + k);
      c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
      x = _mm256_broadcast_ss(a4 + k);
      c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
      x = _mm256_broadcast_ss(a5 + k);
      c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
    }
  }
  return {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
}

struct Acc8x8 {
  __m256 c0, c1, c2, c3, c4, c5, c6, c7;
};
// 8 accumulators + 1 B vector + broadcasts. Per k: 1 load of B, 8 broadcasts, 8 FMAs; 8 independent
// accumulators cover the FMA latency.
template <typename RowAt>
__attribute__((target("avx2,fma"), always_inline)) inline Acc8x8 accumulate_8x8(int64_t ntaps, int64_t cg, RowAt row,
                                                                                const float* b) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps(),
         c4 = _mm256_setzero_ps(), c5 = _mm256_setzero_ps(), c6 = _mm256_setzero_ps(), c7 = _mm256_setzero_ps();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float *a0 = row(t, 0), *a1 = row(t, 1), *a2 = row(t, 2), *a3 = row(t, 3), *a4 = row(t, 4),
                *a5 = row(t, 5), *a6 = row(t, 6), *a7 = row(t, 7);
#pragma GCC unroll 4
    for (int64_t k = 0; k < cg; ++k, b += kNR8) {
      const __m256 bk = _mm256_loadu_ps(b);
      c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + k), bk, c0);
      c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a1 + k), bk, c1);
      c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a2 + k), bk, c2);
      c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a3 + k), bk, c3);
      c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(a4 + k), bk, c4);
      c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(a5 + k), bk, c5);
      c6 = _mm256_fmadd_ps(_mm256_broadcast_ss(a6 + k), bk, c6);
      c7 = _mm256_fmadd_ps(_mm256_broadcast_ss(a7 + k), bk, c7);
    }
  }
  return {c0, c1, c2, c3, c4, c5, c6, c7};
}

__attribute__((target("avx2,fma"))) void conv_block_avx2(int64_t ntaps, int64_t cg, const float* const* rows,
                                                         const float* b, float* c, int64_t ldc, bool accumulate) {
  Acc6x16 a = accumulate_6x16(ntaps, cg, [rows](int64_t t, int64_t i) { return rows[t * kMR + i]; }, b);
#define DYNCONV_STORE_ROW(i, lo, hi)                                                  \
  {                                                                                   \
    float* ci = c + (i) * ldc;                                                        \
    if (accumulate) {                                                                 \
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(ci));                                    \
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(ci + 8));                                \
    }                                                                                 \
    _mm256_storeu_ps(ci, lo);                                                         \
    _mm256_storeu_ps(ci + 8, hi);                                                     \
  }
  DYNCONV_STORE_ROW(0, a.c00, a.c01) DYNCONV_STORE_ROW(1, a.c10, a.c11) DYNCONV_STORE_ROW(2, a.c20, a.c21)
  DYNCONV_STORE_ROW(3, a.c30, a.c31) DYNCONV_STORE_ROW(4, a.c40, a.c41) DYNCONV_STORE_ROW(5, a.c50, a.c51)
#undef DYNCONV_STORE_ROW
}

// 8x8 float block. In isolation at 6 output channels it delivers 1.4-1.6x the useful MACs of the padded 6x16
// block (one core of the 2-core AVX2 dev machine).
__attribute__((target("avx2,fma"))) void conv_block_8x8_avx2(int64_t ntaps, int64_t cg, const float* const* rows,
                                                             const float* b, float* c, int64_t ldc, bool accumulate) {
  const Acc8x8 a = accumulate_8x8(ntaps, cg, [rows](int64_t t, int64_t i) { return rows[t * kMR8 + i]; }, b);
#define DYNCONV_STORE_ROW8(i, v)                                                                 \
  _mm256_storeu_ps(c + (i) * ldc, accumulate ? _mm256_add_ps(v, _mm256_loadu_ps(c + (i) * ldc)) : v);
  DYNCONV_STORE_ROW8(0, a.c0) DYNCONV_STORE_ROW8(1, a.c1) DYNCONV_STORE_ROW8(2, a.c2) DYNCONV_STORE_ROW8(3, a.c3)
  DYNCONV_STORE_ROW8(4, a.c4) DYNCONV_STORE_ROW8(5, a.c5) DYNCONV_STORE_ROW8(6, a.c6) DYNCONV_STORE_ROW8(7, a.c7)
#undef DYNCONV_STORE_ROW8
}

// Stores the first n < 8 lanes of v. 4..7 lanes (MSDNet's 6 channels) as a 4-lane store plus 1-3 scalar
// lanes: measured faster than one vmaskmovps on the Zen 3 dev machine.
__attribute__((target("avx2"), always_inline)) inline void store_partial(float* d, __m256 v, int64_t n, __m256i lanes) {
  if (n < 4) {
    _mm256_maskstore_ps(d, lanes, v);
    return;
  }
  _mm_storeu_ps(d, _mm256_castps256_ps128(v));
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  if (n == 5) {
    _mm_store_ss(d + 4, hi);
  } else if (n >= 6) {
    _mm_storel_pi(reinterpret_cast<__m64*>(d + 4), hi);
    if (n == 7) _mm_store_ss(d + 6, _mm_movehl_ps(hi, hi));
  }
}

// The 8x8 block with its epilogue in registers.
template <typename RowAt>
__attribute__((target("avx2,fma"), always_inline)) inline void block8_store_impl(int64_t ntaps, int64_t cg,
                                                                                 RowAt row, const float* b,
                                                                                 const RowStore& st) {
  const Acc8x8 a = accumulate_8x8(ntaps, cg, row, b);
  // Lanes >= n are never read (bias, residual) nor written: a concat slice's neighbours belong to other layers.
  const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(st.n)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const bool full = st.n == 8;
  const __m256 bias = st.bias ? (full ? _mm256_loadu_ps(st.bias) : _mm256_maskload_ps(st.bias, lanes))
                              : _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.0f);
#define DYNCONV_PUT(i, acc)                                                                   \
  {                                                                                           \
    float* d = st.dst[i];                                                                     \
    __m256 v = _mm256_add_ps(acc, bias);                                                      \
    if (st.add) v = _mm256_add_ps(v, full ? _mm256_loadu_ps(d) : _mm256_maskload_ps(d, lanes)); \
    if (st.act != 0) v = _mm256_max_ps(zero, v);                                              \
    if (st.act == 2) v = _mm256_min_ps(six, v);                                               \
    if (full)                                                                                 \
      _mm256_storeu_ps(d, v);                                                                 \
    else                                                                                      \
      store_partial(d, v, st.n, lanes);                                                       \
  }
  // (max/min return their second operand when either is NaN: v second keeps a NaN, as std::max/min do.)
  DYNCONV_PUT(0, a.c0)
  if (st.nvalid > 1) DYNCONV_PUT(1, a.c1)
  if (st.nvalid > 2) DYNCONV_PUT(2, a.c2)
  if (st.nvalid > 3) DYNCONV_PUT(3, a.c3)
  if (st.nvalid > 4) DYNCONV_PUT(4, a.c4)
  if (st.nvalid > 5) DYNCONV_PUT(5, a.c5)
  if (st.nvalid > 6) DYNCONV_PUT(6, a.c6)
  if (st.nvalid > 7) DYNCONV_PUT(7, a.c7)
#undef DYNCONV_PUT
}

// The 6x16 block with its epilogue in registers (see block8_store_impl); a row's 16 lanes are two halves of 8.
template <typename RowAt>
__attribute__((target("avx2,fma"), always_inline)) inline void block16_store_impl(int64_t ntaps, int64_t cg,
                                                                                  RowAt row, const float* b,
                                                                                  const RowStore& st) {
  const Acc6x16 a = accumulate_6x16(ntaps, cg, row, b);
  // half 0: lanes 0..min(n,8); half 1: lanes 8..n (none when n <= 8)
  const int64_t n0 = st.n < 8 ? st.n : 8, n1 = st.n - n0;
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lanes0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n0)), idx);
  const __m256i lanes1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n1)), idx);
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.0f);
  const __m256 bias0 = st.bias ? _mm256_maskload_ps(st.bias, lanes0) : zero;
  const __m256 bias1 = st.bias && n1 > 0 ? _mm256_maskload_ps(st.bias + 8, lanes1) : zero;
#define DYNCONV_HALF(d, acc, bias, nh, lanes)                                                    \
  {                                                                                              \
    __m256 v = _mm256_add_ps(acc, bias);                                                         \
    if (st.add) v = _mm256_add_ps(v, nh == 8 ? _mm256_loadu_ps(d) : _mm256_maskload_ps(d, lanes)); \
    if (st.act != 0) v = _mm256_max_ps(zero, v);                                                 \
    if (st.act == 2) v = _mm256_min_ps(six, v);                                                  \
    if (nh == 8)                                                                                 \
      _mm256_storeu_ps(d, v);                                                                    \
    else                                                                                         \
      store_partial(d, v, nh, lanes);                                                            \
  }
#define DYNCONV_PUT16(i, lo, hi)                                    \
  {                                                                 \
    float* d = st.dst[i];                                           \
    DYNCONV_HALF(d, lo, bias0, n0, lanes0)                          \
    if (n1 > 0) DYNCONV_HALF(d + 8, hi, bias1, n1, lanes1)          \
  }
  DYNCONV_PUT16(0, a.c00, a.c01)
  if (st.nvalid > 1) DYNCONV_PUT16(1, a.c10, a.c11)
  if (st.nvalid > 2) DYNCONV_PUT16(2, a.c20, a.c21)
  if (st.nvalid > 3) DYNCONV_PUT16(3, a.c30, a.c31)
  if (st.nvalid > 4) DYNCONV_PUT16(4, a.c40, a.c41)
  if (st.nvalid > 5) DYNCONV_PUT16(5, a.c50, a.c51)
#undef DYNCONV_PUT16
#undef DYNCONV_HALF
}

// The AVX-512 blocks' reduction: acc[i][v] = sum over taps t and channels k of row(t, i)[k] * b[(t*cg + k)*NR + 16v ..]
// for MR rows x 16*NV channels: MR*NV accumulators (16 or 24) + NV B vectors + 1 broadcast of the 32 zmm registers.
// Per k: NV loads of B, MR broadcasts of A, MR*NV FMAs, so the loop is bound by the FMA pipes; inlined, the arrays
// are fully unrolled into registers (no stack traffic in the loop: objdump).
// PF > 0: software-prefetch B PF reduction steps ahead (for panels that do not fit in L1; see tile_gemm.h).
constexpr int kPrefetchSteps = 4;
constexpr int64_t kFeedSteps = 16;
struct NoTapWork {
  void operator()() const {}
};
// Zeroes RowStore's zero ranges an equal share per call (zmm_accumulate calls it every kFeedSteps reduction steps).
struct ZeroFeed {
  const RowStore& st;
  int64_t per_call = 0, left = 0;
  int q = 0;
  float* zp = nullptr;
  ZeroFeed(const RowStore& s, int64_t calls) : st(s), left(s.zero_len[0] / 16), zp(s.zero_ptr[0]) {
    int64_t total = 0;
    for (int i = 0; i < s.zero_ranges; ++i) total += s.zero_len[i];
    per_call = (total / 16 + calls - 1) / calls;
  }
  __attribute__((target("avx512f"), always_inline)) inline void operator()() {
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t nvec = per_call; nvec > 0 && q < st.zero_ranges;) {
      if (left == 0) {
        if (++q == st.zero_ranges) break;
        zp = st.zero_ptr[q];
        left = st.zero_len[q] / 16;
        continue;
      }
      const int64_t c = std::min(nvec, left);
      for (int64_t j = 0; j < c; ++j) _mm512_stream_ps(zp + 16 * j, zero);
      zp += 16 * c;
      left -= c;
      nvec -= c;
    }
  }
};
template <int MR, int NV, int PF, typename RowAt, typename OnTap = NoTapWork>
__attribute__((target("avx512f"), always_inline)) inline void zmm_accumulate(int64_t ntaps, int64_t cg, RowAt row,
                                                                            const float* b, __m512 (&acc)[MR][NV],
                                                                            OnTap&& on_tap = OnTap{}) {
  constexpr int64_t NR = 16 * NV;
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ntaps; ++t) {
    const float* a[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) a[i] = row(t, i);
    // on_tap every kFeedSteps reduction steps: work it does (zero stores) spreads evenly over the FMAs
    for (int64_t k0 = 0; k0 < cg; k0 += kFeedSteps) {
      on_tap();
      const int64_t k1 = std::min(cg, k0 + kFeedSteps);
      for (int64_t k = k0; k < k1; ++k, b += NR) {
        __m512 bv[NV];
        if constexpr (PF > 0) {
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) _mm_prefetch(reinterpret_cast<const char*>(b + PF * NR + 16 * v), _MM_HINT_T0);
        }
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const __m512 x = _mm512_set1_ps(a[i][k]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(x, bv[v], acc[i][v]);
        }
      }
    }
  }
}

// AVX-512 float block of MR rows x 16*NV channels (8x32 or 6x64) into a C tile.
template <int MR, int NV, int PF = 0>
__attribute__((target("avx512f"))) void conv_block_zmm(int64_t ntaps, int64_t cg, const float* const* rows,
                                                       const float* b, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  zmm_accumulate<MR, NV, PF>(ntaps, cg, [rows](int64_t t, int64_t i) { return rows[t * MR + i]; }, b, acc);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* ci = c + i * ldc + 16 * v;
      _mm512_storeu_ps(ci, accumulate ? _mm512_add_ps(acc[i][v], _mm512_loadu_ps(ci)) : acc[i][v]);
    }
}

// conv_block_zmm with the weight-panel prefetch where prefetch_b asks for it.
template <int MR, int NV>
__attribute__((target("avx512f"))) void conv_block_zmm_pf(int64_t ntaps, int64_t cg, const float* const* rows,
                                                          const float* b, float* c, int64_t ldc, bool accumulate,
                                                          bool prefetch_b) {
  if (prefetch_b)
    conv_block_zmm<MR, NV, kPrefetchSteps>(ntaps, cg, rows, b, c, ldc, accumulate);
  else
    conv_block_zmm<MR, NV>(ntaps, cg, rows, b, c, ldc, accumulate);
}

// The AVX-512 block with its epilogue in registers (see block8_store_impl): MR rows x 16*NV channels, of which the
// first st.n are read (bias, residual) and written, through lane masks (masked lanes neither fault nor store).
template <int MR, int NV, typename RowAt, int PF = 0>
__attribute__((target("avx512f"), always_inline)) inline void zmm_store_impl(int64_t ntaps, int64_t cg, RowAt row,
                                                                            const float* b, const RowStore& st) {
  __m512 acc[MR][NV];
  if (st.zero_ranges > 0) {
    // Spread the zero stores of st's ranges evenly over the reduction, so they drain to memory while the FMAs run
    // instead of stalling the core in one burst.
    ZeroFeed feed(st, ntaps * ((cg + kFeedSteps - 1) / kFeedSteps));
    zmm_accumulate<MR, NV, PF>(ntaps, cg, row, b, acc, feed);
  } else {
    zmm_accumulate<MR, NV, PF>(ntaps, cg, row, b, acc);
  }
  __mmask16 mk[NV];
  __m512 bias[NV];
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.0f);
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t nv = std::min<int64_t>(16, std::max<int64_t>(0, st.n - 16 * v));
    mk[v] = static_cast<__mmask16>((1u << nv) - 1u);
    bias[v] = st.bias ? _mm512_maskz_loadu_ps(mk[v], st.bias + 16 * v) : zero;
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (i >= st.nvalid) break;
    float* d = st.dst[i];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m512 y = _mm512_add_ps(acc[i][v], bias[v]);
      if (st.add) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mk[v], d + 16 * v));
      // (max/min return their second operand when either is NaN: y second keeps a NaN, as std::max/min do.)
      if (st.act != 0) y = _mm512_max_ps(zero, y);
      if (st.act == 2) y = _mm512_min_ps(six, y);
      if (st.stream && mk[v] == 0xFFFF)
        _mm512_stream_ps(d + 16 * v, y);
      else
        _mm512_mask_storeu_ps(d + 16 * v, mk[v], y);
    }
  }
}

// zmm_store_impl on a row-pointer table (rows[t * MR + i]), with the weight-panel prefetch where st asks for it.
template <int MR, int NV>
__attribute__((target("avx512f"), always_inline)) inline void zmm_store_table(int64_t ntaps, int64_t cg,
                                                                             const float* const* rows, const float* b,
                                                                             const RowStore& st) {
  const auto row = [rows](int64_t t, int64_t i) { return rows[t * MR + i]; };
  if (st.prefetch_b)
    zmm_store_impl<MR, NV, decltype(row), kPrefetchSteps>(ntaps, cg, row, b, st);
  else
    zmm_store_impl<MR, NV>(ntaps, cg, row, b, st);
}

// AVX-512 tile micro-kernel for the backward GEMMs: 6 rows x NP 16-column panels at once (NP = 4, 2 or 1; the
// panels lie panel_stride apart, as tile_gemm packs them), 6*NP zmm accumulators. Each output is still summed in k
// order, so the result equals the AVX2 kernel's bit for bit.
template <int NP>
__attribute__((target("avx512f"))) void micro_zmm(int64_t kc, const float* a, int64_t rs_a, int64_t cs_a,
                                                  const float* b, int64_t panel_stride, float* c, int64_t ldc,
                                                  bool accumulate) {
  __m512 acc[kMR][NP];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_setzero_ps();
  const float* ar[kMR];
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i) ar[i] = a + i * rs_a;
  int64_t off = 0;
  for (int64_t k = 0; k < kc; ++k, off += cs_a) {
    __m512 bv[NP];
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) bv[q] = _mm512_loadu_ps(b + q * panel_stride + k * kNR);
#pragma GCC unroll 8
    for (int i = 0; i < kMR; ++i) {
      const __m512 x = _mm512_set1_ps(ar[i][off]);
#pragma GCC unroll 4
      for (int q = 0; q < NP; ++q) acc[i][q] = _mm512_fmadd_ps(x, bv[q], acc[i][q]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kMR; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      float* ci = c + i * ldc + q * kNR;
      _mm512_storeu_ps(ci, accumulate ? _mm512_add_ps(acc[i][q], _mm512_loadu_ps(ci)) : acc[i][q]);
    }
}

__attribute__((target("avx512f"))) void tile_avx512(int64_t m, int64_t panels, int64_t kc, const float* a,
                                                    int64_t rs_a, int64_t cs_a, const float* b, int64_t panel_stride,
                                                    float* c, int64_t ldc, bool accumulate) {
  // Groups of 4 panels (then 2, then 1), group-outer: the group's B (kc x 64 floats) stays in L1 while the
  // 6-row blocks of A stream past it.
  int64_t p = 0;
  for (; p + 4 <= panels; p += 4)
    for (int64_t i = 0; i < m; i += kMR)
      micro_zmm<4>(kc, a + i * rs_a, rs_a, cs_a, b + p * panel_stride, panel_stride, c + i * ldc + p * kNR, ldc,
                   accumulate);
  if (p + 2 <= panels) {
    for (int64_t i = 0; i < m; i += kMR)
      micro_zmm<2>(kc, a + i * rs_a, rs_a, cs_a, b + p * panel_stride, panel_stride, c + i * ldc + p * kNR, ldc,
                   accumulate);
    p += 2;
  }
  if (p < panels)
    for (int64_t i = 0; i < m; i += kMR)
      micro_zmm<1>(kc, a + i * rs_a, rs_a, cs_a, b + p * panel_stride, panel_stride, c + i * ldc + p * kNR, ldc,
                   accumulate);
}

bool cpu_has_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
bool cpu_has_avx2_fma() { return false; }
bool cpu_has_avx512f() { return false; }
#endif

#ifdef DYNCONV_X86
__attribute__((target("avx2"))) void store_row_stream_avx2(float* dst, const float* src, const float* bias, int64_t n,
                                                           int act) {
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.0f);
  for (int64_t j = 0; j < n; j += 8) {
    __m256 v = _mm256_loadu_ps(src + j);
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    // maxps/minps return their second operand when either is NaN: v second keeps a NaN, as the scalar
    // epilogue's std::max(v, 0) / std::min(v, 6) do.
    if (act != 0) v = _mm256_max_ps(zero, v);
    if (act == 2) v = _mm256_min_ps(six, v);
    _mm256_stream_ps(dst + j, v);
  }
}
__attribute__((target("avx2"))) void zero_stream_avx2(float* dst, int64_t n) {
  const __m256 z = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) _mm256_stream_ps(dst + j, z);
}
#endif

}  // namespace

bool store_row_stream(float* dst, const float* src, const float* bias, int64_t n, int act) {
#ifdef DYNCONV_X86
  if (cpu_has_avx2_fma() && (reinterpret_cast<uintptr_t>(dst) & 31) == 0 && n % 8 == 0) {
    store_row_stream_avx2(dst, src, bias, n, act);
    return true;
  }
#endif
  return false;
}

bool zero_stream(float* dst, int64_t n) {
#ifdef DYNCONV_X86
  if (cpu_has_avx2_fma() && (reinterpret_cast<uintptr_t>(dst) & 31) == 0 && n % 8 == 0) {
    zero_stream_avx2(dst, n);
    return true;
  }
#endif
  return false;
}

void stream_fence() {
#ifdef DYNCONV_X86
  _mm_sfence();
#endif
}

bool tile_gemm_uses_avx2() { return cpu_has_avx2_fma(); }

bool tile_gemm_uses_avx512() {
  if (!cpu_has_avx512f()) return false;
  const char* v = std::getenv("DYNCONV_EXT_AVX512");
  return !(v && v[0] == '0');
}

// The fused-store blocks (float, AVX2 only: callers check tile_gemm_uses_avx2()): the strided form reads row i of
// tap t at taps[t] + i * step, the table form at rows[t * MR + i].
#ifdef DYNCONV_X86
#define DYNCONV_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DYNCONV_TARGET_AVX2
#endif
DYNCONV_TARGET_AVX2 void conv_block_8x8_store_strided(int64_t ntaps, int64_t cg, const float* const* taps,
                                                      int64_t step, const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  block8_store_impl(ntaps, cg, [taps, step](int64_t t, int64_t i) { return taps[t] + i * step; }, b, st);
#endif
}

DYNCONV_TARGET_AVX2 void conv_block_8x8_store_table(int64_t ntaps, int64_t cg, const float* const* rows,
                                                    const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  block8_store_impl(ntaps, cg, [rows](int64_t t, int64_t i) { return rows[t * kMR8 + i]; }, b, st);
#endif
}

DYNCONV_TARGET_AVX2 void conv_block_6x16_store_strided(int64_t ntaps, int64_t cg, const float* const* taps,
                                                       int64_t step, const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  block16_store_impl(ntaps, cg, [taps, step](int64_t t, int64_t i) { return taps[t] + i * step; }, b, st);
#endif
}

DYNCONV_TARGET_AVX2 void conv_block_6x16_store_table(int64_t ntaps, int64_t cg, const float* const* rows,
                                                     const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  block16_store_impl(ntaps, cg, [rows](int64_t t, int64_t i) { return rows[t * kMR + i]; }, b, st);
#endif
}
#undef DYNCONV_TARGET_AVX2

// The AVX-512 fused-store blocks (float; callers check tile_gemm_uses_avx512()).
#ifdef DYNCONV_X86
#define DYNCONV_TARGET_AVX512 __attribute__((target("avx512f")))
#else
#define DYNCONV_TARGET_AVX512
#endif
DYNCONV_TARGET_AVX512 void conv_block_8x16z_store_strided(int64_t ntaps, int64_t cg, const float* const* taps,
                                                          int64_t step, const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  zmm_store_impl<8, 1>(ntaps, cg, [taps, step](int64_t t, int64_t i) { return taps[t] + i * step; }, b, st);
#endif
}
DYNCONV_TARGET_AVX512 void conv_block_8x16z_store_table(int64_t ntaps, int64_t cg, const float* const* rows,
                                                        const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  zmm_store_impl<8, 1>(ntaps, cg, [rows](int64_t t, int64_t i) { return rows[t * 8 + i]; }, b, st);
#endif
}
DYNCONV_TARGET_AVX512 void conv_block_8x32z_store_strided(int64_t ntaps, int64_t cg, const float* const* taps,
                                                          int64_t step, const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  zmm_store_impl<8, 2>(ntaps, cg, [taps, step](int64_t t, int64_t i) { return taps[t] + i * step; }, b, st);
#endif
}
DYNCONV_TARGET_AVX512 void conv_block_8x32z_store_table(int64_t ntaps, int64_t cg, const float* const* rows,
                                                        const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  zmm_store_table<8, 2>(ntaps, cg, rows, b, st);
#endif
}
DYNCONV_TARGET_AVX512 void conv_block_6x64z_store_table(int64_t ntaps, int64_t cg, const float* const* rows,
                                                        const float* b, const RowStore& st) {
#ifdef DYNCONV_X86
  zmm_store_table<6, 4>(ntaps, cg, rows, b, st);
#endif
}
#undef DYNCONV_TARGET_AVX512

template <>
void tile_gemm<float>(int64_t m, int64_t panels, int64_t kc, const float* a, int64_t rs_a, int64_t cs_a,
                      const float* b, int64_t panel_stride, float* c, int64_t ldc, bool accumulate) {
#ifdef DYNCONV_X86
  if (tile_gemm_uses_avx512()) {
    tile_avx512(m, panels, kc, a, rs_a, cs_a, b, panel_stride, c, ldc, accumulate);
    return;
  }
  if (cpu_has_avx2_fma()) {
    tile_avx2(m, panels, kc, a, rs_a, cs_a, b, panel_stride, c, ldc, accumulate);
    return;
  }
#endif
  tile_generic<float>(m, panels, kc, a, rs_a, cs_a, b, panel_stride, c, ldc, accumulate);
}

template <>
void tile_gemm<double>(int64_t m, int64_t panels, int64_t kc, const double* a, int64_t rs_a, int64_t cs_a,
                       const double* b, int64_t panel_stride, double* c, int64_t ldc, bool accumulate) {
  tile_generic<double>(m, panels, kc, a, rs_a, cs_a, b, panel_stride, c, ldc, accumulate);
}

template <>
void conv_block_6x16<float>(int64_t ntaps, int64_t cg, const float* const* rows, const float* b, float* c,
                            int64_t ldc, bool accumulate) {
#ifdef DYNCONV_X86
  if (cpu_has_avx2_fma()) {
    conv_block_avx2(ntaps, cg, rows, b, c, ldc, accumulate);
    return;
  }
#endif
  conv_block_generic<float, kMR, kNR>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_6x16<double>(int64_t ntaps, int64_t cg, const double* const* rows, const double* b, double* c,
                             int64_t ldc, bool accumulate) {
  conv_block_generic<double, kMR, kNR>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_8x8<float>(int64_t ntaps, int64_t cg, const float* const* rows, const float* b, float* c,
                           int64_t ldc, bool accumulate) {
#ifdef DYNCONV_X86
  if (cpu_has_avx2_fma()) {
    conv_block_8x8_avx2(ntaps, cg, rows, b, c, ldc, accumulate);
    return;
  }
#endif
  conv_block_generic<float, kMR8, kNR8>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_8x8<double>(int64_t ntaps, int64_t cg, const double* const* rows, const double* b, double* c,
                            int64_t ldc, bool accumulate) {
  conv_block_generic<double, kMR8, kNR8>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_8x32<float>(int64_t ntaps, int64_t cg, const float* const* rows, const float* b, float* c,
                            int64_t ldc, bool accumulate, bool prefetch_b) {
#ifdef DYNCONV_X86
  if (cpu_has_avx512f()) {
    conv_block_zmm_pf<kMR32, kNR32 / 16>(ntaps, cg, rows, b, c, ldc, accumulate, prefetch_b);
    return;
  }
#endif
  conv_block_generic<float, kMR32, kNR32>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_8x32<double>(int64_t ntaps, int64_t cg, const double* const* rows, const double* b, double* c,
                             int64_t ldc, bool accumulate, bool /*prefetch_b*/) {
  conv_block_generic<double, kMR32, kNR32>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_8x16z<float>(int64_t ntaps, int64_t cg, const float* const* rows, const float* b, float* c,
                             int64_t ldc, bool accumulate) {
#ifdef DYNCONV_X86
  if (cpu_has_avx512f()) {
    conv_block_zmm<kMR16z, 1>(ntaps, cg, rows, b, c, ldc, accumulate);
    return;
  }
#endif
  conv_block_generic<float, kMR16z, kNR16z>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_8x16z<double>(int64_t ntaps, int64_t cg, const double* const* rows, const double* b, double* c,
                              int64_t ldc, bool accumulate) {
  conv_block_generic<double, kMR16z, kNR16z>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_6x64<float>(int64_t ntaps, int64_t cg, const float* const* rows, const float* b, float* c,
                            int64_t ldc, bool accumulate, bool prefetch_b) {
#ifdef DYNCONV_X86
  if (cpu_has_avx512f()) {
    conv_block_zmm_pf<kMR64, kNR64 / 16>(ntaps, cg, rows, b, c, ldc, accumulate, prefetch_b);
    return;
  }
#endif
  conv_block_generic<float, kMR64, kNR64>(ntaps, cg, rows, b, c, ldc, accumulate);
}

template <>
void conv_block_6x64<double>(int64_t ntaps, int64_t cg, const double* const* rows, const double* b, double* c,
                             int64_t ldc, bool accumulate, bool /*prefetch_b*/) {
  conv_block_generic<double, kMR64, kNR64>(ntaps, cg, rows, b, c, ldc, accumulate);
}

}  // namespace dynconv::cpu

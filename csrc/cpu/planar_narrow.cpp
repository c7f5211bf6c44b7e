#include "planar_narrow.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "tile_gemm.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DYNCONV_PLANAR_X86 1
#endif

namespace dynconv::cpu {

namespace {
constexpr int64_t kLanes = 16;
}

bool planar_narrow_supported(const ConvShape& s, int64_t xsW) {
#ifdef DYNCONV_PLANAR_X86
  // The gathers index one input row in int32.
  const int64_t reach = (s.W + s.KW + 2 * kLanes) * s.SW + s.PW;
  if (reach * xsW >= (int64_t(1) << 31)) return false;
  return s.G == 1 && s.Co >= 1 && s.Co <= kPlanarMaxCo && s.DH == 1 && s.DW == 1 && tile_gemm_uses_avx512() &&
         __builtin_cpu_supports("avx512vl");
#else
  (void)s, (void)xsW;
  return false;
#endif
}

#ifdef DYNCONV_PLANAR_X86
namespace {

// One thread's staged input rows. Row slot r holds, for input channel c and column phase p (p < SW), the padded
// input columns q = j * SW + p (q - PW the input column; zero outside the input) at plane(r, c, p)[j], j < len.
struct StagedRows {
  int64_t C, SW, len;
  std::vector<float> buf;  // slots x C x SW x len, zero where a column falls outside the input (written once)
  std::vector<int64_t> img, row;

  StagedRows(const ConvShape& s, int64_t len_)
      : C(s.C), SW(s.SW), len(len_), buf(static_cast<size_t>(s.KH * s.C * s.SW * len_ + kLanes), 0.0f),
        img(static_cast<size_t>(s.KH), -1), row(static_cast<size_t>(s.KH), -1) {}
  float* slot(int64_t r) { return buf.data() + r * C * SW * len; }
};

// Copies input row hi of image n into its slot (hi % KH: an output row's KH input rows are consecutive, so they
// never share a slot) unless the slot holds it already, and returns the slot. 16 staged columns of a channel are
// one masked gather (a scalar copy cost as much as the arithmetic); lanes outside the input are written as zero.
__attribute__((target("avx512f"))) const float* stage_row(const ConvShape& s, StagedRows& st, const float* x,
                                                          int64_t xsN, int64_t xsH, int64_t xsW, int64_t n,
                                                          int64_t hi) {
  const int64_t r = hi % s.KH;
  float* d = st.slot(r);
  if (st.img[r] == n && st.row[r] == hi) return d;
  st.img[r] = n;
  st.row[r] = hi;
  const float* src = x + n * xsN + hi * xsH;
  const int64_t plane = s.SW * st.len;  // floats per channel
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i lane_step = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(s.SW * xsW)));
  for (int64_t p = 0; p < s.SW; ++p) {
    for (int64_t j0 = 0; j0 < st.len; j0 += kLanes) {
      // Lane i: padded column q = (j0 + i) * SW + p, input column w = q - PW; in the input for w in [0, W).
      const int64_t w0 = j0 * s.SW + p - s.PW;
      const int64_t lo = w0 >= 0 ? 0 : ceil_div(-w0, s.SW);                         // first lane with w >= 0
      const int64_t hi_l = s.W - w0 <= 0 ? 0 : std::min<int64_t>(kLanes, ceil_div(s.W - w0, s.SW));  // w < W
      if (lo >= hi_l) continue;  // all padding: still zero
      const __mmask16 m = static_cast<__mmask16>(((1u << hi_l) - 1) & ~((1u << lo) - 1));
      const __m512i idx = _mm512_add_epi32(lane_step, _mm512_set1_epi32(static_cast<int>(w0 * xsW)));
      float* dp = d + p * st.len + j0;
      for (int64_t c = 0; c < s.C; ++c)
        _mm512_storeu_ps(dp + c * plane, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, src + c, 4));
    }
  }
  return d;
}

// acc[co][v] = sum over taps t = kh*KW + kw and channels c of wk[(t*C + c)*CO + co] (pack_weight_panels' layout for
// one CO-wide panel) * the NV pixel vectors that output pixels w0 .. w0 + 16*NV - 1 read:
// rows[kh] + c*plane + w0 + kw_off[kw], kw_off[kw] = (kw % SW)*len + kw / SW.
template <int CO, int NV>
__attribute__((target("avx512f"), always_inline)) inline void planar_accumulate(
    const ConvShape& s, const float* const* rows, int64_t plane, const int64_t* kw_off, int64_t w0,
    const float* wk, __m512 (&acc)[CO][NV]) {
#pragma GCC unroll 8
  for (int co = 0; co < CO; ++co)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[co][v] = _mm512_setzero_ps();
  for (int64_t kh = 0; kh < s.KH; ++kh) {
    for (int64_t kw = 0; kw < s.KW; ++kw) {
      const float* r = rows[kh] + w0 + kw_off[kw];
      for (int64_t c = 0; c < s.C; ++c, wk += CO) {
        const float* src = r + c * plane;
        __m512 xv[NV];
#pragma GCC unroll 2
        for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(src + v * kLanes);
#pragma GCC unroll 8
        for (int co = 0; co < CO; ++co) {
          const __m512 wv = _mm512_set1_ps(wk[co]);
#pragma GCC unroll 2
          for (int v = 0; v < NV; ++v) acc[co][v] = _mm512_fmadd_ps(wv, xv[v], acc[co][v]);
        }
      }
    }
  }
}

// Transposes 8 channel rows of 8 pixels (r[k] lane i: channel k, pixel i) into 8 pixel rows (lane k: channel k).
__attribute__((target("avx2"), always_inline)) inline void transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20); r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20); r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31); r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31); r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// One block of nvalid <= 16*NV output pixels of output row `orow` (pixel wo at orow + wo*osW), starting at w0.
// The epilogue turns each 8-pixel half of the accumulators into 8 pixel vectors of CO channels (an in-register
// transpose) and stores each with one masked store: a scatter per accumulator cost 16 store uops for 16 pixels,
// each on another output cache line, and was most of the block's time.
template <int CO, int NV>
__attribute__((target("avx512f,avx512vl"))) void planar_block(const ConvShape& s, const float* const* rows,
                                                               int64_t plane, const int64_t* kw_off, int64_t w0,
                                                               int64_t nvalid, const float* wk, const float* bias,
                                                               float* orow, int64_t osW, int act) {
  __m512 acc[CO][NV];
  planar_accumulate<CO, NV>(s, rows, plane, kw_off, w0, wk, acc);
#pragma GCC unroll 8
  for (int co = 0; co < CO; ++co)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[co][v] = _mm512_add_ps(acc[co][v], _mm512_set1_ps(bias ? bias[co] : 0.0f));
  const __mmask8 m = static_cast<__mmask8>((1u << CO) - 1);
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.0f);
  float* d = orow + w0 * osW;
#pragma GCC unroll 4
  for (int h = 0; h < 2 * NV; ++h) {
    const int64_t i0 = h * 8;
    if (i0 >= nvalid) break;
    __m256 r[8];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      if (k >= CO) {
        r[k] = zero;
      } else {
        const __m512 a = acc[k][h / 2];
        r[k] = h % 2 == 0 ? _mm512_castps512_ps256(a)
                          : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
      }
    }
    transpose8(r);
    const int64_t n = std::min<int64_t>(8, nvalid - i0);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      if (i >= n) break;
      float* di = d + (i0 + i) * osW;
      __m256 y = r[i];
      if (act != 0) y = _mm256_max_ps(zero, y);  // (a NaN stays: max/min return the second operand)
      if (act == 2) y = _mm256_min_ps(six, y);
      _mm256_mask_storeu_ps(di, m, y);
    }
  }
}

template <int CO>
void planar_rows(const ConvShape& s, const float* x, int64_t xsN, int64_t xsH, int64_t xsW, const float* wk,
                 const float* bias, float* out, int64_t osN, int64_t osH, int64_t osW, int act, bool prefetch) {
  // Staged columns per phase: the last block's vector reads reach j = ceil16(Wo) - 1 + (KW - 1) / SW.
  const int64_t len = ceil_div(ceil_div(s.Wo, kLanes) * kLanes + (s.KW - 1) / s.SW, kLanes) * kLanes;
  const int64_t plane = s.SW * len;
  std::vector<int64_t> kw_off(static_cast<size_t>(s.KW));
  for (int64_t kw = 0; kw < s.KW; ++kw) kw_off[kw] = (kw % s.SW) * len + kw / s.SW;
  const int64_t rows_total = s.N * s.Ho;
  const std::vector<float> zero_row(static_cast<size_t>(s.C * plane + kLanes), 0.0f);
  // Contiguous runs of output rows per thread, so consecutive rows reuse KH - SH of their staged input rows.
  const int64_t grain = std::max<int64_t>(1, ceil_div(rows_total, 4 * std::max(at::get_num_threads(), 1)));
  at::parallel_for(0, rows_total, grain, [&](int64_t b, int64_t e) {
    StagedRows st(s, len);
    std::vector<const float*> rows(static_cast<size_t>(s.KH));
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / s.Ho, ho = nh % s.Ho, hi0 = ho * s.SH - s.PH;
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t hi = hi0 + kh;
        rows[kh] = hi < 0 || hi >= s.H ? zero_row.data() : stage_row(s, st, x, xsN, xsH, xsW, n, hi);
      }
      float* orow = out + n * osN + ho * osH;
      if (prefetch && nh + 1 < e) {
        const int64_t n1 = (nh + 1) / s.Ho, ho1 = (nh + 1) % s.Ho, r0 = ho1 * s.SH - s.PH;
        // The input rows the next output row stages and this one does not: the gathers wait on every line they
        // touch (one 16-pixel gather at stride 2 spans 12 lines of a 6-channel row), the prefetcher does not.
        for (int64_t r = std::max(r0, r0 + s.KH - s.SH); r < r0 + s.KH; ++r) {
          if (r < 0 || r >= s.H) continue;
          const char* row = reinterpret_cast<const char*>(x + n1 * xsN + r * xsH);
          const int64_t bytes = ((s.W - 1) * xsW + s.C) * static_cast<int64_t>(sizeof(float));
          for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(row + o);
        }
        // A channel slice of a wider buffer: a few channels per output cache line, each store a read for
        // ownership. The next row's lines, for writing, while this row computes (as the fused path does).
        if (osW > s.Co) {
          const float* next = out + n1 * osN + ho1 * osH;
          for (int64_t wo = 0; wo < s.Wo; ++wo) __builtin_prefetch(next + wo * osW, 1);
        }
      }
      int64_t w0 = 0;
      for (; w0 + 2 * kLanes <= s.Wo; w0 += 2 * kLanes)
        planar_block<CO, 2>(s, rows.data(), plane, kw_off.data(), w0, 2 * kLanes, wk, bias, orow, osW, act);
      for (; w0 < s.Wo; w0 += kLanes)
        planar_block<CO, 1>(s, rows.data(), plane, kw_off.data(), w0, std::min(kLanes, s.Wo - w0), wk, bias, orow, osW,
                            act);
    }
  });
}

}  // namespace

void forward_planar_narrow(const ConvShape& s, const float* x, int64_t xsN, int64_t xsH, int64_t xsW,
                           const float* wk, const float* bias, float* out, int64_t osN, int64_t osH, int64_t osW,
                           int act, bool prefetch) {
  switch (s.Co) {
#define DYNCONV_PLANAR_CASE(n) \
  case n:                      \
    return planar_rows<n>(s, x, xsN, xsH, xsW, wk, bias, out, osN, osH, osW, act, prefetch);
    DYNCONV_PLANAR_CASE(1) DYNCONV_PLANAR_CASE(2) DYNCONV_PLANAR_CASE(3) DYNCONV_PLANAR_CASE(4)
    DYNCONV_PLANAR_CASE(5) DYNCONV_PLANAR_CASE(6) DYNCONV_PLANAR_CASE(7) DYNCONV_PLANAR_CASE(8)
#undef DYNCONV_PLANAR_CASE
    default:
      TORCH_CHECK(false, "forward_planar_narrow: ", s.Co, " output channels (at most ", kPlanarMaxCo, ")");
  }
}
#else
void forward_planar_narrow(const ConvShape&, const float*, int64_t, int64_t, int64_t, const float*, const float*,
                           float*, int64_t, int64_t, int64_t, int, bool) {
  TORCH_CHECK(false, "forward_planar_narrow: needs an x86-64 CPU with AVX-512");
}
#endif

}  // namespace dynconv::cpu

// The forward machinery shared by the CPU ops that compute a convolution at a list of output rows
// (masked_conv2d: the active pixels; conv2d_into: every pixel, written into a channel slice of a wider buffer):
// weight packing, output/input views, the implicit-GEMM driver and the depthwise path.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../conv_shape.h"
#include "active_rows.h"
#include "tile_gemm.h"
#include "packed_weights.h"
#include "planar_narrow.h"

namespace dynconv::cpu {


// The fused epilogue activation: 0 none, 1 ReLU, 2 ReLU6.
template <typename T>
inline T apply_act(T v, int act) {
  if (act == 0) return v;
  v = std::max(v, T(0));
  return act == 2 ? std::min(v, T(6)) : v;
}

struct PixelCoord {
  int64_t n, ho, wo;
};
inline PixelCoord coord(const ConvShape& s, int64_t p) {
  const int64_t hw = s.Ho * s.Wo;
  const int64_t n = p / hw, r = p - n * hw;
  return {n, r / s.Wo, r % s.Wo};
}

// Packs the weights of every group into nr-column panels (16; 8 for the narrow block; 32 or 64 for the AVX-512 ones):
//   packed[((g * panels + p) * K + k) * nr + j] = weight[g*Cog + p*nr + j, c, kh, kw], k = (kh*KW + kw)*Cg + c.
// A tensor, not a vector: the CPU allocator aligns to 64 bytes, so a 16-float panel row is one cache line
// (an 8-float row half of one) and B loads never split lines. Read straight from the [Co, Cg, KH, KW] weight (no permuted copy), one
// (panel, tap) slab per work item so both threads share the packing: it runs on every call.
template <typename T>
at::Tensor pack_weight_panels(const ConvShape& s, const at::Tensor& weight, int64_t nr = kNR) {
  const at::Tensor w = weight.contiguous();
  const T* wp = w.data_ptr<T>();
  const int64_t K = s.k_per_group(), panels = ceil_div(s.Cog, nr), taps = s.taps();
  at::Tensor packed = at::empty({s.G * panels * K * nr}, weight.options());
  T* pk = packed.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 8192 / (s.Cg * nr));
  at::parallel_for(0, s.G * panels * taps, grain, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t gp = item / taps, t = item % taps, g = gp / panels, p = gp % panels;
      const int64_t nvalid = std::min(nr, s.Cog - p * nr);
      T* dst = pk + (gp * K + t * s.Cg) * nr;
      const T* src = wp + (g * s.Cog + p * nr) * s.Cg * taps + t;  // filter j, channel c: src[(j*Cg + c)*taps]
      for (int64_t c = 0; c < s.Cg; ++c) {
        T* d = dst + c * nr;
        for (int64_t j = 0; j < nvalid; ++j) d[j] = src[(j * s.Cg + c) * taps];
        for (int64_t j = nvalid; j < nr; ++j) d[j] = T(0);
      }
    }
  });
  return packed;
}

struct OutView {
  int64_t sN, sC, sH, sW;
};
inline OutView out_view(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Where pixel (n, h, w) of a channels-last-strided input starts: x + n*sN + h*sH + w*sW, channels contiguous.
// A contiguous channels-last tensor has sW = C; a channel slice of a wider channels-last buffer (the filled
// prefix of a concat buffer) has sW = the buffer's channel count and is read in place.
struct InView {
  int64_t sN, sH, sW;
};
inline InView contiguous_in_view(const ConvShape& s) { return {s.H * s.W * s.C, s.W * s.C, s.C}; }
// True when `t` can be read through an InView as it is (channel stride 1, uniform pixel strides).
inline bool readable_in_place(const at::Tensor& t) {
  return t.dim() == 4 && t.stride(1) == 1 && t.stride(3) >= t.size(1) && t.stride(2) == t.size(3) * t.stride(3) &&
         t.stride(0) >= t.size(2) * t.stride(2);
}
inline InView in_view(const at::Tensor& t) { return {t.stride(0), t.stride(2), t.stride(3)}; }

// Zeroes the inactive output pixels of image rows [nh_begin, nh_end) (an image row = one (n, ho)).
// Called inside the compute region, one proportional slice per chunk, so no extra parallel region.
template <typename T>
void zero_inactive(const ConvShape& s, const bool* mask, int64_t nh_begin, int64_t nh_end, T* out, const OutView& ov) {
  std::vector<uint8_t> active(static_cast<size_t>(s.Wo));  // this image row's mask, one entry per pixel
  for (int64_t nh = nh_begin; nh < nh_end; ++nh) {
    const int64_t n = nh / s.Ho, ho = nh % s.Ho;
    const bool* mrow = mask + (n * s.Hm + ho / s.block) * s.Wm;
    expand_mask_row(s, mrow, active.data());
    T* base = out + n * ov.sN + ho * ov.sH;
    for (int64_t wo = 0; wo < s.Wo;) {
      if (active[wo]) { ++wo; continue; }
      int64_t end = wo + 1;
      while (end < s.Wo && !active[end]) ++end;
      if (ov.sC == 1 && ov.sW == s.Co) {
        std::memset(base + wo * ov.sW, 0, (end - wo) * s.Co * sizeof(T));  // a run of whole pixels
      } else {
        for (int64_t w = wo; w < end; ++w)
          for (int64_t co = 0; co < s.Co; ++co) base[w * ov.sW + co * ov.sC] = T(0);
      }
      wo = end;
    }
  }
}

// Guided self-scheduling over [0, n): a thread claims max(2, remaining / (2 * workers)) items at a time, so
// big chunks early and small ones at the end leave no thread waiting long for a slower one (a shared VM
// core, a denser stretch of the mask). Returns false when nothing is left.
inline bool claim_chunk(std::atomic<int64_t>& next, int64_t n, int64_t workers, int64_t& begin, int64_t& end) {
  int64_t b = next.load(std::memory_order_relaxed), c = 0;
  do {
    if (b >= n) return false;
    c = std::max<int64_t>(2, (n - b) / (2 * std::max<int64_t>(workers, 1)));
  } while (!next.compare_exchange_weak(b, b + c, std::memory_order_relaxed));
  begin = b;
  end = std::min(n, b + c);
  return true;
}

// The slice of image rows a chunk [b, e) of n work items zeroes: proportional, so slices tile [0, N*Ho).
inline std::pair<int64_t, int64_t> zero_slice(const ConvShape& s, int64_t b, int64_t e, int64_t n) {
  const int64_t rows = s.N * s.Ho;
  return {b * rows / n, e * rows / n};
}

// Implicit GEMM. A macro block of kBlocksPerMacro x kMR active rows reads the input in place through
// per-tap row pointers (no im2row copy). Each 6-row block runs the microkernel once per 16-column weight
// panel over the full reduction (all taps), so the result leaves the registers once and goes straight
// to the rows' output pixels with the bias (and residual) added. The panel streams from L2 (36 KiB at
// 64 channels, 3x3): the hardware prefetcher keeps up, and this measured 1-3 % faster than splitting the
// taps into L1-sized chunks with partial sums (64/128/256 channels, 3x3, batch 8, densities 0.25 and 0.5,
// 2-core AVX2 machine); 3 blocks per macro block measured as fast as 2 or 4.
// `rows` lists the M output pixels to compute (flat, raster order); nullptr means all of them, 0..M-1 (a dense
// conv such as conv2d_into: no index map to build or read).
constexpr int64_t kBlocksPerMacro = 3;
// Outputs at least this large are written with streaming stores (see forward_gemm_blocked).
constexpr int64_t kStreamOutputBytes = int64_t(4) << 20;
// A kernel switch that is on unless the environment variable `name` starts with '0'. Read on every call (a
// getenv is ~0.1 us), so one process can time both settings interleaved (python/tools/*_ab.py).
inline bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  return !(v && v[0] == '0');
}
// DYNCONV_EXT_STREAM_STORES=0 turns them off (python/tools/stream_stores_ab.py).
inline bool stream_stores_enabled() { return env_switch_on("DYNCONV_EXT_STREAM_STORES"); }

// Per-tap displacements of the kernel window, so the hot loops do no division by runtime sizes, and the row a
// padding tap reads.
template <typename T>
struct TapTable {
  std::vector<int64_t> dh, dw, off;  // tap t: rows and columns from the window's corner; its input offset
  std::vector<T> zeros;              // what a tap in the padding reads: Cg zeros, shared read-only by all threads
  int64_t span_h, span_w;            // the window's extent minus one
  TapTable(const ConvShape& s, const InView& iv)
      : dh(s.taps()), dw(s.taps()), off(s.taps()), zeros(static_cast<size_t>(s.Cg), T(0)),
        span_h((s.KH - 1) * s.DH), span_w((s.KW - 1) * s.DW) {
    for (int64_t t = 0; t < s.taps(); ++t) {
      dh[t] = (t / s.KW) * s.DH;
      dw[t] = (t % s.KW) * s.DW;
      off[t] = dh[t] * iv.sH + dw[t] * iv.sW;
    }
  }
  const T* zero_row() const { return zeros.data(); }
  // True when every tap of the window with corner (hi0, wi0) lies inside the input.
  bool inside(const ConvShape& s, int64_t hi0, int64_t wi0) const {
    return hi0 >= 0 && hi0 + span_h < s.H && wi0 >= 0 && wi0 + span_w < s.W;
  }
  // Where tap t of that window reads; `corner` is the (possibly out-of-range) address of input pixel (hi0, wi0).
  const T* tap(const ConvShape& s, const T* corner, int64_t hi0, int64_t wi0, int64_t t) const {
    const int64_t hi = hi0 + dh[t], wi = wi0 + dw[t];
    return (hi >= 0 && hi < s.H && wi >= 0 && wi < s.W) ? corner + off[t] : zero_row();
  }
};


// The register block: 6 rows x 16 channels, or 8 x 8 when a group has at most 8 output channels.
// kPrefetchInputs: whether the driver software-prefetches the next macro block's scattered input rows. On for the
// AVX2 blocks (measured to help on the AMD Zen 3 dev VM); off for the AVX-512 ones, where on the AVX-512 Xeon
// the hardware prefetcher kept up and the prefetch instructions cost more than they saved: off/on 0.95-0.99 at
// densities 0.1-0.5 on 3x3 64ch 56x56 and 128ch 28x28 batch 8, two interleaved runs of 21 rounds each.
struct Block6x16 {
  static constexpr int64_t MR = kMR, NR = kNR;
  static constexpr bool kPrefetchInputs = true;
  template <typename T>
  static void run(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool acc,
                  bool /*pf*/) {
    conv_block_6x16<T>(ntaps, cg, rows, b, c, ldc, acc);
  }
};
struct Block8x8 {
  static constexpr int64_t MR = kMR8, NR = kNR8;
  static constexpr bool kPrefetchInputs = true;
  template <typename T>
  static void run(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool acc,
                  bool /*pf*/) {
    conv_block_8x8<T>(ntaps, cg, rows, b, c, ldc, acc);
  }
};

struct Block8x32 {
  static constexpr int64_t MR = kMR32, NR = kNR32;
  static constexpr bool kPrefetchInputs = false;
  template <typename T>
  static void run(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool acc,
                  bool pf) {
    conv_block_8x32<T>(ntaps, cg, rows, b, c, ldc, acc, pf);
  }
};

struct Block8x16z {
  static constexpr int64_t MR = kMR16z, NR = kNR16z;
  static constexpr bool kPrefetchInputs = false;
  template <typename T>
  static void run(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool acc,
                  bool /*pf*/) {
    conv_block_8x16z<T>(ntaps, cg, rows, b, c, ldc, acc);
  }
};

struct Block6x64 {
  static constexpr int64_t MR = kMR64, NR = kNR64;
  static constexpr bool kPrefetchInputs = false;
  template <typename T>
  static void run(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool acc,
                  bool pf) {
    conv_block_6x64<T>(ntaps, cg, rows, b, c, ldc, acc, pf);
  }
};

// The AVX-512 blocks' fused-store forms (tile_gemm.h): the masked conv's rows leave the registers straight into their
// output pixels with bias, residual and activation (streaming stores where the C-tile path would use them),
// instead of a C tile and an epilogue pass per row. DYNCONV_EXT_FUSED_EPILOGUE=0 (read per call) turns it off.
template <typename T, typename Blk>
struct FusedEpilogue {
  static constexpr bool kAvailable = false;
};
template <>
struct FusedEpilogue<float, Block6x64> {
  static constexpr bool kAvailable = true;
  static void store(int64_t ntaps, int64_t cg, const float* const* rows, const float* b, const RowStore& st) {
    conv_block_6x64z_store_table(ntaps, cg, rows, b, st);
  }
};
template <>
struct FusedEpilogue<float, Block8x16z> {
  static constexpr bool kAvailable = true;
  static void store(int64_t ntaps, int64_t cg, const float* const* rows, const float* b, const RowStore& st) {
    conv_block_8x16z_store_table(ntaps, cg, rows, b, st);
  }
};
template <>
struct FusedEpilogue<float, Block8x32> {
  static constexpr bool kAvailable = true;
  static void store(int64_t ntaps, int64_t cg, const float* const* rows, const float* b, const RowStore& st) {
    conv_block_8x32z_store_table(ntaps, cg, rows, b, st);
  }
};
inline bool fused_epilogue_enabled() { return env_switch_on("DYNCONV_EXT_FUSED_EPILOGUE"); }
// DYNCONV_EXT_SPLIT_PANELS=0 (read per call) keeps few-row convs on one thread per macro block (see forward_gemm_blocked).
inline bool split_panels_enabled() { return env_switch_on("DYNCONV_EXT_SPLIT_PANELS"); }

constexpr int64_t kL1Bytes = 48 << 10;
inline bool weight_prefetch_enabled() { return env_switch_on("DYNCONV_EXT_WEIGHT_PREFETCH"); }

template <typename T, typename Blk>
void forward_gemm_blocked(const ConvShape& s, const T* x, const InView& iv, const at::Tensor& weight, const T* bias,
                  const int64_t* rows, int64_t M, T* out, const OutView& ov, bool add, int act,
                  const bool* zero_mask) {
  const bool relu = act != 0;
  constexpr int64_t MR = Blk::MR, NR = Blk::NR;
  const at::Tensor wpack_t = cached_packing(weight, NR, s.G, /*kind=*/0, [&] { return pack_weight_panels<T>(s, weight, NR); });
  const T* wpack = wpack_t.data_ptr<T>();
  const int64_t K = s.k_per_group(), panels = ceil_div(s.Cog, NR), taps = s.taps(), ldc = panels * NR;
  // Weight panels larger than L1 are software-prefetched by the AVX-512 blocks (tile_gemm.h);
  // DYNCONV_EXT_WEIGHT_PREFETCH=0 (read per call) turns that off.
  const bool prefetch_b = K * NR * static_cast<int64_t>(sizeof(T)) > kL1Bytes && weight_prefetch_enabled();
  const int64_t macro_rows = kBlocksPerMacro * MR, nmacro = ceil_div(M, macro_rows);
  const int64_t per_macro = kBlocksPerMacro * taps * MR;  // row pointers of one macro block: [block][tap][row]
  const TapTable<T> tt(s, iv);
  const int64_t* tap_off = tt.off.data();
  const int64_t hw = s.Ho * s.Wo;
  const T* zp = tt.zero_row();
  // For macro block mb: the input row pointer of tap t of each row (group 0; `zp` for a padding tap; pad
  // rows repeat the last row) and each row's output pixel offset. Pointers, not offsets: with one group
  // the microkernel takes them as they are.
  const auto macro_ptrs = [&](int64_t mb, const T** ptr, int64_t* out_offs) {
    const int64_t r0 = mb * macro_rows, mt = std::min(macro_rows, M - r0);
    // (n, ho, wo) of the previous row: a next pixel on the same image row is a step along it, which saves the
    // two 64-bit divisions per row (with few output channels they cost as much as the row's arithmetic).
    int64_t prev = -2, n = 0, ho = 0, wo = 0;
    for (int64_t r = 0; r < macro_rows; ++r) {
      const int64_t i = r0 + std::min(r, mt - 1);
      const int64_t p = rows ? rows[i] : i;
      // prev >= 0 and p > prev: a later pixel of the same image row (most rows of a mask) needs no division.
      if (prev >= 0 && p > prev && p - prev < s.Wo - wo) {
        wo += p - prev;
      } else if (p != prev) {
        n = p / hw;
        const int64_t rem = p - n * hw;
        ho = rem / s.Wo;
        wo = rem - ho * s.Wo;
      }
      prev = p;
      out_offs[r] = n * ov.sN + ho * ov.sH + wo * ov.sW;
      const int64_t hi0 = ho * s.SH - s.PH, wi0 = wo * s.SW - s.PW;
      const T* base = x + n * iv.sN + hi0 * iv.sH + wi0 * iv.sW;
      const T** o = ptr + (r / MR) * taps * MR + r % MR;
      if (tt.inside(s, hi0, wi0)) {  // interior: no tap in padding
        for (int64_t t = 0; t < taps; ++t) o[t * MR] = base + tap_off[t];
      } else {
        for (int64_t t = 0; t < taps; ++t) o[t * MR] = tt.tap(s, base, hi0, wi0, t);
      }
    }
  };
  const int64_t line = 64 / sizeof(T);
  const bool slice_out = ov.sC == 1 && ov.sW > s.Co;
  // A contiguous channels-last output is raster-ordered pixel after pixel: the inactive pixels between two
  // consecutive active rows are one memset, done as each row is written, so the zero stores overlap the
  // FMA-bound microkernel instead of taking a memory-bound pass of their own.
  const bool contiguous_cl = ov.sC == 1 && ov.sW == s.Co && ov.sH == s.Wo * s.Co && ov.sN == s.Ho * s.Wo * s.Co;
  const bool zero_gaps = zero_mask && rows && contiguous_cl;
  // Streaming stores for outputs far larger than the caches: a row's result (and the zero gaps) is written
  // without first reading the destination lines (scattered rows are not prefetched, so each read-for-ownership
  // miss stalled the epilogue). Whole lines only: a contiguous channels-last output (not a concat slice, which
  // later layers read back soon) whose groups cover whole 64-byte lines.
  // Measured on the 2-core AVX2 machine, 3x3 64ch 56x56 batch 8 (6.4 MB out): 6-16 % faster at densities
  // 0.1-0.5, a gated ResNet-50 reading these outputs unchanged within noise (python/tools/stream_stores_ab.py,
  // benchmarks/results/stream_stores_ab_cpu.md); in one-off runs a following conv was not slower in total
  // (1x1 dense: +1 %, 3x3 masked: -2 %) and 3.2 MB / 1.6 MB outputs (128ch 28x28, 256ch 14x14) gained 0-3 %,
  // hence the 4 MiB floor.
  const bool stream = std::is_same_v<T, float> && tile_gemm_uses_avx2() && !add && contiguous_cl &&
                      s.Cog * sizeof(T) % 64 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0 &&
                      s.out_pixels() * s.Co * static_cast<int64_t>(sizeof(T)) >= kStreamOutputBytes &&
                      stream_stores_enabled();
  // The zero gaps between active rows are written by the fused blocks themselves, a share every 16 reduction steps
  // (zmm_store_impl), so the streaming stores drain while the FMAs run instead of stalling the core in a burst
  // before each macro block. One process, interleaved, 2-core AVX-512 Xeon, batch 8, 4 runs
  // (python python/tools/masked_switch_ab.py --var DYNCONV_EXT_ZERO_IN_KERNEL, zero_in_kernel_ab_cpu_xeon.md):
  // 3x3 64ch 56x56 1.07-1.11x at density 0.1, 1.01-1.04x at 0.25, 0.99-1.00x at 0.5; 1x1 1.03-1.14x; outputs
  // under 4 MiB (no streaming stores) are not affected.
  // DYNCONV_EXT_ZERO_IN_KERNEL=0 (read per call) zeroes them before each macro block instead.
  const bool zero_in_kernel = FusedEpilogue<T, Blk>::kAvailable && zero_gaps && stream &&
                              env_switch_on("DYNCONV_EXT_ZERO_IN_KERNEL");
  constexpr int64_t kMaxKernelGap = 64;  // pixels; longer gaps (and the tail) are zeroed on their own, at once
  const auto zero_pixels = [&](T* p, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      if (stream && zero_stream(p, n)) return;
    }
    std::memset(p, 0, n * sizeof(T));
  };
  // The row pointers of nblk blocks for group g: with several groups, shifted into `shifted` to group g's channels
  // (never the zero row); with one, src itself.
  const auto group_ptrs = [&](const T* const* src, const T** shifted, int64_t nblk, int64_t g) -> const T* const* {
    if (s.G == 1) return src;
    for (int64_t q = 0; q < nblk * taps * MR; ++q) shifted[q] = src[q] == zp ? zp : src[q] + g * s.Cg;
    return shifted;
  };
  // Zeroes the inactive pixels before active row i (and, after the last one, those to the end).
  // The first inactive pixel before active row i, and the inactive pixels after the last row.
  const auto gap_start = [&](int64_t i) { return i == 0 ? int64_t(0) : rows[i - 1] + 1; };
  const auto zero_tail = [&](int64_t i) {
    if (i == M - 1 && rows[i] + 1 < s.out_pixels())
      zero_pixels(out + (rows[i] + 1) * s.Co, (s.out_pixels() - rows[i] - 1) * s.Co);
  };
  const auto zero_gap = [&](int64_t i) {
    const int64_t from = gap_start(i);
    if (rows[i] > from) zero_pixels(out + from * s.Co, (rows[i] - from) * s.Co);
    zero_tail(i);
  };
  // The register-epilogue path: block blk of a macro block (mt rows, output offsets offs, row pointers gptrs of
  // group g) over weight panel p, stored straight into its output pixels.
  // zero_row0 >= 0 (the macro block's first row): the block also zeroes the gaps before its rows (see zero_in_kernel).
  const auto store_block = [&](const T* const* gptrs, const int64_t* offs, int64_t g, int64_t p, int64_t blk,
                               int64_t mt, int64_t zero_row0 = -1) {
    if constexpr (FusedEpilogue<T, Blk>::kAvailable) {
      const int64_t nv = std::min(MR, mt - blk * MR);
      float* pd[MR];
      for (int64_t i = 0; i < nv; ++i) pd[i] = out + offs[blk * MR + i] + g * s.Cog + p * NR;
      const float* bg = bias ? bias + g * s.Cog + p * NR : nullptr;
      RowStore st{pd, nv, std::min(NR, s.Cog - p * NR), bg, act, add};
      st.stream = stream;
      st.prefetch_b = prefetch_b;
      // The zero gaps before this block's rows, written by the block while it computes (panel 0, group 0 only).
      float* zptr[MR];
      int64_t zlen[MR];
      if (zero_row0 >= 0 && zero_in_kernel && p == 0 && g == 0) {
        int nz = 0;
        for (int64_t r = blk * MR; r < blk * MR + nv; ++r) {
          const int64_t i = zero_row0 + r, from = gap_start(i), gap = rows[i] - from;
          if (gap > 0 && gap <= kMaxKernelGap) {
            zptr[nz] = out + from * s.Co;
            zlen[nz++] = gap * s.Co;
          } else if (gap > 0) {
            zero_pixels(out + from * s.Co, gap * s.Co);
          }
          zero_tail(i);
        }
        st.zero_ranges = nz;
        st.zero_ptr = zptr;
        st.zero_len = zlen;
      }
      FusedEpilogue<T, Blk>::store(taps, s.Cg, gptrs + blk * taps * MR, wpack + (g * panels + p) * K * NR, st);
    }
  };
  // (the blocks are the AVX-512 ones only where the CPU has it; a channels-last output)
  const bool fused_epilogue = FusedEpilogue<T, Blk>::kAvailable && tile_gemm_uses_avx512() && ov.sC == 1 &&
                              fused_epilogue_enabled();
  // Few active rows and many weight panels (batch 1 in a deep stage: e.g. 12 active pixels of a 7x7 512-channel
  // 3x3 conv, one macro block, 16 panels of 576 KiB): split the panels across the threads instead of leaving all
  // but one idle while one streams every panel. Only with the register epilogue, where a panel's columns are
  // stored on their own.
  const int64_t threads = at::get_num_threads();
  if constexpr (FusedEpilogue<T, Blk>::kAvailable) {
    if (fused_epilogue && panels > 1 && threads > 1 && nmacro < 2 * threads && split_panels_enabled()) {
      if (zero_mask && !zero_gaps)
        at::parallel_for(0, s.N * s.Ho, 16, [&](int64_t b0, int64_t e0) { zero_inactive<T>(s, zero_mask, b0, e0, out, ov); });
      at::parallel_for(0, nmacro * panels, 1, [&](int64_t b0, int64_t e0) {
        std::vector<const T*> ptrs(static_cast<size_t>(per_macro)), grouped(static_cast<size_t>(s.G > 1 ? per_macro : 0));
        std::vector<int64_t> offs(static_cast<size_t>(macro_rows));
        int64_t have = -1;  // the macro block whose row pointers `ptrs` holds
        for (int64_t item = b0; item < e0; ++item) {
          const int64_t mb = item / panels, p = item % panels;
          if (mb != have) {
            macro_ptrs(mb, ptrs.data(), offs.data());
            have = mb;
          }
          const int64_t r0 = mb * macro_rows, mt = std::min(macro_rows, M - r0), nblk = ceil_div(mt, MR);
          if (zero_gaps && p == 0)
            for (int64_t r = 0; r < mt; ++r) zero_gap(r0 + r);
          for (int64_t g = 0; g < s.G; ++g) {
            const T* const* gp = group_ptrs(ptrs.data(), grouped.data(), nblk, g);
            for (int64_t blk = 0; blk < nblk; ++blk) store_block(gp, offs.data(), g, p, blk, mt);
          }
        }
        if (stream) stream_fence();
      });
      return;
    }
  }
  std::atomic<int64_t> next_macro{0};
  const int64_t workers = std::min<int64_t>(threads, ceil_div(nmacro, 2));
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    std::vector<const T*> cur(static_cast<size_t>(per_macro)), next(static_cast<size_t>(per_macro));
    std::vector<int64_t> out_offs(static_cast<size_t>(macro_rows)), next_out(static_cast<size_t>(macro_rows));
    std::vector<const T*> grouped(static_cast<size_t>(s.G > 1 ? per_macro : 0));
    std::vector<T> ctile(static_cast<size_t>(macro_rows * ldc));
    int64_t mb_begin, mb_end;
    while (claim_chunk(next_macro, nmacro, workers, mb_begin, mb_end)) {
      if (zero_mask && !zero_gaps) {
        const auto [z0, z1] = zero_slice(s, mb_begin, mb_end, nmacro);
        zero_inactive<T>(s, zero_mask, z0, z1, out, ov);
      }
      macro_ptrs(mb_begin, next.data(), next_out.data());
      for (int64_t mb = mb_begin; mb < mb_end; ++mb) {
        const int64_t r0 = mb * macro_rows, mt = std::min(macro_rows, M - r0);
        const int64_t nblk = ceil_div(mt, MR);
        cur.swap(next);
        out_offs.swap(next_out);
        // Scattered active rows defeat the hardware prefetcher: fetch the next macro block's input
        // rows while this one computes. (Prefetching 2 or 3 macro blocks ahead measured no better.)
        if (mb + 1 < mb_end) {
          macro_ptrs(mb + 1, next.data(), next_out.data());
          // Only rows that start a run: in channels-last memory the next pixel's input follows the previous
          // one's, which the hardware prefetcher already streams.
          const int64_t n0 = (mb + 1) * macro_rows, nt = std::min(macro_rows, M - n0);
          // Writing a few channels into a wide channels-last buffer (a concat slice) touches a fresh cache line
          // per output pixel that no hardware prefetcher predicts: request them for writing ahead of the
          // epilogue too.
          if (slice_out)
            for (int64_t r = 0; r < nt; ++r)
              for (int64_t e = 0; e < s.Co; e += line) __builtin_prefetch(out + next_out[r] + e, 1, 2);
          for (int64_t r = 0; Blk::kPrefetchInputs && r < nt; ++r) {
            if (r > 0 && (!rows || rows[n0 + r] == rows[n0 + r - 1] + 1)) continue;
            const T* const* o = next.data() + (r / MR) * taps * MR + r % MR;
            for (int64_t t = 0; t < taps; ++t)
              if (o[t * MR] != zp)
                for (int64_t e = 0; e < s.C; e += line) __builtin_prefetch(o[t * MR] + e, 0, 2);  // to L2, not L1
          }
        }
        for (int64_t g = 0; g < s.G; ++g) {
          const T* const* ptrs = group_ptrs(cur.data(), grouped.data(), nblk, g);
          const T* wg = wpack + g * panels * K * NR;
          const T* bg = bias ? bias + g * s.Cog : nullptr;
          if constexpr (FusedEpilogue<T, Blk>::kAvailable) {
            if (fused_epilogue) {  // the block stores its rows itself: no C tile, no epilogue pass
              if (zero_gaps && g == 0 && !zero_in_kernel)
                for (int64_t r = 0; r < mt; ++r) zero_gap(r0 + r);
              // panel-major, as below: a panel is reused by the macro block's blocks while it is in cache
              for (int64_t p = 0; p < panels; ++p)
                for (int64_t blk = 0; blk < nblk; ++blk) store_block(ptrs, out_offs.data(), g, p, blk, mt, r0);
              continue;
            }
          }
          for (int64_t p = 0; p < panels; ++p)
            for (int64_t blk = 0; blk < nblk; ++blk)
              Blk::template run<T>(taps, s.Cg, ptrs + blk * taps * MR, wg + p * K * NR,
                                   ctile.data() + blk * MR * ldc + p * NR, ldc, /*accumulate=*/false, prefetch_b);
          for (int64_t r = 0; r < mt; ++r) {
            if (zero_gaps && g == 0) zero_gap(r0 + r);
            T* dst = out + out_offs[r] + g * s.Cog * ov.sC;
            const T* src = ctile.data() + r * ldc;
            if constexpr (std::is_same_v<T, float>) {
              if (stream && store_row_stream(dst, src, bg, s.Cog, act)) continue;
            }
            if (ov.sC == 1 && !add && !relu) {  // channels-last output, plain conv: the common, vectorized case
              if (bg)
                for (int64_t j = 0; j < s.Cog; ++j) dst[j] = src[j] + bg[j];
              else
                std::memcpy(dst, src, s.Cog * sizeof(T));
            } else if (ov.sC == 1) {
              for (int64_t j = 0; j < s.Cog; ++j) {
                T v = src[j] + (bg ? bg[j] : T(0)) + (add ? dst[j] : T(0));
                dst[j] = apply_act(v, act);
              }
            } else {
              for (int64_t j = 0; j < s.Cog; ++j) {
                T v = src[j] + (bg ? bg[j] : T(0)) + (add ? dst[j * ov.sC] : T(0));
                dst[j * ov.sC] = apply_act(v, act);
              }
            }
          }
        }
      }
    }
    if (stream) stream_fence();
  });
}

// DYNCONV_EXT_FUSED_NARROW=0 turns the fused narrow-output path below off (read per call, like the streaming
// switch, so python/tools/fused_narrow_ab.py can time both in one process). DYNCONV_EXT_FUSED8=0, the switch's
// name when the path covered only <= 8 channels (the committed A/B was run with it), still does too.
inline bool fused_narrow_enabled() {
  return env_switch_on("DYNCONV_EXT_FUSED_NARROW") && env_switch_on("DYNCONV_EXT_FUSED8");
}

// DYNCONV_EXT_FUSED_PREFETCH=0 turns off the fused path's software prefetches: the next output row's new input
// rows, and (when the output is a slice of a wider buffer) its output lines for writing. A concat buffer's channel
// slice is read and written a few channels per pixel at the buffer's full pixel stride (e.g. 16 of 64 channels: one
// cache line in four), a pattern the hardware prefetcher serves poorly once the buffer is out of L2. Measured on the
// 2-core AVX-512 Xeon, one process, interleaved (python python/tools/fused_prefetch_ab.py, results in
// benchmarks/results/fused_prefetch_ab_cpu_xeon.md): input rows alone, MSDNet CIFAR whole network batch 256 1.10x,
// RANet CIFAR 1.11x; adding the output lines, a further 1.05x (MSDNet) and 1.09x (RANet); about neutral at batch 64.
inline bool fused_prefetch_enabled() { return env_switch_on("DYNCONV_EXT_FUSED_PREFETCH"); }
// DYNCONV_EXT_MERGED_TAPS=0 (read per call) keeps one tap per kernel position in forward_dense_fused.
inline bool merged_taps_enabled() { return env_switch_on("DYNCONV_EXT_MERGED_TAPS"); }

// A dense convolution (every output pixel; conv2d_into) with at most kFusedMaxCog output channels per group,
// float, AVX2, channels contiguous in the output; the 8x8 block up to 8 channels, the 6x16 one above.
// MSDNet's fine-scale layers (1x1 bottlenecks and 3x3 convs to 6 channels at 32x32) were bound by instructions
// outside the arithmetic in forward_gemm_blocked: per-row tap pointer tables (~58 instructions a pixel) and the
// C-tile epilogue (~100) against ~115 in the microkernel. Here the work is image rows: whole B-pixel segments of
// the pixels whose taps all fall inside the input are read by the strided block (row i of tap t at
// taps[t] + i * step: one pointer per tap instead of B), the other pixels (borders, a row's last < B interior
// ones) are gathered B at a time into a pointer table. Both blocks store their result straight from the
// registers with bias, activation and a lane mask (no C tile, no epilogue pass). Wide outputs stay on
// forward_gemm_blocked, whose macro blocks reuse each weight panel for 18 rows instead of 6.
// Measured (python/tools/fused_narrow_ab.py, batch 256, 2-core AVX2 machine, benchmarks/results/fused_narrow_ab_cpu.md):
// 1.05-2.19x on MSDNet CIFAR's narrow layers, its whole network 1.12x, its budgeted-batch run at p=0.5 1.21x.
constexpr int64_t kFusedMaxCog = 32;
// A fused-store register block: its shape and its strided / table kernels.
template <int64_t MR_, int64_t NR_, decltype(&conv_block_8x8_store_strided) Strided,
          decltype(&conv_block_8x8_store_table) Table>
struct FusedBlock {
  static constexpr int64_t MR = MR_, NR = NR_;
  static constexpr auto strided = Strided;
  static constexpr auto table = Table;
};
using Fused8x8 = FusedBlock<kMR8, kNR8, conv_block_8x8_store_strided, conv_block_8x8_store_table>;
using Fused6x16 = FusedBlock<kMR, kNR, conv_block_6x16_store_strided, conv_block_6x16_store_table>;
// On AVX-512 CPUs the outputs of 9-64 channels per group take AVX-512 fused blocks (8 pixels x 16 channels up to
// 16, 8 x 32 above, in 32-channel panels); <= 8 channels stay on the AVX2 8x8 one. MSDNet CIFAR's whole network at
// batch 256 (2-core AVX-512 Xeon, one process, interleaved): 664 ms with these up to 64 channels, 727 ms up to 32,
// 771 ms with the AVX2 6x16 fused block (and AVX-512 only in forward_gemm_blocked), 903 ms all AVX2.
constexpr int64_t kFusedMaxCog512 = 64;
using Fused8x16z = FusedBlock<8, 16, conv_block_8x16z_store_strided, conv_block_8x16z_store_table>;
using Fused8x32z = FusedBlock<8, 32, conv_block_8x32z_store_strided, conv_block_8x32z_store_table>;

template <typename Blk>
void forward_dense_fused(const ConvShape& s, const float* x, const InView& iv, const at::Tensor& weight,
                         const float* bias, float* out, const OutView& ov, bool add, int act) {
  constexpr int64_t B = Blk::MR, NR = Blk::NR;
  const at::Tensor wpack_t = cached_packing(weight, NR, s.G, /*kind=*/0, [&] { return pack_weight_panels<float>(s, weight, NR); });
  const float* wpack = wpack_t.data_ptr<float>();
  const int64_t K = s.k_per_group(), taps = s.taps(), panels = ceil_div(s.Cog, NR);
  const TapTable<float> tt(s, iv);
  const int64_t* tap_off = tt.off.data();
  // Output columns whose taps all lie inside the input: wo in [wlo, whi).
  const int64_t last = s.W - tt.span_w + s.PW;  // wo * SW < last
  const int64_t wlo = std::min(s.Wo, ceil_div(s.PW, s.SW));
  const int64_t whi = std::max(wlo, std::min(s.Wo, last > 0 ? ceil_div(last, s.SW) : 0));
  const float* zp = tt.zero_row();
  const int64_t step = s.SW * iv.sW;
  const int64_t rows_total = s.N * s.Ho;
  std::atomic<int64_t> next_row{0};
  const bool prefetch_next_row = fused_prefetch_enabled();
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ceil_div(rows_total, 2));
  // Few input channels in a contiguous channels-last input (a stem conv: 3 channels): the KW taps of a kernel row
  // read KW * C consecutive floats, in the packed weights' k order, so a segment runs KH taps of KW * C channels
  // instead of KH * KW taps of C (the per-tap work outweighed 3 reduction steps).
  const bool merge_rows = s.G == 1 && s.DW == 1 && s.KW > 1 && iv.sW == s.C && s.C * s.KW <= 64 &&
                          merged_taps_enabled();
  const int64_t seg_taps = merge_rows ? s.KH : taps, seg_cg = merge_rows ? s.KW * s.Cg : s.Cg;  // per segment
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    std::vector<const float*> strided(static_cast<size_t>(taps)), table(static_cast<size_t>(taps * B)),
        shifted(static_cast<size_t>(taps * B));
    float* seg_dst[B];    // a strided segment's output pixels
    float* table_dst[B];  // the gathered border pixels' (kept across segments until B are pending)
    float* gdst[B];
    int64_t pending = 0;  // border pixels gathered into `table` / `table_dst`
    // Runs the block for every group and weight panel: inputs shifted by g*Cg (never the zero row), outputs by
    // g*Cog + p*NR.
    const auto run = [&](bool is_strided, int64_t nvalid) {
      for (int64_t g = 0; g < s.G; ++g) {
        float* const* dst = is_strided ? seg_dst : table_dst;
        const float* const* ptrs = table.data();
        if (is_strided && merge_rows) {
          for (int64_t kh = 0; kh < s.KH; ++kh) shifted[kh] = strided[kh * s.KW];  // (one group)
        } else if (is_strided) {
          for (int64_t t = 0; t < taps; ++t) shifted[t] = strided[t] + g * s.Cg;
        } else if (s.G > 1) {
          for (int64_t q = 0; q < taps * B; ++q) shifted[q] = table[q] == zp ? zp : table[q] + g * s.Cg;
          ptrs = shifted.data();
        }
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t c0 = g * s.Cog + p * NR;
          for (int64_t i = 0; i < nvalid; ++i) gdst[i] = dst[i] + c0;
          const RowStore st{gdst, nvalid, std::min(NR, s.Cog - p * NR), bias ? bias + c0 : nullptr, act, add};
          const float* wp = wpack + (g * panels + p) * K * NR;
          if (is_strided)
            Blk::strided(seg_taps, seg_cg, shifted.data(), step, wp, st);
          else
            Blk::table(taps, s.Cg, ptrs, wp, st);
        }
      }
    };
    const auto flush = [&]() {
      if (pending == 0) return;
      for (int64_t i = pending; i < B; ++i)  // pad rows repeat the last pixel (computed, not stored)
        for (int64_t t = 0; t < taps; ++t) table[t * B + i] = table[t * B + pending - 1];
      run(false, pending);
      pending = 0;
    };
    const auto gather = [&](int64_t n, int64_t ho, int64_t wo) {
      const int64_t hi0 = ho * s.SH - s.PH, wi0 = wo * s.SW - s.PW;
      const float* base = x + n * iv.sN + hi0 * iv.sH + wi0 * iv.sW;
      for (int64_t t = 0; t < taps; ++t) table[t * B + pending] = tt.tap(s, base, hi0, wi0, t);
      table_dst[pending] = out + n * ov.sN + ho * ov.sH + wo * ov.sW;
      if (++pending == B) flush();
    };
    int64_t b0, b1;
    while (claim_chunk(next_row, rows_total, workers, b0, b1)) {
      for (int64_t nh = b0; nh < b1; ++nh) {
        const int64_t n = nh / s.Ho, ho = nh % s.Ho, hi0 = ho * s.SH - s.PH;
        const bool rows_inside = hi0 >= 0 && hi0 + tt.span_h < s.H;
        const int64_t lo = rows_inside ? wlo : s.Wo, hi = rows_inside ? whi : s.Wo;  // lo <= hi <= Wo
        for (int64_t wo = 0; wo < lo; ++wo) gather(n, ho, wo);
        float* orow = out + n * ov.sN + ho * ov.sH;
        const float* irow = x + n * iv.sN + hi0 * iv.sH;
        // Whole segments only; the rest of the interior joins the border pixels in the table (overlapping the
        // last segment with the previous one instead recomputed up to B-1 pixels: slower on 8- and 16-pixel rows).
        const int64_t seg_end = lo + (hi - lo) / B * B;
        for (int64_t w0 = lo; w0 < seg_end; w0 += B) {
          const float* base = irow + (w0 * s.SW - s.PW) * iv.sW;
          if (prefetch_next_row) {
            // The input rows the next output row reads and this one does not, under this segment.
            const int64_t r0 = hi0 + tt.span_h + 1;
            for (int64_t r = r0; r < r0 + s.SH && r < s.H; ++r) {
              const float* pb = x + n * iv.sN + r * iv.sH + (w0 * s.SW - s.PW) * iv.sW;
              for (int64_t i = 0; i < B * s.SW; ++i)
                for (int64_t c = 0; c < s.Cg; c += 16) __builtin_prefetch(pb + i * iv.sW + c);
            }
            // A channel slice of a wider buffer is written a few channels per cache line: its lines of the next
            // row, when this thread computes it, for writing (the read-for-ownership is what the stores wait on).
            if (ov.sW > s.Co && ho + 1 < s.Ho && nh + 1 < b1) {
              float* ob = out + n * ov.sN + (ho + 1) * ov.sH + w0 * ov.sW;
              for (int64_t i = 0; i < B; ++i)
                for (int64_t c = 0; c < s.Co; c += 16) __builtin_prefetch(ob + i * ov.sW + c, 1);
            }
          }
          for (int64_t t = 0; t < taps; ++t) strided[t] = base + tap_off[t];
          for (int64_t i = 0; i < B; ++i) seg_dst[i] = orow + (w0 + i) * ov.sW;
          run(true, B);
        }
        for (int64_t wo = seg_end; wo < s.Wo; ++wo) gather(n, ho, wo);
      }
    }
    flush();
  });
}

// DYNCONV_EXT_PLANAR_NARROW=0 turns off forward_planar_narrow (planar_narrow.h) for dense convs to <= 8 channels
// (read per call: python/tools/planar_narrow_ab.py).
inline bool planar_narrow_enabled() { return env_switch_on("DYNCONV_EXT_PLANAR_NARROW"); }
// DYNCONV_EXT_ZMM16=0 (read per call) keeps masked convs with 9-16 output channels per group on the AVX2 6x16 block
// instead of the AVX-512 8x16 one (python/tools/masked_switch_ab.py --var DYNCONV_EXT_ZMM16).
inline bool zmm16_enabled() { return env_switch_on("DYNCONV_EXT_ZMM16"); }

template <typename T>
void forward_gemm(const ConvShape& s, const T* x, const InView& iv, const at::Tensor& weight, const T* bias,
                  const int64_t* rows, int64_t M, T* out, const OutView& ov, bool add, int act,
                  const bool* zero_mask) {
  if constexpr (std::is_same_v<T, float>) {
    // KxK (K > 1) to <= 8 channels: pixels in the vector lanes (planar_narrow.h). 1x1 convs stay on the fused
    // path: there the planar copy of the input is amortized over Co MACs per value only (0.53-0.78x measured).
    if (!rows && !zero_mask && !add && ov.sC == 1 && s.taps() > 1 && planar_narrow_enabled() &&
        planar_narrow_supported(s, iv.sW)) {
      // One Co-wide panel of the shared packing (and its cache entry for marked-constant weights).
      const at::Tensor wpack = cached_packing(weight, s.Co, s.G, /*kind=*/0,
                                              [&] { return pack_weight_panels<float>(s, weight, s.Co); });
      forward_planar_narrow(s, x, iv.sN, iv.sH, iv.sW, wpack.data_ptr<float>(), bias, out, ov.sN, ov.sH, ov.sW, act,
                            fused_prefetch_enabled());
      return;
    }
    if (!rows && !zero_mask && s.Cog > kNR8 && s.Cog <= kFusedMaxCog512 && ov.sC == 1 && tile_gemm_uses_avx512() &&
        fused_narrow_enabled()) {
      if (s.Cog <= 16)
        forward_dense_fused<Fused8x16z>(s, x, iv, weight, bias, out, ov, add, act);
      else
        forward_dense_fused<Fused8x32z>(s, x, iv, weight, bias, out, ov, add, act);
      return;
    }
    if (!rows && !zero_mask && s.Cog <= kFusedMaxCog && ov.sC == 1 && tile_gemm_uses_avx2() && fused_narrow_enabled()) {
      if (s.Cog <= kNR8)
        forward_dense_fused<Fused8x8>(s, x, iv, weight, bias, out, ov, add, act);
      else
        forward_dense_fused<Fused6x16>(s, x, iv, weight, bias, out, ov, add, act);
      return;
    }
  }
  if (s.Cog <= kNR8)
    forward_gemm_blocked<T, Block8x8>(s, x, iv, weight, bias, rows, M, out, ov, add, act, zero_mask);
  else if (std::is_same_v<T, float> && s.Cog > kNR && tile_gemm_uses_avx512()) {
    // AVX-512: 64-channel panels where they tile the output exactly and stay small enough for L2 (64-256
    // channels, 3x3 up to 128 input channels); 32-channel ones otherwise. In one-process A/Bs on a 2-core
    // AVX-512 Xeon (masked 3x3 and 1x1, 32-512 channels, densities 0.25 and 0.5) 6x64 was 0-8 % faster than
    // 8x32 on those shapes and 10-40 % slower on 32/96 channels and on 512-channel 3x3 (a 1.2 MB panel).
    if (s.Cog % kNR64 == 0 && s.k_per_group() <= 1152)
      forward_gemm_blocked<T, Block6x64>(s, x, iv, weight, bias, rows, M, out, ov, add, act, zero_mask);
    else
      forward_gemm_blocked<T, Block8x32>(s, x, iv, weight, bias, rows, M, out, ov, add, act, zero_mask);
  }
  else if (std::is_same_v<T, float> && tile_gemm_uses_avx512() && zmm16_enabled())
    // 9-16 channels per group (CIFAR ResNets' 16-channel stage): one zmm per row. In one-process A/Bs on the 2-core
    // AVX-512 Xeon (python python/tools/masked_switch_ab.py --var DYNCONV_EXT_ZMM16 --shapes narrow): 1.06-1.33x
    // over the AVX2 6x16 block at batch 8-64, densities 0.25-1.0; 0.93-1.05x at batch 1 (30-50 us calls). 12- and
    // 16-row variants measured the same.
    forward_gemm_blocked<T, Block8x16z>(s, x, iv, weight, bias, rows, M, out, ov, add, act, zero_mask);
  else
    forward_gemm_blocked<T, Block6x16>(s, x, iv, weight, bias, rows, M, out, ov, add, act, zero_mask);
}

// Depthwise-style groups (one input channel per group): a GEMM would be 1 column wide, so compute directly,
// vectorized over the channels of the channels-last input. `rows` as for forward_gemm.
// A pixel's channels go in blocks of kDwBlock accumulators (a compile-time width, so they stay in registers); each
// valid tap adds x[tap][c / Cog] * w[tap][c]. The row loop is compiled three times (generic, AVX2, AVX-512 for
// float) so the channel loops vectorize to the machine's registers. With AVX2 and AVX-512 a row's run of interior
// pixels goes to dw_interior_avx2 / _avx512 in one call, 4 pixels sharing each pass over the taps (4 independent
// accumulator chains). Taps come from a TapTable (interior pixels skip the bounds checks) and consecutive pixels
// step their coordinates instead of dividing. Measured on the 2-core AVX-512 Xeon (16 channels 3x3, 32x32, batch
// 256, 2 threads): 7.7 ms with the former one-pixel loop (accumulators in memory, per-tap bounds checks and
// divisions), 2.1 ms on the AVX2 path, 1.7 ms on the AVX-512 one; oneDNN's F.conv2d 1.0-1.25 ms.
constexpr int64_t kDwBlock = 16;
constexpr int64_t kDwPixels = 4;

template <typename T>
struct DepthwiseRows;
#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx512f"))) inline void dw_interior_avx512(const DepthwiseRows<float>& k,
                                                                 const float* const* src, int64_t step, float* dst,
                                                                 int64_t groups);
__attribute__((target("avx2,fma"))) inline void dw_interior_avx2(const DepthwiseRows<float>& k,
                                                                const float* const* src, int64_t step, float* dst,
                                                                int64_t groups);
#endif

template <typename T>
struct DepthwiseRows {
  const ConvShape& s;
  const T* x;
  const InView& iv;
  const TapTable<T>& tt;
  const T* wt;  // wt[t * Co + co] = weight[co, 0, t]
  const T* bias;
  const int64_t* rows;
  T* out;
  const OutView& ov;
  bool add;
  int act;

  // Channels [c0, c0 + NB) of one output pixel; NB a compile-time width so the accumulators stay in registers.
  template <int64_t NB>
  __attribute__((always_inline)) inline void block(int64_t c0, int64_t nb, int64_t ntaps, const T* const* src,
                                                   const T* const* wrow, T* dst) const {
    T a[NB];
#pragma GCC unroll 16
    for (int64_t c = 0; c < NB; ++c) a[c] = T(0);
    if (s.Cog == 1) {
      for (int64_t t = 0; t < ntaps; ++t) {
        const T* __restrict xp = src[t] + c0;
        const T* __restrict wr = wrow[t] + c0;
#pragma GCC unroll 16
        for (int64_t c = 0; c < NB; ++c) a[c] += (c < nb ? xp[c] * wr[c] : T(0));
      }
    } else {
      for (int64_t t = 0; t < ntaps; ++t)
        for (int64_t c = 0; c < nb; ++c) a[c] += src[t][(c0 + c) / s.Cog] * wrow[t][c0 + c];
    }
    T* d = dst + c0 * ov.sC;
    for (int64_t c = 0; c < nb; ++c) {
      T& o = d[c * ov.sC];
      o = apply_act(a[c] + (bias ? bias[c0 + c] : T(0)) + (add ? o : T(0)), act);
    }
  }

  __attribute__((always_inline)) inline void pixel(int64_t ntaps, const T* const* src, const T* const* wrow,
                                                   T* dst) const {
    int64_t c0 = 0;
    for (; c0 + kDwBlock <= s.Co; c0 += kDwBlock) block<kDwBlock>(c0, kDwBlock, ntaps, src, wrow, dst);
    if (c0 < s.Co) block<kDwBlock>(c0, s.Co - c0, ntaps, src, wrow, dst);
  }

  // kIsa: the instruction set of the caller (0 generic, 2 AVX2, 512 AVX-512; the last two with T = float): runs
  // of interior pixels take dw_interior_avx2 / dw_interior_avx512 there.
  template <int kIsa>
  __attribute__((always_inline)) inline void range(int64_t rb, int64_t re) const {
    const int64_t taps = s.taps();
    std::vector<const T*> src(static_cast<size_t>(taps)), wrow(static_cast<size_t>(taps)),
        wall(static_cast<size_t>(taps));
    for (int64_t t = 0; t < taps; ++t) wall[t] = wt + t * s.Co;
    // Output columns whose windows end inside the input on the right: wo < wo_in_end.
    const int64_t right = s.W - 1 - tt.span_w + s.PW;
    const int64_t wo_in_end = right < 0 ? 0 : std::min(s.Wo, right / s.SW + 1);
    PixelCoord pc{0, 0, 0};
    int64_t prev = -2;
    for (int64_t r = rb; r < re;) {
      const int64_t p = rows ? rows[r] : r;
      if (p == prev + 1) {  // the next pixel: step the coordinates instead of dividing
        if (++pc.wo == s.Wo) {
          pc.wo = 0;
          if (++pc.ho == s.Ho) {
            pc.ho = 0;
            ++pc.n;
          }
        }
      } else {
        pc = coord(s, p);
      }
      const int64_t hi0 = pc.ho * s.SH - s.PH, wi0 = pc.wo * s.SW - s.PW;
      const T* corner = x + pc.n * iv.sN + hi0 * iv.sH + wi0 * iv.sW;
      T* dst = out + pc.n * ov.sN + pc.ho * ov.sH + pc.wo * ov.sW;
#if defined(__x86_64__) || defined(_M_X64)
      // Runs of consecutive pixels of this row whose windows lie inside the input, kDwPixels at a time.
      if constexpr (kIsa != 0 && std::is_same_v<T, float>) {
        if (s.Cog == 1 && pc.wo + kDwPixels <= wo_in_end && tt.inside(s, hi0, wi0)) {
          int64_t len = std::min(re - r, wo_in_end - pc.wo);
          if (rows) {
            int64_t j = 1;
            while (j < len && rows[r + j] == p + j) ++j;
            len = j;
          }
          const int64_t groups = len / kDwPixels;
          if (groups > 0) {
            for (int64_t t = 0; t < taps; ++t) src[t] = corner + tt.off[t];
            if constexpr (kIsa == 512)
              dw_interior_avx512(*this, src.data(), s.SW * iv.sW, dst, groups);
            else
              dw_interior_avx2(*this, src.data(), s.SW * iv.sW, dst, groups);
            const int64_t adv = groups * kDwPixels;
            pc.wo += adv - 1;
            prev = p + adv - 1;
            r += adv;
            continue;
          }
        }
      }
#endif
      if (tt.inside(s, hi0, wi0)) {
        for (int64_t t = 0; t < taps; ++t) src[t] = corner + tt.off[t];
        pixel(taps, src.data(), wall.data(), dst);
      } else {
        int64_t nt = 0;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t hi = hi0 + tt.dh[t], wi = wi0 + tt.dw[t];
          if (hi < 0 || hi >= s.H || wi < 0 || wi >= s.W) continue;  // padding: adds nothing
          src[nt] = corner + tt.off[t];
          wrow[nt] = wall[t];
          ++nt;
        }
        pixel(nt, src.data(), wrow.data(), dst);
      }
      prev = p;
      ++r;
    }
  }
};

#if defined(__x86_64__) || defined(_M_X64)
// kDwPixels interior pixels of one output row at once (pixel j reads tap t at src[t] + j * step), float, AVX-512
// (callers inline it only into AVX-512 code): independent accumulators hide the FMA latency that a single
// pixel's chain of taps waits on. Channels in 16-lane blocks, the last one masked.
__attribute__((target("avx512f"))) inline void dw_interior_avx512(const DepthwiseRows<float>& k,
                                                                 const float* const* src, int64_t step, float* dst,
                                                                 int64_t groups) {
  const ConvShape& s = k.s;
  const OutView& ov = k.ov;
  const float *wt = k.wt, *bias = k.bias;
  const bool add = k.add;
  const int act = k.act;
  static_assert(kDwPixels == 4, "four accumulators below");
  const int64_t taps = s.taps();
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.0f);
  for (int64_t gi = 0; gi < groups; ++gi, dst += kDwPixels * ov.sW) {
    const int64_t goff = gi * kDwPixels * step;
    for (int64_t c0 = 0; c0 < s.Co; c0 += 16) {
      const int64_t nb = std::min<int64_t>(16, s.Co - c0);
      const __mmask16 m = static_cast<__mmask16>(nb == 16 ? 0xFFFF : (1u << nb) - 1);
      __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
      for (int64_t t = 0; t < taps; ++t) {
        const __m512 w = _mm512_maskz_loadu_ps(m, wt + t * s.Co + c0);
        const float* xp = src[t] + goff + c0;
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xp), w, a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xp + step), w, a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xp + 2 * step), w, a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xp + 3 * step), w, a3);
      }
      const __m512 bv = bias ? _mm512_maskz_loadu_ps(m, bias + c0) : zero;
      const __m512 acc[kDwPixels] = {a0, a1, a2, a3};
      for (int64_t j = 0; j < kDwPixels; ++j) {
        float* d = dst + j * ov.sW + c0 * ov.sC;
        if (ov.sC == 1) {
          __m512 v = _mm512_add_ps(acc[j], bv);
          if (add) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, d));
          // max/min return their second operand when either is NaN: v second keeps a NaN, as apply_act does
          if (act != 0) v = _mm512_max_ps(zero, v);
          if (act == 2) v = _mm512_min_ps(six, v);
          _mm512_mask_storeu_ps(d, m, v);
        } else {
          alignas(64) float tmp[16];
          _mm512_store_ps(tmp, acc[j]);
          for (int64_t c = 0; c < nb; ++c) {
            float& o = d[c * ov.sC];
            o = apply_act(tmp[c] + (bias ? bias[c0 + c] : 0.0f) + (add ? o : 0.0f), act);
          }
        }
      }
    }
  }
}
// The same for AVX2: 8-lane channel blocks, the last one masked.
__attribute__((target("avx2,fma"))) inline void dw_interior_avx2(const DepthwiseRows<float>& k,
                                                                const float* const* src, int64_t step, float* dst,
                                                                int64_t groups) {
  const ConvShape& s = k.s;
  const OutView& ov = k.ov;
  const float *wt = k.wt, *bias = k.bias;
  const bool add = k.add;
  const int act = k.act;
  const int64_t taps = s.taps();
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.0f);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t gi = 0; gi < groups; ++gi, dst += kDwPixels * ov.sW) {
    const int64_t goff = gi * kDwPixels * step;
    for (int64_t c0 = 0; c0 < s.Co; c0 += 8) {
      const int64_t nb = std::min<int64_t>(8, s.Co - c0);
      const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(nb)), lane);
      __m256 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
      for (int64_t t = 0; t < taps; ++t) {
        const __m256 w = _mm256_maskload_ps(wt + t * s.Co + c0, m);
        const float* xp = src[t] + goff + c0;
        a0 = _mm256_fmadd_ps(_mm256_maskload_ps(xp, m), w, a0);
        a1 = _mm256_fmadd_ps(_mm256_maskload_ps(xp + step, m), w, a1);
        a2 = _mm256_fmadd_ps(_mm256_maskload_ps(xp + 2 * step, m), w, a2);
        a3 = _mm256_fmadd_ps(_mm256_maskload_ps(xp + 3 * step, m), w, a3);
      }
      const __m256 bv = bias ? _mm256_maskload_ps(bias + c0, m) : zero;
      const __m256 acc[kDwPixels] = {a0, a1, a2, a3};
      for (int64_t j = 0; j < kDwPixels; ++j) {
        float* d = dst + j * ov.sW + c0 * ov.sC;
        if (ov.sC == 1) {
          __m256 v = _mm256_add_ps(acc[j], bv);
          if (add) v = _mm256_add_ps(v, _mm256_maskload_ps(d, m));
          if (act != 0) v = _mm256_max_ps(zero, v);  // v second keeps a NaN, as apply_act does
          if (act == 2) v = _mm256_min_ps(six, v);
          _mm256_maskstore_ps(d, m, v);
        } else {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, acc[j]);
          for (int64_t c = 0; c < nb; ++c) {
            float& o = d[c * ov.sC];
            o = apply_act(tmp[c] + (bias ? bias[c0 + c] : 0.0f) + (add ? o : 0.0f), act);
          }
        }
      }
    }
  }
}
#endif

template <typename T>
void depthwise_range_generic(const DepthwiseRows<T>& k, int64_t rb, int64_t re) {
  k.template range<0>(rb, re);
}
#if defined(__x86_64__) || defined(_M_X64)
__attribute__((target("avx2,fma"))) inline void depthwise_range_avx2(const DepthwiseRows<float>& k, int64_t rb,
                                                                     int64_t re) {
  k.range<2>(rb, re);
}
__attribute__((target("avx512f"))) inline void depthwise_range_avx512(const DepthwiseRows<float>& k, int64_t rb,
                                                                      int64_t re) {
  k.range<512>(rb, re);
}
#endif

template <typename T>
void forward_depthwise(const ConvShape& s, const T* x, const InView& iv, const at::Tensor& weight, const T* bias,
                       const int64_t* rows, int64_t M, T* out, const OutView& ov, bool add, int act,
                       const bool* zero_mask) {
  const at::Tensor w = weight.contiguous();
  const T* wp = w.data_ptr<T>();
  // wt[t][co] = weight[co, 0, t]: contiguous over output channels for the inner loop.
  std::vector<T> wt(static_cast<size_t>(s.taps() * s.Co));
  for (int64_t co = 0; co < s.Co; ++co)
    for (int64_t t = 0; t < s.taps(); ++t) wt[t * s.Co + co] = wp[co * s.taps() + t];
  const TapTable<T> tt(s, iv);
  const DepthwiseRows<T> k{s, x, iv, tt, wt.data(), bias, rows, out, ov, add, act};
  auto run = &depthwise_range_generic<T>;
#if defined(__x86_64__) || defined(_M_X64)
  if constexpr (std::is_same_v<T, float>) {
    if (tile_gemm_uses_avx512())
      run = &depthwise_range_avx512;
    else if (tile_gemm_uses_avx2())
      run = &depthwise_range_avx2;
  }
#endif
  at::parallel_for(0, M, 64, [&](int64_t rb, int64_t re) {
    if (zero_mask) {
      const auto [z0, z1] = zero_slice(s, rb, re, M);
      zero_inactive<T>(s, zero_mask, z0, z1, out, ov);
    }
    run(k, rb, re);
  });
}

}  // namespace dynconv::cpu

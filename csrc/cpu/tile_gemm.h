// Register-blocked GEMM on a tile: C[m x 16*panels] (+)= A[m x kc] * B[kc x 16*panels].
//
// A is read through two strides, a(i, k) = a[i * rs_a + k * cs_a], so the same kernel serves a
// row-major gathered tile (forward, grad_input) and a transposed one (grad_weight).
// B is pre-packed in panels of 16 columns: panel p holds b[p * panel_stride + k * 16 + j].
// C is row-major with leading dimension ldc (a multiple of 16); m must be a multiple of kMR.
#pragma once

#include <cstdint>

namespace dynconv::cpu {

constexpr int64_t kMR = 6;   // rows of the register block
constexpr int64_t kNR = 16;  // columns of the register block (two AVX2 float vectors)

template <typename T>
void tile_gemm(int64_t m, int64_t panels, int64_t kc, const T* a, int64_t rs_a, int64_t cs_a,
               const T* b, int64_t panel_stride, T* c, int64_t ldc, bool accumulate);

// Implicit-GEMM block of a convolution: 6 output rows x 16 output channels, full reduction.
//   c[i*ldc + j] (+)= sum_t sum_k rows[t*6 + i][k] * b[(t*cg + k)*16 + j]
// rows[t*6 + i] points at the cg input channels that tap t of row i reads (a zero row where the tap
// falls in the padding), so the input is read in place: no im2row copy.
template <typename T>
void conv_block_6x16(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool accumulate);

// Narrow variant for convolutions with at most 8 output channels per group (MSDNet's 6-channel growth layers):
// 8 output rows x 8 output channels, B packed in 8-column panels (b[(t*cg + k)*8 + j]), rows[t*8 + i].
// A 16-column block would leave 10 of 16 lanes idle at 6 channels; this one leaves 2 of 8.
constexpr int64_t kMR8 = 8;
constexpr int64_t kNR8 = 8;
template <typename T>
void conv_block_8x8(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool accumulate);

// Fused-store variant of the 8x8 block (float, AVX2+FMA only): the result leaves the registers straight into the
// output pixels instead of going through a C tile and a separate epilogue pass. With a few output channels the
// epilogue and the per-row pointer tables cost more instructions than the arithmetic (MSDNet's 6-channel
// layers), so both go: row i of tap t reads taps[t] + i * step (8 pixels along one image row, every tap inside
// the input), or rows[t*8 + i] for any other block, as conv_block_8x8.
struct RowStore {
  float* const* dst;   // dst[i]: row i's output pixel (n channels, contiguous); rows >= nvalid are not stored
  int64_t nvalid;      // 1..8
  int64_t n;           // channels per row, 1..8 (1..16 for the 6x16 block)
  const float* bias;   // n values or nullptr
  int act;             // 0 none, 1 ReLU, 2 ReLU6 (after the bias and the residual)
  bool add;            // add the destination's current values (a residual) first
  bool stream = false; // AVX-512 blocks: streaming stores (every dst 64-byte aligned, n a multiple of 16, no add)
  bool prefetch_b = false;  // AVX-512 6x64 / 8x32 table blocks: prefetch the weight panel (see conv_block_8x32)
  // AVX-512 blocks: output ranges the block zeroes with streaming stores while its reduction runs, a share every 16
  // reduction steps (zero_len[q] floats, a multiple of 16, from the 64-byte aligned zero_ptr[q]): a masked conv's inactive pixels.
  int zero_ranges = 0;
  float* const* zero_ptr = nullptr;
  const int64_t* zero_len = nullptr;
};
void conv_block_8x8_store_strided(int64_t ntaps, int64_t cg, const float* const* taps, int64_t step, const float* b,
                                  const RowStore& st);
void conv_block_8x8_store_table(int64_t ntaps, int64_t cg, const float* const* rows, const float* b,
                                const RowStore& st);
// The same for the 6x16 block (6 pixels x up to 16 channels of one 16-column panel; st.n <= 16, st.dst[0..6)).
void conv_block_6x16_store_strided(int64_t ntaps, int64_t cg, const float* const* taps, int64_t step,
                                   const float* b, const RowStore& st);
void conv_block_6x16_store_table(int64_t ntaps, int64_t cg, const float* const* rows, const float* b,
                                 const RowStore& st);

// AVX-512 fused-store blocks (float; only where tile_gemm_uses_avx512()): 8 pixels x up to 16 channels (one zmm
// per row) and 8 pixels x up to 32 (two), st.n channels stored through lane masks, st.dst[0..8).
void conv_block_8x16z_store_strided(int64_t ntaps, int64_t cg, const float* const* taps, int64_t step,
                                    const float* b, const RowStore& st);
void conv_block_8x16z_store_table(int64_t ntaps, int64_t cg, const float* const* rows, const float* b,
                                  const RowStore& st);
void conv_block_8x32z_store_strided(int64_t ntaps, int64_t cg, const float* const* taps, int64_t step,
                                    const float* b, const RowStore& st);
void conv_block_8x32z_store_table(int64_t ntaps, int64_t cg, const float* const* rows, const float* b,
                                  const RowStore& st);
// 6 pixels x up to 64 channels (four zmm per row), rows[t*6 + i]: the masked conv's 6x64 block with its epilogue in
// registers (forward_gemm_blocked on AVX-512).
void conv_block_6x64z_store_table(int64_t ntaps, int64_t cg, const float* const* rows, const float* b,
                                  const RowStore& st);

// Streaming (non-temporal) row stores: dst[j] = act(src[j] (+ bias[j])) for j < n (act: 0 none, 1 ReLU,
// 2 ReLU6), and dst[0..n) = 0, written without reading the destination lines first. dst must be 32-byte
// aligned and n a multiple of 8 (float); returns false (and writes nothing) where that does not hold or AVX2
// is missing. Call stream_fence() before another thread reads what was written.
bool store_row_stream(float* dst, const float* src, const float* bias, int64_t n, int act);
bool zero_stream(float* dst, int64_t n);
void stream_fence();

// True when the AVX2+FMA float kernel is used on this CPU.
bool tile_gemm_uses_avx2();

// AVX-512 blocks for wide outputs: 8 output rows x 32 output channels (two zmm vectors per row, 16 accumulators)
// and 6 rows x 64 channels (four per row, 24 accumulators), B packed in 32- or 64-column panels
// (b[(t*cg + k)*NR + j]), rows[t*MR + i]; otherwise as conv_block_6x16. On a CPU with AVX-512F they do twice the
// work per instruction of the 6x16 AVX2 block; elsewhere (and for double) they are the portable loop, so callers
// pick them only where tile_gemm_uses_avx512().
constexpr int64_t kMR32 = 8;
constexpr int64_t kNR32 = 32;
// prefetch_b: software-prefetch the weight panel a few reduction steps ahead, for panels larger than L1 (a 3x3
// 64-channel panel of the 6x64 block is 144 KiB and streams from L2 once per block; the hardware prefetcher left
// the FMA loop waiting on it: 1.01-1.08x on masked 3x3 convs of 64-256 channels in one-process A/Bs on the 2-core
// AVX-512 Xeon, python python/tools/masked_switch_ab.py).
template <typename T>
void conv_block_8x32(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool accumulate,
                     bool prefetch_b = false);
// 8 rows x 16 channels (one zmm per row, 8 accumulators): masked convs with 9-16 output channels per group, which
// the AVX2 6x16 block runs at half the vector width.
constexpr int64_t kMR16z = 8;
constexpr int64_t kNR16z = 16;
template <typename T>
void conv_block_8x16z(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool accumulate);

constexpr int64_t kMR64 = 6;
constexpr int64_t kNR64 = 64;
template <typename T>
void conv_block_6x64(int64_t ntaps, int64_t cg, const T* const* rows, const T* b, T* c, int64_t ldc, bool accumulate,
                     bool prefetch_b = false);

// True when this CPU (and its OS) has AVX-512F and the environment variable DYNCONV_EXT_AVX512 does not start
// with '0'. Read on every call, so one process can time both kernels interleaved (python/tools/avx512_ab.py).
bool tile_gemm_uses_avx512();


}  // namespace dynconv::cpu

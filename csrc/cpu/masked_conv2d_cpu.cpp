// CPU kernels of dynconv::masked_conv2d (and its in-place residual variant) and masked_conv2d_backward.
//
// Forward (implicit GEMM): active output rows are taken in blocks of 6; for each tap a row pointer into the
// channels-last input (a zero row for padding) feeds a 6x16 register-blocked microkernel (conv_block_6x16)
// against weights pre-packed in 16-column panels, so there is no im2row copy. On AVX-512 CPUs, float outputs wider
// than 16 channels per group take a 6x64 or 8x32 AVX-512 block instead (conv_rows_forward.h: forward_gemm). The epilogue adds bias, the
// residual and the activation and writes each row straight to its output pixel; inactive pixels are zeroed
// (or keep the residual) in the same parallel region. Above `dense_threshold` active density the dense ATen
// convolution is faster and is used instead, then masked.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "../conv_shape.h"
#include "active_rows.h"
#include "conv_rows_forward.h"
#include "tile_gemm.h"

namespace dynconv::cpu {
namespace {

constexpr int64_t kTileRows = 96;  // rows per backward tile (multiple of kMR)

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Copies columns [k0, k0 + kc) of the im2row rows of `count` active pixels (group g) into a[count x kc].
template <typename T>
void gather_rows(const ConvShape& s, const T* x, const int64_t* rows, int64_t count, int64_t g, int64_t k0,
                 int64_t kc, T* a) {
  for (int64_t r = 0; r < count; ++r) {
    const PixelCoord pc = coord(s, rows[r]);
    const int64_t hi0 = pc.ho * s.SH - s.PH, wi0 = pc.wo * s.SW - s.PW;
    T* dst = a + r * kc;
    int64_t k = k0;
    const int64_t k1 = k0 + kc;
    while (k < k1) {
      const int64_t t = k / s.Cg, c0 = k - t * s.Cg, len = std::min(s.Cg - c0, k1 - k);
      const int64_t hi = hi0 + (t / s.KW) * s.DH, wi = wi0 + (t % s.KW) * s.DW;
      if (hi >= 0 && hi < s.H && wi >= 0 && wi < s.W)
        std::memcpy(dst, x + ((pc.n * s.H + hi) * s.W + wi) * s.C + g * s.Cg + c0, len * sizeof(T));
      else
        std::memset(dst, 0, len * sizeof(T));
      dst += len;
      k += len;
    }
  }
}

// `inplace`: the residual itself is the output (masked_conv2d_residual_): active pixels are updated in
// place, inactive ones are never touched.
at::Tensor masked_conv2d_cpu_impl(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, int64_t block_size, const std::optional<at::Tensor>& residual,
                                  int64_t activation, double dense_threshold, bool inplace,
                                  bool zero_inactive_pixels, const std::optional<at::Tensor>& given_rows) {
  const ConvShape s = make_conv_shape(input, weight, bias, mask, stride, padding, dilation, groups, block_size);
  TORCH_CHECK(activation >= 0 && activation <= 2,
              "masked_conv2d: activation must be 0 (none), 1 (relu) or 2 (relu6), got ", activation);
  const int act_code = static_cast<int>(activation);
  const bool relu = act_code != 0;
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) check_residual(s, input, *residual);
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "masked_conv2d (CPU): dtype must be float32 or float64, got ", input.scalar_type());
  const auto fmt = input.suggest_memory_format();

  // Decide dense vs sparse from the count alone; the row list is built only for the sparse path.
  const at::Tensor mask_cells = mask.contiguous();
  const std::vector<int64_t> prefix = image_row_prefix(s, mask_cells.data_ptr<bool>());
  const int64_t n_active = prefix.back();
  const double density = s.out_pixels() ? double(n_active) / double(s.out_pixels()) : 0.0;
  if (n_active > 0 && density >= dense_threshold) {
    // Dense fallback: oneDNN's conv, inactive pixels zeroed in place (one pass, no expanded mask).
    at::Tensor out = at::conv2d(input, weight, bias, stride, padding, dilation, groups);
    const bool partial = n_active != s.out_pixels();
    // With a residual the `where` below restores inactive pixels instead; zero_inactive=False leaves them as computed.
    if (partial && !has_res && zero_inactive_pixels) {
      AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "masked_conv2d_dense_fallback", [&] {
        scalar_t* op = out.data_ptr<scalar_t>();
        const OutView ov = out_view(out);
        at::parallel_for(0, s.N * s.Ho, 16, [&](int64_t b0, int64_t e0) {
          zero_inactive<scalar_t>(s, mask_cells.data_ptr<bool>(), b0, e0, op, ov);
        });
      });
    }
    if (has_res || relu) {
      // act(conv + residual) at active pixels, residual (or 0) elsewhere: add, activate, then restore.
      at::Tensor y = has_res ? out.add_(*residual) : out;
      if (act_code == 1) y.relu_();
      if (act_code == 2) y.clamp_(0, 6);
      if (has_res && partial) y = at::where(pixel_mask(mask_cells, s), y, *residual);
      if (inplace) return residual->copy_(y);
      return y.contiguous(input.suggest_memory_format());
    }
    return out;
  }

  const bool have_rows = given_rows.has_value() && given_rows->defined();
  if (have_rows) {
    TORCH_CHECK(given_rows->scalar_type() == at::kLong && given_rows->dim() == 1 && given_rows->device().is_cpu(),
                "masked_conv2d: rows must be a 1-D int64 CPU tensor (dynconv_ext.ops.active_rows)");
    TORCH_CHECK(given_rows->numel() == n_active, "masked_conv2d: rows has ", given_rows->numel(),
                " entries but the mask selects ", n_active, " pixels");
  }
  const at::Tensor rows_c = have_rows ? given_rows->contiguous() : at::Tensor();
  const ActiveRows act = have_rows ? ActiveRows{} : build_active_rows(s, mask_cells.data_ptr<bool>(), prefix, /*with_inverse=*/false);
  if (have_rows)
    TORCH_CHECK(rows_match_mask(s, mask_cells.data_ptr<bool>(), rows_c.data_ptr<int64_t>(), rows_c.numel()),
                "masked_conv2d: rows is not this mask's index map (expected the strictly increasing flat indices "
                "of its active pixels, as dynconv_ext.ops.active_rows returns)");
  const int64_t* row_ptr = have_rows ? rows_c.data_ptr<int64_t>() : act.rows.data();
  const int64_t n_rows = have_rows ? rows_c.numel() : static_cast<int64_t>(act.rows.size());
  at::Tensor out;
  if (inplace) {
    out = *residual;
  } else {
    out = at::empty({s.N, s.Co, s.Ho, s.Wo}, input.options().memory_format(fmt));
    if (has_res) out.copy_(*residual);
  }
  if (n_rows == 0) {
    if (!has_res) out.zero_();
    return out;
  }
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor b = (bias.has_value() && bias->defined()) ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "masked_conv2d_cpu", [&] {
    const OutView ov = out_view(out);
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    // Inactive pixels to zero (none with a residual, or when the caller leaves them unspecified).
    const bool* zero_mask = (has_res || !zero_inactive_pixels) ? nullptr : mask_cells.data_ptr<bool>();
    if (s.Cg == 1 && s.G > 1)  // depthwise; a single-channel plain conv is a (narrow) GEMM
      forward_depthwise<scalar_t>(s, x.data_ptr<scalar_t>(), contiguous_in_view(s), weight, bp, row_ptr, n_rows, op, ov, has_res, act_code, zero_mask);
    else
      forward_gemm<scalar_t>(s, x.data_ptr<scalar_t>(), contiguous_in_view(s), weight, bp, row_ptr, n_rows, op, ov, has_res, act_code, zero_mask);
  });
  return out;
}

at::Tensor masked_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& mask, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups, int64_t block_size,
                             const std::optional<at::Tensor>& residual, int64_t activation, double dense_threshold,
                             bool zero_inactive, const std::optional<at::Tensor>& rows) {
  return masked_conv2d_cpu_impl(input, weight, bias, mask, stride, padding, dilation, groups, block_size, residual,
                                activation, dense_threshold, /*inplace=*/false, zero_inactive, rows);
}

at::Tensor masked_conv2d_residual_cpu_(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, const at::Tensor& mask,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       int64_t groups, int64_t block_size, at::Tensor& residual, int64_t activation,
                                       double dense_threshold, const std::optional<at::Tensor>& rows) {
  masked_conv2d_cpu_impl(input, weight, bias, mask, stride, padding, dilation, groups, block_size, residual,
                         activation, dense_threshold, /*inplace=*/true, /*zero_inactive_pixels=*/true, rows);
  return residual;
}

// ------------------------------------------------------------------------------------------------
// Backward. G = grad_output at the active rows ([M x Co]), A = the gathered im2row rows.
//   grad_bias   = column sums of G
//   grad_weight = per group, A_g^T G_g           (tile_gemm on the transposed tile, summed over tiles)
//   grad_input  = per group, dA_g = G_g W_g, then each input pixel pulls the dA entries that read it
//                 (a gather instead of a scatter-add, so threads never write the same pixel)
// ------------------------------------------------------------------------------------------------

// Packs W_g^T in panels over its K columns: packed[((g*kpanels + p)*Cog + co)*16 + j] = W[g*Cog+co, k=p*16+j].
template <typename T>
std::vector<T> pack_weight_transposed(const ConvShape& s, const at::Tensor& weight) {
  const at::Tensor w = weight.contiguous();
  const T* wp = w.data_ptr<T>();
  const int64_t K = s.k_per_group(), kpanels = ceil_div(K, kNR);
  std::vector<T> packed(static_cast<size_t>(s.G * kpanels * s.Cog * kNR), T(0));
  for (int64_t g = 0; g < s.G; ++g)
    for (int64_t co = 0; co < s.Cog; ++co) {
      const T* src = wp + (g * s.Cog + co) * s.Cg * s.taps();
      for (int64_t c = 0; c < s.Cg; ++c)
        for (int64_t t = 0; t < s.taps(); ++t) {
          const int64_t k = t * s.Cg + c, p = k / kNR, j = k % kNR;
          packed[((g * kpanels + p) * s.Cog + co) * kNR + j] = src[c * s.taps() + t];
        }
    }
  return packed;
}

template <typename T>
void backward_impl(const ConvShape& s, const T* x, const T* go, const at::Tensor& weight, const ActiveRows& act,
                   T* grad_input /*NHWC*/, T* grad_weight /*[Co,Cg,KH,KW]*/, T* grad_bias) {
  const int64_t M = static_cast<int64_t>(act.rows.size());
  const int64_t K = s.k_per_group();
  const int64_t opanels = ceil_div(s.Cog, kNR), kpanels = ceil_div(K, kNR);
  const int64_t Kpad = kpanels * kNR;
  // Tile rows so one tile's gathered rows ([TM x K]) stay within ~256 KiB.
  const int64_t TM = std::max<int64_t>(kMR, std::min<int64_t>(kTileRows, (65536 / std::max<int64_t>(K, 1)) / kMR * kMR));
  const int64_t ntiles = ceil_div(M, TM);
  const int nthreads = at::get_num_threads();

  if (grad_bias) {
    std::vector<T> acc(static_cast<size_t>(s.Co), T(0));
    for (int64_t r = 0; r < M; ++r) {
      const T* g = go + act.rows[r] * s.Co;
      for (int64_t co = 0; co < s.Co; ++co) acc[co] += g[co];
    }
    std::copy(acc.begin(), acc.end(), grad_bias);
  }

  if (grad_weight) {
    // Per thread: dWt[g][k][co] accumulated over that thread's tiles, rows padded to kMR.
    const int64_t Kr = round_up(K, kMR), ldc = opanels * kNR;
    std::vector<std::vector<T>> partial(static_cast<size_t>(nthreads));
    at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
      std::vector<T>& dwt = partial[at::get_thread_num()];
      if (dwt.empty()) dwt.assign(static_cast<size_t>(s.G * Kr * ldc), T(0));
      std::vector<T> abuf(static_cast<size_t>(TM * K + kMR), T(0));  // +kMR: padded rows read past the end
      std::vector<T> gpack(static_cast<size_t>(opanels * TM * kNR));
      for (int64_t t = tb; t < te; ++t) {
        const int64_t r0 = t * TM, mt = std::min(TM, M - r0);
        for (int64_t g = 0; g < s.G; ++g) {
          gather_rows<T>(s, x, act.rows.data() + r0, mt, g, 0, K, abuf.data());
          std::fill(gpack.begin(), gpack.end(), T(0));
          for (int64_t r = 0; r < mt; ++r) {
            const T* gr = go + act.rows[r0 + r] * s.Co + g * s.Cog;
            for (int64_t co = 0; co < s.Cog; ++co) gpack[((co / kNR) * TM + r) * kNR + co % kNR] = gr[co];
          }
          // dWt_g[K x Cog] += A^T[K x mt] * G[mt x Cog]; a(i = k, kk = r) = abuf[r*K + k].
          tile_gemm<T>(Kr, opanels, mt, abuf.data(), 1, K, gpack.data(), TM * kNR, dwt.data() + g * Kr * ldc, ldc,
                       true);
        }
      }
    });
    const int64_t ktot = s.Cg * s.taps();
    for (int64_t g = 0; g < s.G; ++g)
      for (int64_t co = 0; co < s.Cog; ++co)
        for (int64_t c = 0; c < s.Cg; ++c)
          for (int64_t t = 0; t < s.taps(); ++t) {
            T v = 0;
            for (const auto& dwt : partial)
              if (!dwt.empty()) v += dwt[(g * Kr + t * s.Cg + c) * ldc + co];
            grad_weight[(g * s.Cog + co) * ktot + c * s.taps() + t] = v;
          }
  }

  if (grad_input) {
    const std::vector<T> wtp = pack_weight_transposed<T>(s, weight);
    const int64_t ld = s.G * Kpad;  // dA row: [G][Kpad]
    if (s.N >= nthreads) {
      // Each thread owns whole samples (an input pixel only receives from outputs of its own sample), so
      // dA of a tile is scatter-added straight into grad_input while it is still in L2.
      std::vector<int64_t> sample_begin(static_cast<size_t>(s.N + 1), M);
      const int64_t hw = s.Ho * s.Wo;
      for (int64_t r = M - 1; r >= 0; --r) sample_begin[act.rows[r] / hw] = r;
      for (int64_t n = s.N - 1; n >= 0; --n) sample_begin[n] = std::min(sample_begin[n], sample_begin[n + 1]);
      at::parallel_for(0, s.N, 1, [&](int64_t nb, int64_t ne) {
        std::fill(grad_input + nb * s.H * s.W * s.C, grad_input + ne * s.H * s.W * s.C, T(0));
        std::vector<T> gbuf(static_cast<size_t>(round_up(TM, kMR) * s.Co));
        std::vector<T> dbuf(static_cast<size_t>(round_up(TM, kMR) * ld));
        for (int64_t r0 = sample_begin[nb]; r0 < sample_begin[ne]; r0 += TM) {
          const int64_t mt = std::min(TM, sample_begin[ne] - r0), mpad = round_up(mt, kMR);
          for (int64_t r = 0; r < mt; ++r) std::memcpy(&gbuf[r * s.Co], go + act.rows[r0 + r] * s.Co, s.Co * sizeof(T));
          std::fill(gbuf.begin() + mt * s.Co, gbuf.begin() + mpad * s.Co, T(0));
          for (int64_t g = 0; g < s.G; ++g)
            tile_gemm<T>(mpad, kpanels, s.Cog, gbuf.data() + g * s.Cog, s.Co, 1,
                         wtp.data() + g * kpanels * s.Cog * kNR, s.Cog * kNR, dbuf.data() + g * Kpad, ld, false);
          for (int64_t r = 0; r < mt; ++r) {
            const int64_t p = act.rows[r0 + r], n = p / hw, rem = p - n * hw, ho = rem / s.Wo, wo = rem - ho * s.Wo;
            for (int64_t t = 0; t < s.taps(); ++t) {
              const int64_t hi = ho * s.SH - s.PH + (t / s.KW) * s.DH, wi = wo * s.SW - s.PW + (t % s.KW) * s.DW;
              if (hi < 0 || hi >= s.H || wi < 0 || wi >= s.W) continue;
              T* gi = grad_input + ((n * s.H + hi) * s.W + wi) * s.C;
              const T* src = dbuf.data() + r * ld + t * s.Cg;
              for (int64_t g = 0; g < s.G; ++g)
                for (int64_t c = 0; c < s.Cg; ++c) gi[g * s.Cg + c] += src[g * Kpad + c];
            }
          }
        }
      });
      return;
    }
    // Fewer samples than threads: materialize dA for all active rows, then each input pixel pulls the
    // entries that read it (a gather, so threads never write the same pixel).
    std::vector<T> dA(static_cast<size_t>((M + kMR) * ld));
    at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
      std::vector<T> gbuf(static_cast<size_t>(round_up(TM, kMR) * s.Co));
      for (int64_t t = tb; t < te; ++t) {
        const int64_t r0 = t * TM, mt = std::min(TM, M - r0), mpad = round_up(mt, kMR);
        for (int64_t r = 0; r < mt; ++r) std::memcpy(&gbuf[r * s.Co], go + act.rows[r0 + r] * s.Co, s.Co * sizeof(T));
        std::fill(gbuf.begin() + mt * s.Co, gbuf.begin() + mpad * s.Co, T(0));
        for (int64_t g = 0; g < s.G; ++g)
          tile_gemm<T>(mpad, kpanels, s.Cog, gbuf.data() + g * s.Cog, s.Co, 1, wtp.data() + g * kpanels * s.Cog * kNR,
                       s.Cog * kNR, dA.data() + r0 * ld + g * Kpad, ld, false);
      }
    });
    at::parallel_for(0, s.N * s.H, 4, [&](int64_t b, int64_t e) {
      for (int64_t nh = b; nh < e; ++nh) {
        const int64_t n = nh / s.H, hi = nh % s.H;
        for (int64_t wi = 0; wi < s.W; ++wi) {
          T* gi = grad_input + ((n * s.H + hi) * s.W + wi) * s.C;
          std::fill(gi, gi + s.C, T(0));
          for (int64_t kh = 0; kh < s.KH; ++kh) {
            const int64_t hnum = hi + s.PH - kh * s.DH;
            if (hnum < 0 || hnum % s.SH) continue;
            const int64_t ho = hnum / s.SH;
            if (ho >= s.Ho) continue;
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t wnum = wi + s.PW - kw * s.DW;
              if (wnum < 0 || wnum % s.SW) continue;
              const int64_t wo = wnum / s.SW;
              if (wo >= s.Wo) continue;
              const int64_t row = act.row_of_pixel[(n * s.Ho + ho) * s.Wo + wo];
              if (row < 0) continue;
              const int64_t tap = kh * s.KW + kw;
              const T* src = dA.data() + row * ld + tap * s.Cg;
              for (int64_t g = 0; g < s.G; ++g)
                for (int64_t c = 0; c < s.Cg; ++c) gi[g * s.Cg + c] += src[g * Kpad + c];
            }
          }
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& mask,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t block_size,
    std::array<bool, 3> output_mask, double dense_threshold) {
  const ConvShape s = make_conv_shape(input, weight, std::nullopt, mask, stride, padding, dilation, groups, block_size);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == s.N && grad_output.size(1) == s.Co &&
                  grad_output.size(2) == s.Ho && grad_output.size(3) == s.Wo,
              "masked_conv2d_backward: grad_output has shape ", grad_output.sizes(), ", expected [", s.N, ", ", s.Co,
              ", ", s.Ho, ", ", s.Wo, "]");
  const auto empty = [&] { return at::empty({0}, input.options()); };
  const ActiveRows act = build_active_rows(s, mask, /*with_inverse=*/output_mask[0]);
  const double density = s.out_pixels() ? double(act.rows.size()) / double(s.out_pixels()) : 0.0;
  if (!act.rows.empty() && density >= dense_threshold) {
    const at::Tensor gm = grad_output * pixel_mask(mask, s);
    auto [gi, gw, gb] = at::convolution_backward(gm, input, weight, at::IntArrayRef{s.Co}, stride, padding, dilation,
                                                 false, {0, 0}, groups, output_mask);
    return {output_mask[0] ? gi : empty(), output_mask[1] ? gw : empty(), output_mask[2] ? gb : empty()};
  }
  at::Tensor gi = output_mask[0] ? at::empty({s.N, s.C, s.H, s.W}, input.options().memory_format(at::MemoryFormat::ChannelsLast)) : empty();
  at::Tensor gw = output_mask[1] ? at::empty_like(weight, at::MemoryFormat::Contiguous) : empty();
  at::Tensor gb = output_mask[2] ? at::empty({s.Co}, input.options()) : empty();
  if (act.rows.empty()) {
    gi.zero_(); gw.zero_(); gb.zero_();
  } else {
    const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor go = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "masked_conv2d_backward_cpu", [&] {
      backward_impl<scalar_t>(s, x.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), weight, act,
                              output_mask[0] ? gi.data_ptr<scalar_t>() : nullptr,
                              output_mask[1] ? gw.data_ptr<scalar_t>() : nullptr,
                              output_mask[2] ? gb.data_ptr<scalar_t>() : nullptr);
    });
  }
  if (output_mask[0]) gi = gi.contiguous(input.suggest_memory_format());
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d_cpu);
  m.impl("masked_conv2d_residual_", &masked_conv2d_residual_cpu_);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cpu);
}

}  // namespace dynconv::cpu

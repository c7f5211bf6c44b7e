// CPU kernel of dynconv::dilate_mask: the pixels a kernel x kernel (stride 1, 'same', dilation d) conv reads for
// its outputs at a bool mask [N, H, W] to be right, i.e. a boolean max-filter of radius d * (kernel / 2) in steps
// of d. Separable: a horizontal OR per row into a scratch row, then a vertical OR of those rows. The gated DynConv
// blocks call it once a block and forward; as torch ops (shifted copies OR-ed in place) it cost ~20 us at batch 1
// on a 32x32 mask, most of it per-op dispatch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace dynconv::cpu {
namespace {

at::Tensor dilate_mask_cpu(const at::Tensor& mask, int64_t kernel, int64_t dilation) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 3,
              "dilate_mask: mask must be a bool tensor [N, H, W], got ", mask.scalar_type(), " of rank ", mask.dim());
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, "dilate_mask: kernel must be odd and >= 1, got ", kernel);
  TORCH_CHECK(dilation >= 1, "dilate_mask: dilation must be >= 1, got ", dilation);
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty_like(m);
  const int64_t N = m.size(0), H = m.size(1), W = m.size(2), r = dilation * (kernel / 2);
  const bool* src = m.data_ptr<bool>();
  bool* dst = out.data_ptr<bool>();
  // Horizontal OR of row y of image n into h (W values).
  const auto row_or = [&](const bool* row, bool* h) {
    for (int64_t x = 0; x < W; ++x) {
      bool v = row[x];
      for (int64_t s = dilation; s <= r && !v; s += dilation)
        v = (x - s >= 0 && row[x - s]) || (x + s < W && row[x + s]);
      h[x] = v;
    }
  };
  // One image per task: its horizontally OR-ed rows, then each output row the OR of its vertical neighbours.
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W)), [&](int64_t n0, int64_t n1) {
    std::vector<char> hbuf(static_cast<size_t>(H * W));
    bool* h = reinterpret_cast<bool*>(hbuf.data());
    for (int64_t n = n0; n < n1; ++n) {
      const bool* img = src + n * H * W;
      for (int64_t y = 0; y < H; ++y) row_or(img + y * W, h + y * W);
      bool* o = dst + n * H * W;
      for (int64_t y = 0; y < H; ++y) {
        bool* orow = o + y * W;
        std::copy(h + y * W, h + (y + 1) * W, orow);
        for (int64_t s = dilation; s <= r; s += dilation) {
          if (y - s >= 0)
            for (int64_t x = 0; x < W; ++x) orow[x] = orow[x] || h[(y - s) * W + x];
          if (y + s < H)
            for (int64_t x = 0; x < W; ++x) orow[x] = orow[x] || h[(y + s) * W + x];
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CPU, m) { m.impl("dilate_mask", &dilate_mask_cpu); }

}  // namespace dynconv::cpu

// Index map of a mask: which output pixels are computed. Built once per call in O(N*Ho*Wo).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../conv_shape.h"

namespace dynconv::cpu {

struct ActiveRows {
  std::vector<int64_t> rows;          // flat output pixel (n*Ho + ho)*Wo + wo of each active row, raster order
  std::vector<int64_t> row_of_pixel;  // inverse map, -1 where inactive (filled only when asked)
};

// One mask row at pixel granularity: active[wo] = mask_row[wo / block], without a division per pixel.
inline void expand_mask_row(const ConvShape& s, const bool* mask_row, uint8_t* active) {
  if (s.block == 1) {
    std::memcpy(active, mask_row, static_cast<size_t>(s.Wo));
    return;
  }
  for (int64_t j = 0, wo = 0; j < s.Wm; ++j) {
    const uint8_t v = mask_row[j];
    for (int64_t e = std::min(s.Wo, wo + s.block); wo < e; ++wo) active[wo] = v;
  }
}

// Raster order keeps neighbouring rows of a tile close in the input, so their halos share cache lines.
// Branch-free compaction: random masks would mispredict a branch on every other pixel.
// Number of active output pixels (cheap: one pass over the mask cells, not the pixels).
inline int64_t count_active(const ConvShape& s, const bool* mp) {
  int64_t count = 0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t i = 0; i < s.Hm; ++i) {
      const bool* mrow = mp + (n * s.Hm + i) * s.Wm;
      int64_t on = 0;
      for (int64_t j = 0; j < s.Wm; ++j) on += mrow[j] ? std::min(s.block, s.Wo - j * s.block) : 0;
      count += on * std::min(s.block, s.Ho - i * s.block);
    }
  return count;
}

inline ActiveRows build_active_rows(const ConvShape& s, const at::Tensor& mask, bool with_inverse) {
  const at::Tensor m = mask.contiguous();
  const bool* mp = m.data_ptr<bool>();
  const int64_t count = count_active(s, mp);
  ActiveRows a;
  a.rows.resize(static_cast<size_t>(count) + 1);  // +1: the branch-free loop writes one past the last row
  if (with_inverse) a.row_of_pixel.assign(static_cast<size_t>(s.out_pixels()), -1);
  std::vector<uint8_t> active(static_cast<size_t>(s.Wo));
  int64_t* out = a.rows.data();
  int64_t p = 0, r = 0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t ho = 0; ho < s.Ho; ++ho) {
      expand_mask_row(s, mp + (n * s.Hm + ho / s.block) * s.Wm, active.data());
      for (int64_t wo = 0; wo < s.Wo; ++wo, ++p) {
        out[r] = p;
        r += active[wo];
      }
    }
  a.rows.resize(static_cast<size_t>(count));
  if (with_inverse)
    for (int64_t i = 0; i < count; ++i) a.row_of_pixel[out[i]] = i;
  return a;
}

}  // namespace dynconv::cpu

// Index map of a mask: which output pixels are computed. Built once per call in O(N*Ho*Wo).
#pragma once

#include <algorithm>
#include <vector>

#include "../conv_shape.h"

namespace dynconv::cpu {

struct ActiveRows {
  std::vector<int64_t> rows;          // flat output pixel (n*Ho + ho)*Wo + wo of each active row, raster order
  std::vector<int64_t> row_of_pixel;  // inverse map, -1 where inactive (filled only when asked)
};

// Raster order keeps neighbouring rows of a tile close in the input, so their halos share cache lines.
inline ActiveRows build_active_rows(const ConvShape& s, const at::Tensor& mask, bool with_inverse) {
  const at::Tensor m = mask.contiguous();
  const bool* mp = m.data_ptr<bool>();
  // Count first: an exact-size vector avoids a worst-case allocation on every call.
  int64_t count = 0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t ho = 0; ho < s.Ho; ho += s.block) {
      const bool* mrow = mp + (n * s.Hm + ho / s.block) * s.Wm;
      int64_t on = 0;
      for (int64_t j = 0; j < s.Wm; ++j) on += mrow[j] ? std::min(s.block, s.Wo - j * s.block) : 0;
      count += on * std::min(s.block, s.Ho - ho);
    }
  ActiveRows a;
  a.rows.resize(static_cast<size_t>(count));
  if (with_inverse) a.row_of_pixel.assign(static_cast<size_t>(s.out_pixels()), -1);
  int64_t* out = a.rows.data();
  int64_t p = 0, r = 0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t ho = 0; ho < s.Ho; ++ho) {
      const bool* mrow = mp + (n * s.Hm + ho / s.block) * s.Wm;
      for (int64_t wo = 0; wo < s.Wo; ++wo, ++p)
        if (mrow[s.block == 1 ? wo : wo / s.block]) {
          if (with_inverse) a.row_of_pixel[p] = r;
          out[r++] = p;
        }
    }
  return a;
}

}  // namespace dynconv::cpu

// Index map of a mask: which output pixels are computed. Built once per call in O(N*Ho*Wo), in parallel.
#pragma once

#include <ATen/Parallel.h>

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

// prefix[nh] = active output pixels before image row nh = n*Ho + ho; prefix[N*Ho] = all of them.
// One pass over the mask cells; a pixel mask row is a byte sum the compiler vectorizes (the per-cell
// min() of block masks would stop that, so it is only paid when block > 1).
inline std::vector<int64_t> image_row_prefix(const ConvShape& s, const bool* mp) {
  std::vector<int64_t> prefix(static_cast<size_t>(s.N * s.Ho + 1));
  int64_t total = 0;
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t i = 0; i < s.Hm; ++i) {
      const uint8_t* mrow = reinterpret_cast<const uint8_t*>(mp + (n * s.Hm + i) * s.Wm);
      int64_t on = 0;
      if (s.block == 1) {
        int32_t sum = 0;
        for (int64_t j = 0; j < s.Wm; ++j) sum += mrow[j];
        on = sum;
      } else {
        for (int64_t j = 0; j < s.Wm; ++j) on += mrow[j] ? std::min(s.block, s.Wo - j * s.block) : 0;
      }
      for (int64_t ho = i * s.block, e = std::min(s.Ho, ho + s.block); ho < e; ++ho) {
        prefix[n * s.Ho + ho] = total;
        total += on;
      }
    }
  prefix[s.N * s.Ho] = total;
  return prefix;
}

// Raster order keeps neighbouring rows of a tile close in the input, so their halos share cache lines.
// Each image row fills its own slice [prefix[nh], prefix[nh+1]), so threads never write the same entry.
// Branch-free compaction into a per-row scratch: random masks would mispredict a branch on every other pixel.
inline ActiveRows build_active_rows(const ConvShape& s, const bool* mp, const std::vector<int64_t>& prefix,
                                    bool with_inverse) {
  ActiveRows a;
  const int64_t count = prefix.back();
  a.rows.resize(static_cast<size_t>(count));
  if (with_inverse) a.row_of_pixel.assign(static_cast<size_t>(s.out_pixels()), -1);
  int64_t* out = a.rows.data();
  at::parallel_for(0, s.N * s.Ho, 16, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> active(static_cast<size_t>(s.Wo));
    std::vector<int64_t> scratch(static_cast<size_t>(s.Wo + 1));  // +1: the loop writes one past the last
    for (int64_t nh = b; nh < e; ++nh) {
      const int64_t n = nh / s.Ho, ho = nh % s.Ho;
      expand_mask_row(s, mp + (n * s.Hm + ho / s.block) * s.Wm, active.data());
      int64_t r = 0, p = nh * s.Wo;
      for (int64_t wo = 0; wo < s.Wo; ++wo, ++p) {
        scratch[r] = p;
        r += active[wo];
      }
      std::memcpy(out + prefix[nh], scratch.data(), static_cast<size_t>(r) * sizeof(int64_t));
      if (with_inverse)
        for (int64_t i = 0; i < r; ++i) a.row_of_pixel[scratch[i]] = prefix[nh] + i;
    }
  });
  return a;
}

// True when `rows` (count entries, count = the mask's active pixels) is exactly the mask's index map:
// strictly increasing, in range and active at each entry. The kernels index memory with these rows and
// zero the gaps between them, so a caller-supplied list is checked before use (one O(count) pass).
inline bool rows_match_mask(const ConvShape& s, const bool* mp, const int64_t* rows, int64_t count) {
  const int64_t hw = s.Ho * s.Wo;
  int64_t prev = -1, n = 0, ho = 0, wo = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t p = rows[i];
    if (p <= prev || p >= s.out_pixels()) return false;  // strictly increasing from 0, in range
    if (prev >= 0 && p - prev < s.Wo - wo) {  // same image row: no division (rows are mostly close together)
      wo += p - prev;
    } else {
      n = p / hw;
      const int64_t r = p - n * hw;
      ho = r / s.Wo;
      wo = r - ho * s.Wo;
    }
    prev = p;
    const int64_t cell = (n * s.Hm + (s.block == 1 ? ho : ho / s.block)) * s.Wm + (s.block == 1 ? wo : wo / s.block);
    if (!mp[cell]) return false;
  }
  return true;
}

inline ActiveRows build_active_rows(const ConvShape& s, const at::Tensor& mask, bool with_inverse) {
  const at::Tensor m = mask.contiguous();
  const bool* mp = m.data_ptr<bool>();
  return build_active_rows(s, mp, image_row_prefix(s, mp), with_inverse);
}

}  // namespace dynconv::cpu

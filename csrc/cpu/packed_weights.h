// Packed-weight cache for weights their owner declares constant (dynconv::mark_constant_weight): the models' fused
// inference paths fold BN into fresh weight tensors that nothing modifies, and every conv call used to repack
// them into the kernels' panel layout (at batch 1 that packing, e.g. 720 KB for an MSDNet classifier conv, cost
// more than the arithmetic). A marked weight's packings are kept while the tensor lives and its version counter
// is unchanged; anything unmarked (a parameter, which `.data` or numpy can change behind the version counter) is
// packed on every call as before. DYNCONV_EXT_PACK_CACHE=0 (read per call) turns the cache off.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <functional>
#include <utility>

namespace dynconv::cpu {

// Declares `weight` constant for as long as it lives (inference tensors and tensors without storage are ignored).
void mark_constant_weight(const at::Tensor& weight);

// `pack()`'s result for this weight and layout key (panel width nr, groups, kind), from the cache where the weight
// is marked constant and unchanged since, else packed now (and kept if marked).
at::Tensor cached_packing(const at::Tensor& weight, int64_t nr, int64_t groups, int kind,
                          const std::function<at::Tensor()>& pack);

// Entries and bytes held (for tests).
std::pair<int64_t, int64_t> packed_cache_stats();

}  // namespace dynconv::cpu

// The packed-weight cache (packed_weights.h). Entries are keyed by the weight's TensorImpl and hold a weak
// reference to it: an impl's memory is not reused while a weak reference exists, so a key cannot be taken by
// another tensor, and an expired entry (the weight was freed) is dropped at the next insertion.
#include "packed_weights.h"

#include <cstdlib>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace dynconv::cpu {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Packing {
  int64_t nr, groups;
  int kind;
  at::ScalarType dtype;
  int64_t version;
  std::vector<int64_t> sizes, strides;
  at::Tensor packed;
};

struct Marked {
  WeakImpl ref;
  std::vector<Packing> packings;
};

// Bounds the cache (a model's folded weights are a few MB); beyond it the marked weights' packings are dropped
// and rebuilt on use.
constexpr int64_t kMaxCacheBytes = int64_t(512) << 20;

std::mutex mu;
std::unordered_map<const c10::TensorImpl*, Marked> marked;
int64_t cached_bytes = 0;

bool cache_enabled() {
  const char* v = std::getenv("DYNCONV_EXT_PACK_CACHE");
  return !(v && v[0] == '0');
}

void drop_expired_locked() {
  for (auto it = marked.begin(); it != marked.end();) {
    if (it->second.ref.expired()) {
      for (const Packing& p : it->second.packings) cached_bytes -= p.packed.nbytes();
      it = marked.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace

void mark_constant_weight(const at::Tensor& weight) {
  if (!weight.defined() || weight.is_inference() || !weight.has_storage()) return;
  std::lock_guard<std::mutex> lock(mu);
  drop_expired_locked();
  marked.try_emplace(weight.unsafeGetTensorImpl(), Marked{WeakImpl(weight.getIntrusivePtr()), {}});
}

at::Tensor cached_packing(const at::Tensor& weight, int64_t nr, int64_t groups, int kind,
                          const std::function<at::Tensor()>& pack) {
  if (weight.is_inference() || !cache_enabled()) return pack();
  const c10::TensorImpl* key = weight.unsafeGetTensorImpl();
  const int64_t version = weight._version();
  const auto same = [&](const Packing& p) {
    return p.nr == nr && p.groups == groups && p.kind == kind && p.dtype == weight.scalar_type() &&
           weight.sizes() == at::IntArrayRef(p.sizes) && weight.strides() == at::IntArrayRef(p.strides);
  };
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = marked.find(key);
    if (it == marked.end() || it->second.ref.expired()) return pack();
    for (const Packing& p : it->second.packings)
      if (same(p) && p.version == version) return p.packed;
  }
  at::Tensor packed = pack();  // outside the lock: packing runs a parallel_for
  std::lock_guard<std::mutex> lock(mu);
  auto it = marked.find(key);
  if (it == marked.end() || it->second.ref.expired()) return packed;
  auto& ps = it->second.packings;
  for (auto p = ps.begin(); p != ps.end();) {  // a stale packing of this layout (the weight changed in place)
    if (same(*p)) {
      cached_bytes -= p->packed.nbytes();
      p = ps.erase(p);
    } else {
      ++p;
    }
  }
  if (cached_bytes + static_cast<int64_t>(packed.nbytes()) > kMaxCacheBytes) return packed;
  ps.push_back(Packing{nr, groups, kind, weight.scalar_type(), version, weight.sizes().vec(), weight.strides().vec(),
                       packed});
  cached_bytes += packed.nbytes();
  return packed;
}

std::pair<int64_t, int64_t> packed_cache_stats() {
  std::lock_guard<std::mutex> lock(mu);
  drop_expired_locked();
  int64_t n = 0;
  for (const auto& kv : marked) n += static_cast<int64_t>(kv.second.packings.size());
  return {n, cached_bytes};
}

}  // namespace dynconv::cpu

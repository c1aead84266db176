// Selection ops on the CPU: top-k, proportional sampling with and without replacement,
// and the percentile rule (specification: fastsel/reference.py; per-element math:
// fastsel/selection_keys.h, shared with the CUDA kernels).
//
// Top-k and sampling without replacement both take the k smallest of N unique 64-bit
// values (key << 32 | index), returned in ascending order:
//   1. a radix histogram of the top 16 bits (per thread) finds the bucket that holds the
//      k-th smallest value; a second pass gathers that bucket's values, and nth_element
//      among them alone finds the value T itself;
//   2. since the values are unique, exactly k of them are <= T: a counting pass and a
//      gathering pass collect them in index order;
//   3. a stable LSD radix sort on the 32-bit key puts them in (key, index) order.
// The four passes over N are parallel over threads; only the k winners are sorted.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fastsel/selection_keys.h"
#include "kernels.h"
#include "race_keys_avx2.h"

#include "fastsel/isa_namespace.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN
namespace {

constexpr int64_t kMaxIndices = int64_t(1) << 32;  // the index must fit the low 32 bits
constexpr int kBucketBits = 16;

// Contiguous ranges of [0, n) of at least `grain` elements, at most one per thread.
struct Chunks {
  int64_t n, count, size;
  Chunks(int64_t n_, int64_t grain) : n(n_) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    count = std::max<int64_t>(1, std::min(threads, (n + grain - 1) / grain));
    size = (n + count - 1) / count;
  }
  int64_t begin(int64_t c) const { return std::min(n, c * size); }
  int64_t end(int64_t c) const { return std::min(n, (c + 1) * size); }
};

template <typename F>
void for_each_chunk(const Chunks& chunks, F&& f) {
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c, chunks.begin(c), chunks.end(c));
  });
}

// The k-th smallest (1-based) of n unique values.
uint64_t kth_smallest(const uint64_t* v, int64_t n, int64_t k) {
  constexpr int64_t kBuckets = int64_t(1) << kBucketBits;
  constexpr int kShift = 64 - kBucketBits;
  const Chunks chunks(n, 1 << 16);
  std::vector<uint32_t> hist(static_cast<size_t>(chunks.count * kBuckets), 0);
  for_each_chunk(chunks, [&](int64_t c, int64_t b, int64_t e) {
    uint32_t* h = hist.data() + c * kBuckets;
    for (int64_t i = b; i < e; ++i) ++h[v[i] >> kShift];
  });
  int64_t before = 0, bucket = 0;
  for (; bucket < kBuckets; ++bucket) {
    int64_t count = 0;
    for (int64_t c = 0; c < chunks.count; ++c) count += hist[c * kBuckets + bucket];
    if (before + count >= k) break;
    before += count;
  }
  // Gather the bucket's values in parallel: each chunk's count is in its histogram.
  std::vector<int64_t> offset(chunks.count + 1, 0);
  for (int64_t c = 0; c < chunks.count; ++c) offset[c + 1] = offset[c] + hist[c * kBuckets + bucket];
  std::vector<uint64_t> candidates(static_cast<size_t>(offset[chunks.count]));
  for_each_chunk(chunks, [&](int64_t c, int64_t b, int64_t e) {
    int64_t o = offset[c];
    for (int64_t i = b; i < e; ++i) {
      if (static_cast<int64_t>(v[i] >> kShift) == bucket) candidates[o++] = v[i];
    }
  });
  const auto nth = candidates.begin() + (k - before - 1);
  std::nth_element(candidates.begin(), nth, candidates.end());
  return *nth;
}

// Stable LSD radix sort of values by their top 32 bits (11-bit digits; a digit shared
// by every value is skipped).
void radix_sort_by_key(std::vector<uint64_t>& v) {
  constexpr int kDigitBits = 11;
  constexpr uint64_t kMask = (uint64_t(1) << kDigitBits) - 1;
  std::vector<uint64_t> tmp(v.size());
  for (int shift = 32; shift < 64; shift += kDigitBits) {
    std::vector<int64_t> count(kMask + 2, 0);
    for (const uint64_t x : v) ++count[((x >> shift) & kMask) + 1];
    if (std::any_of(count.begin() + 1, count.end(), [&](int64_t c) { return c == static_cast<int64_t>(v.size()); })) {
      continue;
    }
    for (size_t d = 1; d < count.size(); ++d) count[d] += count[d - 1];
    for (const uint64_t x : v) tmp[count[(x >> shift) & kMask]++] = x;
    v.swap(tmp);
  }
}

// Indices of the k smallest unique packed values (key << 32 | index), in value order.
at::Tensor k_smallest_indices(const std::vector<uint64_t>& packed, int64_t k, const at::TensorOptions& opts) {
  const int64_t n = static_cast<int64_t>(packed.size());
  at::Tensor out = at::empty({k}, opts.dtype(at::kLong));
  if (k == 0) return out;
  const uint64_t threshold = kth_smallest(packed.data(), n, k);
  // Gather the k values <= threshold in index order (per-chunk counts, then offsets).
  const Chunks chunks(n, 1 << 16);
  std::vector<int64_t> offset(chunks.count + 1, 0);
  for_each_chunk(chunks, [&](int64_t c, int64_t b, int64_t e) {
    int64_t count = 0;
    for (int64_t i = b; i < e; ++i) count += packed[i] <= threshold;
    offset[c + 1] = count;
  });
  for (int64_t c = 0; c < chunks.count; ++c) offset[c + 1] += offset[c];
  std::vector<uint64_t> selected(static_cast<size_t>(k));
  for_each_chunk(chunks, [&](int64_t c, int64_t b, int64_t e) {
    int64_t o = offset[c];
    for (int64_t i = b; i < e; ++i) {
      if (packed[i] <= threshold) selected[o++] = packed[i];
    }
  });
  radix_sort_by_key(selected);
  int64_t* idx = out.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) idx[j] = static_cast<int64_t>(selected[j] & 0xFFFFFFFFu);
  return out;
}

void check_vector(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D [N], got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating point tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(0) < kMaxIndices, op, ": ", name, " has ", t.size(0),
                    " entries; at most 2^32 - 1 are supported");
}

void check_k(int64_t k, int64_t n, const char* op) {
  TORCH_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(k <= n, op, ": k = ", k, " exceeds N = ", n);
}

void check_seed(int64_t seed, int64_t counter, const char* op) {
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK_VALUE(counter >= 0, op, ": counter must be in [0, 2^63), got ", counter);
}

// Importance as float32 (the sampling ops' working precision), contiguous.
at::Tensor importance_f32(const at::Tensor& importance) {
  return importance.to(at::kFloat).contiguous();
}

// First NaN, negative and infinite entries, the number of positive entries and the
// largest entry, in one parallel pass.
struct ImportanceSummary {
  int64_t first_nan = std::numeric_limits<int64_t>::max();
  int64_t first_negative = std::numeric_limits<int64_t>::max();
  int64_t first_inf = std::numeric_limits<int64_t>::max();
  int64_t positive = 0;
  float max = 0.0f;
};

ImportanceSummary summarize_importance(const float* w, int64_t n) {
  const Chunks chunks(n, 1 << 15);
  std::vector<ImportanceSummary> parts(chunks.count);
  for_each_chunk(chunks, [&](int64_t c, int64_t b, int64_t e) {
    ImportanceSummary s;
    for (int64_t i = b; i < e; ++i) {
      const float x = w[i];
      if (x > 0.0f) {
        ++s.positive;
        if (x > s.max) s.max = x;
        if (x == std::numeric_limits<float>::infinity() && i < s.first_inf) s.first_inf = i;
      } else if (x < 0.0f) {
        if (i < s.first_negative) s.first_negative = i;
      } else if (x != x) {
        if (i < s.first_nan) s.first_nan = i;
      }
    }
    parts[c] = s;
  });
  ImportanceSummary all;
  for (const auto& s : parts) {
    all.first_nan = std::min(all.first_nan, s.first_nan);
    all.first_negative = std::min(all.first_negative, s.first_negative);
    all.first_inf = std::min(all.first_inf, s.first_inf);
    all.positive += s.positive;
    all.max = std::max(all.max, s.max);
  }
  return all;
}

// The errors of fastsel.sample for bad importance values (same wording as fastsel/selection.py).
void check_importance_values(const ImportanceSummary& s, const at::Tensor& importance, int64_t k,
                             bool replacement) {
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(s.first_nan == kNone, "importance must not contain NaN; importance[",
                    s.first_nan, "] is NaN");
  if (s.first_negative != kNone) {
    TORCH_CHECK_VALUE(false, "importance must be non-negative; importance[", s.first_negative,
                      "] = ", importance[s.first_negative].item<double>());
  }
  if (s.first_inf != kNone) {
    const double value = importance[s.first_inf].item<double>();
    TORCH_CHECK_VALUE(!std::isfinite(value), "importance must be finite in float32, in which it is used: importance[",
                      s.first_inf, "] = ", value, " exceeds float32's largest value ",
                      std::numeric_limits<float>::max(),
                      "; rescale the importances (only their ratios matter), e.g. divide by their maximum");
    TORCH_CHECK_VALUE(false, "importance must be finite; importance[", s.first_inf, "] = inf");
  }
  if (k == 0) return;
  TORCH_CHECK_VALUE(s.positive > 0, "importance is all zero (in float32): nothing can be drawn");
  TORCH_CHECK_VALUE(replacement || k <= s.positive, "k = ", k,
                    " exceeds the number of nonzero importances (", s.positive,
                    ") for sampling without replacement");
}

// #{j : sorted[j] < x} by a branchless binary search: the halving step is a conditional
// move, not a branch, so the ~50% mispredictions of std::lower_bound on random values
// disappear (the history is small and stays in L1).
inline int64_t count_below(const double* sorted, size_t len, double x) {
  const double* base = sorted;
  while (len > 1) {
    const size_t half = len / 2;
    base = (base[half] < x) ? base + half : base;
    len -= half;
  }
  return (base - sorted) + (*base < x);
}

}  // namespace

at::Tensor select_topk(const at::Tensor& scores, int64_t k, bool largest) {
  constexpr const char* op = "fastsel.select_topk";
  check_vector(scores, "scores", op);
  const int64_t n = scores.size(0);
  check_k(k, n, op);
  const auto opts = scores.options();
  if (k == 0) return at::empty({0}, opts.dtype(at::kLong));
  if (scores.scalar_type() == at::kDouble) {
    // 64-bit keys leave no room for the index: sort (key, index) pairs instead.
    const at::Tensor s = scores.contiguous();
    const double* x = s.const_data_ptr<double>();
    std::vector<std::pair<uint64_t, int64_t>> keyed(n);
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) keyed[i] = {rank_key_bits64(x[i], largest), i};
    });
    std::nth_element(keyed.begin(), keyed.begin() + (k - 1), keyed.end());
    std::sort(keyed.begin(), keyed.begin() + k);
    at::Tensor out = at::empty({k}, opts.dtype(at::kLong));
    int64_t* idx = out.data_ptr<int64_t>();
    for (int64_t j = 0; j < k; ++j) idx[j] = keyed[j].second;
    return out;
  }
  const at::Tensor s = scores.to(at::kFloat).contiguous();
  const float* x = s.const_data_ptr<float>();
  std::vector<uint64_t> packed(n);
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) packed[i] = pack_key_index(rank_key_bits(x[i], largest), i);
  });
  return k_smallest_indices(packed, k, opts);
}

at::Tensor sample_without_replacement(const at::Tensor& importance, int64_t k, int64_t seed,
                                      int64_t counter) {
  constexpr const char* op = "fastsel.sample";
  check_vector(importance, "importance", op);
  const int64_t n = importance.size(0);
  check_k(k, n, op);
  check_seed(seed, counter, op);
  const at::Tensor w32 = importance_f32(importance);
  const float* w = w32.const_data_ptr<float>();
  const ImportanceSummary summary = summarize_importance(w, n);
  check_importance_values(summary, importance, k, /*replacement=*/false);
  if (k == 0) return at::empty({0}, importance.options().dtype(at::kLong));
  const RaceScale scale = race_scale(summary.max);
  std::vector<uint64_t> packed(n);
  const uint64_t s = static_cast<uint64_t>(seed), c = static_cast<uint64_t>(counter);
  at::parallel_for(0, n, 1 << 13, [&](int64_t b, int64_t e) {
    int64_t i = b;
#if defined(FASTSEL_HAS_RACE_KEYS_AVX2)
    for (; i < e && i % 8 != 0; ++i) packed[i] = pack_key_index(race_key_bits(w[i], scale, s, c, i), i);
    alignas(32) uint32_t key[8];
    for (; i + 8 <= e; i += 8) {
      race_key_bits_avx2(w + i, scale, static_cast<uint64_t>(i), s, c, key);
      for (int j = 0; j < 8; ++j) packed[i + j] = pack_key_index(key[j], i + j);
    }
#endif
    for (; i < e; ++i) packed[i] = pack_key_index(race_key_bits(w[i], scale, s, c, i), i);
  });
  return k_smallest_indices(packed, k, importance.options());
}

at::Tensor sample_with_replacement(const at::Tensor& importance, int64_t k, int64_t seed,
                                   int64_t counter) {
  constexpr const char* op = "fastsel.sample";
  check_vector(importance, "importance", op);
  const int64_t n = importance.size(0);
  TORCH_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
  TORCH_CHECK_VALUE(k < kMaxIndices, op, ": k = ", k, " draws exceed the limit of 2^32 - 1 per call");
  check_seed(seed, counter, op);
  const at::Tensor w32 = importance_f32(importance);
  const float* w = w32.const_data_ptr<float>();
  const ImportanceSummary summary = summarize_importance(w, n);
  check_importance_values(summary, importance, k, /*replacement=*/true);
  at::Tensor out = at::empty({k}, importance.options().dtype(at::kLong));
  if (k == 0) return out;

  // Integer weights (reference.replacement_weights) and their inclusive prefix sums.
  const double scale = replacement_scale(summary.max, replacement_weight_bits(n));
  std::vector<int64_t> cum(n);
  const Chunks chunks(n, 1 << 15);
  std::vector<int64_t> offset(chunks.count + 1, 0);
  for_each_chunk(chunks, [&](int64_t c, int64_t b, int64_t e) {
    int64_t sum = 0;
    for (int64_t i = b; i < e; ++i) cum[i] = (sum += quantized_importance(w[i], scale));
    offset[c + 1] = sum;
  });
  for (int64_t c = 0; c < chunks.count; ++c) offset[c + 1] += offset[c];
  for_each_chunk(chunks, [&](int64_t c, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) cum[i] += offset[c];
  });
  const int64_t total = cum[n - 1];

  int64_t* idx = out.data_ptr<int64_t>();
  const uint64_t s = static_cast<uint64_t>(seed), c = static_cast<uint64_t>(counter);
  at::parallel_for(0, k, 1 << 12, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t t = replacement_target(s, c, static_cast<uint64_t>(j), total);
      idx[j] = std::upper_bound(cum.begin(), cum.end(), t) - cum.begin();
    }
  });
  return out;
}

at::Tensor percentile(const at::Tensor& values, const at::Tensor& history) {
  constexpr const char* op = "fastsel.percentile";
  check_vector(values, "values", op);
  check_vector(history, "history", op);
  TORCH_CHECK_VALUE(history.device() == values.device(), op, ": history is on ", history.device(),
                    " but values are on ", values.device());
  const at::Tensor h64 = history.to(at::kDouble).contiguous();
  std::vector<double> sorted;
  sorted.reserve(h64.numel());
  const double* h = h64.const_data_ptr<double>();
  for (int64_t i = 0; i < h64.numel(); ++i) {
    if (!std::isnan(h[i])) sorted.push_back(h[i]);
  }
  std::sort(sorted.begin(), sorted.end());
  const int64_t n = values.size(0);
  at::Tensor out = at::empty({n}, values.options().dtype(at::kFloat));
  float* f = out.data_ptr<float>();
  const float m = static_cast<float>(sorted.size());  // exact below 2^24 entries
  const double* first = sorted.data();
  const size_t len = sorted.size();
  const at::Tensor v = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "fastsel_percentile", [&] {
    const scalar_t* x = v.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 12, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const double xi = static_cast<double>(x[i]);
        if (std::isnan(xi)) {
          f[i] = std::numeric_limits<float>::quiet_NaN();
        } else if (len == 0) {
          f[i] = 1.0f;
        } else {
          f[i] = static_cast<float>(count_below(first, len, xi)) / m;
        }
      }
    });
  });
  return out;
}

FASTSEL_ISA_END
}  // namespace fastsel::cpu

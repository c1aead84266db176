// Minimal Margin Score (Weinstein, Fine & Hel-Or) on the CPU, per row.
//
// For a linear head z = W h + b and prediction a, the smallest move of the features h
// that makes class j tie with a has length (z_a - z_j) / ||w_a - w_j||; the MMS is the
// minimum over j != a (0 when another class already ties with a).
//
// Exact MMS without any C x C work. The runner-up r gives an upper bound,
//   MMS <= best := (z_a - z_r) / ||w_a - w_r||,
// and every class has a lower bound through the triangle inequality around the mean
// row mu of W (which removes a component shared by all rows):
//   (z_a - z_j) / ||w_a - w_j|| >= (z_a - z_j) / (||w_a - mu|| + max_k ||w_k - mu||).
// So only classes with z_a - z_j < best (||w_a - mu|| + max_k ||w_k - mu||) can beat
// the runner-up. A compare sweep over the row (in cache, right after scoring it) finds
// them, and only their distances, ||w_a - w_j|| from the difference (no cancellation),
// are computed: O(C) per row plus D per candidate, where a Gram-matrix method pays
// O(C^2 D) per call whatever N is.
//
// For small C the Gram matrix is the cheaper side (C^2 D is tiny, while a distance costs
// D per row): the [C, C] inverse distances are computed once per call and each row
// takes a plain multiply-min over its C entries.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "vec_utils.h"

namespace fastsel::cpu {

// Classes up to which the exact MMS uses the [C, C] inverse-distance matrix.
constexpr int64_t kMmsGramMaxClasses = 256;

struct MmsWeights {
  const void* inv_dist = nullptr;  // [C, C] 1 / ||w_a - w_j||, acc_t, when C <= kMmsGramMaxClasses
  const void* w = nullptr;       // [C, D] row-major, acc_t
  const void* radius = nullptr;  // [C] ||w_j - mu||, acc_t
  double radius_max = 0;         // max_j ||w_j - mu||
  int64_t D = 0;
};

// ||w_a - w_b|| from the difference of the two rows. Four accumulators: with one, the
// D / 8 dependent FMAs (4 cycles of latency each) took longer than reading the two rows.
inline float pair_distance(const float* w, int64_t D, int64_t a, int64_t b) {
  const float* wa = w + a * D;
  const float* wb = w + b * D;
  Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  int64_t k = 0;
  for (; k + 4 * kLanes <= D; k += 4 * kLanes) {
    const Vec d0 = Vec::loadu(wa + k) - Vec::loadu(wb + k);
    const Vec d1 = Vec::loadu(wa + k + kLanes) - Vec::loadu(wb + k + kLanes);
    const Vec d2 = Vec::loadu(wa + k + 2 * kLanes) - Vec::loadu(wb + k + 2 * kLanes);
    const Vec d3 = Vec::loadu(wa + k + 3 * kLanes) - Vec::loadu(wb + k + 3 * kLanes);
    acc0 = at::vec::fmadd(d0, d0, acc0);
    acc1 = at::vec::fmadd(d1, d1, acc1);
    acc2 = at::vec::fmadd(d2, d2, acc2);
    acc3 = at::vec::fmadd(d3, d3, acc3);
  }
  for (; k + kLanes <= D; k += kLanes) {
    const Vec d = Vec::loadu(wa + k) - Vec::loadu(wb + k);
    acc0 = at::vec::fmadd(d, d, acc0);
  }
  float s = hsum((acc0 + acc1) + (acc2 + acc3));
  for (; k < D; ++k) s += (wa[k] - wb[k]) * (wa[k] - wb[k]);
  return std::sqrt(s);
}

inline double pair_distance(const double* w, int64_t D, int64_t a, int64_t b) {
  double s = 0.0;
  for (int64_t k = 0; k < D; ++k) s += (w[a * D + k] - w[b * D + k]) * (w[a * D + k] - w[b * D + k]);
  return std::sqrt(s);
}

// Bit (j - at) of a w-bit chunk starting at `at`, or 0 when j lies outside it.
inline uint64_t chunk_bit(int64_t j, int64_t at, int64_t w) {
  const uint64_t off = static_cast<uint64_t>(j - at);
  return off < static_cast<uint64_t>(w) ? uint64_t(1) << off : 0;
}

// Calls visit(j) for every j in [0, n) with x[j] >= threshold other than skip1 and
// skip2, in increasing order. Four vectors per iteration and one test of their
// combined lane bits: hits are rare (the few classes near the top of the row), and the
// two known ones (prediction and runner-up) are cleared from the bits rather than
// visited, since each visit costs a mispredicted branch.
template <typename T, typename Visit>
inline void for_each_at_least(const T* x, int64_t n, T threshold, int64_t skip1, int64_t skip2,
                              Visit&& visit) {
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
#if defined(FASTSEL_VEC512)
    const __m512 thr = _mm512_set1_ps(threshold);
    auto ge = [&](int64_t k) -> uint64_t {
      return _mm512_cmp_ps_mask(_mm512_loadu_ps(x + k), thr, _CMP_GE_OQ);
    };
    constexpr int64_t kStep = 64, kOne = 16;
#elif defined(FASTSEL_X86_AVX2)
    const __m256 thr = _mm256_set1_ps(threshold);
    auto ge = [&](int64_t k) -> uint64_t {
      return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + k), thr, _CMP_GE_OQ)));
    };
    constexpr int64_t kStep = 32, kOne = 8;
#endif
#if defined(FASTSEL_VEC512) || defined(FASTSEL_X86_AVX2)
    auto visit_bits = [&](uint64_t bits, int64_t at, int64_t w) {
      bits &= ~(chunk_bit(skip1, at, w) | chunk_bit(skip2, at, w));
      for (; bits != 0; bits &= bits - 1) visit(at + __builtin_ctzll(bits));
    };
    for (; j + kStep <= n; j += kStep) {
      const uint64_t bits = ge(j) | ge(j + kOne) << kOne | ge(j + 2 * kOne) << (2 * kOne) |
                            ge(j + 3 * kOne) << (3 * kOne);
      if (bits != 0) visit_bits(bits, j, kStep);
    }
    for (; j + kOne <= n; j += kOne) {
      const uint64_t bits = ge(j);
      if (bits != 0) visit_bits(bits, j, kOne);
    }
#endif
  }
  for (; j < n; ++j) {
    if (x[j] >= threshold && j != skip1 && j != skip2) visit(j);
  }
}

// Exact MMS of one valid row with prediction a (value za), runner-up r and top-2
// margin (za - z_r). blocks(visit_block) must call visit_block(x, j0, n) for the row's
// columns as acc_t blocks (x[j - j0] = z_j).
template <typename acc_t, typename Blocks>
acc_t mms_exact_pruned(acc_t za, int64_t a, int64_t r, acc_t margin, const MmsWeights& mw,
                       Blocks&& blocks) {
  if (margin == acc_t(0)) return acc_t(0);  // another class ties with a: on the boundary
  if (r < 0 || !(margin < std::numeric_limits<acc_t>::infinity())) {
    return std::numeric_limits<acc_t>::infinity();  // no finite competitor
  }
  if (mw.inv_dist != nullptr) {  // small C: every term from the precomputed matrix
    acc_t best = std::numeric_limits<acc_t>::infinity();
    blocks([&](const acc_t* x, int64_t j0, int64_t n) {
      const acc_t* q = static_cast<const acc_t*>(mw.inv_dist) + a * n;  // one block: j0 = 0, n = C
      for (int64_t j = 0; j < n; ++j) {
        if (j != a) best = std::min(best, (za - x[j]) * q[j]);  // z_j < za: no 0 * inf
      }
    });
    return best;
  }
  const acc_t* w = static_cast<const acc_t*>(mw.w);
  const acc_t* radius = static_cast<const acc_t*>(mw.radius);
  acc_t best = margin / pair_distance(w, mw.D, a, r);
  // Lowered by a few ulps of the operands' magnitude so that rounding can never drop a
  // class that could beat the runner-up.
  const acc_t reach = best * (radius[a] + static_cast<acc_t>(mw.radius_max));
  const acc_t threshold = (za - reach) - (std::abs(za) + reach) * acc_t(1e-6);
  const acc_t radius_a = radius[a];
  blocks([&](const acc_t* x, int64_t j0, int64_t n) {
    for_each_at_least(x, n, threshold, a - j0, r - j0, [&](int64_t k) {
      // The same bound with class j's own radius, before paying for the distance; the
      // 1e-4 slack is far above the rounding of the radii and the gap.
      const int64_t j = j0 + k;
      const acc_t gap = za - x[k];
      if (gap * acc_t(1 - 1e-4) > best * (radius_a + radius[j])) return;
      best = std::min(best, gap / pair_distance(w, mw.D, a, j));
    });
  });
  return best;
}

}  // namespace fastsel::cpu

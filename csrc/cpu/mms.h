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
// the runner-up, and only their distances, ||w_a - w_j|| from the difference (no
// cancellation), are computed: O(C) per row plus D per candidate, where a Gram-matrix
// method pays O(C^2 D) per call whatever N is. Rows of one block (C <= 4096) find the
// runner-up and those classes in a list that pass 2 of scoring makes anyway
// (RowCandidates); wider rows sweep the row again while it is in cache
// (for_each_at_least), as do rows whose list falls short.
//
// For small C and many rows the Gram matrix is the cheaper side (use_mms_gram): the
// [C, C] inverse distances are computed once per call (inverse_distances in
// score_kernel.cpp) and each row takes a plain multiply-min over its C entries.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "vec_utils.h"

#include "fastsel/isa_namespace.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN

// Classes up to which the MMS may use the [C, C] inverse-distance matrix.
constexpr int64_t kMmsGramMaxClasses = 256;

// Whether a call of N rows takes its MMS distances from the [C, C] matrix (C^2 D
// multiply-adds once, then C per row) rather than per row (the exact MMS ~2 distances
// of D each plus the candidate search, the top-2 MMS one distance). D drops out of the
// comparison; the crossovers (the exact MMS at C^2 ~ 4N, the top-2 MMS at C^2 ~ N) are
// where the two cost the same in interleaved timings (docs/kernels.md). The two agree to
// float32 rounding, not bit for bit, so a row's MMS can change in its last bits with the
// size of the batch it is scored in.
inline bool use_mms_gram(int64_t N, int64_t C, bool exact) {
  return C <= kMmsGramMaxClasses && C * C <= (exact ? 4 : 1) * N;
}

struct MmsWeights {
  const void* inv_dist = nullptr;  // [C, C] 1 / ||w_a - w_j||, acc_t, when C <= kMmsGramMaxClasses
  const void* w = nullptr;       // [C, D] row-major, acc_t
  const void* radius = nullptr;  // [C] ||w_j - mu||, acc_t
  double radius_max = 0;         // max_j ||w_j - mu||
  const void* max_distance = nullptr;  // [C] >= max_j ||w_a - w_j||, acc_t, optional (mms_head)
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

// The range in which pair_distance's plain sum of squares is accurate: above the lower
// bound every square that underflowed (< 2^-149 in float, 2^-1074 in double) is at most
// D * 2^-49 (2^-114) of the sum; a finite result had no square overflow.
template <typename T>
constexpr T kMinPlainDistance = std::is_same_v<T, float> ? T(0x1p-50) : T(0x1p-480);

// ||w_a - w_b|| for rows outside that range, or holding NaN / +-inf: NaN when either row
// holds a non-finite entry (the distance, and so the MMS term, is undefined), else the
// sum of squares in double of the rows scaled by a power of two (exact) that puts their
// largest entry in [0.5, 1): no overflow, and no underflow that matters.
template <typename T>
T careful_pair_distance(const T* w, int64_t D, int64_t a, int64_t b) {
  const T* wa = w + a * D;
  const T* wb = w + b * D;
  double top = 0.0;
  for (int64_t k = 0; k < D; ++k) {
    const double x = static_cast<double>(wa[k]), y = static_cast<double>(wb[k]);
    if (!std::isfinite(x) || !std::isfinite(y)) return std::numeric_limits<T>::quiet_NaN();
    top = std::max(top, std::max(std::abs(x), std::abs(y)));
  }
  if (top == 0.0) return T(0);
  int e = 0;
  std::frexp(top, &e);  // top = f 2^e, f in [0.5, 1)
  double s = 0.0;
  for (int64_t k = 0; k < D; ++k) {
    const double d = std::ldexp(static_cast<double>(wa[k]), -e) - std::ldexp(static_cast<double>(wb[k]), -e);
    s += d * d;
  }
  return static_cast<T>(std::ldexp(std::sqrt(s), e));
}

// pair_distance, or careful_pair_distance where the plain sum cannot be trusted (tiny,
// huge or non-finite rows, identical rows): the same value as pair_distance for every
// pair of ordinary rows, NaN for a pair with a non-finite row.
template <typename T>
T checked_pair_distance(const T* w, int64_t D, int64_t a, int64_t b) {
  const T d = pair_distance(w, D, a, b);
  if (d >= kMinPlainDistance<T> && d <= std::numeric_limits<T>::max()) return d;  // false for NaN
  return careful_pair_distance(w, D, a, b);
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
    const Vec thr(threshold);
    j = scan_lane_bits(x, n, [&](const Vec& v) { return at_least_bits(v, thr); },
                       [&](uint64_t bits, int64_t at, int64_t width) {
                         bits &= ~(chunk_bit(skip1, at, width) | chunk_bit(skip2, at, width));
                         for (; bits != 0; bits &= bits - 1) visit(at + __builtin_ctzll(bits));
                         return true;
                       });
  }
  for (; j < n; ++j) {
    if (x[j] >= threshold && j != skip1 && j != skip2) visit(j);
  }
}

// The columns of one row at or above a floor, as bits: pass 2 of a row of one block
// (LaneSums::sweep) stores one word per iteration, for kWordColumns columns, whether or
// not it holds a candidate: branching on the words that do cost ten times as much
// (LaneSums::sweep).
struct RowCandidates {
  static constexpr int64_t kWordColumns = 2 * kLanes;  // one loop iteration of pass 2
  static constexpr int64_t kMaxColumns = 4096;
  static_assert(kWordColumns <= 32, "a word is 32 bits");
  float floor = std::numeric_limits<float>::infinity();
  int64_t n_words = 0;
  uint32_t words[kMaxColumns / kWordColumns];

  // Whether every column with z_j >= threshold is listed.
  bool covers(float threshold) const { return threshold >= floor; }

  // visit(j) for the listed columns j in increasing order, while it returns true. Most
  // words are zero: one vector test per 16 words finds the others; a branch per word was
  // the hottest part of the candidate search (the test saved ~20 ns a row).
  template <typename Visit>
  void for_each(Visit&& visit) const {
    for (int64_t w0 = 0; w0 < n_words; w0 += 16) {
      for (uint32_t nz = nonzero_words(words + w0, std::min<int64_t>(16, n_words - w0)); nz != 0; nz &= nz - 1) {
        const int64_t w = w0 + __builtin_ctz(nz);
        for (uint32_t b = words[w]; b != 0; b &= b - 1) {
          if (!visit(w * kWordColumns + __builtin_ctz(b))) return;
        }
      }
    }
  }
};

// The first columns of a RowCandidates list with their values (x = the row), gathered in
// one traversal of its bits for the runner-up and the candidates both.
struct ListedColumns {
  static constexpr int kCapacity = 64;
  int n = 0;
  bool complete = true;  // false: more columns were listed than these
  int32_t index[kCapacity];
  float value[kCapacity];

  template <typename T>  // float or a narrower float type
  void gather(const RowCandidates& list, const T* x) {
    n = 0;
    complete = true;
    list.for_each([&](int64_t j) {
      if (n == kCapacity) {
        complete = false;
        return false;
      }
      index[n] = static_cast<int32_t>(j);
      value[n] = static_cast<float>(x[j]);
      ++n;
      return true;
    });
  }

  // First column other than skip whose value is v, or -1 (also when it may lie beyond).
  int64_t find(float v, int64_t skip) const {
    for (int k = 0; k < n; ++k) {
      if (value[k] == v && index[k] != skip) return index[k];
    }
    return -1;
  }
};

// The floor of a row's list that makes it hold every candidate of the pruned exact MMS
// below: the columns within reach = factor * margin of the top logit z_a, where
// factor = (||w_a - mu|| + max_k ||w_k - mu||) / ||w_a - w_r|| (plus rounding slack)
// depends on the row's two classes, unknown before pass 2. The caller passes a running
// estimate of factor: too low, the row falls back to a sweep of its own; too high, more
// columns are listed and visited (heavy-tailed: once factor * margin spans the bulk of
// a row whose top logit stands apart, most of its columns). So the estimate tracks a
// high quantile of the rows' factors: each fallback raises it by kReachGrowth, each row
// served by its list lowers it by kReachDecay, which settles where about 1% of rows fall
// back. Either way the MMS is the same; only its cost changes. The top-2 MMS needs only
// the runner-up (factor 1), and rows whose MMS is 0 (a tie) or +inf (one finite class)
// need nothing beyond the maximum.
constexpr float kInitialReachFactor = 1.5f;
constexpr float kMaxReachFactor = 8.f;
constexpr float kReachGrowth = 1.1f, kReachDecay = 0.999f;

inline float candidate_floor(float v1, float v2, float factor) {
  const float margin = v1 - v2;
  if (!(margin > 0.f && margin < std::numeric_limits<float>::infinity())) return v1;
  return std::min(v2, v1 - factor * margin);
}

// Whether a row's MMS needs the distance to its runner-up r: not when it is 0 (a tie)
// or +inf (no finite competitor).
template <typename acc_t>
bool mms_needs_runner_up(acc_t margin, int64_t r) {
  return r >= 0 && margin > acc_t(0) && margin < std::numeric_limits<acc_t>::infinity();
}

// The MMS of a row that needs no distance (top-2 margin, runner-up r): 0 when another
// class ties with the prediction (the point is on the boundary), +inf when there is no
// finite competitor; none otherwise.
template <typename acc_t>
std::optional<acc_t> mms_without_distance(acc_t margin, int64_t r) {
  if (margin == acc_t(0)) return acc_t(0);
  if (!mms_needs_runner_up(margin, r)) return std::numeric_limits<acc_t>::infinity();
  return std::nullopt;
}

// min over j in [0, n), j != skip, of (za - x[j]) * q[j], where za is the row's maximum
// and x[j] < za for j != skip (a tie returns before this), so no 0 * inf: the Gram
// method's per-row loop. A NaN product (a NaN weight) is passed over, as std::min(best,
// NaN) does. The float version runs a vector's width of classes per step: the scalar
// loop waited on its min's latency every class (the MMS at 65536 x 100 on one thread
// went from 87 to 58 ns a row).
inline double min_scaled_gap(const double* x, const double* q, int64_t n, double za, int64_t skip) {
  double best = std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (j != skip) best = std::min(best, (za - x[j]) * q[j]);
  }
  return best;
}

inline float min_scaled_gap(const float* x, const float* q, int64_t n, float za, int64_t skip) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const Vec top(za), inf(kInf), lane = Vec::arange(0.f, 1.f);
  Vec best(kInf);
  auto step = [&](const Vec& xv, const Vec& qv, int64_t k) {
    // the skipped class's lane, by its offset in the step (exact in float)
    const Vec t = Vec::blendv((top - xv) * qv, inf, lane == Vec(static_cast<float>(skip - k)));
    best = Vec::blendv(best, t, t < best);  // std::min(best, t): NaN t leaves best
  };
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) step(Vec::loadu(x + k), Vec::loadu(q + k), k);
  if (k < n) step(load_partial(x + k, n - k, -kInf), load_partial(q + k, n - k, 1.f), k);  // gap +inf
  return hmin(best);
}

#if defined(FASTSEL_VEC512)
// mms_without_distance for 16 rows at once: 0 where the margin is 0 (a tie), +inf where
// the row has no runner-up or the margin is not finite, `value` elsewhere.
inline Vec lanes_without_distance(const Vec& margin, const Vec& runner_up, const Vec& value) {
  const __m512 zero = _mm512_setzero_ps(), inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const __mmask16 tie = _mm512_cmp_ps_mask(margin, zero, _CMP_EQ_OQ);
  const __mmask16 needs = _mm512_cmp_ps_mask(runner_up, zero, _CMP_GE_OQ) &
                          _mm512_cmp_ps_mask(margin, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(margin, inf, _CMP_LT_OQ);
  return _mm512_mask_mov_ps(_mm512_mask_mov_ps(inf, needs, value), tie, zero);
}

// Classes up to which lanes_mms_gram holds a row of the inverse distances in registers.
constexpr int64_t kLaneMmsMaxClasses = 32;

// Exact MMS, from the [C, C] inverse distances inv (C <= kLaneMmsMaxClasses), of the 16
// rows of the lane-wise layout x[j * 16 + l] = z_lj, given their maxima v1, runner-up
// values v2 and the predictions a (lane l: row l's). The same products and minimum as
// mms_exact_gram per row (so the same bits): inv is symmetric, so the entries the 16
// lanes need at class j, inv[a_l, j], are row j's entries a_l, picked from registers
// with one permute instead of 16 row reads. Lanes of invalid rows come out meaningless.
inline Vec lanes_mms_gram(const float* x, int64_t C, const float* inv, const Vec& v1, const Vec& v2,
                          const Vec& a, const Vec& runner_up) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const __m512 inf = _mm512_set1_ps(kInf);
  const __m512i a_index = _mm512_cvttps_epi32(a);
  const __mmask16 lo_mask = static_cast<__mmask16>((1u << std::min<int64_t>(C, 16)) - 1);
  const __mmask16 hi_mask = static_cast<__mmask16>(C > 16 ? (1u << (C - 16)) - 1 : 0);
  __m512 best = inf;
  for (int64_t j = 0; j < C; ++j) {
    const __m512 lo = _mm512_maskz_loadu_ps(lo_mask, inv + j * C);
    const __m512 hi = _mm512_maskz_loadu_ps(hi_mask, inv + j * C + 16);
    const __m512 q = _mm512_permutex2var_ps(lo, a_index, hi);
    const __m512 t = _mm512_mul_ps(_mm512_sub_ps(v1, _mm512_loadu_ps(x + j * 16)), q);
    // std::min(best, t) for j != a: NaN t leaves best
    const __mmask16 take = _mm512_cmp_ps_mask(t, best, _CMP_LT_OQ) &
                           _mm512_cmp_ps_mask(a, _mm512_set1_ps(static_cast<float>(j)), _CMP_NEQ_UQ);
    best = _mm512_mask_mov_ps(best, take, t);
  }
  return lanes_without_distance(v1 - v2, runner_up, best);
}

// Top-2 MMS of the same 16 rows, margin * inv[a, r] with r = runner_up (-1: none), as
// mms_top2_or_gram per row: one gather for the 16 rows instead of a call chain per row.
inline Vec lanes_mms_top2(int64_t C, const float* inv, const Vec& v1, const Vec& v2, const Vec& a,
                          const Vec& runner_up) {
  const Vec margin = v1 - v2;
  const __mmask16 ok = _mm512_cmp_ps_mask(runner_up, _mm512_setzero_ps(), _CMP_GE_OQ) &
                       _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GE_OQ);
  const __m512i index = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_cvttps_epi32(a), _mm512_set1_epi32(static_cast<int>(C))),
                                         _mm512_cvttps_epi32(runner_up));
  const __m512 q = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok, index, inv, 4);  // masked lanes not read
  return lanes_without_distance(margin, runner_up, _mm512_mul_ps(margin, q));
}
#endif

// Exact MMS of one valid row with prediction a (value za), runner-up r and top-2
// margin (za - z_r), when the [C, C] inverse distances are precomputed (small C):
// blocks(visit_block) must call visit_block(x, j0, n) for the row's columns as acc_t
// blocks (x[j - j0] = z_j); a single block here.
template <typename acc_t, typename Blocks>
acc_t mms_exact_gram(acc_t za, int64_t a, int64_t r, acc_t margin, const MmsWeights& mw, Blocks&& blocks) {
  if (const auto trivial = mms_without_distance(margin, r)) return *trivial;
  acc_t best = std::numeric_limits<acc_t>::infinity();
  blocks([&](const acc_t* x, int64_t j0, int64_t n) {
    const acc_t* q = static_cast<const acc_t*>(mw.inv_dist) + a * n;  // one block: j0 = 0, n = C
    best = min_scaled_gap(x, q, n, za, a);
  });
  return best;
}

// Exact MMS of one valid row by the pruned search (see the top of this file), given the
// distance ||w_a - w_r|| to the runner-up when mms_needs_runner_up.
// candidates(threshold, visit) must call visit(j, z_j) for every column j other than a
// and r with z_j >= threshold, in increasing j.
template <typename acc_t, typename Candidates>
acc_t mms_exact_pruned(acc_t za, int64_t a, int64_t r, acc_t margin, acc_t runner_up_distance,
                       const MmsWeights& mw, Candidates&& candidates) {
  if (const auto trivial = mms_without_distance(margin, r)) return *trivial;
  const acc_t* w = static_cast<const acc_t*>(mw.w);
  const acc_t* radius = static_cast<const acc_t*>(mw.radius);
  acc_t best = margin / runner_up_distance;
  // Lowered by a few ulps of the operands' magnitude so that rounding can never drop a
  // class that could beat the runner-up.
  // The farthest class a can have: r_a + max_k r_k, or the head's own maximum when given
  // (fastsel.mms_head: in a float64 simulation of random 1000 x 512 heads, 1.03-1.15x
  // the median distance against ~1.5x for the radii, leaving ~0.16 candidate distances a
  // row instead of ~1.1).
  const acc_t* max_distance = static_cast<const acc_t*>(mw.max_distance);
  acc_t farthest = radius[a] + static_cast<acc_t>(mw.radius_max);
  if (max_distance != nullptr) farthest = std::min(farthest, max_distance[a]);  // NaN: not taken
  const acc_t reach = best * farthest;
  const acc_t threshold = (za - reach) - (std::abs(za) + reach) * acc_t(1e-6);
  const acc_t radius_a = radius[a];
  candidates(threshold, [&](int64_t j, acc_t z_j) {
    // The same bound with class j's own radius, before paying for the distance; the
    // 1e-4 slack is far above the rounding of the radii and the gap.
    const acc_t gap = za - z_j;
    acc_t bound = radius_a + radius[j];
    if (max_distance != nullptr) bound = std::min(bound, std::min(max_distance[a], max_distance[j]));
    if (gap * acc_t(1 - 1e-4) > best * bound) return;
    best = std::min(best, gap / checked_pair_distance(w, mw.D, a, j));
  });
  return best;
}

FASTSEL_ISA_END
}  // namespace fastsel::cpu

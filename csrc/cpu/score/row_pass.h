// The passes over one row of the scoring kernel: per-lane top-2 (pass 1), the
// SoftmaxState sums with one exp per element (pass 2, fused with the next row's pass 1),
// NaN and +inf detection, and the scalar path for float64, invalid and very wide rows.
#pragma once

#include "exp.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN
namespace {

// Pass 1 over a block: per-lane top-2 values (as a multiset, so ties count twice).
// NaN and +inf are not looked for here (see score_row_vectorized for how pass 2 finds
// them), so this pass is three instructions per vector.
struct LaneMax {
  Vec v1{-std::numeric_limits<float>::infinity()};
  Vec v2{-std::numeric_limits<float>::infinity()};

  inline void update(const Vec& x) {
    v2 = max_fast(v2, min_fast(v1, x));
    v1 = max_fast(v1, x);
  }

  void sweep(const float* x, int64_t n) {
    LaneMax even = *this;  // a local copy stays in registers (see LaneSums::sweep)
    LaneMax odd;           // a second chain, merged below, halves the loop-carried latency
    int64_t k = 0;
    for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
      even.update(Vec::loadu(x + k));
      odd.update(Vec::loadu(x + k + kLanes));
    }
    for (; k + kLanes <= n; k += kLanes) even.update(Vec::loadu(x + k));
    if (k < n) even.update(load_partial(x + k, n - k, -std::numeric_limits<float>::infinity()));
    merge(even, odd);
  }

  // *this = per lane, the top-2 of the union of two top-2 multisets.
  void merge(const LaneMax& a, const LaneMax& b) {
    v2 = max_fast(min_fast(a.v1, b.v1), max_fast(a.v2, b.v2));
    v1 = max_fast(a.v1, b.v1);
  }

  // Top-2 of the union of the lanes' top-2 multisets: top1 is the largest lane top-1;
  // top2 is top1 again if two lanes reach it, else the larger of the other lanes' top-1
  // and all lanes' top-2 (the winning lane's top-2 included).
  void reduce(float& top1, float& top2) const {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    top1 = hmax(v1);
    if (count_equal(v1, top1) > 1) {
      top2 = top1;
      return;
    }
    top2 = std::max(hmax(Vec::blendv(v1, Vec(kNegInf), v1 == Vec(top1))), hmax(v2));
  }
};

// Pass 2 over a block: SoftmaxState sums per lane, relative to one shared maximum m.
// Elements not below m are counted instead of summed, so that d - 1 stays exact (see
// row_scores.h). In a valid row those are exactly the elements equal to m; a NaN is
// never below m (z - m is NaN), so looking at the few lanes not below m finds every NaN
// of the row (score_row_vectorized). The count and that look are on the scalar side:
// most vectors hold no such lane, and a test of the lane bits per iteration is cheaper
// than vector work.
struct LaneSums {
  Vec d_sub{0.f}, s1{0.f}, s2{0.f};
  int64_t n_not_below = 0;
  bool saw_nan = false;

  void rebase(float old_m, float new_m) {
    const float delta = old_m - new_m;
    const float factor = std::exp(delta);
    if (factor == 0.f) {  // the old terms vanish (and delta * d_old may overflow to -inf)
      d_sub = s1 = s2 = Vec(0.f);
      n_not_below = 0;
      return;
    }
    const Vec scale(factor);
    // Fold the old maxima into lane 0; all lanes scale together.
    alignas(64) float extra[kLanes] = {};
    extra[0] = static_cast<float>(n_not_below);
    const Vec d_old = d_sub + Vec::loadu(extra);
    s1 = (s1 + Vec(delta) * d_old) * scale;
    d_sub = d_old * scale;
    s2 = (s2 + Vec::loadu(extra) * Vec(s2_unit<float>())) * scale * scale;  // s2 is scaled (row_scores.h)
    n_not_below = 0;  // everything swept so far now lies below the new maximum
  }

  // Accumulates one vector of logits x and returns the lanes not below m as bits.
  // The clamp keeps NaN (max(floor, NaN) is NaN in all three variants) and maps -inf to
  // the floor, whose exp is exactly 0. Always inlined: called out of line (GCC's choice
  // for the AVX2 copy in some builds), its vector arguments go through memory and the
  // AVX2 forward runs ~1.4x the instructions (bench/results/compare_contract/).
  C10_ALWAYS_INLINE static uint32_t accumulate(const Vec& x, const Vec& m, Vec& d_sub, Vec& s1, Vec& s2) {
#if defined(FASTSEL_VEC512)  // masked adds instead of and-ing with the mask
    // _mm512_max_ps returns its second operand when either is NaN
    const __m512 t = _mm512_max_ps(_mm512_set1_ps(kExpFloor), _mm512_sub_ps(x, m));
    const __m512 e = exp_nonpositive(t);
    const __mmask16 below = _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 d = d_sub, a = s1, b = s2;
    const __m512 scaled = _mm512_mul_ps(e, _mm512_set1_ps(s2_root(0.f)));  // s2 is scaled (row_scores.h)
    d_sub = _mm512_mask_add_ps(d, below, d, e);
    s1 = _mm512_mask3_fmadd_ps(e, t, a, below);
    s2 = _mm512_mask3_fmadd_ps(scaled, scaled, b, below);
    return ~static_cast<uint32_t>(below) & 0xFFFFu;
#else
    const Vec t = at::vec::clamp_min(x - m, Vec(kExpFloor));  // max(floor, t): keeps NaN
    const Vec e = exp_nonpositive(t);
    const Vec below = t < Vec(0.f);
    const Vec e_below = e & below;
    const Vec scaled = e_below * Vec(s2_root(0.f));  // s2 is scaled (row_scores.h)
    d_sub = d_sub + e_below;
    s1 = at::vec::fmadd(e_below, t, s1);
    s2 = at::vec::fmadd(scaled, scaled, s2);
#if defined(FASTSEL_VEC256)
    return ~static_cast<uint32_t>(_mm256_movemask_ps(below)) & 0xFFu;
#else
    alignas(64) float lanes[kLanes];
    below.store(lanes);
    uint32_t bits = 0;
    for (int64_t l = 0; l < kLanes; ++l) bits |= uint32_t(lanes[l] == 0.f) << l;
    return bits;
#endif
#endif
  }
  static_assert(kLanes <= 16, "two vectors' lane bits must fit in 32 bits");

  // Sweeps x[0, n) with the shared maximum m. Returns the position of the first element
  // not below m (the row's first maximum when the row is valid), or -1. Tracking it here
  // costs a predictable branch per iteration; searching for it afterwards would read the
  // row once more.
  //
  // With `next` (a row of the same length n), pass 1 of that row runs in the same loop:
  // pass 2 keeps the multiply-add pipes busy and pass 1 (max/min) the others, so pass 1
  // costs little more than its loads, and those loads start the next row's trip from
  // memory while this row's arithmetic runs. Its per-lane top-2 go to next_lanes.
  //
  // With `candidates`, the columns at or above candidates->floor are listed for the MMS
  // (mms.h): one compare per vector and one store of the lane bits per iteration, ~25
  // cycles a row. Listing them through a branch on each word holding one (a few words a
  // row, hard to predict) cost ten times that.
  int64_t sweep(const float* x, int64_t n, float m, const float* next = nullptr,
                LaneMax* next_lanes = nullptr, RowCandidates* candidates = nullptr) {
    if (candidates != nullptr) {
      if (next != nullptr) return sweep_impl<true, true>(x, n, m, next, next_lanes, candidates);
      return sweep_impl<false, true>(x, n, m, nullptr, nullptr, candidates);
    }
    if (next != nullptr) return sweep_impl<true, false>(x, n, m, next, next_lanes, nullptr);
    return sweep_impl<false, false>(x, n, m, nullptr, nullptr, nullptr);
  }

  template <bool kFused, bool kCollect>
  int64_t sweep_impl(const float* x, int64_t n, float m, const float* next, LaneMax* next_lanes,
                     RowCandidates* candidates) {
    const Vec mv(m);
    const Vec floor(kCollect ? candidates->floor : 0.f);
    uint32_t* words = kCollect ? candidates->words : nullptr;
    LaneMax ne, no;  // pass 1 of `next`, two chains
    // Local accumulators: accumulating into members would go through memory every
    // iteration (the compiler cannot prove that x does not alias *this), putting a
    // store-to-load forwarding delay on each loop-carried chain.
    Vec d0 = d_sub, a0 = s1, b0 = s2;
    Vec d1(0.f), a1(0.f), b1(0.f);  // a second chain halves the loop-carried FMA latency
    int64_t first = -1, count = 0;
    bool nan = false;
    auto note = [&](uint32_t at_max, int64_t k) {
      if (at_max != 0) {  // rare: the vector holding the maximum (or NaN)
        if (first < 0) first = k + __builtin_ctz(at_max);
        count += __builtin_popcount(at_max);
        for (uint32_t b = at_max; b != 0; b &= b - 1) {
          const float v = x[k + __builtin_ctz(b)];
          nan |= v != v;
        }
      }
    };
    int64_t k = 0;
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
      if constexpr (kFused) {
        ne.update(Vec::loadu(next + k));
        no.update(Vec::loadu(next + k + kLanes));
      }
      const Vec x0 = Vec::loadu(x + k), x1 = Vec::loadu(x + k + kLanes);
      const uint32_t lo = accumulate(x0, mv, d0, a0, b0);
      const uint32_t hi = accumulate(x1, mv, d1, a1, b1);
      note(lo | (hi << kLanes), k);
      if constexpr (kCollect) *words++ = at_least_bits(x0, floor) | at_least_bits(x1, floor) << kLanes;
    }
    if (k < n) {  // the last word: up to one full vector, then one partial vector
      uint32_t word = 0;
      const int64_t k0 = k;
      if (k + kLanes <= n) {
        if constexpr (kFused) ne.update(Vec::loadu(next + k));
        const Vec x0 = Vec::loadu(x + k);
        note(accumulate(x0, mv, d0, a0, b0), k);
        if constexpr (kCollect) word = at_least_bits(x0, floor);
        k += kLanes;
      }
      if (k < n) {  // padding lanes hold -inf: below m, and never listed (even for floor -inf)
        if constexpr (kFused) ne.update(load_partial(next + k, n - k, kNegInf));
        const Vec x0 = load_partial(x + k, n - k, kNegInf);
        note(accumulate(x0, mv, d0, a0, b0), k);
        if constexpr (kCollect) word |= (at_least_bits(x0, floor) & ((1u << (n - k)) - 1)) << (k - k0);
      }
      if constexpr (kCollect) *words++ = word;
    }
    if constexpr (kCollect) candidates->n_words = words - candidates->words;
    if constexpr (kFused) next_lanes->merge(ne, no);
    d_sub = d0 + d1;
    s1 = a0 + a1;
    s2 = b0 + b1;
    n_not_below += count;
    saw_nan |= nan;
    return first;
  }

  SoftmaxState<float> reduce(float m) const {
    SoftmaxState<float> s;
    s.m = m;
    s.n_eq = static_cast<float>(n_not_below);
    s.d_sub = hsum(d_sub);
    s.s1 = hsum(s1);
    s.s2 = hsum(s2);
    return s;
  }
};

// Whether x[0, n) holds a NaN.
inline bool has_nan(const float* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    if (x[j] != x[j]) return true;
  }
  return false;
}

// Index of the first x[j] == value with j != skip in x[0, n), or -1 (scan_lane_bits).
inline int64_t find_first(const float* x, int64_t n, float value, int64_t skip) {
  const Vec v(value);
  int64_t found = -1;
  const int64_t rest = scan_lane_bits(x, n, [&](const Vec& y) { return equal_bits(y, v); },
                                      [&](uint64_t bits, int64_t at, int64_t) {
                                        for (; bits != 0 && found < 0; bits &= bits - 1) {
                                          const int64_t j = at + __builtin_ctzll(bits);
                                          if (j != skip) found = j;
                                        }
                                        return found < 0;
                                      });
  if (found >= 0) return found;
  for (int64_t k = rest; k < n; ++k) {
    if (x[k] == value && k != skip) return k;
  }
  return -1;
}

// Columns [j0, j0 + n) of a row as floats: the row itself for float logits, else
// converted into buf (n <= kBlock).
template <typename scalar_t>
inline const float* float_block(const scalar_t* row, int64_t j0, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row + j0;
  } else {
    to_float(row + j0, buf, n);
    return buf;
  }
}

// First index j != skip of a row (any scalar type) with row[j] == value, or -1. Narrow
// types are converted block by block into buf.
template <typename scalar_t>
int64_t find_in_row(const scalar_t* row, int64_t C, float value, int64_t skip, float* buf) {
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, C - j0);
    const float* x = float_block(row, j0, n, buf);
    const int64_t j = find_first(x, n, value, skip - j0);
    if (j >= 0) return j0 + j;
  }
  return -1;
}

// Scores one row with the vector passes. Returns false if the row is invalid (the
// caller then uses the scalar path). top.i2 is left unset (-1): only the MMS needs it,
// and finds it on demand.
//
// Invalid rows (NaN, +inf, no finite element) are found without a pass of their own:
// pass 2 sees every NaN (LaneSums), m must be finite, and blocks skipped while the row
// holds only -inf so far are checked for NaN directly. A NaN can hide elements from
// pass 1 (max(v, NaN) forgets v), but the row is invalid then anyway.
//
// With `candidates` (rows of one block only, C <= kBlock), pass 2 also lists the columns
// at or above candidate_floor(z_(1), z_(2), reach_factor) (mms.h).
template <typename scalar_t>
bool score_row_vectorized(const scalar_t* row, int64_t C, float* buf, SoftmaxState<float>& st,
                          Top2<float>& top, RowCandidates* candidates = nullptr, float reach_factor = 1.f) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  LaneMax lanes;
  LaneSums sums;
  float m = kNegInf;
  int64_t first_max = -1;  // first column not below m
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, C - j0);
    const float* x = float_block(row, j0, n, buf);
    lanes.sweep(x, n);
    const float block_max = hmax(lanes.v1);  // running maximum of the row so far
    if (m == kNegInf && !(block_max > kNegInf)) {  // only -inf so far (or a NaN lane maximum)
      if (has_nan(x, n)) return false;
      continue;  // nothing to sum yet
    }
    if (block_max > m) {
      if (m != kNegInf) sums.rebase(m, block_max);
      m = block_max;
      first_max = -1;  // the earlier blocks hold only smaller values
    }
    if (candidates != nullptr) {  // one block (C <= kBlock): its lanes hold the row's top-2
      lanes.reduce(top.v1, top.v2);
      candidates->floor = candidate_floor(top.v1, top.v2, reach_factor);
    }
    const int64_t at = sums.sweep(x, n, m, nullptr, nullptr, candidates);
    if (first_max < 0 && at >= 0) first_max = j0 + at;
  }
  if (sums.saw_nan || !(m > kNegInf && m < std::numeric_limits<float>::infinity()) || first_max < 0) {
    return false;
  }
  st = sums.reduce(m);
  if (candidates == nullptr) lanes.reduce(top.v1, top.v2);  // else done before pass 2
  top.i1 = first_max;
  top.i2 = -1;
  return true;
}

// The same for a float row of C <= kBlock columns whose pass 1 already ran (lanes):
// pass 2 runs fused with pass 1 of `next` (a row of the same C, or null), whose per-lane
// top-2 go to next_lanes (fresh on entry). With `candidates`, pass 2 also lists the
// columns at or above candidate_floor(z_(1), z_(2), reach_factor) (mms.h).
inline bool score_row_fused(const float* x, int64_t C, const LaneMax& lanes, const float* next,
                            LaneMax& next_lanes, SoftmaxState<float>& st, Top2<float>& top,
                            RowCandidates* candidates = nullptr, float reach_factor = 1.f) {
  const float m = hmax(lanes.v1);
  if (!(m > -std::numeric_limits<float>::infinity() && m < std::numeric_limits<float>::infinity())) {
    if (next != nullptr) next_lanes.sweep(next, C);  // -inf only, +inf or NaN: scalar path
    return false;
  }
  if (candidates != nullptr) {
    lanes.reduce(top.v1, top.v2);
    candidates->floor = candidate_floor(top.v1, top.v2, reach_factor);
  }
  LaneSums sums;
  const int64_t first_max = sums.sweep(x, C, m, next, &next_lanes, candidates);
  if (sums.saw_nan || first_max < 0) return false;
  st = sums.reduce(m);
  if (candidates == nullptr) lanes.reduce(top.v1, top.v2);  // else done before pass 2
  top.i1 = first_max;
  top.i2 = -1;
  return true;
}

// ---- scalar path: float64, invalid rows, very wide rows -------------------------------

template <typename scalar_t, typename acc_t>
int64_t score_row_scalar(const scalar_t* row, int64_t C, SoftmaxState<acc_t>& st, Top2<acc_t>& top) {
  int64_t first_nan = -1;
  for (int64_t j = 0; j < C; ++j) {
    const acc_t x = static_cast<acc_t>(row[j]);
    if (x != x && first_nan < 0) first_nan = j;
    st.push(x);
    top.push(x, j);
  }
  return first_nan;
}

}  // namespace
FASTSEL_ISA_END
}  // namespace fastsel::cpu

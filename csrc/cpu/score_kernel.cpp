// Fused one-pass scoring of logits [N, C] on the CPU.
//
// Each row is read from memory once. It is processed in column blocks of kBlock floats
// (16 KiB, L1/L2-resident); each block is swept twice while it is in cache:
//   1. lane-parallel top-2 values; the running row maximum m is the largest lane top-1;
//   2. exp(z - m) with the SoftmaxState sums of row_scores.h, one exp per element; the
//      same sweep finds the first maximum and counts the elements not below m, which
//      is how NaN and +inf are detected (score_row_vectorized).
// For float rows of one block, pass 1 of the next row runs inside pass 2 of this one
// (LaneSums::sweep). When a later block raises m the lane sums are rebased once per
// block (a scalar exp), not per element as a strictly online softmax would. Rows that turn out invalid
// (NaN, +inf, only -inf) are recomputed by the scalar path, which also gives their
// torch.argmax-compatible pred. Rows are distributed over threads with at::parallel_for.
//
// Per row of 1000 float32 logits on one core of the development machine (AVX-512
// build), ~310 ns: pass 2 ~200 ns (exp throughput: 15 vector instructions per 16
// logits), pass 1 ~15 ns when fused, reductions and epilogue ~90 ns.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastsel/row_scores.h"
#include "kernels.h"
#include "large_alloc.h"
#include "mms.h"
#include "vec_utils.h"

#include "fastsel/isa_namespace.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN
namespace {

constexpr int64_t kBlock = 4096;
static_assert(kBlock <= RowCandidates::kMaxColumns, "a block's candidate bits must fit");
// Lane indices are carried as float, exact below 2^24; wider rows take the scalar path.
constexpr int64_t kMaxVectorClasses = int64_t(1) << 24;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ---- vectorized passes --------------------------------------------------------------

// exp(t) for t in [kExpFloor, 0]. Range reduction t = n ln2 + r, |r| <= ln2 / 2,
// then exp(r) by a degree-5 polynomial and 2^n: ~12 instructions where a general exp
// spends ~20 on range checks. The coefficients are a minimax fit of exp on
// [-ln2/2, ln2/2] (relative error 7.5e-8; ~2.2e-7 after float32 rounding of the
// evaluation), 40x more accurate than the Taylor coefficients at the same cost.
//   AVX2: 2^n is built in the exponent bits. At the floor n = -127, whose exponent bits
//     are all zero, so the result is exactly 0 for t < -87.68 (where exp is below
//     FLT_MIN anyway).
//   AVX-512: vscalefps multiplies by 2^n in one instruction (the shift, add and multiply
//     of the AVX2 path) and underflows gradually; at the floor -104 the result,
//     below 2^-150, rounds to exactly 0.
// Either way (and in the portable build) -inf logits, clamped to the floor, get exactly
// zero probability.
#if defined(FASTSEL_VEC512)
constexpr float kExpFloor = -104.0f;
#else
constexpr float kExpFloor = -88.0f;
#endif
constexpr float kExpC0 = 1.000000119e+00f, kExpC1 = 9.999997020e-01f, kExpC2 = 4.999889433e-01f,
                kExpC3 = 1.666757464e-01f, kExpC4 = 4.191537574e-02f, kExpC5 = 8.297646418e-03f;
constexpr float kLog2e = 1.44269504f;
// One fused multiply-add reduces t by n ln2 with ln2 rounded to float (off by 1.9e-9):
// r is then off by |n| * 1.9e-9, a relative error of exp below 6e-8 for t >= -20 (where
// the terms matter to the sums) and 2.5e-7 at the floor. The classic two-constant
// Cody-Waite split would cost one more FMA per vector for accuracy the sums do not need.
constexpr float kLn2 = 0.693147182f;

inline Vec exp_nonpositive(const Vec& t) {
#if defined(FASTSEL_VEC512)
  const __m512 x = t;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), x);
  __m512 p = _mm512_set1_ps(kExpC5);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC0));
  return _mm512_scalef_ps(p, n);
#elif defined(FASTSEL_VEC256)
  const __m256 x = t;
  const __m256 n = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), x);
  __m256 p = _mm256_set1_ps(kExpC5);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC0));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
#else  // portable: ATen's exp, zeroed at the floor, where it would give exp(-88) ~ 6e-39
  return Vec::blendv(t.exp_u20(), Vec(0.f), t <= Vec(kExpFloor));
#endif
}

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
  // the floor, whose exp is exactly 0.
  static inline uint32_t accumulate(const Vec& x, const Vec& m, Vec& d_sub, Vec& s1, Vec& s2) {
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

// First index j != skip of a row (any scalar type) with row[j] == value, or -1. Narrow
// types are converted block by block into buf.
template <typename scalar_t>
int64_t find_in_row(const scalar_t* row, int64_t C, float value, int64_t skip, float* buf) {
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t n = std::min(kBlock, C - j0);
    const float* x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = row + j0;
    } else {
      to_float(row + j0, buf, n);
      x = buf;
    }
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
    const float* x;
    if constexpr (std::is_same_v<scalar_t, float>) {
      x = row + j0;
    } else {
      to_float(row + j0, buf, n);
      x = buf;
    }
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

// ---- the driver -----------------------------------------------------------------------

template <typename acc_t>
struct OutputPointers {
  acc_t *loss, *entropy, *margin, *true_margin, *grad_norm, *confidence, *mms, *lse;
  int64_t* pred;

  void write(int64_t i, const RowScores<acc_t>& r) const {
    loss[i] = r.loss;
    entropy[i] = r.entropy;
    margin[i] = r.margin;
    true_margin[i] = r.true_margin;
    grad_norm[i] = r.grad_norm;
    confidence[i] = r.confidence;
    lse[i] = r.lse;
    pred[i] = r.pred;
  }
};

struct MmsInputs {
  int64_t mode = kMmsNone;
  MmsWeights weights;
};

// Runner-up index of a row: the vector path leaves it unset and finds it on demand.
template <typename scalar_t, typename acc_t>
int64_t runner_up_index(const scalar_t* row, int64_t C, const Top2<acc_t>& top, float* buf) {
  if (top.i2 >= 0 || top.v2 == neg_inf<acc_t>()) return top.i2;
  if constexpr (std::is_same_v<acc_t, float>) return find_in_row(row, C, top.v2, top.i1, buf);
  return -1;  // unreachable: the scalar (float64) path tracks i2
}

// Everything a row needs besides its index; shared by the row-wise and lane-wise paths.
template <typename scalar_t>
struct RowJob {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* base;
  int64_t row_stride, C;
  const MmsInputs* mms;
  const OutputPointers<acc_t>* out;

  // The row as acc_t blocks: visit_block(x, j0, n) with x[j - j0] = z_j.
  template <typename VisitBlock>
  void row_blocks(const scalar_t* row, float* buf, VisitBlock&& visit_block) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      visit_block(row, 0, C);
    } else {
      for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
        const int64_t n = std::min(kBlock, C - j0);
        to_float(row + j0, buf, n);
        visit_block(buf, j0, n);
      }
    }
  }

  // Every column j other than a and r with z_j >= threshold, by a sweep of the row.
  template <typename Visit>
  void sweep_candidates(const scalar_t* row, acc_t threshold, int64_t a, int64_t r, float* buf,
                        Visit&& visit) const {
    row_blocks(row, buf, [&](const acc_t* x, int64_t j0, int64_t n) {
      for_each_at_least(x, n, threshold, a - j0, r - j0, [&](int64_t k) { visit(j0 + k, x[k]); });
    });
  }

  // MMS of row i from its top-2 (mms.h); NaN for invalid rows.
  void write_mms(int64_t i, const scalar_t* row, const Top2<acc_t>& top, const RowScores<acc_t>& r,
                 float* buf) const {
    if (mms->mode == kMmsNone) return;
    if (!r.valid) {
      out->mms[i] = quiet_nan<acc_t>();
      return;
    }
    const int64_t a = top.i1;
    const int64_t runner_up = runner_up_index(row, C, top, buf);
    const MmsWeights& mw = mms->weights;
    if (mms->mode == kMmsTop2 || mw.inv_dist != nullptr) {
      out->mms[i] = mms_top2_or_gram(row, top.v1, a, runner_up, r.margin, buf);
      return;
    }
    const acc_t distance = mms_needs_runner_up(r.margin, runner_up)
                               ? checked_pair_distance(static_cast<const acc_t*>(mw.w), mw.D, a, runner_up)
                               : acc_t(1);
    out->mms[i] = mms_exact_pruned<acc_t>(top.v1, a, runner_up, r.margin, distance, mw,
                                          [&](acc_t threshold, auto&& visit) {
                                            sweep_candidates(row, threshold, a, runner_up, buf, visit);
                                          });
  }

  // The top-2 MMS, or the exact MMS from the [C, C] inverse distances (small C), for the
  // generic path (write_mms) and the group path (group_mms).
  acc_t mms_top2_or_gram(const scalar_t* row, acc_t za, int64_t a, int64_t r, acc_t margin, float* buf) const {
    const MmsWeights& mw = mms->weights;
    if (mms->mode == kMmsExact) {
      return mms_exact_gram<acc_t>(za, a, r, margin, mw, [&](auto&& visit_block) { row_blocks(row, buf, visit_block); });
    }
    if (const auto trivial = mms_without_distance(margin, r)) return *trivial;
    if (mw.inv_dist != nullptr) return margin * static_cast<const acc_t*>(mw.inv_dist)[a * C + r];
    return margin / checked_pair_distance(static_cast<const acc_t*>(mw.w), mw.D, a, r);
  }

  // MMS of the rows of a group (C <= kBlock), after their row passes: the rows are still
  // in L2 (kLanes rows of at most kBlock columns); interleaved with the row passes, which
  // stream from memory, the same work would compete with them for the caches. Pass 2 listed each row's columns at or
  // above its floor (RowCandidates, mms.h): the runner-up comes from that list, and so do
  // the exact mode's candidates when the list covers them; else the row is swept. Either
  // way reach_factor (mms.h) adapts.
  void group_mms(int64_t i0, int64_t rows, const bool* ok, const float* v1, const float* v2,
                 const float* i1, const RowCandidates* candidates, float& reach_factor, float* buf) const {
    static_assert(std::is_same_v<acc_t, float>);
    const MmsWeights& mw = mms->weights;
    ListedColumns list;
    for (int64_t r = 0; r < rows; ++r) {
      if (!ok[r]) continue;
      const scalar_t* row = base + (i0 + r) * row_stride;
      const int64_t a = static_cast<int64_t>(i1[r]);
      const float margin = v1[r] - v2[r];
      list.gather(candidates[r], row);
      int64_t ru = candidates[r].covers(v2[r]) ? list.find(v2[r], a) : -1;
      if (ru < 0) {
        Top2<float> top;
        top.v1 = v1[r]; top.v2 = v2[r]; top.i1 = a; top.i2 = -1;
        ru = runner_up_index(row, C, top, buf);
      }
      if (mms->mode == kMmsTop2 || mw.inv_dist != nullptr) {
        out->mms[i0 + r] = mms_top2_or_gram(row, v1[r], a, ru, margin, buf);
        continue;
      }
      const float distance = mms_needs_runner_up(margin, ru) ? checked_pair_distance(static_cast<const float*>(mw.w), mw.D, a, ru) : 1.f;
      out->mms[i0 + r] = mms_exact_pruned<float>(v1[r], a, ru, margin, distance, mw, [&](float threshold, auto&& visit) {
        if (list.complete && candidates[r].covers(threshold)) {
          for (int k = 0; k < list.n; ++k) {
            const int64_t j = list.index[k];
            if (list.value[k] >= threshold && j != a && j != ru) visit(j, list.value[k]);
          }
          reach_factor = std::max(1.f, reach_factor * kReachDecay);
          return;
        }
        if (list.complete) reach_factor = std::min(kMaxReachFactor, reach_factor * kReachGrowth);  // floor too high
        sweep_candidates(row, threshold, a, ru, buf, visit);
      });
    }
  }

  // Row-wise path: vector passes along the row, scalar fallback for invalid rows.
  void score_row(int64_t i, int64_t y, float* buf) const {
    const scalar_t* row = base + i * row_stride;
    SoftmaxState<acc_t> st;
    Top2<acc_t> top;
    bool ok = false;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (C < kMaxVectorClasses) ok = score_row_vectorized(row, C, buf, st, top);
    }
    int64_t first_nan = -1;
    RowScores<acc_t> r;
    if (ok) {
      r = finalize_row(st, top, y >= 0 ? static_cast<acc_t>(row[y]) : acc_t(0), y);
    } else {
      // The scalar path accumulates in double whatever the logits: a float sum of more
      // than 2^24 terms of 1 (a row of 2^24 + k equal logits) would stop growing at 2^24.
      SoftmaxState<double> sd;
      Top2<double> td;
      first_nan = score_row_scalar(row, C, sd, td);
      const RowScores<double> rd = finalize_row(sd, td, y >= 0 ? static_cast<double>(row[y]) : 0.0, y);
      r = RowScores<acc_t>{static_cast<acc_t>(rd.loss), static_cast<acc_t>(rd.entropy),
                           static_cast<acc_t>(rd.margin), static_cast<acc_t>(rd.true_margin),
                           static_cast<acc_t>(rd.grad_norm), static_cast<acc_t>(rd.confidence),
                           static_cast<acc_t>(rd.lse), rd.pred, rd.valid};
      top.v1 = static_cast<acc_t>(td.v1);
      top.v2 = static_cast<acc_t>(td.v2);
      top.i1 = td.i1;
      top.i2 = td.i2;
    }
    if (first_nan >= 0) r.pred = first_nan;  // torch.argmax ranks NaN first
    out->write(i, r);
    write_mms(i, row, top, r, buf);
  }

  // finalize_row of row_scores.h for kLanes rows at once (one row per lane), storing
  // rows [i0, i0 + rows) of every float output. Vectorizing the per-row epilogue
  // (log1p, exp, sqrt, divisions) matters when C is small or moderate.
  void finalize_lanes(int64_t i0, int64_t rows, const Vec& m, const Vec& v2, const Vec& i1,
                      const Vec& n_eq, const Vec& d_sub, const Vec& s1, const Vec& s2,
                      const Vec& z_y, const Vec& yv) const {
    const Vec one(1.f), zero(0.f), nan(std::numeric_limits<float>::quiet_NaN());
    const Vec dm1 = (n_eq - one) + d_sub;
    const Vec d = n_eq + d_sub;
    const Vec log_d = dm1.log1p();
    const Vec ignored = yv < zero;
    const Vec runner_up = Vec::blendv(m, v2, yv == i1);
    const Vec zy_is_max = z_y == m;
    const Vec e_y = exp_nonpositive(at::vec::clamp_min(z_y - m, Vec(kExpFloor)));
    const Vec one_minus_py = Vec::blendv(d - e_y, dm1, zy_is_max);
    // sum_{j != y} p_j^2 d^2 U and the norm as finalize_row computes them (s2 is scaled
    // by U = root^2 against underflow: row_scores.h)
    const Vec root(s2_root(0.f)), unit(s2_unit<float>());
    const Vec e_y_scaled = e_y * root;
    const Vec rest_sq = at::vec::clamp_min(
        Vec::blendv(at::vec::fmadd(n_eq, unit, s2) - e_y_scaled * e_y_scaled,
                    at::vec::fmadd(n_eq - one, unit, s2), zy_is_max), zero);
    const Vec g = one_minus_py * root;
    const Vec scaled_norm = at::vec::fmadd(g, g, rest_sq).sqrt() / root;
    const Vec plain_norm = at::vec::fmadd(one_minus_py, one_minus_py, rest_sq / unit).sqrt();
    const Vec norm = Vec::blendv(plain_norm, scaled_norm, scaled_norm < Vec(std::numeric_limits<float>::infinity()));
    const Vec grad_norm = at::vec::maximum(norm, one_minus_py) / d;  // >= 1 - p_y (row_scores.h)
    Vec::blendv((m - z_y) + log_d, zero, ignored).store(out->loss + i0, rows);
    (log_d - s1 / d).store(out->entropy + i0, rows);
    (m - v2).store(out->margin + i0, rows);
    Vec::blendv(z_y - runner_up, nan, ignored).store(out->true_margin + i0, rows);
    Vec::blendv(grad_norm, nan, ignored).store(out->grad_norm + i0, rows);
    (one / d).store(out->confidence + i0, rows);
    (m + log_d).store(out->lse + i0, rows);
  }

  // MMS of valid row i from its top-2 and margin v1 - v2 (as finalize_lanes computes it).
  void lane_mms(int64_t i, float v1, float v2, int64_t i1, int64_t i2, float* buf) const {
    if (mms->mode == kMmsNone) return;
    Top2<acc_t> top;
    top.v1 = v1; top.i1 = i1; top.v2 = v2; top.i2 = i2;
    RowScores<acc_t> rs;
    rs.valid = true;
    rs.margin = v1 - v2;
    rs.pred = i1;
    write_mms(i, base + i * row_stride, top, rs, buf);
  }

  // Row-wise vector passes for kLanes consecutive rows, then one vectorized epilogue.
  //
  // kMms: an MMS is asked for (a separate instance, so that the MMS code and its buffers
  // stay out of the plain scoring loop: sharing one function cost that loop ~7%).
  // reach_factor: the running estimate of candidate_floor (mms.h), one per thread.
  template <bool kMms>
  void score_row_group(int64_t i0, int64_t rows, const int64_t* y, float* buf, float& reach_factor) const {
    static_assert(std::is_same_v<acc_t, float>);
    alignas(64) float m[kLanes], v2[kLanes], i1[kLanes], n_eq[kLanes], d_sub[kLanes],
        s1[kLanes], s2[kLanes], zy[kLanes], yf[kLanes];
    bool ok[kLanes];
    // Float rows of one block: each row's pass 2 runs fused with the next row's pass 1.
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    const bool fused = kFloat && C <= kBlock;
    // Rows of one block list their MMS candidates in pass 2 (the pruned exact search needs
    // the columns within reach of the maximum, the others only the runner-up).
    const bool collect = kMms && C <= kBlock;  // fused, or one converted block
    const float floor_factor =
        mms->mode == kMmsExact && mms->weights.inv_dist == nullptr ? reach_factor : 1.f;
    RowCandidates candidates[kMms ? kLanes : 1];
    LaneMax pass1;  // pass 1 of the row scored next (fused path)
    if constexpr (kFloat) {
      if (fused && rows > 0) pass1.sweep(base + i0 * row_stride, C);
    }
    for (int64_t r = 0; r < kLanes; ++r) {
      SoftmaxState<float> st;
      Top2<float> top;
      if (r >= rows) {
        ok[r] = false;
      } else if (fused) {
        if constexpr (kFloat) {
          const LaneMax lanes = pass1;
          pass1 = LaneMax();
          const float* next = r + 1 < rows ? base + (i0 + r + 1) * row_stride : nullptr;
          ok[r] = score_row_fused(base + (i0 + r) * row_stride, C, lanes, next, pass1, st, top,
                                  collect ? &candidates[r] : nullptr, floor_factor);
        }
      } else {
        ok[r] = C < kMaxVectorClasses &&
                score_row_vectorized(base + (i0 + r) * row_stride, C, buf, st, top,
                                     collect ? &candidates[r] : nullptr, floor_factor);
      }
      if (!ok[r]) {  // placeholder lane, overwritten by the scalar path below
        st.m = 0.f; st.n_eq = 1.f; top.v1 = 0.f; top.v2 = 0.f; top.i1 = 0;
      } else if (!collect) {
        // now, while the row is in cache: the MMS sweeps it again (runner-up, candidates)
        lane_mms(i0 + r, top.v1, top.v2, top.i1, top.i2, buf);
      }
      m[r] = st.m; n_eq[r] = st.n_eq; d_sub[r] = st.d_sub; s1[r] = st.s1; s2[r] = st.s2;
      v2[r] = top.v2; i1[r] = static_cast<float>(top.i1);
      zy[r] = (ok[r] && y[r] >= 0) ? static_cast<float>(base[(i0 + r) * row_stride + y[r]]) : 0.f;
      yf[r] = static_cast<float>(r < rows ? y[r] : -1);
    }
    finalize_lanes(i0, rows, Vec::loadu(m), Vec::loadu(v2), Vec::loadu(i1), Vec::loadu(n_eq),
                   Vec::loadu(d_sub), Vec::loadu(s1), Vec::loadu(s2), Vec::loadu(zy), Vec::loadu(yf));
    if constexpr (kMms) {
      if (collect) group_mms(i0, rows, ok, m, v2, i1, candidates, reach_factor, buf);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      if (!ok[r]) {
        score_row(i, y[r], buf);
        continue;
      }
      out->pred[i] = static_cast<int64_t>(i1[r]);
    }
  }

  // Lane-wise path for small C: kLanes rows at once, one row per vector lane. The rows
  // are transposed into tbuf[j * kLanes + r] (float) and swept twice; top-2 indices are
  // tracked exactly (strictly greater wins, so the lowest index wins ties).
  void score_lanes(int64_t i0, int64_t rows, const int64_t* y, float* tbuf, float* buf) const {
    static_assert(std::is_same_v<acc_t, float>);
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < kLanes; ++r) {
      const scalar_t* row = base + (i0 + std::min(r, rows - 1)) * row_stride;
      for (int64_t j = 0; j < C; ++j) tbuf[j * kLanes + r] = static_cast<float>(row[j]);
    }
    Vec v1(kNegInf), v2(kNegInf), i1(-1.f), i2(-1.f), check(0.f);
    for (int64_t j = 0; j < C; ++j) {
      const Vec x = Vec::loadu(tbuf + j * kLanes);
      const Vec jv(static_cast<float>(j));
      const Vec gt1 = x > v1;
      const Vec gt2 = x > v2;
      v2 = Vec::blendv(v2, x, gt2);
      i2 = Vec::blendv(i2, jv, gt2);
      v2 = Vec::blendv(v2, v1, gt1);
      i2 = Vec::blendv(i2, i1, gt1);
      v1 = Vec::blendv(v1, x, gt1);
      i1 = Vec::blendv(i1, jv, gt1);
      check = check + x;
    }
    Vec d_sub(0.f), s1(0.f), s2(0.f);
    alignas(64) float n_eq_a[kLanes] = {}, zy_a[kLanes], yf_a[kLanes];
    for (int64_t j = 0; j < C; ++j) {
      uint32_t at_max = LaneSums::accumulate(Vec::loadu(tbuf + j * kLanes), v1, d_sub, s1, s2);
      for (; at_max != 0; at_max &= at_max - 1) n_eq_a[__builtin_ctz(at_max)] += 1.f;
    }
    for (int64_t r = 0; r < kLanes; ++r) {
      zy_a[r] = y[r] >= 0 ? tbuf[y[r] * kLanes + r] : 0.f;
      yf_a[r] = static_cast<float>(y[r]);
    }
    finalize_lanes(i0, rows, v1, v2, i1, Vec::loadu(n_eq_a), d_sub, s1, s2, Vec::loadu(zy_a),
                   Vec::loadu(yf_a));
    alignas(64) float m_a[kLanes], chk_a[kLanes], v2_a[kLanes], i1_a[kLanes], i2_a[kLanes], mms_a[kLanes];
    v1.store(m_a); check.store(chk_a); v2.store(v2_a); i1.store(i1_a); i2.store(i2_a);
    bool lane_mms_done = false;
#if defined(FASTSEL_VEC512)
    // 16 rows at once from the [C, C] inverse distances (mms.h); else per row (lane_mms)
    const auto* inv = static_cast<const float*>(mms->weights.inv_dist);
    if (inv != nullptr && mms->mode == kMmsExact && C <= kLaneMmsMaxClasses) {
      lanes_mms_gram(tbuf, C, inv, v1, v2, i1, i2).store(mms_a);
      lane_mms_done = true;
    } else if (inv != nullptr && mms->mode == kMmsTop2) {
      lanes_mms_top2(C, inv, v1, v2, i1, i2).store(mms_a);
      lane_mms_done = true;
    }
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      // NaN / +inf (non-finite check sum other than -inf) or no finite element
      const bool valid = m_a[r] > kNegInf &&
                         (chk_a[r] == kNegInf || (chk_a[r] > kNegInf && chk_a[r] < -kNegInf));
      if (!valid) {
        score_row(i, y[r], buf);  // exact semantics (and argmax of NaN rows) from the scalar path
        continue;
      }
      out->pred[i] = static_cast<int64_t>(i1_a[r]);
      if (lane_mms_done) {
        out->mms[i] = mms_a[r];
      } else {
        lane_mms(i, m_a[r], v2_a[r], static_cast<int64_t>(i1_a[r]), static_cast<int64_t>(i2_a[r]), buf);
      }
    }
  }
};

// Rows up to this many classes take the lane-wise path.
constexpr int64_t kLaneWiseMaxClasses = 128;

template <typename scalar_t, typename target_t>
void score_rows(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                const MmsInputs& mms, const OutputPointers<acc_type_t<scalar_t>>& out,
                std::atomic<int64_t>& first_bad_target) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t target_stride = target.stride(0);
  const target_t* tgt = target.const_data_ptr<target_t>();
  const RowJob<scalar_t> job{logits.const_data_ptr<scalar_t>(), logits.stride(0), C, &mms, &out};
  const bool lane_wise = std::is_same_v<acc_t, float> && C <= kLaneWiseMaxClasses;
  const int64_t group = std::is_same_v<acc_t, float> ? kLanes : 1;  // rows per epilogue
  const int64_t n_groups = (N + group - 1) / group;
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * group));

  // Target index of row i: -1 for ignore_index; out-of-range values are recorded.
  auto target_of = [&](int64_t i) -> int64_t {
    const int64_t t = static_cast<int64_t>(tgt[i * target_stride]);
    if (t == ignore_index) return -1;
    if (t < 0 || t >= C) {
      int64_t expected = -1;
      first_bad_target.compare_exchange_strong(expected, i);
      return -1;
    }
    return t;
  };

  at::parallel_for(0, n_groups, grain, [&](int64_t g_begin, int64_t g_end) {
    std::vector<float> buf(kBlock);
    float reach_factor = kInitialReachFactor;
    std::vector<float> tbuf(lane_wise ? C * kLanes : 0);
    for (int64_t g = g_begin; g < g_end; ++g) {
      if constexpr (std::is_same_v<acc_t, float>) {
        const int64_t i0 = g * kLanes;
        const int64_t rows = std::min(kLanes, N - i0);
        int64_t y[kLanes];
        for (int64_t r = 0; r < kLanes; ++r) y[r] = r < rows ? target_of(i0 + r) : -1;
        if (lane_wise) {
          job.score_lanes(i0, rows, y, tbuf.data(), buf.data());
        } else {
          if (mms.mode != kMmsNone) {
            job.template score_row_group<true>(i0, rows, y, buf.data(), reach_factor);
          } else {
            job.template score_row_group<false>(i0, rows, y, buf.data(), reach_factor);
          }
        }
      } else {
        job.score_row(g, target_of(g), buf.data());
      }
    }
  });
}

// grad_norm of the most confident rows, again. The row pass keeps sum_j exp(2 (z_j - m))
// scaled by 2^100 (float) or 2^960 (double) (row_scores.h), which holds its precision
// while the largest term exp(z_j - m), j != y, is above ~2^-113 (2^-991); below, the
// squares are subnormal and grad_norm loses digits. A row there has 0 < loss < 2^-100
// (2^-960), its target the unique maximum: its grad_norm is recomputed in double from
// the row, relative to its largest competitor t = max_{j != y} z_j - z_y:
//   ||p - onehot(y)|| = exp(t) sqrt(R1^2 + R2) / d,  R1 = sum_{j != y} exp(z_j - z_y - t),
//   R2 = sum_{j != y} exp(2 (z_j - z_y - t)), d = 1 + exp(t) R1,
// where nothing underflows but the final product (rows of logits a margin of 70 apart in
// float32, 700 in float64; one more pass over each).
template <typename scalar_t, typename target_t>
void refine_confident_grad_norms(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                 const OutputPointers<acc_type_t<scalar_t>>& out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const target_t* tgt = target.const_data_ptr<target_t>();
  const int64_t rs = logits.stride(0), ts = target.stride(0);
  const acc_t below = std::is_same_v<acc_t, float> ? acc_t(0x1p-100) : acc_t(0x1p-960);
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t loss = out.loss[i];
      if (!(loss > acc_t(0) && loss < below)) continue;  // NaN, ignored (0) and ordinary rows
      const int64_t y = static_cast<int64_t>(tgt[i * ts]);
      if (y == ignore_index) continue;
      const scalar_t* row = base + i * rs;
      const double zy = static_cast<double>(row[y]);
      double t = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < C; ++j) {
        if (j != y) t = std::max(t, static_cast<double>(row[j]) - zy);
      }
      double r1 = 0.0, r2 = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        if (j == y) continue;
        const double e = std::exp((static_cast<double>(row[j]) - zy) - t);
        r1 += e;
        r2 += e * e;
      }
      const double top = std::exp(t);
      out.grad_norm[i] = static_cast<acc_t>(top * std::sqrt(r1 * r1 + r2) / (1.0 + top * r1));
    }
  });
}

// Raises the IndexError for the first row whose target is neither in [0, C) nor
// ignore_index (recorded by the row loops, so no separate pass over the targets).
void throw_if_bad_target(int64_t bad_row, const at::Tensor& target, int64_t C,
                         int64_t ignore_index, const char* op) {
  if (bad_row < 0) return;
  const int64_t value = target.scalar_type() == at::kLong ? target[bad_row].item<int64_t>()
                                                           : target[bad_row].item<int32_t>();
  TORCH_CHECK_INDEX(false, op, ": target[", bad_row, "] = ", value, " is outside [0, ", C,
                    ") and is not ignore_index (", ignore_index, ")");
}

// Pairs whose squared distance is below this fraction of ||w_a||^2 + ||w_j||^2 lose more
// than ~1e-5 of it to cancellation in the Gram form (a few ulps of the norms).
constexpr double kGramCancellationRatio = 1.0 / 64;

// 1 / ||w_a - w_j|| for every pair of rows of w (contiguous), [C, C] (inf for identical
// rows and on the diagonal, which is never read: j != a). One at::mm gives the Gram form
// ||w_a||^2 + ||w_j||^2 - 2 w_a.w_j; it cancels where two rows nearly coincide (in
// float32, rows 1e-3 apart relative to their norm came out ~10% off), so those pairs are
// recomputed from the difference of the rows. Centring the rows first would flag fewer
// pairs when all rows share a large component, but costs a pass over W on every call,
// more than the recomputation of the few pairs flagged in practice.
//
// Everything after the product is one loop over the upper triangle, mirrored: a chain of
// elementwise torch ops (sum of norms, sub, compare, nonzero, clamp, rsqrt) would launch
// eight ops per call, which at small C costs more than the whole MMS of a batch, and the
// mirror makes the matrix symmetric bit for bit, which lanes_mms_gram (mms.h) relies on.
// *suspect is set when a row's squared norm (the Gram diagonal) is not finite: the row
// holds NaN or +-inf, or overflows (the caller tells which).
at::Tensor inverse_distances(const at::Tensor& w, bool* suspect) {
  const int64_t C = w.size(0), D = w.size(1);
  const at::Tensor gram = at::mm(w, w.t());
  at::Tensor inv = at::empty({C, C}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fastsel_inverse_distances", [&] {
    const scalar_t* g = gram.const_data_ptr<scalar_t>();
    const scalar_t* rows = w.const_data_ptr<scalar_t>();
    scalar_t* out = inv.mutable_data_ptr<scalar_t>();
    for (int64_t a = 0; a < C; ++a) {
      if (!std::isfinite(g[a * C + a])) *suspect = true;
    }
    const scalar_t ratio = static_cast<scalar_t>(kGramCancellationRatio);
    const scalar_t kMinPlainSquare = kMinPlainDistance<scalar_t> * kMinPlainDistance<scalar_t>;
    // squares of distances up to this stay finite, and so do their sums of two
    const scalar_t kMaxPlainDistance = std::sqrt(std::numeric_limits<scalar_t>::max()) / scalar_t(2);
    const scalar_t kMaxPlainSquare = kMaxPlainDistance * kMaxPlainDistance;
    // row a does C - 1 - a pairs: a grain of rows is ~4096 pairs on average
    at::parallel_for(0, C, std::max<int64_t>(1, 8192 / std::max<int64_t>(C, 1)), [&](int64_t a0, int64_t a1) {
      for (int64_t a = a0; a < a1; ++a) {
        out[a * C + a] = std::numeric_limits<scalar_t>::infinity();
        const scalar_t sq_a = g[a * C + a];
        for (int64_t j = a + 1; j < C; ++j) {
          const scalar_t sum_sq = sq_a + g[j * C + j];
          scalar_t d2 = std::fma(scalar_t(-2), g[a * C + j], sum_sq);
          scalar_t q;
          // The Gram form holds for ordinary rows; recomputed from the rows: pairs that
          // cancel, tiny or overflowing squares, and non-finite rows (NaN distance).
          const bool plain = d2 >= sum_sq * ratio && d2 >= kMinPlainSquare && sum_sq <= kMaxPlainSquare;
          if (plain) {
            q = scalar_t(1) / std::sqrt(d2);  // 1 / sqrt as torch's rsqrt
          } else {
            const scalar_t d = checked_pair_distance(rows, D, a, j);
            // d * d as before for ordinary rows (bit for bit); 1 / d where d * d would
            // leave the range, NaN for a non-finite row
            q = d >= kMinPlainDistance<scalar_t> && d <= kMaxPlainDistance ? scalar_t(1) / std::sqrt(d * d)
                                                                           : scalar_t(1) / d;
          }
          out[a * C + j] = q;
          out[j * C + a] = q;
        }
      }
    });
  });
  return inv;
}

// ||w_j - mu|| for every row j of w ([C, D] float, contiguous), mu the mean row: the
// pruned MMS search's bounds (mms.h). The triangle inequality holds around any mu, so
// the mean's own rounding is harmless; each radius adds float sums of at most 256
// squares in double, so it is good to ~1e-6 relative whatever D (the search's slack is
// 1e-4). Rows in parallel, in one pass: `(w - w.mean(0)).norm(2, 1)` would allocate and
// read a [C, D] temporary, a large part of the call for a batch of a few hundred rows.
at::Tensor centred_radii(const at::Tensor& w) {
  const int64_t C = w.size(0), D = w.size(1);
  const float* rows = w.const_data_ptr<float>();
  std::vector<float> mu(D, 0.f);
  at::parallel_for(0, D, 256, [&](int64_t d0, int64_t d1) {
    for (int64_t j = 0; j < C; ++j) {
      const float* row = rows + j * D;
      for (int64_t d = d0; d < d1; ++d) mu[d] += row[d];
    }
    for (int64_t d = d0; d < d1; ++d) mu[d] /= static_cast<float>(C);
  });
  at::Tensor radius = at::empty({C}, w.options());
  float* out = radius.mutable_data_ptr<float>();
  constexpr int64_t kSpan = 256;  // squares per float sum
  at::parallel_for(0, C, 64, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* row = rows + j * D;
      double total = 0.0;
      for (int64_t s0 = 0; s0 < D; s0 += kSpan) {
        const int64_t s1 = std::min(D, s0 + kSpan);
        Vec acc0(0.f), acc1(0.f);
        int64_t d = s0;
        for (; d + 2 * kLanes <= s1; d += 2 * kLanes) {
          const Vec e0 = Vec::loadu(row + d) - Vec::loadu(mu.data() + d);
          const Vec e1 = Vec::loadu(row + d + kLanes) - Vec::loadu(mu.data() + d + kLanes);
          acc0 = at::vec::fmadd(e0, e0, acc0);
          acc1 = at::vec::fmadd(e1, e1, acc1);
        }
        float part = hsum(acc0 + acc1);
        for (; d < s1; ++d) part += (row[d] - mu[d]) * (row[d] - mu[d]);
        total += part;
      }
      out[j] = static_cast<float>(std::sqrt(total));
    }
  });
  return radius;
}

}  // namespace

namespace {

// t * 2^k for |k| up to ~2100, exact where the result is in range: in two steps, since
// 2^k itself may overflow (a subnormal float64's 2^1029) and a scalar 2^k is rounded to
// t's dtype (2^132 is inf in float, and 0 * inf is NaN).
at::Tensor times_power_of_two(const at::Tensor& t, int k) {
  const int half = k / 2;
  return t * std::ldexp(1.0, half) * std::ldexp(1.0, k - half);
}

// The exponent e of max |x| = f 2^e, f in [0.5, 1), of the finite entries of x (0 when none
// is nonzero).
int magnitude_exponent(const at::Tensor& x) {
  const double top = at::nan_to_num(x.abs(), 0.0, 0.0).max().item<double>();
  int e = 0;
  std::frexp(top, &e);
  return top > 0 ? e : 0;
}

}  // namespace

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "same_bits: CPU tensors only");
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.const_data_ptr(), y.const_data_ptr(), x.nbytes()) == 0;
}

bool mms_uses_max_distance(int64_t N, int64_t C) { return !use_mms_gram(N, C, /*exact=*/true); }

ScoreOutputs score_forward(const at::Tensor& logits_in, const at::Tensor& target,
                           int64_t ignore_index, const std::optional<at::Tensor>& weight,
                           int64_t mms_mode, const std::optional<at::Tensor>& max_distance) {
  check_score_forward_args(logits_in, target, weight, mms_mode, max_distance);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  // Rows may have any stride; columns must be unit-stride for vector loads.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  ScoreBuffers outs(N, opts, mms_mode);

  MmsInputs mms_in;
  mms_in.mode = mms_mode;
  at::Tensor w, radius, inv_dist, farthest;
  // A weight with a NaN or +-inf entry has no distance between that class and any other,
  // and the exact MMS takes a minimum over every class: it is then NaN wherever a
  // distance is needed (0 < margin < inf), whatever path the call takes (the top-2 MMS
  // gets NaN from its own pair's distance, per row).
  bool nonfinite_weight = false;
  // The MMS of w is s times that of w * s (s = 2^k, so w * s is exact): the weight is
  // rescaled where its magnitude would break the arithmetic (a float64 weight beyond
  // float32's range for float32 logits, the pruned search's radii overflowing or
  // underflowing) and the MMS scaled back at the end, mms_scale_exp = k.
  int mms_scale_exp = 0;
  if (mms_mode != kMmsNone) {
    if (weight->scalar_type() == at::kDouble && opts.dtype() == at::kFloat) {
      const int e = magnitude_exponent(*weight);  // keep the rows inside float32's normal range
      if (e > 100 || e < -100) mms_scale_exp = -e;
    }
    w = (mms_scale_exp != 0 ? times_power_of_two(*weight, mms_scale_exp) : *weight).to(opts.dtype()).contiguous();
    const bool gram = use_mms_gram(N, C, mms_mode == kMmsExact);
    if (gram) {  // distances from the matrix
      bool suspect = false;  // a non-finite Gram diagonal: then the exact check (it may be overflow)
      inv_dist = inverse_distances(w, &suspect);
      if (mms_mode == kMmsExact && suspect) nonfinite_weight = !at::isfinite(w).all().item<bool>();
      mms_in.weights.inv_dist = inv_dist.const_data_ptr();
    }
    if (mms_mode == kMmsExact && !gram) {  // the pruned search's bounds
      const bool is_float = w.scalar_type() == at::kFloat;
      auto radii = [&] {  // the radii, and their maximum (+inf if one is not finite)
        radius = is_float ? centred_radii(w) : (w - w.mean(0, /*keepdim=*/true)).norm(2, {1}).contiguous();
        double top = 0.0;
        AT_DISPATCH_FLOATING_TYPES(radius.scalar_type(), "fastsel_radius_max", [&] {
          const scalar_t* r = radius.const_data_ptr<scalar_t>();
          for (int64_t j = 0; j < C; ++j) {
            const double v = static_cast<double>(r[j]);
            top = std::isfinite(v) ? std::max(top, v) : std::numeric_limits<double>::infinity();
            if (std::isinf(top)) break;
          }
        });
        return top;
      };
      double radius_max = radii();
      const double lo = is_float ? 0x1p-40 : 0x1p-400, hi = is_float ? 0x1p40 : 0x1p400;
      double magnitude = radius_max;  // what the rescaling puts near 1
      if (!std::isfinite(radius_max)) {  // a non-finite entry, or finite rows too large for the sums
        nonfinite_weight = !at::isfinite(w).all().item<bool>();
        magnitude = nonfinite_weight ? 1.0 : w.abs().max().item<double>();
      } else if (radius_max < lo) {  // tiny rows (their squares may have underflowed), or identical ones
        magnitude = w.abs().max().item<double>();
      }
      if (!nonfinite_weight && magnitude > 0 && (magnitude < lo || magnitude > hi)) {
        int e = 0;
        std::frexp(magnitude, &e);  // magnitude = f 2^e, f in [0.5, 1)
        mms_scale_exp -= e;
        w = times_power_of_two(w, -e);
        radius_max = radii();
      }
      mms_in.weights.radius = radius.const_data_ptr();
      mms_in.weights.radius_max = radius_max;
      if (max_distance.has_value()) {  // scaled like w (in float64 first: it may leave float's range)
        farthest = times_power_of_two(max_distance->to(at::kDouble), mms_scale_exp).to(opts.dtype()).contiguous();
        mms_in.weights.max_distance = farthest.const_data_ptr();
      }
    }
    mms_in.weights.w = w.const_data_ptr();
    mms_in.weights.D = w.size(1);
    if (nonfinite_weight) mms_in.mode = kMmsNone;  // filled from the margins below
  }

  std::atomic<int64_t> first_bad_target{-1};
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastsel_score", [&] {
      using acc_t = acc_type_t<scalar_t>;
      OutputPointers<acc_t> out{outs.loss.data_ptr<acc_t>(),      outs.entropy.data_ptr<acc_t>(),
                                outs.margin.data_ptr<acc_t>(),    outs.true_margin.data_ptr<acc_t>(),
                                outs.grad_norm.data_ptr<acc_t>(), outs.confidence.data_ptr<acc_t>(),
                                outs.mms.numel() ? outs.mms.data_ptr<acc_t>() : nullptr,
                                outs.lse.data_ptr<acc_t>(),       outs.pred.data_ptr<int64_t>()};
      if (target.scalar_type() == at::kLong) {
        score_rows<scalar_t, int64_t>(logits, target, ignore_index, mms_in, out, first_bad_target);
        refine_confident_grad_norms<scalar_t, int64_t>(logits, target, ignore_index, out);
      } else {
        score_rows<scalar_t, int32_t>(logits, target, ignore_index, mms_in, out, first_bad_target);
        refine_confident_grad_norms<scalar_t, int32_t>(logits, target, ignore_index, out);
      }
    });
  }
  throw_if_bad_target(first_bad_target.load(), target, C, ignore_index, "fastsel.score");
  if (nonfinite_weight) {
    // 0 for a tie and +inf without a finite competitor, as ever (no distance needed);
    // NaN elsewhere, invalid rows (NaN margin) included
    const at::Tensor& m = outs.margin;
    outs.mms.copy_(at::where(m == 0, at::zeros_like(m),
                             at::where(m == std::numeric_limits<double>::infinity(), m,
                                       at::full_like(m, std::numeric_limits<double>::quiet_NaN()))));
  } else if (mms_scale_exp != 0) {
    // in float64: 2^k of a float32 MMS may lie beyond float's range (k = -997 for a 1e300
    // weight), and inf * 0 is NaN
    outs.mms.copy_(times_power_of_two(outs.mms.to(at::kDouble), mms_scale_exp));
  }
  return outs.outputs();
}

// ---- backward ---------------------------------------------------------------------------

namespace {

// grad[j] = g * exp(z_j - lse) - g * [j == y], vectorized over a float row.
inline void softmax_minus_onehot(const float* z, float* grad, int64_t n, float lse, float g) {
  const Vec lv(lse), gv(g);
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    ((Vec::loadu(z + k) - lv).exp_u20() * gv).store(grad + k);
  }
  for (; k < n; ++k) grad[k] = std::exp(z[k] - lse) * g;
}

// The same with lse = m + log_d kept in two parts: p_j = exp((z_j - m) - log_d).
inline void softmax_minus_onehot_split(const float* z, float* grad, int64_t n, float m, float log_d, float g) {
  const Vec mv(m), lv(log_d), gv(g);
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    (((Vec::loadu(z + k) - mv) - lv).exp_u20() * gv).store(grad + k);
  }
  for (; k < n; ++k) grad[k] = std::exp((z[k] - m) - log_d) * g;
}

// exp(z_j - lse) takes the rounding of lse, ulp(lse) / 2, as a relative error of p_j:
// nothing for ordinary rows, but at |lse| >= 64 it exceeds 4e-6 in float (7e-15 in
// double), and where ulp(lse) passes log d (ties at 1e308: lse rounds to the maximum, p_j
// to 1 instead of 1/2) it is all of p_j. Such rows recompute the maximum m and
// log d = log sum_j exp(z_j - m) (two more passes) and use exp((z_j - m) - log d), as
// log_softmax does.
constexpr float kSplitLseFrom = 64.f;

// (m, log d) of a row given as float blocks: blocks(visit) calls visit(x, n) per block.
template <typename Blocks>
std::pair<float, float> max_and_log_d(Blocks&& blocks) {
  float m = -std::numeric_limits<float>::infinity();
  blocks([&](const float* x, int64_t n) {
    Vec acc(m);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) acc = at::vec::maximum(acc, Vec::loadu(x + k));
    float r = hmax(acc);
    for (; k < n; ++k) r = std::max(r, x[k]);
    m = std::max(m, r);
  });
  double d = 0.0;  // double across blocks: the row may be wider than 2^24
  blocks([&](const float* x, int64_t n) {
    const Vec mv(m);
    Vec acc(0.f);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) acc = acc + (Vec::loadu(x + k) - mv).exp_u20();
    double part = hsum(acc);
    for (; k < n; ++k) part += std::exp(x[k] - m);
    d += part;
  });
  return {m, static_cast<float>(std::log(d))};
}

template <typename scalar_t, typename target_t>
void backward_rows(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                   const at::Tensor& lse, int64_t ignore_index, at::Tensor& grad,
                   std::atomic<int64_t>& first_bad_target) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const acc_t* l = lse.const_data_ptr<acc_t>();
  const target_t* tgt = target.const_data_ptr<target_t>();
  const int64_t zs = logits.stride(0), gs = grad_loss.stride(0), ls = lse.stride(0),
                ts = target.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> zf, gf;
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
      zf.resize(std::min(C, kBlock));
      gf.resize(std::min(C, kBlock));
    }
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* zr = z + i * zs;
      scalar_t* gr = out + i * C;
      const int64_t t = static_cast<int64_t>(tgt[i * ts]);
      if (t == ignore_index || t < 0 || t >= C) {
        if (t != ignore_index) {  // reported after the loop
          int64_t expected = -1;
          first_bad_target.compare_exchange_strong(expected, i);
        }
        std::memset(static_cast<void*>(gr), 0, sizeof(scalar_t) * C);
        continue;
      }
      const acc_t gi = g[i * gs];
      const acc_t li = l[i * ls];
      if constexpr (std::is_same_v<scalar_t, double>) {
        if (std::abs(li) < kSplitLseFrom || li != li) {  // NaN lse (an invalid row): NaN, as its loss
          for (int64_t j = 0; j < C; ++j) gr[j] = std::exp(zr[j] - li) * gi;
        } else {
          double m = -std::numeric_limits<double>::infinity(), d = 0.0;
          for (int64_t j = 0; j < C; ++j) m = std::max(m, zr[j]);
          for (int64_t j = 0; j < C; ++j) d += std::exp(zr[j] - m);
          const double log_d = std::log(d);
          for (int64_t j = 0; j < C; ++j) gr[j] = std::exp((zr[j] - m) - log_d) * gi;
        }
        gr[t] -= gi;
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        if (std::abs(li) < kSplitLseFrom || li != li) {
          softmax_minus_onehot(zr, gr, C, li, gi);
        } else {
          const auto [m, log_d] = max_and_log_d([&](auto&& visit) { visit(zr, C); });
          softmax_minus_onehot_split(zr, gr, C, m, log_d, gi);
        }
        gr[t] -= gi;
      } else {
        const bool split = !(std::abs(li) < kSplitLseFrom) && li == li;
        float m = 0.f, log_d = 0.f;
        if (split) {
          std::tie(m, log_d) = max_and_log_d([&](auto&& visit) {
            for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
              const int64_t n = std::min(kBlock, C - j0);
              to_float(zr + j0, zf.data(), n);
              visit(zf.data(), n);
            }
          });
        }
        for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
          const int64_t n = std::min(kBlock, C - j0);
          to_float(zr + j0, zf.data(), n);
          if (split) {
            softmax_minus_onehot_split(zf.data(), gf.data(), n, m, log_d, gi);
          } else {
            softmax_minus_onehot(zf.data(), gf.data(), n, li, gi);
          }
          if (t >= j0 && t < j0 + n) gf[t - j0] -= gi;
          from_float(gf.data(), gr + j0, n);
        }
      }
    }
  });
}

}  // namespace

at::Tensor score_backward(const at::Tensor& grad_loss, const at::Tensor& logits_in,
                          const at::Tensor& target, const at::Tensor& lse_in,
                          int64_t ignore_index) {
  check_score_backward_args(grad_loss, logits_in, target, lse_in);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const auto acc_dtype = accumulate_type(logits.scalar_type());
  const at::Tensor g = grad_loss.to(acc_dtype);
  const at::Tensor lse = lse_in.to(acc_dtype);
  at::Tensor grad = empty_for_streaming_write({N, C}, logits.options());
  if (N == 0) return grad;
  std::atomic<int64_t> first_bad_target{-1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastsel_score_backward", [&] {
    if (target.scalar_type() == at::kLong) {
      backward_rows<scalar_t, int64_t>(g, logits, target, lse, ignore_index, grad, first_bad_target);
    } else {
      backward_rows<scalar_t, int32_t>(g, logits, target, lse, ignore_index, grad, first_bad_target);
    }
  });
  throw_if_bad_target(first_bad_target.load(), target, C, ignore_index, "fastsel.score_backward");
  return grad;
}

FASTSEL_ISA_END
}  // namespace fastsel::cpu

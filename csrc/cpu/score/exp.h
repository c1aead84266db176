// The vectorized exp of the scoring kernel (exp of t <= 0 by range reduction and a
// minimax polynomial), and the block and lane constants of the row passes.
#pragma once

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
#include "../large_alloc.h"
#include "../mms.h"
#include "../vec_utils.h"
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

// exp(r) for |r| <= ln2 / 2: the degree-5 polynomial above by Horner's rule, one FMA a
// term (the vector ISAs; the portable path uses ATen's exp).
inline Vec exp_reduced(const Vec& r) {
  Vec p(kExpC5);
  p = at::vec::fmadd(p, r, Vec(kExpC4));
  p = at::vec::fmadd(p, r, Vec(kExpC3));
  p = at::vec::fmadd(p, r, Vec(kExpC2));
  p = at::vec::fmadd(p, r, Vec(kExpC1));
  return at::vec::fmadd(p, r, Vec(kExpC0));
}

inline Vec exp_nonpositive(const Vec& t) {
#if defined(FASTSEL_VEC512)
  const __m512 x = t;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2), x);
  return _mm512_scalef_ps(exp_reduced(r), n);
#elif defined(FASTSEL_VEC256)
  const __m256 x = t;
  const __m256 n = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2), x);
  const __m256 p = exp_reduced(r);
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
#else  // portable: ATen's exp, zeroed at the floor, where it would give exp(-88) ~ 6e-39
  return Vec::blendv(t.exp_u20(), Vec(0.f), t <= Vec(kExpFloor));
#endif
}

}  // namespace
FASTSEL_ISA_END
}  // namespace fastsel::cpu

// race_key_bits of selection_keys.h for 8 consecutive elements at once (AVX2).
//
// Philox is integer multiply-heavy, and with scalar keys the multiplies dominate sampling
// without replacement (bench/bench_select.py times it). Here each 32x32 -> 64-bit multiply of the round is two vpmuludq (even and odd lanes). The float part runs the
// same IEEE operations in the same order as the scalar header (no FMA: the extension is
// built with -ffp-contract=off), so the keys are bit-identical; tests compare them with
// the reference on every backend.
#pragma once

#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include "fastsel/selection_keys.h"

#include "fastsel/isa_namespace.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN

#define FASTSEL_HAS_RACE_KEYS_AVX2 1

// (hi, lo) of the lane-wise 32x32-bit products a * m.
inline void mulhilo32_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                                          // lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(m, 32));  // 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Word kWordRaceTime of Philox4x32-10 for counters (index0 + lane, 0 | high, counter) under seed.
inline __m256i philox_word2_avx2(uint64_t index0, uint64_t seed, uint64_t counter) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // index0 is a multiple of 8, so index0 + lane never carries into the high word.
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(index0)), lane);
  __m256i c1 = _mm256_set1_epi32(static_cast<int32_t>(index0 >> 32));
  __m256i c2 = _mm256_set1_epi32(static_cast<int32_t>(counter));
  __m256i c3 = _mm256_set1_epi32(static_cast<int32_t>(counter >> 32));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo32_avx2(c0, m0, hi0, lo0);
    mulhilo32_avx2(c2, m1, hi1, lo1);
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int32_t>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int32_t>(k1)));
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  static_assert(kWordRaceTime == 2, "the race time is output word 2");
  return c2;
}

// -log(u) of selection_keys.h's neg_log_unit, lane-wise.
inline __m256 neg_log_unit_avx2(__m256 u) {
  const __m256i bits = _mm256_castps_si256(u);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F800000)));
  const __m256 big = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
  e = _mm256_sub_epi32(e, _mm256_castps_si256(big));  // big lanes are all ones = -1
  const __m256 f = _mm256_add_ps(m, _mm256_set1_ps(-1.0f));
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(f, _mm256_set1_ps(2.0f)));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(0.111111111f);
  p = _mm256_add_ps(_mm256_mul_ps(p, z), _mm256_set1_ps(0.142857143f));
  p = _mm256_add_ps(_mm256_mul_ps(p, z), _mm256_set1_ps(0.2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, z), _mm256_set1_ps(0.333333333f));
  const __m256 two_s = _mm256_mul_ps(s, _mm256_set1_ps(2.0f));
  const __m256 log_m = _mm256_add_ps(two_s, _mm256_mul_ps(two_s, _mm256_mul_ps(p, z)));
  const __m256 log_u = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(e), _mm256_set1_ps(0.693147182f)), log_m);
  return _mm256_xor_ps(log_u, _mm256_set1_ps(-0.0f));  // negation is exact
}

// race_key_bits(w[j], scale, seed, counter, index0 + j) for j in [0, 8); index0 % 8 == 0.
inline void race_key_bits_avx2(const float* w, RaceScale scale, uint64_t index0, uint64_t seed,
                               uint64_t counter, uint32_t* key) {
  const __m256i word = philox_word2_avx2(index0, seed, counter);
  // open_unit_float: (2 (word >> 9) + 1) 2^-24
  const __m256i odd = _mm256_add_epi32(_mm256_slli_epi32(_mm256_srli_epi32(word, 9), 1), _mm256_set1_epi32(1));
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(odd), _mm256_set1_ps(5.9604644775390625e-8f));
  const __m256 wv = _mm256_loadu_ps(w);
  const __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(wv, _mm256_set1_ps(scale.a)), _mm256_set1_ps(scale.b));
  const __m256 race = _mm256_div_ps(neg_log_unit_avx2(u), scaled);
  const __m256 positive = _mm256_cmp_ps(wv, _mm256_setzero_ps(), _CMP_GT_OQ);
  const __m256i bits = _mm256_blendv_epi8(_mm256_set1_epi32(-1), _mm256_castps_si256(race),
                                          _mm256_castps_si256(positive));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(key), bits);
}

FASTSEL_ISA_END
}  // namespace fastsel::cpu

#endif  // __AVX2__ && __FMA__

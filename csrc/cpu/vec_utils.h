// Small vector helpers for the CPU kernels, on top of at::vec::Vectorized<float>.
// The build (setup.py) picks the ISA of the building CPU:
//   avx512: -mavx512f/bw/vl/dq -DCPU_CAPABILITY_AVX512, a Vec is one 512-bit register;
//   avx2:   -mavx2 -mfma -DCPU_CAPABILITY_AVX2, a Vec is one 256-bit register;
//   none:   ATen's portable fallback.
// Hand-written paths test FASTSEL_VEC512 / FASTSEL_VEC256 (the width of Vec), or
// FASTSEL_X86_AVX2 for 256-bit code that does not depend on Vec (both x86 builds).
#pragma once

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__) && defined(__AVX512VL__)
#define FASTSEL_VEC512 1
#elif defined(CPU_CAPABILITY_AVX2) && defined(__AVX2__) && defined(__FMA__)
#define FASTSEL_VEC256 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define FASTSEL_X86_AVX2 1
#include <immintrin.h>
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "fastsel/isa_namespace.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// Horizontal sum and maximum of the lanes (one shuffle tree, no trip through memory).
inline float hsum(const Vec& v) {
#if defined(FASTSEL_VEC512)
  return _mm512_reduce_add_ps(v);
#elif defined(FASTSEL_VEC256)
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
#else
  alignas(64) float a[kLanes];
  v.store(a);
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += a[i];
  return s;
#endif
}

inline float hmax(const Vec& v) {
#if defined(FASTSEL_VEC512)
  return _mm512_reduce_max_ps(v);
#elif defined(FASTSEL_VEC256)
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
#else
  alignas(64) float a[kLanes];
  v.store(a);
  float m = a[0];
  for (int64_t i = 1; i < kLanes; ++i) m = std::max(m, a[i]);
  return m;
#endif
}

// Negation is exact, so this is the lanes' minimum (for lanes without NaN).
inline float hmin(const Vec& v) { return -hmax(-v); }

// Number of lanes of v equal to x.
inline int count_equal(const Vec& v, float x) {
#if defined(FASTSEL_VEC512)
  return __builtin_popcount(_mm512_cmp_ps_mask(v, _mm512_set1_ps(x), _CMP_EQ_OQ));
#elif defined(FASTSEL_VEC256)
  return __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(x), _CMP_EQ_OQ)));
#else
  alignas(64) float a[kLanes];
  v.store(a);
  int n = 0;
  for (int64_t i = 0; i < kLanes; ++i) n += a[i] == x;
  return n;
#endif
}

// max/min without NaN propagation, one instruction each (at::vec::maximum/minimum
// spend three to propagate NaN); for callers that rule NaN out or detect it apart.
inline Vec max_fast(const Vec& a, const Vec& b) {
#if defined(FASTSEL_VEC512)
  return _mm512_max_ps(a, b);
#elif defined(FASTSEL_VEC256)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}
inline Vec min_fast(const Vec& a, const Vec& b) {
#if defined(FASTSEL_VEC512)
  return _mm512_min_ps(a, b);
#elif defined(FASTSEL_VEC256)
  return _mm256_min_ps(a, b);
#else
  return at::vec::minimum(a, b);
#endif
}

// Lane bits (bit l for lane l) of an ordered comparison of x with g: NaN lanes give 0.
enum class LaneTest { kAtLeast, kEqual };

template <LaneTest kTest>
inline uint32_t lane_test_bits(const Vec& x, const Vec& g) {
#if defined(FASTSEL_VEC512)
  return _mm512_cmp_ps_mask(x, g, kTest == LaneTest::kAtLeast ? _CMP_GE_OQ : _CMP_EQ_OQ);
#elif defined(FASTSEL_VEC256)
  return static_cast<uint32_t>(
      _mm256_movemask_ps(_mm256_cmp_ps(x, g, kTest == LaneTest::kAtLeast ? _CMP_GE_OQ : _CMP_EQ_OQ)));
#else
  alignas(64) float a[kLanes], b[kLanes];
  x.store(a);
  g.store(b);
  uint32_t bits = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    bits |= uint32_t(kTest == LaneTest::kAtLeast ? a[l] >= b[l] : a[l] == b[l]) << l;
  }
  return bits;
#endif
}

inline uint32_t at_least_bits(const Vec& x, const Vec& g) { return lane_test_bits<LaneTest::kAtLeast>(x, g); }
inline uint32_t equal_bits(const Vec& x, const Vec& g) { return lane_test_bits<LaneTest::kEqual>(x, g); }

// Scans the full vectors of x[0, n) for lanes that lane_bits(vector) marks, for rare
// hits: four vectors per iteration and one test of their combined bits, then single
// vectors. hit(bits, at, width) gets each nonzero chunk in increasing order (bit k for
// column at + k) and returns false to stop the scan (scan_lane_bits then returns -1).
// Otherwise returns where the columns the scan left (n % kLanes of them) start.
template <typename LaneBits, typename Hit>
inline int64_t scan_lane_bits(const float* x, int64_t n, LaneBits&& lane_bits, Hit&& hit) {
  static_assert(4 * kLanes <= 64, "four vectors' lane bits must fit in 64 bits");
  auto bits_at = [&](int64_t k) -> uint64_t { return lane_bits(Vec::loadu(x + k)); };
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    const uint64_t bits = bits_at(j) | bits_at(j + kLanes) << kLanes |
                          bits_at(j + 2 * kLanes) << (2 * kLanes) | bits_at(j + 3 * kLanes) << (3 * kLanes);
    if (bits != 0 && !hit(bits, j, 4 * kLanes)) return -1;
  }
  for (; j + kLanes <= n; j += kLanes) {
    const uint64_t bits = bits_at(j);
    if (bits != 0 && !hit(bits, j, kLanes)) return -1;
  }
  return j;
}

// Bit k set for each nonzero w[k], k < n <= 16.
inline uint32_t nonzero_words(const uint32_t* w, int64_t n) {
#if defined(FASTSEL_VEC512)
  const __m512i v = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << n) - 1), w);
  return _mm512_test_epi32_mask(v, v);
#else
  uint32_t bits = 0;
  for (int64_t k = 0; k < n; ++k) bits |= uint32_t(w[k] != 0) << k;
  return bits;
#endif
}

// Loads n < kLanes floats; the other lanes hold `fill`. A masked load, not a copy
// through a stack buffer, so the load is not stalled by store forwarding.
inline Vec load_partial(const float* p, int64_t n, float fill) {
#if defined(FASTSEL_VEC512)  // masked-off lanes are not read, so cannot fault
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), static_cast<__mmask16>((1u << n) - 1), p);
#elif defined(FASTSEL_VEC256)
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
#else
  alignas(64) float a[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) a[i] = i < n ? p[i] : fill;
  return Vec::loadu(a);
#endif
}

// Converts n values of a narrow float type to float32.
template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  using VecS = at::vec::Vectorized<scalar_t>;
  int64_t k = 0;
  for (; k + VecS::size() <= n; k += VecS::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(src + k));
    lo.store(dst + k);
    hi.store(dst + k + kLanes);
  }
  for (; k < n; ++k) dst[k] = static_cast<float>(src[k]);
}

// Converts n float32 values to a narrow float type (round to nearest even).
template <typename scalar_t>
inline void from_float(const float* src, scalar_t* dst, int64_t n) {
  using VecS = at::vec::Vectorized<scalar_t>;
  int64_t k = 0;
  for (; k + VecS::size() <= n; k += VecS::size()) {
    VecS v = at::vec::convert_from_float<scalar_t>(Vec::loadu(src + k), Vec::loadu(src + k + kLanes));
    v.store(dst + k);
  }
  for (; k < n; ++k) dst[k] = static_cast<scalar_t>(src[k]);
}

FASTSEL_ISA_END
}  // namespace fastsel::cpu

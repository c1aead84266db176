// Small vector helpers for the CPU kernels, on top of at::vec::Vectorized<float>.
// Built with -mavx2 -mfma -DCPU_CAPABILITY_AVX2 a Vec is one 256-bit register; without,
// the same code compiles against ATen's portable fallback.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace fastsel::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

inline float hsum(const Vec& v) {
  alignas(64) float a[kLanes];
  v.store(a);
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += a[i];
  return s;
}

inline float hmax(const Vec& v) {
  alignas(64) float a[kLanes];
  v.store(a);
  float m = a[0];
  for (int64_t i = 1; i < kLanes; ++i) m = std::max(m, a[i]);
  return m;
}

// max/min without NaN propagation, one instruction each (at::vec::maximum/minimum
// spend three to propagate NaN); for callers that rule NaN out or detect it apart.
inline Vec max_fast(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}
inline Vec min_fast(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_ps(a, b);
#else
  return at::vec::minimum(a, b);
#endif
}

// Loads n < kLanes floats; the other lanes hold `fill`. A masked load, not a copy
// through a stack buffer, so the load is not stalled by store forwarding.
inline Vec load_partial(const float* p, int64_t n, float fill) {
#if defined(CPU_CAPABILITY_AVX2)
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

}  // namespace fastsel::cpu

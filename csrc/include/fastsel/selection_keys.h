// Per-element math of the selection ops, shared by the CPU and CUDA kernels (host/device
// inline) and mirrored operation for operation by fastsel/reference.py and the Triton
// kernels, so that one seed selects the same samples on every backend.
//
// Every selection reduces to "the k smallest (key, index) pairs":
//   * top-k of scores: key = rank_key(score), an order-preserving map of the float to
//     uint32 (negated for "largest"); ties keep the lowest index first, NaN ranks last.
//   * sampling without replacement (exponential race, Efraimidis & Spirakis 2006): item i
//     runs an Exp(1) time E_i scaled by 1 / w_i; the first k to finish are a sample with
//     P(i first) = w_i / sum w, then the same among the rest, and so on.
//     key = E_i / (w_i 2^s) in float32 (race_scale), zero importance ranks last.
//   * sampling with replacement: draw t uniformly from [0, sum q) and take the first i
//     with cumsum(q)_i > t, where q are the importances quantized to integers: integer
//     prefix sums are exact in any order, so every backend finds the same index.
//
// Random numbers: Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011), a counter-based
// generator: output = bijection(counter; key). Here key = (seed low, seed high) and
// counter = (element low, element high, call counter low, call counter high), so every
// element of every call has its own 128-bit block, computable in any order on any
// device. The four output words are used by different ops (kWord*), so ops sharing a
// (seed, counter) draw independent numbers.
//
// No floating-point operation here may be contracted into an FMA or reassociated: the
// extension is compiled with -ffp-contract=off, the CUDA code uses __fmul_rn/__fadd_rn
// through the FASTSEL_MUL/FASTSEL_ADD macros, and Triton/PyTorch run each op separately.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTSEL_SK_HD __host__ __device__ __forceinline__
#else
#define FASTSEL_SK_HD inline
#endif

#if defined(__CUDA_ARCH__)
#define FASTSEL_MUL(a, b) __fmul_rn(a, b)
#define FASTSEL_ADD(a, b) __fadd_rn(a, b)
#define FASTSEL_DIV(a, b) __fdiv_rn(a, b)
#define FASTSEL_DMUL(a, b) __dmul_rn(a, b)
#else
#define FASTSEL_MUL(a, b) ((a) * (b))
#define FASTSEL_ADD(a, b) ((a) + (b))
#define FASTSEL_DIV(a, b) ((a) / (b))
#define FASTSEL_DMUL(a, b) ((a) * (b))
#endif

#include "fastsel/isa_namespace.h"

namespace fastsel {
FASTSEL_ISA_BEGIN

// Which Philox output word each random decision uses.
constexpr int kWordRaceTime = 2;    // sample without replacement: E_i
constexpr int kWordBernoulli = 3;   // percentile rule: keep with probability P_i
// sample with replacement: draw j uses words 0 (low) and 1 (high) of element j.

struct Philox4x32 {
  uint32_t x[4];
};

FASTSEL_SK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32-10 of counter c under key k (Random123's known-answer vectors hold).
FASTSEL_SK_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                       uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, hi0, lo0);
    mulhilo32(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The block of element `index` in call `counter` under `seed` (all three < 2^63).
FASTSEL_SK_HD Philox4x32 philox_block(uint64_t seed, uint64_t counter, uint64_t index) {
  return philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                       static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FASTSEL_SK_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  union { uint32_t u; float f; } v{b};
  return v.f;
#endif
}

FASTSEL_SK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union { float f; uint32_t u; } v{f};
  return v.u;
#endif
}

// Uniform in (0, 1) from the top 23 bits: (2 k + 1) 2^-24, exact in float32, never 0 or 1.
FASTSEL_SK_HD float open_unit_float(uint32_t word) {
  const uint32_t k = word >> 9;
  return FASTSEL_MUL(static_cast<float>(2u * k + 1u), 5.9604644775390625e-8f);  // 2^-24
}

// Uniform in [0, 1) from the top 24 bits: k 2^-24, exact in float32.
FASTSEL_SK_HD float unit_float(uint32_t word) {
  return FASTSEL_MUL(static_cast<float>(word >> 8), 5.9604644775390625e-8f);
}

// Uniform in [0, 1) with 53 random bits from two words, exact in float64.
FASTSEL_SK_HD double unit_double(uint32_t lo, uint32_t hi) {
  const uint64_t k = (static_cast<uint64_t>(hi) << 21) | (lo >> 11);
  return FASTSEL_DMUL(static_cast<double>(k), 1.1102230246251565e-16);  // 2^-53
}

// -log(u) for u in (0, 1), float32, from the same sequence of IEEE operations on every
// backend (library logs differ in the last ulp between CPU, GPU and numpy).
// u = m 2^e with m in (sqrt(1/2), sqrt(2)]; log m = 2 atanh(s), s = (m - 1) / (m + 1),
// |s| < 0.172, = 2 s (1 + s^2/3 + s^4/5 + s^6/7 + s^8/9) with truncation error < 1e-9.
FASTSEL_SK_HD float neg_log_unit(float u) {
  const uint32_t bits = float_to_bits(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  float m = bits_to_float((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  if (m > 1.41421356f) {
    m = FASTSEL_MUL(m, 0.5f);
    e += 1;
  }
  const float f = FASTSEL_ADD(m, -1.0f);  // exact (Sterbenz)
  const float s = FASTSEL_DIV(f, FASTSEL_ADD(f, 2.0f));
  const float z = FASTSEL_MUL(s, s);
  float p = 0.111111111f;                                  // 1/9
  p = FASTSEL_ADD(FASTSEL_MUL(p, z), 0.142857143f);        // 1/7
  p = FASTSEL_ADD(FASTSEL_MUL(p, z), 0.2f);                // 1/5
  p = FASTSEL_ADD(FASTSEL_MUL(p, z), 0.333333333f);        // 1/3
  const float two_s = FASTSEL_MUL(s, 2.0f);
  const float log_m = FASTSEL_ADD(two_s, FASTSEL_MUL(two_s, FASTSEL_MUL(p, z)));
  const float log_u = FASTSEL_ADD(FASTSEL_MUL(static_cast<float>(e), 0.693147182f), log_m);
  return -log_u;
}

// 2^p as a float32 for p in [-126, 127], built in the exponent bits (exact).
FASTSEL_SK_HD float pow2f(int32_t p) { return bits_to_float(static_cast<uint32_t>(p + 127) << 23); }

// The race keys divide by the importance, and E / w overflows float32 for w below ~1e-38:
// every such item would tie at +inf and be taken in index order, not at random. So every
// importance is first multiplied by the same power of two 2^s, s = -e where
// max_importance = f 2^e (frexp, f in [0.5, 1)), which puts the largest in [0.5, 1) and
// changes no probability. 2^s is applied as two factors 2^a 2^b (a = floor(s / 2)), each a
// normal float32 for every finite positive maximum; each product is one IEEE rounding.
struct RaceScale {
  float a, b;
};

FASTSEL_SK_HD RaceScale race_scale(float max_importance) {
  const uint32_t bits = float_to_bits(max_importance);
  // Nothing positive, or an infinite maximum (rejected by the public API; torch.frexp
  // gives exponent 0 for it, as the reference does): no scaling.
  if (!(max_importance > 0.0f) || bits >= 0x7F800000u) return RaceScale{1.0f, 1.0f};
  int32_t e;  // frexp exponent, from the bits (subnormals: from the leading one)
  if ((bits >> 23) != 0) {
    e = static_cast<int32_t>(bits >> 23) - 126;
  } else {
    int32_t lead = 22;
    while (((bits >> lead) & 1u) == 0u) --lead;
    e = lead - 148;
  }
  const int32_t s = -e;
  const int32_t a = (s >= 0) ? s / 2 : -((-s + 1) / 2);  // floor(s / 2)
  return RaceScale{pow2f(a), pow2f(s - a)};
}

// Race key bits of an item with importance w >= 0 (float32): the bits of E / (w 2^s), a
// non-negative float, so unsigned order is numeric order. Zero importance gets the
// all-ones key, after every positive importance (even one whose key overflows to inf).
FASTSEL_SK_HD uint32_t race_key_bits(float w, RaceScale scale, uint64_t seed, uint64_t counter,
                                     uint64_t index) {
  if (!(w > 0.0f)) return 0xFFFFFFFFu;
  const Philox4x32 r = philox_block(seed, counter, index);
  const float e = neg_log_unit(open_unit_float(r.x[kWordRaceTime]));
  const float scaled = FASTSEL_MUL(FASTSEL_MUL(w, scale.a), scale.b);
  return float_to_bits(FASTSEL_DIV(e, scaled));
}

// Rank key of a float32 score: smaller key = better. Order-preserving map of the float
// to uint32 (ascending), complemented for largest-first; -0 equals +0; NaN is the
// all-ones key, so it ranks after every number in both directions.
FASTSEL_SK_HD uint32_t rank_key_bits(float x, bool largest) {
  if (x != x) return 0xFFFFFFFFu;
  const uint32_t b = float_to_bits(FASTSEL_ADD(x, 0.0f));  // -0 + 0 = +0
  const uint32_t ascending = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return largest ? ~ascending : ascending;
}

// The same for a float64 score, as uint64.
FASTSEL_SK_HD uint64_t rank_key_bits64(double x, bool largest) {
  if (x != x) return ~uint64_t(0);
#if defined(__CUDA_ARCH__)
  const uint64_t b = static_cast<uint64_t>(__double_as_longlong(x + 0.0));
#else
  union { double d; uint64_t u; } v{x + 0.0};
  const uint64_t b = v.u;
#endif
  const uint64_t sign = uint64_t(1) << 63;
  const uint64_t ascending = (b & sign) ? ~b : (b | sign);
  return largest ? ~ascending : ascending;
}

// (key, index) packed so that unsigned order is (key, then index) order; index < 2^32.
FASTSEL_SK_HD uint64_t pack_key_index(uint32_t key, uint64_t index) {
  return (static_cast<uint64_t>(key) << 32) | index;
}

// The same as a signed int64 with the same order (for int64 sorts: torch.topk, at::sort):
// the key's top bit is flipped so that keys >= 2^31 stay above those below.
FASTSEL_SK_HD int64_t pack_key_index_signed(uint32_t key, uint64_t index) {
  return static_cast<int64_t>(pack_key_index(key ^ 0x80000000u, index));
}

// Bits per integer weight of sampling with replacement over n items: 52 - bit_length(n),
// so that n weights below 2^weight_bits sum to less than 2^52 and every prefix sum is an
// exact int64 (and an exact float64 in replacement_target).
FASTSEL_SK_HD int replacement_weight_bits(int64_t n) {
  int bit_length = 0;
  for (uint64_t rest = static_cast<uint64_t>(n); rest != 0; rest >>= 1) ++bit_length;
  return 52 - bit_length;
}

// 2^shift for those weights (reference.py's replacement_weights): with the largest
// importance max = f 2^e, f in [0.5, 1) (frexp of the float32; e = 0 for 0),
// shift = weight_bits - e puts the largest weight in [2^(weight_bits - 1), 2^weight_bits).
// The power of two is exact in float64: |shift| < 200 for any finite float32 max.
FASTSEL_SK_HD double replacement_scale(float max_importance, int weight_bits) {
  int exponent = 0;
#if defined(__CUDA_ARCH__)
  frexpf(max_importance, &exponent);  // torch.frexp calls the same function on CUDA
  return ldexp(1.0, weight_bits - exponent);
#else
  std::frexp(max_importance, &exponent);
  return std::ldexp(1.0, weight_bits - exponent);
#endif
}

// Integer weight of importance w for sampling with replacement: w 2^shift truncated,
// where scale = 2^shift is chosen from the largest importance (see reference.py) so that
// the sum of all weights stays below 2^52. The product is exact (w has 24 bits).
FASTSEL_SK_HD int64_t quantized_importance(float w, double scale) {
  return w > 0.0f ? static_cast<int64_t>(FASTSEL_DMUL(static_cast<double>(w), scale)) : 0;
}

// Draw j of sampling with replacement: t uniform in [0, total) for integer weights with
// total < 2^53 (u total is one correctly rounded float64 product).
FASTSEL_SK_HD int64_t replacement_target(uint64_t seed, uint64_t counter, uint64_t draw, int64_t total) {
  const Philox4x32 r = philox_block(seed, counter, draw);
  const double u = unit_double(r.x[0], r.x[1]);
  int64_t t = static_cast<int64_t>(FASTSEL_DMUL(u, static_cast<double>(total)));
  return t < total ? t : total - 1;
}

FASTSEL_ISA_END
}  // namespace fastsel

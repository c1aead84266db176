// What the MMS of a call needs of the classifier weight before the rows: the inverse
// distances of all pairs (the Gram form, cancelling pairs recomputed), the rows' radii
// around their mean (the pruned search's bounds), and exact power-of-two scaling.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "fastsel/isa_namespace.h"
#include "mms.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN
namespace {

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
FASTSEL_ISA_END
}  // namespace fastsel::cpu

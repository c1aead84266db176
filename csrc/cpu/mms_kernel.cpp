// Minimal Margin Score (Weinstein, Fine & Hel-Or) on the CPU.
//
// For a linear head z = W h + b and prediction a, the smallest move of the features h
// that makes class j tie with a has length (z_a - z_j) / ||w_a - w_j||; the MMS is the
// minimum over j != a. The distances come from squared norms and one matrix product,
// ||w_a - w_j||^2 = ||w_a||^2 + ||w_j||^2 - 2 w_a.w_j, so the cost is a GEMM plus one
// multiply-min sweep of each row:
//   * C <= kMmsDenseMaxClasses: the [C, C] inverse-distance matrix is built once per call
//     and the sweep is fused into the scoring pass while the row is in cache;
//   * larger C: [C, C] would not fit, so rows are grouped by predicted class and the
//     inverse distances of a chunk of classes ([K, C], bounded memory) are built at a time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fastsel/row_scores.h"
#include "kernels.h"
#include "vec_utils.h"

namespace fastsel::cpu {

InverseDistances inverse_distances(const at::Tensor& w, const at::Tensor& sq_norms,
                                   const at::Tensor& classes) {
  // dot[k, j] = w_{classes[k]} . w_j, turned in place into 1 / ||w_{classes[k]} - w_j||.
  at::Tensor dot = at::mm(w.index_select(0, classes), w.t()).contiguous();
  const int64_t K = dot.size(0), C = dot.size(1);
  at::Tensor spread = at::empty({K}, dot.options());
  AT_DISPATCH_FLOATING_TYPES(dot.scalar_type(), "fastsel_inverse_distances", [&] {
    scalar_t* q = dot.data_ptr<scalar_t>();
    scalar_t* spread_p = spread.data_ptr<scalar_t>();
    const scalar_t* sq = sq_norms.const_data_ptr<scalar_t>();
    const int64_t* cls = classes.const_data_ptr<int64_t>();
    at::parallel_for(0, K, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t a = cls[k];
        scalar_t* row = q + k * C;
        for (int64_t j = 0; j < C; ++j) row[j] = inv_distance(sq[a], sq[j], row[j]);
        scalar_t lo = std::numeric_limits<scalar_t>::infinity(), hi = 0;
        for (int64_t j = 0; j < C; ++j) {
          if (j == a) continue;
          lo = std::min(lo, row[j]);
          hi = std::max(hi, row[j]);
        }
        spread_p[k] = C > 1 ? hi / lo : scalar_t(1);
      }
    });
  });
  return {dot, spread};
}

namespace {

// Pruned minimum. With margin m = z_a - z_(2) and spread s = max_j q_j / min_j q_j, the
// runner-up bounds the answer from above, MMS <= m max q, and any class j has a term
// (z_a - z_j) q_j >= (z_a - z_j) min q. So only classes with z_a - z_j < m s can beat
// the runner-up: a compare sweep over z finds them (no load of the q row, which for
// large C comes from L3), and only those few terms are computed.
template <typename T>
T mms_exact_row_impl(const T* z, const T* q, int64_t C, int64_t a, T margin, T spread) {
  if (margin == T(0)) return T(0);  // another class ties with the prediction: on the boundary
  const T za = z[a];
  // Lowered by a few ulps of the operands' magnitude so that rounding (of the margin
  // itself, or with |z| >> margin) can never drop the runner-up or a true candidate.
  const T reach = margin * spread;
  const T threshold = (za - reach) - (std::abs(za) + reach) * T(1e-6);
  T best = std::numeric_limits<T>::infinity();
  auto consider = [&](int64_t j) {
    if (j != a) best = std::min(best, (za - z[j]) * q[j]);  // za - z[j] > 0: no tie left
  };
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX2)
    const __m256 thr = _mm256_set1_ps(threshold);
    for (; j + kLanes <= C; j += kLanes) {
      int bits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + j), thr, _CMP_GE_OQ));
      while (bits) {
        consider(j + __builtin_ctz(bits));
        bits &= bits - 1;
      }
    }
#endif
  }
  for (; j < C; ++j) {
    if (z[j] >= threshold) consider(j);
  }
  return best;
}

}  // namespace

float mms_exact_row(const float* z, const float* q, int64_t C, int64_t a, float margin, float spread) {
  return mms_exact_row_impl(z, q, C, a, margin, spread);
}

double mms_exact_row(const double* z, const double* q, int64_t C, int64_t a, double margin,
                     double spread) {
  return mms_exact_row_impl(z, q, C, a, margin, spread);
}

float pair_distance(const float* w, int64_t D, int64_t a, int64_t b) {
  const float* wa = w + a * D;
  const float* wb = w + b * D;
  Vec acc(0.f);
  int64_t k = 0;
  for (; k + kLanes <= D; k += kLanes) {
    const Vec d = Vec::loadu(wa + k) - Vec::loadu(wb + k);
    acc = at::vec::fmadd(d, d, acc);
  }
  float s = hsum(acc);
  for (; k < D; ++k) s += (wa[k] - wb[k]) * (wa[k] - wb[k]);
  return std::sqrt(s);
}

double pair_distance(const double* w, int64_t D, int64_t a, int64_t b) {
  double s = 0.0;
  for (int64_t k = 0; k < D; ++k) s += (w[a * D + k] - w[b * D + k]) * (w[a * D + k] - w[b * D + k]);
  return std::sqrt(s);
}

namespace {

template <typename scalar_t>
void mms_grouped_rows(const at::Tensor& logits, const at::Tensor& w, const at::Tensor& sq,
                      const at::Tensor& classes, const at::Tensor& starts, const at::Tensor& order,
                      const at::Tensor& margin, at::Tensor& mms) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t C = logits.size(1);
  const int64_t n_classes = classes.size(0);
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / C);  // [chunk, C] <= 16 MiB
  const int64_t* order_p = order.const_data_ptr<int64_t>();
  const int64_t* starts_p = starts.const_data_ptr<int64_t>();
  const int64_t* classes_p = classes.const_data_ptr<int64_t>();
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const int64_t row_stride = logits.stride(0);
  acc_t* out = mms.data_ptr<acc_t>();
  const acc_t* margin_p = margin.const_data_ptr<acc_t>();
  for (int64_t c0 = 0; c0 < n_classes; c0 += chunk) {
    const int64_t c1 = std::min(n_classes, c0 + chunk);
    const InverseDistances inv = inverse_distances(w, sq, classes.slice(0, c0, c1));
    const acc_t* q_p = inv.q.const_data_ptr<acc_t>();
    const acc_t* spread_p = inv.spread.const_data_ptr<acc_t>();
    at::parallel_for(starts_p[c0], starts_p[c1], 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> zbuf;
      int64_t k = 0;  // class k of this chunk owns rows [starts[c0 + k], starts[c0 + k + 1])
      for (int64_t r = begin; r < end; ++r) {
        while (starts_p[c0 + k + 1] <= r) ++k;
        const int64_t i = order_p[r];
        const scalar_t* row = base + i * row_stride;
        const acc_t* z;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          z = row;
        } else {
          zbuf.resize(C);
          to_float(row, zbuf.data(), C);
          z = zbuf.data();
        }
        out[i] = mms_exact_row(z, q_p + k * C, C, classes_p[c0 + k], margin_p[i], spread_p[k]);
      }
    });
  }
}

}  // namespace

void mms_exact_grouped(const at::Tensor& logits, const at::Tensor& pred, const at::Tensor& valid,
                       const at::Tensor& margin, const at::Tensor& w, at::Tensor& mms) {
  // Valid rows sorted by predicted class, so each class's rows are contiguous in `order`.
  const at::Tensor rows = valid.nonzero().squeeze(1);
  if (rows.numel() == 0) return;
  const at::Tensor row_pred = pred.index_select(0, rows);
  const auto sorted = row_pred.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor order = rows.index_select(0, std::get<1>(sorted)).contiguous();
  const auto uniq = at::_unique2(std::get<0>(sorted), /*sorted=*/true, /*return_inverse=*/false,
                                 /*return_counts=*/true);
  const at::Tensor classes = std::get<0>(uniq);
  const at::Tensor starts = at::cat({std::get<2>(uniq).new_zeros({1}), std::get<2>(uniq).cumsum(0)});
  const at::Tensor sq = (w * w).sum(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastsel_mms_grouped", [&] {
    mms_grouped_rows<scalar_t>(logits, w, sq, classes, starts, order, margin, mms);
  });
}

}  // namespace fastsel::cpu

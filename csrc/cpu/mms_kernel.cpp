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

#include <vector>

#include "fastsel/row_scores.h"
#include "kernels.h"
#include "vec_utils.h"

namespace fastsel::cpu {

at::Tensor inverse_distances(const at::Tensor& w, const at::Tensor& sq_norms,
                             const at::Tensor& classes) {
  // dot[k, j] = w_{classes[k]} . w_j, turned in place into 1 / ||w_{classes[k]} - w_j||.
  at::Tensor dot = at::mm(w.index_select(0, classes), w.t()).contiguous();
  const int64_t K = dot.size(0), C = dot.size(1);
  AT_DISPATCH_FLOATING_TYPES(dot.scalar_type(), "fastsel_inverse_distances", [&] {
    scalar_t* q = dot.data_ptr<scalar_t>();
    const scalar_t* sq = sq_norms.const_data_ptr<scalar_t>();
    const int64_t* cls = classes.const_data_ptr<int64_t>();
    at::parallel_for(0, K, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const scalar_t sq_a = sq[cls[k]];
        scalar_t* row = q + k * C;
        for (int64_t j = 0; j < C; ++j) row[j] = inv_distance(sq_a, sq[j], row[j]);
      }
    });
  });
  return dot;
}

namespace {

// min over j in [begin, end) of (za - z[j]) * q[j]. The caller has excluded ties with the
// maximum (they give 0), so every difference is > 0 and no term can be NaN: a plain
// multiply-min, two loads and three operations per vector.
float min_terms(const float* z, const float* q, int64_t begin, int64_t end, float za) {
  const Vec zav(za);
  Vec best(std::numeric_limits<float>::infinity());
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    best = min_fast(best, (zav - Vec::loadu(z + j)) * Vec::loadu(q + j));
  }
  float m = hmin(best);
  for (; j < end; ++j) m = std::min(m, (za - z[j]) * q[j]);
  return m;
}

double min_terms(const double* z, const double* q, int64_t begin, int64_t end, double za) {
  double m = std::numeric_limits<double>::infinity();
  for (int64_t j = begin; j < end; ++j) m = std::min(m, (za - z[j]) * q[j]);
  return m;
}

template <typename T>
T mms_exact_row_impl(const T* z, const T* q, int64_t C, int64_t a, T margin) {
  if (margin == T(0)) return T(0);  // another class ties with the prediction: on the boundary
  return std::min(min_terms(z, q, 0, a, z[a]), min_terms(z, q, a + 1, C, z[a]));
}

}  // namespace

float mms_exact_row(const float* z, const float* q, int64_t C, int64_t a, float margin) {
  return mms_exact_row_impl(z, q, C, a, margin);
}

double mms_exact_row(const double* z, const double* q, int64_t C, int64_t a, double margin) {
  return mms_exact_row_impl(z, q, C, a, margin);
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
    const at::Tensor q = inverse_distances(w, sq, classes.slice(0, c0, c1));
    const acc_t* q_p = q.const_data_ptr<acc_t>();
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
        out[i] = mms_exact_row(z, q_p + k * C, C, classes_p[c0 + k], margin_p[i]);
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

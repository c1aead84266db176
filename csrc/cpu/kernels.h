// CPU kernel entry points of fastsel (registered in csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "fastsel/op_contract.h"

namespace fastsel::cpu {

ScoreOutputs score_forward(const at::Tensor& logits, const at::Tensor& target,
                           int64_t ignore_index, const std::optional<at::Tensor>& weight,
                           int64_t mms_mode);

at::Tensor score_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                          const at::Tensor& target, const at::Tensor& lse,
                          int64_t ignore_index);

// ---- Minimal Margin Score helpers (mms_kernel.cpp) --------------------------------

// q[k, j] = 1 / ||w_a - w_j|| for the rows a = classes[k] of w against every row of w,
// via squared norms and one matrix product (w: [C, D] contiguous float or double), and
// spread[k] = max_{j != a} q[k, j] / min_{j != a} q[k, j], which bounds the MMS search.
struct InverseDistances {
  at::Tensor q, spread;
};
InverseDistances inverse_distances(const at::Tensor& w, const at::Tensor& sq_norms,
                                   const at::Tensor& classes);

// min_{j != a} mms_term(z[a] - z[j], q[j]) over one row of C logits whose prediction a
// has top-2 margin `margin` (0 when another class ties with a); spread as above.
float mms_exact_row(const float* z, const float* q, int64_t C, int64_t a, float margin, float spread);
double mms_exact_row(const double* z, const double* q, int64_t C, int64_t a, double margin,
                     double spread);

// ||w_a - w_b|| from the difference, w row-major [*, D].
float pair_distance(const float* w, int64_t D, int64_t a, int64_t b);
double pair_distance(const double* w, int64_t D, int64_t a, int64_t b);

// Exact MMS of the rows with valid[i] for large C: rows are grouped by pred so that each
// class's inverse distances are computed once. Writes mms[i] for those rows.
void mms_exact_grouped(const at::Tensor& logits, const at::Tensor& pred,
                       const at::Tensor& valid, const at::Tensor& margin, const at::Tensor& w,
                       at::Tensor& mms);

}  // namespace fastsel::cpu

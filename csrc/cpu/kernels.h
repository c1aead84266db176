// CPU kernel entry points of fastsel (registered in csrc/ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "fastsel/op_contract.h"

namespace fastsel::cpu {

ScoreOutputs score_forward(const at::Tensor& logits, const at::Tensor& target,
                           int64_t ignore_index, const std::optional<at::Tensor>& weight,
                           int64_t mms_mode, const std::optional<at::Tensor>& max_distance);

at::Tensor score_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                          const at::Tensor& target, const at::Tensor& lse,
                          int64_t ignore_index);

// Host helpers of fastsel.ops (pybind, not operators): whether two CPU tensors hold the
// same bytes (memcmp; the MmsHead staleness check), and whether the exact MMS of an
// [N, C] call uses max_distance (the pruned search, not the Gram matrix).
bool same_bits(const at::Tensor& a, const at::Tensor& b);
bool mms_uses_max_distance(int64_t N, int64_t C);

// Selection ops (schemas and semantics in csrc/ops.cpp, select_kernel.cpp).
at::Tensor select_topk(const at::Tensor& scores, int64_t k, bool largest);
at::Tensor sample_without_replacement(const at::Tensor& importance, int64_t k, int64_t seed,
                                      int64_t counter);
at::Tensor sample_with_replacement(const at::Tensor& importance, int64_t k, int64_t seed,
                                   int64_t counter);
at::Tensor percentile(const at::Tensor& values, const at::Tensor& history);

}  // namespace fastsel::cpu

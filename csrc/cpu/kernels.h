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

}  // namespace fastsel::cpu

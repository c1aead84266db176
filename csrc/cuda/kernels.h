// CUDA kernel entry points of fastsel (registered in csrc/cuda/ops_cuda.cu).
//
// Same contract as the CPU kernels of csrc/cpu/kernels.h (fastsel/contract.py). This
// header stays light on purpose (no ATen/ATen.h): it is included by nvcc-compiled files,
// where every header costs compile time twice (host and device passes).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "fastsel/op_contract.h"

namespace fastsel::cuda {

// The outputs of the contract (fastsel/contract.py, in schema order) of CUDA
// logits [N, C]; mms is empty ([0]) when mms_mode is kMmsNone. Asynchronous: no host
// synchronisation; a target outside [0, C) that is not ignore_index triggers a
// device-side assertion.
ScoreOutputs score_forward(const at::Tensor& logits, const at::Tensor& target,
                           int64_t ignore_index, const std::optional<at::Tensor>& weight,
                           int64_t mms_mode, const std::optional<at::Tensor>& max_distance);

// grad_logits = grad_loss[:, None] * (softmax(logits) - onehot(target)), 0 on ignored rows.
at::Tensor score_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                          const at::Tensor& target, const at::Tensor& lse,
                          int64_t ignore_index);

// Selection ops (csrc/cuda/select_kernel.cu; semantics in csrc/ops.cpp, per-
// element math in fastsel/selection_keys.h): the same indices as the CPU kernels and
// fastsel/reference.py for the same inputs and seed. Asynchronous, no host
// synchronisation; int64 indices, float32 fractions for percentile.
at::Tensor select_topk(const at::Tensor& scores, int64_t k, bool largest);
at::Tensor sample_without_replacement(const at::Tensor& importance, int64_t k, int64_t seed,
                                      int64_t counter);
at::Tensor sample_with_replacement(const at::Tensor& importance, int64_t k, int64_t seed,
                                   int64_t counter);
at::Tensor percentile(const at::Tensor& values, const at::Tensor& history);

}  // namespace fastsel::cuda

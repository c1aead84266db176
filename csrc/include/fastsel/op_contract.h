// The contract of the torch.ops.fastsel scoring ops shared by every device's kernels
// (schemas in csrc/ops.cpp): argument checks, output allocation, mode constants.
// Host-only and light (no ATen/ATen.h): nvcc-compiled files include it too.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "fastsel/isa_namespace.h"

namespace fastsel {

// (loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms, lse)
using ScoreOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Modes of the Minimal Margin Score (schema argument mms_mode; fastsel/ops.py MMS_MODES).
enum MmsMode : int64_t { kMmsNone = 0, kMmsExact = 1, kMmsTop2 = 2 };

// GPU kernels: largest C for which the exact MMS precomputes the [C, C] inverse-distance
// matrix and fuses the MMS into the scoring pass; above it the inverse distances are built
// for a bounded block of rows at a time, never C x C. (The CPU kernel prunes instead:
// csrc/cpu/mms.h.)
constexpr int64_t kMmsDenseMaxClasses = 2048;

// The helpers below are compiled into every CPU kernel ISA: in the ISA's namespace
// (fastsel/isa_namespace.h); the types above are shared with the dispatch.
FASTSEL_ISA_BEGIN

inline at::ScalarType accumulate_type(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* op,
                              const char* name) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(),
              " but logits are on ", logits.device());
}

inline void check_target(const at::Tensor& target, const at::Tensor& logits, const char* op) {
  const int64_t N = logits.size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape [N] = [", N,
              "], got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op,
              ": target must be int64 or int32, got ", target.scalar_type());
  check_same_device(target, logits, op, "target");
}

// Checks of score_forward's arguments (the Python wrapper checks first, with friendlier
// exception types; these guard direct calls of the op).
inline void check_score_forward_args(const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight, int64_t mms_mode,
                                     const std::optional<at::Tensor>& max_distance) {
  TORCH_CHECK(logits.dim() == 2, "fastsel.score: logits must be 2-D [N, C], got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "fastsel.score: logits must be floating point, got ", logits.scalar_type());
  const int64_t C = logits.size(1);
  TORCH_CHECK(C >= 1, "fastsel.score: logits must have at least one class (C >= 1)");
  check_target(target, logits, "fastsel.score");
  TORCH_CHECK(mms_mode >= kMmsNone && mms_mode <= kMmsTop2,
              "fastsel.score: mms_mode must be 0 (none), 1 (exact) or 2 (top2), got ", mms_mode);
  TORCH_CHECK(mms_mode == kMmsNone || weight.has_value(), "fastsel.score: mms_mode ", mms_mode,
              " needs a weight");
  if (mms_mode != kMmsNone) {
    const at::Tensor& w = *weight;
    TORCH_CHECK(w.dim() == 2 && w.size(0) == C && w.size(1) >= 1,
                "fastsel.score: weight must be [C, D] = [", C, ", D] with D >= 1, got ", w.sizes());
    check_same_device(w, logits, "fastsel.score", "weight");
  }
  if (max_distance.has_value()) {
    const at::Tensor& d = *max_distance;
    TORCH_CHECK(weight.has_value(), "fastsel.score: max_distance needs a weight");
    TORCH_CHECK(d.dim() == 1 && d.size(0) == C && at::isFloatingType(d.scalar_type()),
                "fastsel.score: max_distance must be a floating point [C] = [", C, "] tensor, got ",
                d.scalar_type(), " ", d.sizes());
    check_same_device(d, logits, "fastsel.score", "max_distance");
  }
}

inline void check_score_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits,
                                      const at::Tensor& target, const at::Tensor& lse) {
  TORCH_CHECK(logits.dim() == 2, "fastsel.score_backward: logits must be 2-D, got ", logits.sizes());
  const int64_t N = logits.size(0);
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == N && lse.dim() == 1 && lse.size(0) == N,
              "fastsel.score_backward: grad_loss and lse must have shape [N] = [", N, "]");
  check_target(target, logits, "fastsel.score_backward");
  check_same_device(grad_loss, logits, "fastsel.score_backward", "grad_loss");
  check_same_device(lse, logits, "fastsel.score_backward", "lse");
}

// The nine outputs of score_forward for N rows; mms is empty ([0]) without an MMS mode.
struct ScoreBuffers {
  at::Tensor loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms, lse;

  ScoreBuffers(int64_t N, const at::TensorOptions& acc, int64_t mms_mode)
      : loss(at::empty({N}, acc)), entropy(at::empty({N}, acc)), margin(at::empty({N}, acc)),
        true_margin(at::empty({N}, acc)), grad_norm(at::empty({N}, acc)),
        confidence(at::empty({N}, acc)), pred(at::empty({N}, acc.dtype(at::kLong))),
        mms(at::empty({mms_mode == kMmsNone ? 0 : N}, acc)), lse(at::empty({N}, acc)) {}

  ScoreOutputs outputs() const {
    return {loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms, lse};
  }
};

FASTSEL_ISA_END
}  // namespace fastsel

// The contract of the torch.ops.fastsel scoring ops shared by every device's kernels:
// argument checks, output allocation, mode constants. The outputs and schemas themselves
// come from fastsel/score_contract.h, generated from fastsel/contract.py.
// Host-only and light (no ATen/ATen.h): nvcc-compiled files include it too.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "fastsel/isa_namespace.h"
#include "fastsel/score_contract.h"

namespace fastsel {

// The returns of score_forward: FASTSEL_SCORE_OUTPUT_COUNT tensors, in schema order.
template <std::size_t N, typename... T>
struct TensorTuple : TensorTuple<N - 1, at::Tensor, T...> {};
template <typename... T>
struct TensorTuple<0, T...> {
  using type = std::tuple<T...>;
};
using ScoreOutputs = TensorTuple<FASTSEL_SCORE_OUTPUT_COUNT>::type;

// Kinds of output (fastsel/contract.py): a float of the row in the accumulate type, an
// int64 class index of the row, the MMS (a float of the row, or [0] without an MMS mode).
enum OutputKind { kRowOutput, kIndexOutput, kMmsOutput };


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

// The outputs of score_forward for N rows, one tensor per output of the contract named
// as there; mms is empty ([0]) without an MMS mode.
struct ScoreBuffers {
#define FASTSEL_OUTPUT_FIELD(name, kind) at::Tensor name;
  FASTSEL_SCORE_OUTPUTS(FASTSEL_OUTPUT_FIELD)
#undef FASTSEL_OUTPUT_FIELD

  ScoreBuffers(int64_t N, const at::TensorOptions& acc, int64_t mms_mode) {
#define FASTSEL_OUTPUT_ALLOC(name, kind) name = allocate(kind, N, acc, mms_mode);
    FASTSEL_SCORE_OUTPUTS(FASTSEL_OUTPUT_ALLOC)
#undef FASTSEL_OUTPUT_ALLOC
  }

  ScoreOutputs outputs() const {
#define FASTSEL_OUTPUT_NAME(name, kind) name,
    return {FASTSEL_SCORE_OUTPUTS(FASTSEL_OUTPUT_NAME)};
#undef FASTSEL_OUTPUT_NAME
  }

 private:
  static at::Tensor allocate(OutputKind kind, int64_t N, const at::TensorOptions& acc, int64_t mms_mode) {
    switch (kind) {
      case kIndexOutput: return at::empty({N}, acc.dtype(at::kLong));
      case kMmsOutput: return at::empty({mms_mode == kMmsNone ? 0 : N}, acc);
      default: return at::empty({N}, acc);
    }
  }
};

FASTSEL_ISA_END
}  // namespace fastsel

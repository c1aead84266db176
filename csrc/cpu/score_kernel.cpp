// Fused one-pass scoring of logits [N, C] on the CPU.
//
// Each row is read from memory once. It is processed in column blocks of kBlock floats
// (16 KiB, L1/L2-resident); each block is swept twice while it is in cache:
//   1. lane-parallel top-2 values; the running row maximum m is the largest lane top-1;
//   2. exp(z - m) with the SoftmaxState sums of row_scores.h, one exp per element; the
//      same sweep finds the first maximum and counts the elements not below m, which
//      is how NaN and +inf are detected (score_row_vectorized).
// For float rows of one block, pass 1 of the next row runs inside pass 2 of this one
// (LaneSums::sweep). When a later block raises m the lane sums are rebased once per
// block (a scalar exp), not per element as a strictly online softmax would. Rows that turn out invalid
// (NaN, +inf, only -inf) are recomputed by the scalar path, which also gives their
// torch.argmax-compatible pred. Rows are distributed over threads with at::parallel_for.
//
// One concern per file: score/exp.h (the vectorized exp), score/row_pass.h (the passes
// over a row), score/rows.h (rows, lanes and groups of rows, their outputs and MMS),
// mms_prep.h (what the MMS needs of the weight), score/backward.h; this file holds the
// entry points. The whole is compiled once per ISA (csrc/cpu/isa/).
//
// Pass 2 bounds the kernel (the exp and the three sums: 15 vector instructions per 16
// logits with AVX-512); pass 1 is nearly free when fused; bench/bench_score.py times it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastsel/row_scores.h"
#include "kernels.h"
#include "large_alloc.h"
#include "mms.h"
#include "vec_utils.h"

#include "fastsel/isa_namespace.h"

#include "score/backward.h"
#include "score/rows.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN

bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "same_bits: CPU tensors only");
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.const_data_ptr(), y.const_data_ptr(), x.nbytes()) == 0;
}

bool mms_uses_max_distance(int64_t N, int64_t C) { return !use_mms_gram(N, C, /*exact=*/true); }

ScoreOutputs score_forward(const at::Tensor& logits_in, const at::Tensor& target,
                           int64_t ignore_index, const std::optional<at::Tensor>& weight,
                           int64_t mms_mode, const std::optional<at::Tensor>& max_distance) {
  check_score_forward_args(logits_in, target, weight, mms_mode, max_distance);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  // Rows may have any stride; columns must be unit-stride for vector loads.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const auto opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  ScoreBuffers outs(N, opts, mms_mode);

  MmsInputs mms_in;
  mms_in.mode = mms_mode;
  at::Tensor w, radius, inv_dist, farthest;
  // A weight with a NaN or +-inf entry has no distance between that class and any other,
  // and the exact MMS takes a minimum over every class: it is then NaN wherever a
  // distance is needed (0 < margin < inf), whatever path the call takes (the top-2 MMS
  // gets NaN from its own pair's distance, per row).
  bool nonfinite_weight = false;
  // The MMS of w is s times that of w * s (s = 2^k, so w * s is exact): the weight is
  // rescaled where its magnitude would break the arithmetic (a float64 weight beyond
  // float32's range for float32 logits, the pruned search's radii overflowing or
  // underflowing) and the MMS scaled back at the end, mms_scale_exp = k.
  int mms_scale_exp = 0;
  if (mms_mode != kMmsNone) {
    if (weight->scalar_type() == at::kDouble && opts.dtype() == at::kFloat) {
      const int e = magnitude_exponent(*weight);  // keep the rows inside float32's normal range
      if (e > 100 || e < -100) mms_scale_exp = -e;
    }
    w = (mms_scale_exp != 0 ? times_power_of_two(*weight, mms_scale_exp) : *weight).to(opts.dtype()).contiguous();
    const bool gram = use_mms_gram(N, C, mms_mode == kMmsExact);
    if (gram) {  // distances from the matrix
      bool suspect = false;  // a non-finite Gram diagonal: then the exact check (it may be overflow)
      inv_dist = inverse_distances(w, &suspect);
      if (mms_mode == kMmsExact && suspect) nonfinite_weight = !at::isfinite(w).all().item<bool>();
      mms_in.weights.inv_dist = inv_dist.const_data_ptr();
    }
    if (mms_mode == kMmsExact && !gram) {  // the pruned search's bounds
      const bool is_float = w.scalar_type() == at::kFloat;
      auto radii = [&] {  // the radii, and their maximum (+inf if one is not finite)
        radius = is_float ? centred_radii(w) : (w - w.mean(0, /*keepdim=*/true)).norm(2, {1}).contiguous();
        double top = 0.0;
        AT_DISPATCH_FLOATING_TYPES(radius.scalar_type(), "fastsel_radius_max", [&] {
          const scalar_t* r = radius.const_data_ptr<scalar_t>();
          for (int64_t j = 0; j < C; ++j) {
            const double v = static_cast<double>(r[j]);
            top = std::isfinite(v) ? std::max(top, v) : std::numeric_limits<double>::infinity();
            if (std::isinf(top)) break;
          }
        });
        return top;
      };
      double radius_max = radii();
      const double lo = is_float ? 0x1p-40 : 0x1p-400, hi = is_float ? 0x1p40 : 0x1p400;
      double magnitude = radius_max;  // what the rescaling puts near 1
      if (!std::isfinite(radius_max)) {  // a non-finite entry, or finite rows too large for the sums
        nonfinite_weight = !at::isfinite(w).all().item<bool>();
        magnitude = nonfinite_weight ? 1.0 : w.abs().max().item<double>();
      } else if (radius_max < lo) {  // tiny rows (their squares may have underflowed), or identical ones
        magnitude = w.abs().max().item<double>();
      }
      if (!nonfinite_weight && magnitude > 0 && (magnitude < lo || magnitude > hi)) {
        int e = 0;
        std::frexp(magnitude, &e);  // magnitude = f 2^e, f in [0.5, 1)
        mms_scale_exp -= e;
        w = times_power_of_two(w, -e);
        radius_max = radii();
      }
      mms_in.weights.radius = radius.const_data_ptr();
      mms_in.weights.radius_max = radius_max;
      if (max_distance.has_value()) {  // scaled like w (in float64 first: it may leave float's range)
        farthest = times_power_of_two(max_distance->to(at::kDouble), mms_scale_exp).to(opts.dtype()).contiguous();
        mms_in.weights.max_distance = farthest.const_data_ptr();
      }
    }
    mms_in.weights.w = w.const_data_ptr();
    mms_in.weights.D = w.size(1);
    if (nonfinite_weight) mms_in.mode = kMmsNone;  // filled from the margins below
  }

  std::atomic<int64_t> first_bad_target{-1};
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastsel_score", [&] {
      using acc_t = acc_type_t<scalar_t>;
      const auto out = OutputPointers<acc_t>::of(outs);
      if (target.scalar_type() == at::kLong) {
        score_rows<scalar_t, int64_t>(logits, target, ignore_index, mms_in, out, first_bad_target);
        refine_confident_grad_norms<scalar_t, int64_t>(logits, target, ignore_index, out);
      } else {
        score_rows<scalar_t, int32_t>(logits, target, ignore_index, mms_in, out, first_bad_target);
        refine_confident_grad_norms<scalar_t, int32_t>(logits, target, ignore_index, out);
      }
    });
  }
  throw_if_bad_target(first_bad_target.load(), target, C, ignore_index, "fastsel.score");
  if (nonfinite_weight) {
    // 0 for a tie and +inf without a finite competitor, as ever (no distance needed);
    // NaN elsewhere, invalid rows (NaN margin) included
    const at::Tensor& m = outs.margin;
    outs.mms.copy_(at::where(m == 0, at::zeros_like(m),
                             at::where(m == std::numeric_limits<double>::infinity(), m,
                                       at::full_like(m, std::numeric_limits<double>::quiet_NaN()))));
  } else if (mms_scale_exp != 0) {
    // in float64: 2^k of a float32 MMS may lie beyond float's range (k = -997 for a 1e300
    // weight), and inf * 0 is NaN
    outs.mms.copy_(times_power_of_two(outs.mms.to(at::kDouble), mms_scale_exp));
  }
  return outs.outputs();
}

at::Tensor score_backward(const at::Tensor& grad_loss, const at::Tensor& logits_in,
                          const at::Tensor& target, const at::Tensor& lse_in,
                          int64_t ignore_index) {
  check_score_backward_args(grad_loss, logits_in, target, lse_in);
  const int64_t N = logits_in.size(0), C = logits_in.size(1);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const auto acc_dtype = accumulate_type(logits.scalar_type());
  const at::Tensor g = grad_loss.to(acc_dtype);
  const at::Tensor lse = lse_in.to(acc_dtype);
  at::Tensor grad = empty_for_streaming_write({N, C}, logits.options());
  if (N == 0) return grad;
  std::atomic<int64_t> first_bad_target{-1};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastsel_score_backward", [&] {
    if (target.scalar_type() == at::kLong) {
      backward_rows<scalar_t, int64_t>(g, logits, target, lse, ignore_index, grad, first_bad_target);
    } else {
      backward_rows<scalar_t, int32_t>(g, logits, target, lse, ignore_index, grad, first_bad_target);
    }
  });
  throw_if_bad_target(first_bad_target.load(), target, C, ignore_index, "fastsel.score_backward");
  return grad;
}

FASTSEL_ISA_END
}  // namespace fastsel::cpu

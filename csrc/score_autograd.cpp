// Autograd of torch.ops.fastsel.score_forward and score_backward, in C++ (the Autograd
// dispatch key, so for CPU and CUDA tensors alike).
//
// Only loss is differentiable: d loss_i / d z_i = softmax(z_i) - onehot(y_i),
// recomputed by score_backward from the logits and the saved per-row log-sum-exp
// (the contract's saved output, fastsel/contract.py), so nothing of size [N, C] is kept between forward and backward. The other
// outputs are non-differentiable: backward through them raises.
//
// score_backward is differentiable too, so gradient penalties and Hessian-vector products
// work as with F.cross_entropy. With p = softmax(z), m_i = [y_i != ignore_index] and
// B_ij = m_i g_i (p_ij - [j == y_i]) its output, for an upstream gradient G [N, C]:
//   d/dg_i = m_i (sum_j G_ij p_ij - G_iy)
//   d/dz_ik = m_i g_i p_ik (G_ik - sum_j G_ij p_ij)
// lse is taken to be logsumexp(z): its dependence on z is inside d/dz (the softmax
// Jacobian), so lse itself gets no gradient and must not require one. These formulas are
// written with differentiable ATen ops, so every further order works as well.
//
// The same formula registered from Python (torch.library.register_autograd, used for the
// Triton ops in fastsel/registration/score.py) runs Python on every call, which for small
// batches costs more than the whole kernel; here the autograd step stays in C++.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>

#include <tuple>
#include <utility>

#include "fastsel/op_contract.h"

namespace fastsel {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

ScoreOutputs call_score_forward(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                const std::optional<at::Tensor>& weight, int64_t mms_mode,
                                const std::optional<at::Tensor>& max_distance) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastsel::score_forward", "")
                       .typed<ScoreOutputs(const at::Tensor&, const at::Tensor&, int64_t,
                                           const std::optional<at::Tensor>&, int64_t,
                                           const std::optional<at::Tensor>&)>();
  return op.call(logits, target, ignore_index, weight, mms_mode, max_distance);
}

at::Tensor call_score_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                               const at::Tensor& lse, int64_t ignore_index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastsel::score_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t)>();
  return op.call(grad_loss, logits, target, lse, ignore_index);
}

class ScoreFunction : public torch::autograd::Function<ScoreFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               int64_t ignore_index, const std::optional<at::Tensor>& weight,
                               int64_t mms_mode, const std::optional<at::Tensor>& max_distance) {
    at::AutoDispatchBelowADInplaceOrView guard;
    variable_list out = std::apply([](const auto&... t) { return variable_list{t...}; },
                                   call_score_forward(logits, target, ignore_index, weight, mms_mode, max_distance));
    ctx->save_for_backward({logits, target, out[FASTSEL_SCORE_SAVED_OUTPUT]});
    ctx->saved_data["ignore_index"] = ignore_index;
    variable_list constant;
    for (size_t i = 0; i < out.size(); ++i) {
      if (i != FASTSEL_SCORE_DIFFERENTIABLE_OUTPUT) constant.push_back(out[i]);
    }
    ctx->mark_non_differentiable(constant);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_loss = grads[FASTSEL_SCORE_DIFFERENTIABLE_OUTPUT];
    at::Tensor grad_logits;
    if (ctx->needs_input_grad(0) && grad_loss.defined()) {
      grad_logits = call_score_backward(grad_loss.contiguous(), saved[0], saved[1], saved[2],
                                        ctx->saved_data["ignore_index"].toInt());
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The derivatives of score_backward (see the top of this file), from differentiable ATen
// ops on the saved inputs: only run when a second-order gradient is asked for.
class ScoreBackwardFunction : public torch::autograd::Function<ScoreBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_loss, const at::Tensor& logits,
                               const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index) {
    TORCH_CHECK(!lse.requires_grad(),
                "fastsel.score_backward: lse must not require grad: it is taken to be logsumexp(logits) and "
                "its gradient is part of the gradient with respect to logits (pass lse.detach())");
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor grad = call_score_backward(grad_loss, logits, target, lse, ignore_index);
    ctx->save_for_backward({grad_loss, logits, target});
    ctx->saved_data["ignore_index"] = ignore_index;
    return {grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_loss = saved[0];
    const at::Tensor& logits = saved[1];
    const at::Tensor& target = saved[2];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    at::Tensor d_grad_loss, d_logits;
    const at::Tensor& upstream = grads[0];
    if (upstream.defined() && (ctx->needs_input_grad(0) || ctx->needs_input_grad(1))) {
      const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      // in int64: an int32 target compared with a wider ignore_index would wrap it
      const at::Tensor keep = target.to(at::kLong).ne(ignore_index);         // [N]
      const at::Tensor p = at::softmax(logits.to(acc), 1);                   // [N, C]
      const at::Tensor G = upstream.to(acc);
      const at::Tensor pG = p * G;
      const at::Tensor s = pG.sum(1, /*keepdim=*/true);                      // [N, 1]
      if (ctx->needs_input_grad(0)) {
        const at::Tensor y = at::where(keep, target, at::zeros_like(target)).to(at::kLong).unsqueeze(1);
        const at::Tensor d = s.squeeze(1) - G.gather(1, y).squeeze(1);
        d_grad_loss = at::where(keep, d, at::zeros_like(d)).to(grad_loss.scalar_type());
      }
      if (ctx->needs_input_grad(1)) {
        // where, not a product with 0: an ignored row may hold NaN or +-inf (0 * NaN is NaN)
        const at::Tensor g = grad_loss.to(acc).unsqueeze(1);
        const at::Tensor d = g * (pG - p * s);
        d_logits = at::where(keep.unsqueeze(1), d, at::zeros_like(d)).to(logits.scalar_type());
      }
    }
    return {d_grad_loss, d_logits, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor score_backward_autograd(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                   const at::Tensor& lse, int64_t ignore_index) {
  return ScoreBackwardFunction::apply(grad_loss, logits, target, lse, ignore_index)[0];
}

template <std::size_t... I>
ScoreOutputs as_outputs(const variable_list& out, std::index_sequence<I...>) {
  return {out[I]...};
}

ScoreOutputs score_forward_autograd(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                    const std::optional<at::Tensor>& weight, int64_t mms_mode,
                                    const std::optional<at::Tensor>& max_distance) {
  const variable_list out = ScoreFunction::apply(logits, target, ignore_index, weight, mms_mode, max_distance);
  return as_outputs(out, std::make_index_sequence<FASTSEL_SCORE_OUTPUT_COUNT>{});
}

}  // namespace
}  // namespace fastsel

TORCH_LIBRARY_IMPL(fastsel, Autograd, m) {
  m.impl("score_forward", &fastsel::score_forward_autograd);
  m.impl("score_backward", &fastsel::score_backward_autograd);
}

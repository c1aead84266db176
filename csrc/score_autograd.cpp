// Autograd of torch.ops.fastsel.score_forward, in C++ (the Autograd dispatch key, so for
// CPU and CUDA tensors alike).
//
// Only loss (output 0) is differentiable: d loss_i / d z_i = softmax(z_i) - onehot(y_i),
// recomputed by score_backward from the logits and the saved per-row log-sum-exp
// (output 8), so nothing of size [N, C] is kept between forward and backward. The other
// outputs are non-differentiable: backward through them raises.
//
// The same formula registered from Python (torch.library.register_autograd, still used
// for the Triton ops in fastsel/_autograd.py) costs ~20 us of Python per call, more than
// the whole kernel for a batch of 128 x 10 logits; here the autograd step stays in C++.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

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
    auto [loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms, lse] =
        call_score_forward(logits, target, ignore_index, weight, mms_mode, max_distance);
    ctx->save_for_backward({logits, target, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({entropy, margin, true_margin, grad_norm, confidence, pred, mms, lse});
    return {loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_logits;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      grad_logits = call_score_backward(grads[0].contiguous(), saved[0], saved[1], saved[2],
                                        ctx->saved_data["ignore_index"].toInt());
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

ScoreOutputs score_forward_autograd(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                    const std::optional<at::Tensor>& weight, int64_t mms_mode,
                                    const std::optional<at::Tensor>& max_distance) {
  const variable_list out = ScoreFunction::apply(logits, target, ignore_index, weight, mms_mode, max_distance);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

}  // namespace
}  // namespace fastsel

TORCH_LIBRARY_IMPL(fastsel, Autograd, m) {
  m.impl("score_forward", &fastsel::score_forward_autograd);
}

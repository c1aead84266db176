"""Registration of the scoring ops: fakes, autograd, and the Triton ops.

* ``torch.ops.fastsel.score_forward`` / ``score_backward``: defined in C++
  (``csrc/ops.cpp``) when the extension is built; their fakes are registered here, their
  autograd in C++ (``csrc/score_autograd.cpp``), because autograd registered from Python
  runs Python on every call, which for small batches costs more than the whole kernel.
  The formulas are the ones below.
* ``torch.ops.fastsel.triton_score_forward`` / ``triton_score_backward``: defined here
  with the same schemas (``fastsel.contract``), so that ``fastsel.ops`` dispatches
  through a table; implemented by the launchers of ``fastsel.triton`` (imported at the
  first call), with the same fakes and the autograd below.

Only ``loss`` is differentiable: d loss_i / d z_i = softmax(z_i) - onehot(y_i),
recomputed in the backward from the logits and the saved per-row log-sum-exp (the
contract's saved output), so nothing of size [N, C] is stored between forward and
backward. The other outputs are marked non-differentiable: calling ``backward`` through
them raises instead of silently producing a zero gradient.

The backward op is differentiable as well (gradient penalties, Hessian-vector products):
with p = softmax(z), m_i = [y_i != ignore_index] and upstream G, d/dg_i = m_i (sum_j
G_ij p_ij - G_iy) and d/dz_ik = m_i g_i p_ik (G_ik - sum_j G_ij p_ij); lse is taken to be
logsumexp(z), so it gets no gradient of its own. Written with differentiable torch ops,
so higher orders work too.
"""

from __future__ import annotations


import torch

from fastsel import contract
from fastsel._extension import CPU_EXTENSION_AVAILABLE

__all__ = ["score_forward_fake", "score_backward_fake", "register_score_autograd", "score_backward_derivatives"]


def score_backward_derivatives(upstream, grad_loss, logits, target, ignore_index, needs_grad_loss: bool,
                               needs_logits: bool):
    """(d/d grad_loss, d/d logits) of ``score_backward`` for the upstream gradient [N, C]
    (None where not needed), in differentiable torch ops."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    keep = target.long() != ignore_index  # int64: an int32 target would wrap a wide ignore_index
    p = torch.softmax(logits.to(acc), dim=1)
    g_up = upstream.to(acc)
    pg = p * g_up
    s = pg.sum(dim=1, keepdim=True)
    d_grad_loss = d_logits = None
    if needs_grad_loss:
        y = torch.where(keep, target, torch.zeros_like(target)).long().unsqueeze(1)
        d = s.squeeze(1) - g_up.gather(1, y).squeeze(1)
        d_grad_loss = torch.where(keep, d, torch.zeros_like(d)).to(grad_loss.dtype)
    if needs_logits:
        # where, not a product with 0: an ignored row may hold NaN or +-inf (0 * NaN is NaN)
        d = grad_loss.to(acc).unsqueeze(1) * (pg - p * s)
        d_logits = torch.where(keep.unsqueeze(1), d, torch.zeros_like(d)).to(logits.dtype)
    return d_grad_loss, d_logits


def register_score_autograd(forward_op: str, backward_op: str) -> None:
    """Registers the autograd formulas of a ``score_forward``-schema op and of its
    ``backward_op(grad_loss, logits, target, lse, ignore_index) -> grad_logits`` (both by
    qualified name, ``"fastsel::..."``).
    """
    namespace, name = backward_op.split("::")
    call_backward = getattr(getattr(torch.ops, namespace), name)

    (differentiable,) = contract.DIFFERENTIABLE_OUTPUTS

    def setup_context(ctx, inputs, output):
        logits, target, ignore_index = inputs[:3]
        ctx.save_for_backward(logits, target, output[contract.SAVED_OUTPUT])
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(*(t for i, t in enumerate(output) if i != differentiable))

    def backward(ctx, *grads):
        logits, target, lse = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = call_backward(grads[differentiable].contiguous(), logits, target, lse, ctx.ignore_index)
        return (grad_logits,) + (None,) * (len(ctx.needs_input_grad) - 1)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)

    def setup_backward_context(ctx, inputs, output):
        grad_loss, logits, target, lse, ignore_index = inputs
        if lse.requires_grad:
            raise RuntimeError("fastsel.score_backward: lse must not require grad: it is taken to be "
                               "logsumexp(logits) and its gradient is part of the gradient with respect "
                               "to logits (pass lse.detach())")
        ctx.save_for_backward(grad_loss, logits, target)
        ctx.ignore_index = ignore_index

    def backward_of_backward(ctx, upstream):
        grad_loss, logits, target = ctx.saved_tensors
        d_grad_loss, d_logits = score_backward_derivatives(
            upstream, grad_loss, logits, target, ctx.ignore_index, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return d_grad_loss, d_logits, None, None, None

    torch.library.register_autograd(backward_op, backward_of_backward, setup_context=setup_backward_context)


def score_forward_fake(logits, target, ignore_index, weight, mms_mode, max_distance=None):
    """Output metadata of a ``score_forward``-schema op (for FakeTensor tracing)."""
    return contract.empty_outputs(logits, mms_mode)


def score_backward_fake(grad_loss, logits, target, lse, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ---- registrations ------------------------------------------------------------------------

if CPU_EXTENSION_AVAILABLE:  # the compiled ops (defined by loading fastsel._C)
    torch.library.register_fake("fastsel::score_forward")(score_forward_fake)
    torch.library.register_fake("fastsel::score_backward")(score_backward_fake)


def _triton_score_forward(logits, target, ignore_index, weight, mms_mode, max_distance=None):
    # max_distance only prunes the CPU kernel's exact MMS search: the values are the same without
    from fastsel.triton import score_forward_triton

    return tuple(score_forward_triton(logits, target, ignore_index, weight, mms_mode))


def _triton_score_backward(grad_loss, logits, target, lse, ignore_index):
    from fastsel.triton import score_backward_triton

    return score_backward_triton(grad_loss, logits, target, lse, ignore_index)


_LIBRARY = torch.library.Library("fastsel", "FRAGMENT")  # kept alive: it owns the registrations
for _name, _schema, _impl, _fake in (
        ("triton_score_forward", contract.score_forward_schema("triton_score_forward"), _triton_score_forward,
         score_forward_fake),
        ("triton_score_backward", contract.score_backward_schema("triton_score_backward"), _triton_score_backward,
         score_backward_fake)):
    _LIBRARY.define(_schema)
    _LIBRARY.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastsel::{_name}", lib=_LIBRARY)(_fake)
register_score_autograd("fastsel::triton_score_forward", "fastsel::triton_score_backward")

"""Autograd of the Triton scoring ops (the compiled ``score_forward`` registers the same
formula in C++, ``csrc/score_autograd.cpp``), plus the fake implementations shared by
both.

Only ``loss`` (output 0) is differentiable: d loss_i / d z_i = softmax(z_i) - onehot(y_i),
recomputed in the backward from the logits and the saved per-row log-sum-exp (output 8),
so nothing of size [N, C] is stored between forward and backward. The other outputs are
marked non-differentiable: calling ``backward`` through them raises instead of silently
producing a zero gradient.

The backward op is differentiable as well (gradient penalties, Hessian-vector products),
by the formulas of ``csrc/score_autograd.cpp``: with p = softmax(z), m_i = [y_i !=
ignore_index] and upstream G, d/dg_i = m_i (sum_j G_ij p_ij - G_iy) and d/dz_ik = m_i g_i
p_ik (G_ik - sum_j G_ij p_ij); lse is taken to be logsumexp(z), so it gets no gradient of
its own. Written with differentiable torch ops, so higher orders work too.
"""

from __future__ import annotations

from typing import Callable

import torch


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


def register_score_autograd(forward_op, backward_op: Callable) -> None:
    """Registers the autograd formulas of a ``score_forward``-schema op and of its
    ``backward_op(grad_loss, logits, target, lse, ignore_index) -> grad_logits``.
    """

    def setup_context(ctx, inputs, output):
        logits, target, ignore_index, _weight, _mms_mode = inputs
        ctx.save_for_backward(logits, target, output[8])
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad_loss, *unused_grads):
        logits, target, lse = ctx.saved_tensors
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = backward_op(grad_loss.contiguous(), logits, target, lse, ctx.ignore_index)
        return grad_logits, None, None, None, None

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
    n = logits.shape[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    floats = [logits.new_empty((n,), dtype=acc) for _ in range(6)]
    pred = logits.new_empty((n,), dtype=torch.int64)
    mms = logits.new_empty((n if mms_mode != 0 else 0,), dtype=acc)
    return (*floats, pred, mms, logits.new_empty((n,), dtype=acc))


def score_backward_fake(grad_loss, logits, target, lse, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)

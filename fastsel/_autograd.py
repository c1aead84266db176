"""Autograd of the Triton scoring ops (the compiled ``score_forward`` registers the same
formula in C++, ``csrc/score_autograd.cpp``), plus the fake implementations shared by
both.

Only ``loss`` (output 0) is differentiable: d loss_i / d z_i = softmax(z_i) - onehot(y_i),
recomputed in the backward from the logits and the saved per-row log-sum-exp (output 8),
so nothing of size [N, C] is stored between forward and backward. The other outputs are
marked non-differentiable: calling ``backward`` through them raises instead of silently
producing a zero gradient.
"""

from __future__ import annotations

from typing import Callable

import torch


def register_score_autograd(forward_op, backward_op: Callable) -> None:
    """Registers the autograd formula of a ``score_forward``-schema op.

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

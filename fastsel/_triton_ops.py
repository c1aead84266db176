"""``torch.ops.fastsel.triton_score_forward`` / ``triton_score_backward``: the Triton
launchers of ``fastsel.triton`` as custom ops with fake implementations and the shared
autograd, so ``backend="triton"`` is differentiable and traceable by ``torch.compile``.

Imported lazily (first use of the Triton backend) so that importing fastsel never imports
triton: the interpreter tests must set ``TRITON_INTERPRET`` before triton is imported.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastsel._autograd import register_score_autograd, score_backward_fake, score_forward_fake
from fastsel.triton import score_backward_triton, score_forward_triton


@torch.library.custom_op("fastsel::triton_score_forward", mutates_args=())
def triton_score_forward(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
    weight: Optional[torch.Tensor], mms_mode: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(score_forward_triton(logits, target, ignore_index, weight, mms_mode))


@torch.library.custom_op("fastsel::triton_score_backward", mutates_args=())
def triton_score_backward(
    grad_loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
    lse: torch.Tensor, ignore_index: int,
) -> torch.Tensor:
    return score_backward_triton(grad_loss, logits, target, lse, ignore_index)


triton_score_forward.register_fake(score_forward_fake)
triton_score_backward.register_fake(score_backward_fake)
register_score_autograd(triton_score_forward, triton_score_backward)

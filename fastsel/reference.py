"""Pure-PyTorch definition of every fastsel op.

This module is the specification the kernels are tested against (run it on float64
inputs to get the oracle) and the ``backend="torch"`` fallback used when the C++
extension is not built. It favours clarity over speed: it materialises [N, C]
intermediates that the kernels never do.

Score definitions follow ``METHODS.md`` section 1; conventions that the papers leave
open are fixed here and mirrored by every kernel:

* ``pred`` is ``torch.argmax``: the lowest index among the maxima; a NaN counts as
  larger than everything (the first NaN wins).
* The runner-up of the top-2 (used by ``margin`` and ``mms="top2"``) is the lowest
  index among the maxima of the row with ``pred`` removed.
* With a single class (C = 1) there is no competitor: ``margin``, ``true_margin`` and
  ``mms`` are ``+inf`` (infinitely far from any decision boundary).
* A row holding NaN or ``+inf``, or only ``-inf``, is invalid: every float score of that
  row is NaN (``pred`` still follows ``torch.argmax``). ``-inf`` entries elsewhere are
  classes of zero probability.
* Rows whose target is ``ignore_index`` get ``loss = 0`` (as
  ``F.cross_entropy(reduction="none")``) and NaN ``true_margin`` / ``grad_norm``.
* ``mms``: ``min_{j != a} (z_a - z_j) / ||w_a - w_j||``; a pair with ``z_a == z_j``
  contributes 0 whatever the distance (the point is on the boundary). This reference
  computes the distances from the Gram form
  ``max(||w_a||^2 + ||w_j||^2 - 2 w_a.w_j, 0)`` in row chunks; the CPU kernel computes
  them from the difference of the rows (no cancellation); they agree to rounding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["Scores", "score_reference", "score_backward_reference", "accumulate_dtype"]


class Scores(NamedTuple):
    """Per-sample scores of one batch of logits; every field is a tensor of shape [N].

    Float fields are float32 (float64 for float64 logits); ``pred`` is int64.
    ``loss`` is differentiable with respect to the logits; the others carry no gradient.
    ``mms`` is None unless a classifier ``weight`` was given.
    """

    loss: torch.Tensor
    entropy: torch.Tensor
    margin: torch.Tensor
    true_margin: torch.Tensor
    grad_norm: torch.Tensor
    confidence: torch.Tensor
    pred: torch.Tensor
    mms: Optional[torch.Tensor]
    lse: torch.Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are float64 for float64 logits and float32 for every narrower float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _top2(z: torch.Tensor):
    """Top-2 values and indices with the lowest index winning ties (see module doc)."""
    n, c = z.shape
    i1 = z.argmax(dim=1)
    v1 = z.gather(1, i1[:, None]).squeeze(1)
    if c == 1:
        inf = torch.full((n,), float("inf"), dtype=z.dtype, device=z.device)
        return v1, i1, -inf, i1.clone()
    rest = z.scatter(1, i1[:, None], float("-inf"))
    i2 = rest.argmax(dim=1)
    v2 = rest.gather(1, i2[:, None]).squeeze(1)
    return v1, i1, v2, i2


def _pair_distance(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||w_a - w_b|| for index vectors a, b, computed from the difference (exact)."""
    return (weight[a] - weight[b]).norm(dim=1)


def _mms_exact(z: torch.Tensor, pred: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, c = z.shape
    out = torch.empty(n, dtype=z.dtype, device=z.device)
    sq = (weight * weight).sum(dim=1)
    rows = max(1, (1 << 22) // max(c, 1))  # bound the [rows, C] temporaries
    for start in range(0, n, rows):
        zz = z[start:start + rows]
        a = pred[start:start + rows]
        dist2 = sq[a][:, None] + sq[None, :] - 2.0 * (weight[a] @ weight.T)
        dist = dist2.clamp_min(0).sqrt()
        diff = zz.gather(1, a[:, None]) - zz
        ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / dist)
        ratio = ratio.scatter(1, a[:, None], float("inf"))
        out[start:start + rows] = ratio.min(dim=1).values
    return out


def score_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    weight: Optional[torch.Tensor] = None,
    mms: str = "exact",
) -> Scores:
    """All scores of ``logits`` [N, C] against ``target`` [N], in plain PyTorch.

    Inputs are assumed validated (``fastsel.score`` does that). Computation happens in
    ``accumulate_dtype(logits.dtype)``; pass float64 logits to get the test oracle.
    """
    acc = accumulate_dtype(logits.dtype)
    z = logits.to(acc)
    n, c = z.shape
    target = target.long()
    ignored = target == ignore_index
    y = torch.where(ignored, torch.zeros_like(target), target)

    lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    loss = torch.where(ignored, torch.zeros_like(lse), lse - z_y)

    with torch.no_grad():
        zd = z.detach()
        lse_d = lse.detach()
        # -inf logits have p = 0; 0 * (-inf) would be NaN, so weight them out explicitly.
        logp = zd - lse_d[:, None]
        p = logp.exp()
        plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
        entropy = -plogp.sum(dim=1)

        v1, i1, v2, i2 = _top2(zd)
        margin = v1 - v2
        runner_up_of_y = torch.where(y == i1, v2, v1)
        true_margin = zd.gather(1, y[:, None]).squeeze(1) - runner_up_of_y
        p_y = p.gather(1, y[:, None]).squeeze(1)
        # ||p - onehot(y)||^2 = sum p^2 - 2 p_y + 1, written as
        # (1 - p_y)^2 + sum_{j != y} p_j^2 is the same quantity without cancellation.
        p_rest = p.scatter(1, y[:, None], 0.0)
        grad_norm2 = (1.0 - p_y) ** 2 + (p_rest * p_rest).sum(dim=1)
        grad_norm = grad_norm2.sqrt()
        confidence = (v1 - lse_d).exp()
        pred = zd.argmax(dim=1) if n > 0 else torch.zeros(0, dtype=torch.long, device=z.device)

        nan = torch.full_like(lse_d, float("nan"))
        true_margin = torch.where(ignored, nan, true_margin)
        grad_norm = torch.where(ignored, nan, grad_norm)

        mms_out = None
        if weight is not None:
            w = weight.to(acc)
            if mms == "top2":
                dist = _pair_distance(w, i1, i2) if c > 1 else torch.ones_like(margin)
                mms_out = torch.where(margin == 0, torch.zeros_like(margin), margin / dist)
                if c == 1:
                    mms_out = torch.full_like(margin, float("inf"))
            else:
                mms_out = _mms_exact(zd, i1, w) if n > 0 else torch.empty(0, dtype=acc)

        # Invalid rows: NaN or +inf anywhere, or no finite maximum at all.
        row_max = zd.amax(dim=1) if n > 0 else lse_d
        invalid = ~torch.isfinite(row_max) | torch.isnan(zd).any(dim=1)
        entropy = torch.where(invalid, nan, entropy)
        margin = torch.where(invalid, nan, margin)
        true_margin = torch.where(invalid, nan, true_margin)
        grad_norm = torch.where(invalid, nan, grad_norm)
        confidence = torch.where(invalid, nan, confidence)
        if mms_out is not None:
            mms_out = torch.where(invalid, nan, mms_out)
    # The loss keeps its graph; invalid rows become NaN without cutting it.
    loss = torch.where(invalid & ~ignored, torch.full_like(loss, float("nan")), loss)
    lse = torch.where(invalid, torch.full_like(lse, float("nan")), lse)
    return Scores(loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms_out, lse.detach())


def score_backward_reference(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """d(sum_i g_i * loss_i) / d logits = g_i * (softmax(z_i) - onehot(y_i)), 0 on ignored rows."""
    acc = accumulate_dtype(logits.dtype)
    z = logits.to(acc)
    target = target.long()
    ignored = target == ignore_index
    y = torch.where(ignored, torch.zeros_like(target), target)
    p = (z - lse.to(acc)[:, None]).exp()
    grad = p.scatter_add(1, y[:, None], -torch.ones_like(p[:, :1]))
    g = torch.where(ignored, torch.zeros_like(grad_loss), grad_loss).to(acc)
    return (grad * g[:, None]).to(logits.dtype)

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
  computes the distances from the Gram form of centred rows in float64
  (``squared_class_distances``); the CPU kernel computes them from the difference of the
  rows (no cancellation); they agree to rounding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = ["Scores", "score_reference", "score_backward_reference", "accumulate_dtype",
           "centred_rows", "squared_class_distances"]


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


def centred_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``weight`` minus their mean, in float64, and their squared norms: the
    terms of ``squared_class_distances``, to compute once per call."""
    w = weight.double()
    w = w - w.mean(dim=0)
    return w, (w * w).sum(dim=1)


def squared_class_distances(weight: torch.Tensor, classes: Optional[torch.Tensor] = None, *,
                            centred: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``||w_a - w_j||^2`` for ``a`` in ``classes`` (every class when None) and every ``j``:
    [rows, C] float64, from the Gram form ``||w_a||^2 + ||w_j||^2 - 2 w_a.w_j``.
    ``centred``: ``centred_rows(weight)`` when the caller has it already.

    That form cancels when two class rows nearly coincide: in float32, rows 1e-3 apart
    relative to their norm came out ~10% off. So the rows are centred first (which
    changes no distance and removes what all rows share) and the Gram form is evaluated in
    float64, where products of float32 values are exact: the relative error of a distance
    is then ~1e-16 * ||w||^2 / ||w_a - w_j||^2. The difference of the rows, as the CPU
    kernel takes it, has no cancellation at all but costs a pass over D per pair.
    """
    w, sq = centred if centred is not None else centred_rows(weight)
    w_a = w if classes is None else w[classes]
    sq_a = sq if classes is None else sq[classes]
    return (sq_a[:, None] + sq[None, :] - 2.0 * (w_a @ w.T)).clamp_min_(0)


# Classes up to which _mms_exact computes the [C, C] distances once and gathers rows of
# it, rather than a [rows, C] Gram product per chunk of rows (8 MiB of float64 at 1024).
_MMS_TABLE_MAX_CLASSES = 1024


def _mms_exact(z: torch.Tensor, pred: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, c = z.shape
    out = torch.empty(n, dtype=z.dtype, device=z.device)
    centred = centred_rows(weight)
    table = None
    if c <= _MMS_TABLE_MAX_CLASSES and c <= n:
        table = squared_class_distances(weight, centred=centred).sqrt_().to(z.dtype)
    rows = max(1, (1 << 22) // max(c, 1))  # bound the [rows, C] temporaries
    for start in range(0, n, rows):
        zz = z[start:start + rows]
        a = pred[start:start + rows]
        dist = table[a] if table is not None else (
            squared_class_distances(weight, a, centred=centred).sqrt_().to(z.dtype))
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


# ---- selection ops (METHODS.md section 2) -----------------------------------------------
#
# Mirrors csrc/include/fastsel/selection_keys.h operation for operation; read the header
# for the design. Integers are int64 tensors holding uint32 (or smaller) values; float
# keys are computed in float32 one IEEE operation at a time, as in the kernels, so the
# same seed gives bit-identical keys and therefore the same indices on every backend.

_U32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
WORD_RACE_TIME = 2  # sample without replacement
WORD_BERNOULLI = 3  # percentile rule
MAX_SEED = (1 << 63) - 1


def _mulhilo32(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * x for a uint32 constant m and uint32 values x, in
    int64 arithmetic without overflow (x split into 16-bit halves)."""
    low = m * (x & 0xFFFF)          # < 2^48
    high = m * (x >> 16)            # < 2^48
    mid = low + ((high & 0xFFFF) << 16)  # < 2^49
    return (high >> 16) + (mid >> 32), mid & _U32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 (Salmon et al. 2011) of the counters (uint32 values in int64 tensors)
    under the key (k0, k1); returns the four output words as int64 tensors."""
    for _ in range(10):
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _U32
        k1 = (k1 + _PHILOX_W1) & _U32
    return c0, c1, c2, c3


def philox_block(seed: int, counter: int, index: torch.Tensor):
    """The four random words of elements ``index`` (int64) in call ``counter`` of ``seed``."""
    index = index.to(torch.int64)
    c0, c1 = index & _U32, index >> 32
    c2 = torch.full_like(index, counter & _U32)
    c3 = torch.full_like(index, counter >> 32)
    return philox4x32_10(c0, c1, c2, c3, seed & _U32, seed >> 32)


def open_unit_float(word: torch.Tensor) -> torch.Tensor:
    """(2 k + 1) 2^-24 with k the top 23 bits: uniform in (0, 1), exact in float32."""
    return (2 * (word >> 9) + 1).to(torch.float32) * 5.9604644775390625e-8


def unit_float(word: torch.Tensor) -> torch.Tensor:
    """k 2^-24 with k the top 24 bits: uniform in [0, 1), exact in float32."""
    return (word >> 8).to(torch.float32) * 5.9604644775390625e-8


def unit_double(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """53 random bits as a float64 in [0, 1)."""
    return ((hi << 21) | (lo >> 11)).to(torch.float64) * 1.1102230246251565e-16


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def neg_log_unit(u: torch.Tensor) -> torch.Tensor:
    """-log(u) of float32 u in (0, 1) by the header's fixed sequence of float32 operations
    (2 atanh series after splitting off the exponent), not by a library log."""
    bits = u.view(torch.int32).to(torch.int64) & _U32
    e = (bits >> 23) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)
    big = m > _f32(1.41421356)
    m = torch.where(big, m * _f32(0.5), m)
    e = torch.where(big, e + 1, e)
    f = m + _f32(-1.0)
    s = f / (f + _f32(2.0))
    z = s * s
    p = torch.full_like(z, 0.111111111)
    p = p * z + _f32(0.142857143)
    p = p * z + _f32(0.2)
    p = p * z + _f32(0.333333333)
    two_s = s * _f32(2.0)
    log_m = two_s + two_s * (p * z)
    log_u = e.to(torch.float32) * _f32(0.693147182) + log_m
    return -log_u


def _pow2f(p: torch.Tensor) -> torch.Tensor:
    """2^p (float32) for integer p in [-126, 127], from the exponent bits (exact)."""
    return ((p + 127) << 23).to(torch.int32).view(torch.float32)


def race_scale(w: torch.Tensor) -> torch.Tensor:
    """[2^a, 2^b] (float32) with 2^(a+b) = 2^-e, max(w) = f 2^e, a = floor(-e / 2): the
    common power-of-two factor that puts the largest importance in [0.5, 1) before the
    race divides by it (see the header's race_scale). Computed on w's device; [1, 1] when
    nothing is positive."""
    top = w.to(torch.float32).max() if w.numel() else torch.zeros((), device=w.device)
    e = torch.frexp(top).exponent.to(torch.int64)
    s = torch.where(top > 0, -e, torch.zeros_like(e))
    a = torch.div(s, 2, rounding_mode="floor")
    return torch.stack([_pow2f(a), _pow2f(s - a)])


def race_key_bits(importance: torch.Tensor, seed: int, counter: int) -> torch.Tensor:
    """Exponential-race keys: the float32 bits of E_i / (w_i 2^s) (int64 in [0, 2^32)),
    2^s = race_scale; all ones for zero importance. ``importance`` is used in float32."""
    w = importance.to(torch.float32)
    scale = race_scale(w)
    index = torch.arange(w.numel(), device=w.device)
    word = philox_block(seed, counter, index)[WORD_RACE_TIME]
    scaled = (w * scale[0]) * scale[1]
    key = neg_log_unit(open_unit_float(word)) / scaled
    bits = key.view(torch.int32).to(torch.int64) & _U32
    return torch.where(w > 0, bits, torch.full_like(bits, _U32))


def rank_key_bits(scores: torch.Tensor, largest: bool) -> torch.Tensor:
    """Order-preserving int64 keys of scores, smaller = better, NaN last, -0 == +0.
    float32 (and narrower) scores give uint32 keys; float64 scores give int64 keys."""
    if scores.dtype == torch.float64:
        b = (scores + 0.0).view(torch.int64)
        ascending = torch.where(b < 0, b ^ 0x7FFFFFFFFFFFFFFF, b)  # signed order = float order
        key = ~ascending if largest else ascending
        return torch.where(torch.isnan(scores), torch.full_like(key, MAX_SEED), key)
    x = scores.to(torch.float32)
    b = (x + _f32(0.0)).view(torch.int32).to(torch.int64) & _U32
    ascending = torch.where(b >= 0x80000000, (~b) & _U32, b | 0x80000000)
    key = ((~ascending) & _U32) if largest else ascending
    return torch.where(torch.isnan(x), torch.full_like(key, _U32), key)


def k_smallest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest keys, ordered by (key, index): ties keep the lowest index."""
    order = torch.sort(keys, stable=True).indices
    return order[:k]


def select_topk_reference(scores: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """The k best scores' indices, best first; ties: lowest index first; NaN ranks last."""
    return k_smallest(rank_key_bits(scores, largest), k)


def sample_without_replacement_reference(importance: torch.Tensor, k: int, seed: int,
                                         counter: int) -> torch.Tensor:
    """k distinct indices drawn with P ∝ importance (exponential race), in race order."""
    return k_smallest(race_key_bits(importance, seed, counter), k)


def replacement_weights(importance: torch.Tensor) -> torch.Tensor:
    """Integer weights q_i = trunc(w_i 2^shift) (int64) for sampling with replacement.

    ``shift`` puts the largest importance in [2^(B-1), 2^B) with B = 52 - bit_length(N),
    so sum q < 2^52 and every prefix sum is exact. Importances below max * 2^-B count as
    zero. The scale is computed on the tensor's device (no host synchronisation).
    """
    w = importance.to(torch.float32)
    n = w.numel()
    bits = 52 - n.bit_length()
    exponent = torch.frexp(w.max()).exponent.to(torch.int64)  # max = f 2^e, f in [0.5, 1)
    scale = torch.ldexp(torch.ones((), dtype=torch.float64, device=w.device), bits - exponent)
    q = (w.to(torch.float64) * scale).to(torch.int64)
    return torch.where(w > 0, q, torch.zeros_like(q))


def sample_with_replacement_reference(importance: torch.Tensor, k: int, seed: int,
                                      counter: int) -> torch.Tensor:
    """k indices drawn independently with P ∝ importance, in draw order: draw j takes the
    first i with cumsum(q)_i > t_j, t_j = min(trunc(u_j total), total - 1)."""
    cum = torch.cumsum(replacement_weights(importance), 0)
    total = cum[-1]
    draws = torch.arange(k, device=importance.device)
    r = philox_block(seed, counter, draws)
    t = (unit_double(r[0], r[1]) * total.to(torch.float64)).to(torch.int64)
    t = torch.minimum(t, total - 1)
    return torch.searchsorted(cum, t, right=True)


def percentile_reference(values: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """F_R(v) = #{h in history : h < v} / #history for each value (float32), NaN history
    entries ignored; NaN values give NaN; an empty history ranks every value at 1."""
    h = history[~torch.isnan(history)].to(torch.float64)
    v = values.to(torch.float64)
    if h.numel() == 0:
        out = torch.ones(v.shape, dtype=torch.float32, device=v.device)
    else:
        below = torch.searchsorted(torch.sort(h).values, v, side="left")
        out = below.to(torch.float32) / _f32(float(h.numel())).to(v.device)
    return torch.where(torch.isnan(v), torch.full_like(out, float("nan")), out)


def bernoulli_uniforms(n: int, seed: int, counter: int, device=None) -> torch.Tensor:
    """Uniforms in [0, 1) (float32) for the percentile rule's keep decisions."""
    r = philox_block(seed, counter, torch.arange(n, device=device))
    return unit_float(r[WORD_BERNOULLI])

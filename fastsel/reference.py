"""Pure-PyTorch definition of every fastsel op.

This module is the specification the kernels are tested against (run it on float64
inputs to get the oracle) and the ``backend="torch"`` fallback used when the C++
extension is not built. It favours clarity over speed: it materialises [N, C]
intermediates that the kernels never do. It is at least as exact as the kernels: every
score is computed from the row relative to its maximum, t_j = z_j - max(z), as they do.

Score definitions follow ``docs/methods.md``; conventions that the papers leave open are
fixed here and mirrored by every kernel:

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
  contributes 0 whatever the distance (the point is on the boundary), and a row without
  a finite competitor (top-2 margin +inf) is +inf. Every other row needs distances: a
  weight row holding NaN or +-inf has none, so such a row's MMS is NaN when the weight
  has a non-finite entry anywhere (``"exact"``: the minimum runs over every class) or in
  its predicted or runner-up class (``"top2"``). The distances come from the Gram form of
  centred rows in float64, rescaled by a power of two (``class_distances``), with the
  pairs that cancel recomputed from the difference of the rows, as the kernels do.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastsel.contract import MMS_MODES, MMS_NONE, MMS_OUTPUT, OUTPUT_NAMES, Scores, accumulate_dtype

__all__ = ["Scores", "score_reference", "score_forward_reference", "score_backward_reference", "accumulate_dtype",
           "CentredRows", "centred_rows", "class_distances", "pair_distances", "mms_from_distance",
           "mms_for_nonfinite_weight", "times_power_of_two", "unit_rows"]


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


# ---- class distances for the MMS --------------------------------------------------------


class CentredRows(NamedTuple):
    """What ``class_distances`` needs of a weight [C, D], computed once per call: ``raw``,
    the rows in float64 times 2^``exponent`` (a power of two that puts the largest finite
    entry in [0.5, 1), so that no square overflows or underflows whatever the weight's
    magnitude), non-finite rows zeroed; ``rows``, those centred on their mean; their
    squared norms; and which rows are finite."""

    rows: torch.Tensor
    sq_norms: torch.Tensor
    finite: torch.Tensor
    exponent: torch.Tensor
    raw: torch.Tensor


def times_power_of_two(t: torch.Tensor, k) -> torch.Tensor:
    """t * 2^k (k an int or an integer tensor), exact where the result is in range: in two
    steps, since 2^k itself may overflow (2^1029 for a subnormal float64)."""
    k = torch.as_tensor(k, device=t.device).to(torch.float64)
    half = torch.div(k, 2, rounding_mode="floor")
    one = torch.ones((), dtype=t.dtype, device=t.device)
    return t * torch.ldexp(one, half.to(t.dtype)) * torch.ldexp(one, (k - half).to(t.dtype))


def unit_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight in float64 times 2^e, e): e (a 0-d tensor) puts the largest finite entry in
    [0.5, 1) (e = 0 when no finite entry is nonzero); NaN and +-inf stay as they are."""
    w = weight.double()
    finite = torch.isfinite(w)
    top = torch.where(finite, w.abs(), 0).amax() if w.numel() else w.new_zeros(())
    e = -torch.frexp(top).exponent.to(torch.int64)
    return times_power_of_two(w, e), e


def centred_rows(weight: torch.Tensor) -> CentredRows:
    """The terms of ``class_distances``, to compute once per call."""
    w, e = unit_rows(weight)
    finite = torch.isfinite(w).all(dim=1)
    raw = torch.where(finite[:, None], w, 0.0)
    rows = raw - raw.mean(dim=0)
    return CentredRows(rows, (rows * rows).sum(dim=1), finite, e, raw)


# Pairs whose squared distance is below this fraction of ||w_a||^2 + ||w_j||^2 (centred)
# lose more than ~4 bits to cancellation in the Gram form, and pairs of rows whose
# squares come near float64's underflow (rows far smaller than the largest) lose them
# all: both are recomputed from the difference of the uncentred rows, scaled per pair,
# so that every distance is good to a few float64 ulps.
_CANCELLATION_RATIO = 1.0 / 16
_TINY_SQUARES = 2.0 ** -900
_RECOMPUTE_ELEMENTS = 1 << 22  # [pairs, D] temporaries of the recomputation


def _difference_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_i|| per row, each difference divided by its largest entry first."""
    diff = a - b
    top = diff.abs().amax(dim=1, keepdim=True)
    unit = diff / torch.where(top > 0, top, torch.ones_like(top))
    return top.squeeze(1) * (unit * unit).sum(dim=1).sqrt()


def _recompute_flagged(dist: torch.Tensor, flagged: torch.Tensor, raw_a: torch.Tensor, raw: torch.Tensor, *,
                       on_host: bool) -> torch.Tensor:
    """``dist`` [rows, C] with the ``flagged`` pairs' distances taken from the difference of
    the rows ``raw_a`` [rows, D] and ``raw`` [C, D]: on the host only the flagged pairs, each
    difference scaled by its own largest entry; on an accelerator, where a data-dependent
    shape (``nonzero``) would make the host wait, every pair's difference by ``cdist``."""
    if on_host:
        dist = dist.clone()
        pairs = flagged.nonzero()
        chunk = max(1, _RECOMPUTE_ELEMENTS // max(1, raw.shape[1]))
        for k in range(0, pairs.shape[0], chunk):
            r, j = pairs[k:k + chunk].unbind(1)
            dist[r, j] = _difference_norms(raw_a[r], raw[j])
        return dist
    direct = torch.cdist(raw_a, raw, compute_mode="donot_use_mm_for_euclid_dist")
    return torch.where(flagged, direct, dist)


def class_distances(weight: torch.Tensor, classes: Optional[torch.Tensor] = None, *,
                    centred: Optional[CentredRows] = None) -> torch.Tensor:
    """``||w_a - w_j||`` for ``a`` in ``classes`` (every class when None) and every ``j``:
    [rows, C] float64; NaN for a pair with a non-finite row. ``centred``:
    ``centred_rows(weight)`` when the caller has it already.

    From the Gram form ``||w_a||^2 + ||w_j||^2 - 2 w_a.w_j`` of centred rows (centring
    changes no distance and removes what all rows share) in float64, where products of
    float32 values are exact. The form cancels when two rows nearly coincide (in
    float32, rows 1e-3 apart relative to their norm came out ~10% off): those pairs, and
    pairs of rows too small for their squares, are recomputed from the difference of the
    rows (on CPU tensors each flagged pair, scaled by its own largest entry; on an
    accelerator every pair's difference, so that no host sync is needed, with the
    weight-wide scale: there rows 1e-150 times smaller than the largest lose digits).
    """
    c = centred if centred is not None else centred_rows(weight)
    pick = (lambda t: t) if classes is None else (lambda t: t[classes])
    w_a, sq_a = pick(c.rows), pick(c.sq_norms)
    both = sq_a[:, None] + c.sq_norms[None, :]
    d2 = (both - 2.0 * (w_a @ c.rows.T)).clamp_min_(0)
    raw_a = pick(c.raw)
    nonzero = (raw_a != 0).any(dim=1)[:, None] | (c.raw != 0).any(dim=1)[None, :]
    flagged = ((d2 < both * _CANCELLATION_RATIO) | (both < _TINY_SQUARES)) & nonzero
    dist = _recompute_flagged(d2.sqrt_(), flagged, raw_a, c.raw, on_host=d2.device.type == "cpu")
    dist = times_power_of_two(dist, -c.exponent)
    finite_a = pick(c.finite)
    return torch.where(finite_a[:, None] & c.finite[None, :], dist, float("nan"))


def pair_distances(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||w_a - w_b|| (float64) for index vectors a, b, from the difference of the rows (no
    cancellation), each difference divided by its largest entry (no overflow or
    underflow); NaN for a pair with a non-finite row."""
    w = weight.double()
    finite = torch.isfinite(w).all(dim=1)
    dist = _difference_norms(torch.where(finite[:, None], w, 0.0)[a], torch.where(finite[:, None], w, 0.0)[b])
    return torch.where(finite[a] & finite[b], dist, float("nan"))


def mms_from_distance(margin: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """The top-2 MMS, margin / distance, with the rows that need no distance: 0 for a tie
    (margin 0), +inf without a finite competitor (margin +inf). NaN margins (invalid
    rows) stay NaN."""
    quotient = (margin.double() / distance.double()).to(margin.dtype)  # a float64 distance may exceed float32
    return torch.where(margin == 0, torch.zeros_like(margin),
                       torch.where(margin == float("inf"), margin, quotient))


def mms_for_nonfinite_weight(mms: torch.Tensor, margin: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                             all_finite: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact MMS under the rule for a weight with a NaN or +-inf entry: NaN wherever a
    distance is needed (see the module doc); ``mms`` where the weight is finite
    (``all_finite``, a 0-d bool tensor, when the caller has it). On the weight's device,
    without reading anything on the host."""
    if all_finite is None:
        all_finite = torch.isfinite(weight).all()
    nan = torch.full_like(margin, float("nan"))
    return torch.where(all_finite, mms, mms_from_distance(margin, nan))


# Classes up to which _mms_exact computes the [C, C] distances once and gathers rows of
# it, rather than a [rows, C] Gram product per chunk of rows (8 MiB of float64 at 1024).
_MMS_TABLE_MAX_CLASSES = 1024


def _mms_exact(z: torch.Tensor, pred: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, c = z.shape
    out = torch.empty(n, dtype=z.dtype, device=z.device)
    centred = centred_rows(weight)
    table = None
    if c <= _MMS_TABLE_MAX_CLASSES and c <= n:
        table = class_distances(weight, centred=centred)
    rows = max(1, (1 << 22) // max(c, 1))  # bound the [rows, C] temporaries
    for start in range(0, n, rows):
        zz = z[start:start + rows]
        a = pred[start:start + rows]
        dist = table[a] if table is not None else class_distances(weight, a, centred=centred)
        # z_a - z_j in z's dtype (the kernels' gap), the quotient in float64 (a float64
        # distance may lie beyond float32's range), rounded once to z's dtype
        diff = zz.gather(1, a[:, None]) - zz
        ratio = torch.where(diff == 0, torch.zeros_like(dist), diff.double() / dist)
        ratio = ratio.scatter(1, a[:, None], float("inf"))
        out[start:start + rows] = ratio.min(dim=1).values.to(z.dtype)
    return out


# ---- the scores ---------------------------------------------------------------------------


_MMS_NAMES = {mode: name for name, mode in MMS_MODES.items()}


def score_forward_reference(logits, target, ignore_index, weight, mms_mode, max_distance=None) -> tuple:
    """``score_reference`` with the scoring op's arguments and outputs (the tuple of
    ``fastsel.contract.SCORE_OUTPUTS``; ``mms`` an empty [0] tensor when ``mms_mode`` is
    0). ``max_distance`` only prunes the compiled exact search: it changes no value."""
    if mms_mode == MMS_NONE:
        s = score_reference(logits, target, ignore_index, None)
        # the empty mms as a view of lse: no allocation on this per-call path
        return (*s[:MMS_OUTPUT], s.lse[:0], *s[MMS_OUTPUT + 1:len(OUTPUT_NAMES)])
    if mms_mode not in _MMS_NAMES:
        raise ValueError(f"mms_mode must be {MMS_NONE} (none) or one of {_MMS_NAMES}, got {mms_mode}")
    return score_reference(logits, target, ignore_index, weight, _MMS_NAMES[mms_mode])[:len(OUTPUT_NAMES)]


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

    Every value comes from t_j = z_j - m (m the row's maximum) and d = sum_j exp(t_j)
    split as n_eq + d_sub (the maxima apart): log d = log1p(d - 1) keeps the loss and
    1 - p_y of confident rows (loss 1e-20, not 0) and the log 2 of two tied maxima at
    1e308 (which lse = m + log d rounds away); a span that overflows (t_j = -inf for
    z_j = -1e308 against m = 1e308) is a class of zero probability. The loss's value is
    this one; its gradient is that of m + log sum_j exp(z_j - m) (m a constant), so
    second and higher derivatives are PyTorch's own.
    """
    acc = accumulate_dtype(logits.dtype)
    z = logits.to(acc)
    n, c = z.shape
    target = target.long()
    ignored = target == ignore_index
    y = torch.where(ignored, torch.zeros_like(target), target)

    with torch.no_grad():
        zd = z.detach()
        row_max = zd.amax(dim=1) if n > 0 else zd.new_empty(0)
        # Invalid rows: NaN or +inf anywhere, or no finite maximum at all.
        invalid = ~torch.isfinite(row_max) | torch.isnan(zd).any(dim=1)
        m = torch.where(invalid, torch.zeros_like(row_max), row_max)  # keeps inf - inf out
        t = zd - m[:, None]  # <= 0 on valid rows
        at_max = t == 0
        e = torch.where(at_max, torch.ones_like(t), t.exp())  # exp(t_j); exactly 1 at the maxima
        e_sub = torch.where(at_max, torch.zeros_like(e), e)
        n_eq = at_max.sum(dim=1).to(acc)
        dm1 = (n_eq - 1.0) + e_sub.sum(dim=1)  # d - 1, exact for the maxima
        d = dm1 + 1.0
        log_d = torch.log1p(dm1)
        lse = m + log_d
        # -sum p log p = log d - sum exp(t) t / d; a zero-probability class adds nothing
        et = torch.where(e > 0, e * t, torch.zeros_like(t))
        entropy = log_d - et.sum(dim=1) / d
        confidence = 1.0 / d

        z_y = zd.gather(1, y[:, None]).squeeze(1)
        t_y = t.gather(1, y[:, None]).squeeze(1)
        loss_value = (m - z_y) + log_d
        # ||p - onehot(y)|| d = ||(d - e_y, e_j for j != y)||, with d - e_y = d - 1 when y is
        # a maximum (exact) and >= 1 otherwise (no cancellation either way); the vector is
        # divided by its largest entry first, so that no square underflows (1 - p_y = 1e-300)
        e_y = e.gather(1, y[:, None]).squeeze(1)
        one_minus_py = torch.where(t_y == 0, dm1, d - e_y)
        others = e.scatter(1, y[:, None], 0.0)
        top = torch.maximum(one_minus_py, others.amax(dim=1) if c > 1 else torch.zeros_like(d))
        top = torch.where(top > 0, top, torch.ones_like(top))
        ratio = others / top[:, None]
        grad_norm = top * ((one_minus_py / top) ** 2 + (ratio * ratio).sum(dim=1)).sqrt() / d

        v1, i1, v2, i2 = _top2(zd)
        margin = v1 - v2
        runner_up_of_y = torch.where(y == i1, v2, v1)
        true_margin = z_y - runner_up_of_y
        pred = zd.argmax(dim=1) if n > 0 else torch.zeros(0, dtype=torch.long, device=z.device)

        nan = torch.full_like(m, float("nan"))
        true_margin = torch.where(ignored, nan, true_margin)
        grad_norm = torch.where(ignored, nan, grad_norm)

        mms_out = None
        if weight is not None:
            if mms == "top2":
                dist = pair_distances(weight, i1, i2) if c > 1 else torch.ones_like(margin)
                mms_out = mms_from_distance(margin, dist)
            else:
                mms_out = _mms_exact(zd, i1, weight) if n > 0 else torch.empty(0, dtype=acc, device=z.device)
                mms_out = mms_for_nonfinite_weight(mms_out, margin, weight)

        entropy = torch.where(invalid, nan, entropy)
        margin = torch.where(invalid, nan, margin)
        true_margin = torch.where(invalid, nan, true_margin)
        grad_norm = torch.where(invalid, nan, grad_norm)
        confidence = torch.where(invalid, nan, confidence)
        lse = torch.where(invalid, nan, lse)
        if mms_out is not None:
            mms_out = torch.where(invalid, nan, mms_out)

    # The loss: its graph is m + log sum exp(z - m) - z_y (m constant: the gradient is the
    # exact softmax - onehot), its value loss_value (the graph's value rounds log d away
    # where d - 1 is tiny against 1, or log 2 against m = 1e308).
    # An ignored row's logits take no part in the graph (they may hold NaN or +-inf): its
    # gradient is exactly 0, as the kernels give, not 0 * NaN.
    z = torch.where(ignored[:, None], torch.zeros_like(z), z)
    m = torch.where(ignored, torch.zeros_like(m), m)
    graph = (m + torch.log(torch.exp(z - m[:, None]).sum(dim=1))) - z.gather(1, y[:, None]).squeeze(1)
    correction = (loss_value - graph).detach()
    correction = torch.where(torch.isfinite(correction), correction, torch.zeros_like(correction))
    loss = torch.where(ignored, torch.zeros_like(graph), graph + correction)
    # Invalid rows become NaN without cutting the graph.
    loss = torch.where(invalid & ~ignored, torch.full_like(loss, float("nan")), loss)
    return Scores(loss=loss, entropy=entropy, margin=margin, true_margin=true_margin, grad_norm=grad_norm,
                  confidence=confidence, pred=pred, mms=mms_out, lse=lse)


def cross_entropy_options(
    logits: torch.Tensor,
    target: torch.Tensor,
    scores: Scores,
    ignore_index: int = -100,
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``F.cross_entropy(logits, target, weight, ignore_index=ignore_index,
    reduction="none", label_smoothing=label_smoothing)`` from the plain cross-entropy
    ``scores.loss`` = lse - z_y of the same rows (any producer of ``Scores``).

    With class weights w (all ones if None) and e = label_smoothing, the target is
    (1 - e) onehot(y) + e / C, each class weighted by its w:

        loss_i = (1 - e) w_y ce_i + (e / C) sum_j w_j t_ij,   t_ij = lse_i - z_ij = -log p_ij,

    and 0 on rows whose target is ``ignore_index``. Class weights cost a gather. The
    smoothing term reads the logits twice more (the row maximum, then t) into one [N, C]
    temporary in the scores' dtype: t_ij is formed as
    (lse_i - m_i) + (m_i - z_ij), m_i the row's maximum, both parts >= 0, so neither
    cancels nor overflows where the logits are huge (lse - m = log d is taken from
    ``scores.confidence`` = 1 / d, to full precision). Its gradient flows through
    ``scores.loss``'s own autograd (d(lse)/dz = d(ce + z_y)/dz) and the linear map
    m - z, so second derivatives are there too. On a row whose true class has z_y = -inf
    (an infinite loss) ce + z_y is undefined: the value is still right, but the
    gradient lacks the smoothing term's part through lse (e W / C times the softmax).
    """
    ce = scores.loss
    acc = ce.dtype
    target = target.long()
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    zero = torch.zeros((), dtype=acc, device=ce.device)
    w = None if weight is None else weight.to(acc)
    w_y = None if w is None else w.gather(0, y)
    hard = ce if w_y is None else ce * w_y
    if label_smoothing == 0:
        return torch.where(valid, hard, zero)
    n, c = logits.shape
    e = float(label_smoothing)
    zd = logits.detach()
    m = zd.amax(dim=1).to(acc) if n > 0 else ce.new_zeros(0)
    m = torch.where(torch.isfinite(m), m, zero)  # rows without a finite maximum are NaN through ce
    z_y = logits.gather(1, y[:, None]).squeeze(1).to(acc)
    carrier = ce + (z_y - m)  # lse - m, with the gradient of lse
    log_d = -torch.log(scores.confidence.to(acc).detach())  # the same value, to full precision
    lse_rel = torch.where(torch.isfinite(carrier), log_d + (carrier - carrier.detach()), log_d)
    t = (m[:, None] - logits).add_(lse_rel[:, None])  # -log p_ij in the scores' dtype: the one temporary
    if w is not None:
        t = t * w if w.requires_grad else t.mul_(w)  # in place unless w's gradient needs t
    smooth = t.sum(dim=1) / c
    loss = (1.0 - e) * hard + e * smooth
    return torch.where(valid, loss, zero)


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


# ---- selection ops (docs/methods.md section 2) -----------------------------------------------
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
        below = torch.searchsorted(torch.sort(h).values, v.contiguous(), side="left")
        out = below.to(torch.float32) / _f32(float(h.numel())).to(v.device)
    return torch.where(torch.isnan(v), torch.full_like(out, float("nan")), out)


def bernoulli_uniforms(n: int, seed: int, counter: int, device=None) -> torch.Tensor:
    """Uniforms in [0, 1) (float32) for the percentile rule's keep decisions."""
    r = philox_block(seed, counter, torch.arange(n, device=device))
    return unit_float(r[WORD_BERNOULLI])

"""Fused one-pass scoring of logits [N, C] in Triton (every score of docs/methods.md section 1).

Each row is read once, in column blocks of ``BLOCK_C``, by a program that owns ``BLOCK_N``
rows. Per row the kernel carries the state of ``csrc/include/fastsel/row_scores.h``:

Softmax statistics relative to the running maximum m of the finite logits::

    n_eq  = #{j : z_j == m}                       (each contributes exp(0) = 1)
    d_sub = sum_{z_j < m} exp(z_j - m)
    s1    = sum_{z_j < m} exp(z_j - m) (z_j - m)    (<= 0)
    s2    = sum_{z_j < m} exp(2 (z_j - m)) U      (U = S2_ROOT^2: 2^100 in float32, 2^960 in float64)

(s2 carries U so that a confident row's squares, exp(z_j - m) < 2^-63 in float32, do not
underflow: grad_norm keeps its relative accuracy), so that d = sum_j exp(z_j - m) = n_eq + d_sub and d - 1 = (n_eq - 1) + d_sub is exact:
log d = log1p(d - 1) and 1 - p_y keep their relative accuracy on confident rows, where
p_(1) rounds to 1 and a plain sum would give loss 0 and grad_norm 0. As on the CPU
(``csrc/cpu/score_kernel.cpp``) the maximum is updated once per block: the block's
maximum b is found first; if it exceeds m, the state is rebased from m to m' = b,

    delta = m - m' (< 0),   scale = exp(delta),   d_old = n_eq + d_sub,
    s1 <- (s1 + delta d_old) scale,   d_sub <- d_old scale,
    s2 <- (s2 + n_eq U) scale^2,      n_eq <- 0,

(the old maxima move below the new one; s1, being relative to m, gains delta per unit
of mass), then the block's elements are summed relative to m' with one exp each.

Top-2 values and indices with the lowest index first among ties (``torch.argmax``):
each block's top-1 is its maximum and the smallest column holding it, its runner-up the
maximum of the block with that column removed; blocks arrive in column order, so when
merging into the running top-2 the running entries win ties.

Finalization (L = log1p(d - 1)), as ``finalize_row`` in ``row_scores.h``::

    lse = m + L,   loss = (m - z_y) + L,   entropy = L - s1 / d  (= lse - sum_j p_j z_j),
    confidence = 1 / d  (= exp(z_(1) - lse)),   margin = v1 - v2,
    true_margin = z_y - (v2 if y == i1 else v1),
    ||p - onehot(y)||^2 d^2 U = ((d - e_y) S2_ROOT)^2 + (n_eq U + s2 - (e_y S2_ROOT)^2)
        (e_y = exp(z_y - m)), and when z_y == m: ((d - 1) S2_ROOT)^2 + ((n_eq - 1) U + s2),
        both without cancellation (unscaled where the first square overflows).

Conventions of ``fastsel.reference`` (the specification): a row with NaN or +inf, or
only -inf, is invalid and all its float scores are NaN except ``loss = 0`` when ignored;
``pred`` is then the first NaN if any (``torch.argmax`` ranks NaN first), else the first
maximum. NaN is kept out of every comparison and sum and tracked as its first index;
+inf takes part in the top-2 (so ``pred`` is the first +inf) but not in the sums. Rows
whose target is ``ignore_index`` get ``loss = 0`` and NaN ``true_margin`` / ``grad_norm``.

The Minimal Margin Score (Weinstein, Fine & Hel-Or) is added after the pass:
``mms_mode == 1`` (exact) by the kernel of ``mms_exact.py``, ``mms_mode == 2`` (top2)
from the margin and the runner-up index that this kernel records.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastsel.contract import MMS_EXACT, MMS_NONE, MMS_TOP2, OUTPUT_NAMES, SCORE_OUTPUTS, empty_outputs
from fastsel.triton._launch import check_device, device_guard, num_warps_for, tile_shape
from fastsel.reference import mms_for_nonfinite_weight, mms_from_distance, pair_distances
from fastsel.triton.mms_exact import mms_exact_triton

__all__ = ["score_forward_triton", "MMS_NONE", "MMS_EXACT", "MMS_TOP2"]


@triton.jit
def _log1p_nonnegative(x):
    """log(1 + x) for x >= 0, accurate for small x.

    ``tl.log(1 + x)`` rounds 1 + x first and loses a small x (all of it below 2^-24 in
    float32): exactly the relative accuracy that the exact d - 1 of the state was built
    for. The Goldberg correction log(u) x / (u - 1) needs a correctly rounded log, which
    GPU backends do not promise (approximate log has an absolute error near 1). Instead,
    with s = x / (2 + x), log(1 + x) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + s^7/7 + s^9/9
    + ...): for x < 1/16, s < 0.031 and the first omitted term is below 1e-16 relative.
    Larger x use log directly (log(1 + x) > 0.06, so an absolute error there is a small
    relative one). Runs once per row, so the divisions by exact integers (constants
    exact in every dtype) cost nothing.
    """
    s = x / (x + 2)
    s2 = s * s
    series = 2 * s * (1 + s2 / 3 + (s2 * s2) / 5 + (s2 * s2 * s2) / 7 + (s2 * s2 * s2 * s2) / 9)
    return tl.where(x < 0.0625, series, tl.log(1 + x))


@triton.jit
def _score_forward_kernel(
    logits_ptr, target_ptr,
    # the outputs of fastsel.contract.SCORE_OUTPUTS but mms, in the contract's order
    loss_ptr, entropy_ptr, margin_ptr, true_margin_ptr, grad_norm_ptr, confidence_ptr,
    pred_ptr, lse_ptr, runner_up_ptr,
    n_rows, n_classes, stride_row, stride_col, stride_target, ignore_index,
    TRACK_RUNNER_UP_INDEX: tl.constexpr,  # mms="top2" needs i2 (written to runner_up_ptr)
    LOG2_S2_ROOT: tl.constexpr,  # log2 of the square root of s2's scale U (module docstring)
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_dtype = loss_ptr.dtype.element_ty  # float32, or float64 for float64 logits
    neg_inf = float("-inf")
    pos_inf = float("inf")

    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row  # int64 offsets: N * stride may exceed 2^31
    offs = tl.arange(0, BLOCK_C)

    # SoftmaxState of every row (see the module docstring).
    m = tl.full([BLOCK_N], neg_inf, acc_dtype)
    n_eq = tl.zeros([BLOCK_N], acc_dtype)
    d_sub = tl.zeros([BLOCK_N], acc_dtype)
    s1 = tl.zeros([BLOCK_N], acc_dtype)
    s2 = tl.zeros([BLOCK_N], acc_dtype)
    # S2_ROOT in acc_dtype (a float literal would be float32, where 2^480 overflows)
    s2_root = tl.exp2(tl.zeros([BLOCK_N], acc_dtype) + LOG2_S2_ROOT)
    s2_unit = s2_root * s2_root
    # Top-2 (NaN excluded, +inf included). i1 starts at 0: a row of only -inf has
    # torch.argmax 0, and any larger value replaces the initial entry.
    v1 = tl.full([BLOCK_N], neg_inf, acc_dtype)
    v2 = tl.full([BLOCK_N], neg_inf, acc_dtype)
    i1 = tl.zeros([BLOCK_N], tl.int32)
    i2 = tl.zeros([BLOCK_N], tl.int32)
    first_nan = tl.full([BLOCK_N], n_classes, tl.int32)  # n_classes: no NaN seen

    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + offs
        col_mask = cols < n_classes
        mask = row_mask[:, None] & col_mask[None, :]
        ptrs = row_ptrs[:, None] + cols[None, :].to(tl.int64) * stride_col
        x = tl.load(ptrs, mask=mask, other=neg_inf).to(acc_dtype)

        is_nan = x != x
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, cols[None, :], n_classes), axis=1))
        x_num = tl.where(is_nan, neg_inf, x)  # padding is -inf too

        # Block top-2 with the lowest column first among ties.
        b1 = tl.max(x_num, axis=1)
        bi1 = tl.min(tl.where(x_num == b1[:, None], cols[None, :], n_classes), axis=1)
        is_bi1 = cols[None, :] == bi1[:, None]
        x_rest = tl.where(is_bi1, neg_inf, x_num)
        b2 = tl.max(x_rest, axis=1)
        # Merge: running entries have lower columns, so they win ties (strict >).
        block_leads = b1 > v1
        second_from_block = tl.where(block_leads, b2 > v1, b1 > v2)
        new_v2 = tl.where(block_leads, tl.where(second_from_block, b2, v1),
                          tl.where(second_from_block, b1, v2))
        if TRACK_RUNNER_UP_INDEX:
            bi2 = tl.min(tl.where((x_rest == b2[:, None]) & ~is_bi1, cols[None, :], n_classes), axis=1)
            i2 = tl.where(block_leads, tl.where(second_from_block, bi2, i1),
                          tl.where(second_from_block, bi1, i2))
        v2 = new_v2
        v1 = tl.where(block_leads, b1, v1)
        i1 = tl.where(block_leads, bi1, i1)

        # Rebase the softmax state to the new maximum. A block holding +inf does not
        # move m (the row is invalid; this keeps inf - inf out of the arithmetic).
        block_max = tl.where(b1 < pos_inf, b1, neg_inf)
        new_m = tl.maximum(m, block_max)
        rebase = (new_m > m) & (m > neg_inf)  # from -inf there is nothing to rescale
        delta = tl.where(rebase, m, 0.0) - tl.where(rebase, new_m, 0.0)  # 0 when not rebasing
        scale = tl.exp(delta)
        d_old = n_eq + d_sub
        # scale 0 (a span that overflows: delta = -inf): the old terms vanish, s1 too
        s1 = tl.where(rebase, tl.where(scale > 0, (s1 + delta * d_old) * scale, 0.0), s1)
        d_sub = tl.where(rebase, d_old * scale, d_sub)
        s2 = tl.where(rebase, (s2 + n_eq * s2_unit) * (scale * scale), s2)
        n_eq = tl.where(rebase, 0.0, n_eq)
        m = new_m

        # Sums of the block relative to m: maxima are counted, smaller finite values summed.
        # (-inf has zero probability; NaN and +inf fail both comparisons.)
        m_ref = tl.where(m > neg_inf, m, 0.0)[:, None]
        finite_below_inf = x > neg_inf
        at_max = finite_below_inf & (x == m_ref)
        below = finite_below_inf & (x < m_ref)
        t = tl.where(below, x, m_ref) - m_ref  # z_j - m <= 0 where summed, 0 elsewhere
        e = tl.where(below, tl.exp(t), 0.0)
        n_eq += tl.sum(at_max.to(acc_dtype), axis=1)
        d_sub += tl.sum(e, axis=1)
        s1 += tl.sum(tl.where(e > 0, e * t, 0.0), axis=1)  # t = -inf where z_j - m overflows: e = 0
        scaled = e * s2_root[:, None]
        s2 += tl.sum(scaled * scaled, axis=1)

    # ---- finalize (row_scores.h: finalize_row) ----
    has_nan = first_nan < n_classes
    valid = (v1 > neg_inf) & (v1 < pos_inf) & ~has_nan
    pred = tl.where(has_nan, first_nan, i1)

    target = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
    ignored = target == ignore_index
    # Out-of-range targets are reported by the caller; clamp so the load stays in bounds.
    y = tl.where(ignored, 0, tl.minimum(tl.maximum(target, 0), n_classes - 1))
    z_y = tl.load(row_ptrs + y * stride_col, mask=row_mask, other=0.0).to(acc_dtype)

    # Invalid rows get a harmless state (their scores are replaced by NaN below), so that
    # no inf - inf or log(0) is evaluated.
    m = tl.where(valid, m, 0.0)
    n_eq = tl.where(valid, n_eq, 1.0)
    d_sub = tl.where(valid, d_sub, 0.0)
    s1 = tl.where(valid, s1, 0.0)
    s2 = tl.where(valid, s2, 0.0)
    v1 = tl.where(valid, v1, 0.0)
    v2 = tl.where(valid, v2, 0.0)
    z_y = tl.where(valid, z_y, 0.0)

    d = n_eq + d_sub
    d_minus_1 = (n_eq - 1.0) + d_sub  # exact for the maxima
    log_d = _log1p_nonnegative(d_minus_1)
    lse = m + log_d
    entropy = log_d - s1 / d
    confidence = 1.0 / d
    margin = v1 - v2  # v2 = -inf without a runner-up (C = 1): +inf
    loss = (m - z_y) + log_d
    true_margin = z_y - tl.where(y == i1, v2, v1)
    # grad_norm * d = sqrt((d (1 - p_y))^2 + d^2 sum_{j != y} p_j^2), see module docstring.
    target_is_max = z_y == m
    e_y = tl.exp(tl.where(target_is_max, 0.0, z_y - m))  # z_y <= m on valid rows
    one_minus_py = tl.where(target_is_max, d_minus_1, d - e_y)
    e_y_scaled = e_y * s2_root
    rest_sq = tl.where(target_is_max, (n_eq - 1.0) * s2_unit + s2, (n_eq * s2_unit + s2) - e_y_scaled * e_y_scaled)
    rest_sq = tl.maximum(rest_sq, 0.0)
    g = one_minus_py * s2_root
    scaled_norm = tl.sqrt(g * g + rest_sq) / s2_root
    plain_norm = tl.sqrt(one_minus_py * one_minus_py + rest_sq / s2_unit)
    # >= 1 - p_y, which it stays where even the scaled squares underflow (row_scores.h)
    grad_norm = tl.maximum(tl.where(scaled_norm < pos_inf, scaled_norm, plain_norm), one_minus_py) / d

    nan = float("nan")
    loss = tl.where(ignored, 0.0, tl.where(valid, loss, nan))
    target_ok = valid & ~ignored
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(entropy_ptr + rows, tl.where(valid, entropy, nan), mask=row_mask)
    tl.store(margin_ptr + rows, tl.where(valid, margin, nan), mask=row_mask)
    tl.store(true_margin_ptr + rows, tl.where(target_ok, true_margin, nan), mask=row_mask)
    tl.store(grad_norm_ptr + rows, tl.where(target_ok, grad_norm, nan), mask=row_mask)
    tl.store(confidence_ptr + rows, tl.where(valid, confidence, nan), mask=row_mask)
    tl.store(lse_ptr + rows, tl.where(valid, lse, nan), mask=row_mask)
    tl.store(pred_ptr + rows, pred.to(tl.int64), mask=row_mask)
    if TRACK_RUNNER_UP_INDEX:
        tl.store(runner_up_ptr + rows, i2.to(tl.int64), mask=row_mask)


def _mms_top2(margin: torch.Tensor, pred: torch.Tensor, runner_up: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
    """margin / ||w_(1) - w_(2)||, the distance taken from the difference (no cancellation;
    ``fastsel.reference.pair_distances``, NaN for a non-finite weight row).

    0 when margin == 0 (a tie is on the boundary). Without a runner-up (C = 1, or only
    -inf besides the maximum) margin is +inf and so is the MMS; invalid rows have a NaN
    margin and stay NaN. ``pred`` equals i1 on every valid row.
    """
    return mms_from_distance(margin, pair_distances(weight, pred, runner_up))


def score_forward_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    weight: Optional[torch.Tensor],
    mms_mode: int,
    *,
    block_c: Optional[int] = None,
    block_n: Optional[int] = None,
) -> tuple[torch.Tensor, ...]:
    """All scores of ``logits`` [N, C] against ``target`` [N] on the Triton backend.

    Same contract as ``torch.ops.fastsel.score_forward``: returns the outputs of
    ``fastsel.contract.SCORE_OUTPUTS`` in order, float32 (float64 for float64
    logits), ``pred`` int64, ``mms`` an empty [0] tensor when ``mms_mode == 0``
    (1: exact, 2: top2; both need ``weight`` [C, D]). Inputs are assumed validated by
    the caller (``fastsel.score``); out-of-range targets are clamped, never reported,
    since reporting would need a host sync. Any strides are read in place (no copies).
    ``block_c`` / ``block_n`` override the tile shape (powers of two; tests, tuning).
    """
    if logits.dim() != 2 or target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"score_forward_triton: expected logits [N, C] and target [N], got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if mms_mode not in (MMS_NONE, MMS_EXACT, MMS_TOP2):
        raise ValueError(f"score_forward_triton: mms_mode must be 0, 1 or 2, got {mms_mode}")
    if mms_mode != MMS_NONE and weight is None:
        raise ValueError(f"score_forward_triton: mms_mode {mms_mode} needs a weight")
    check_device(logits, "score_forward_triton")
    n_rows, n_classes = logits.shape
    out = dict(zip(OUTPUT_NAMES, empty_outputs(logits, MMS_NONE)))  # the MMS, if any, is computed below
    acc_dtype = out["loss"].dtype
    # what the kernel writes: every output but the MMS, in the contract's order (that of
    # the kernel's output pointers)
    written = [out[o.name] for o in SCORE_OUTPUTS if o.kind != "mms"]
    track_runner_up = mms_mode == MMS_TOP2
    runner_up = torch.empty(n_rows if track_runner_up else 0, dtype=torch.int64, device=logits.device)
    if n_rows == 0:
        return tuple(out.values())

    tile_n, tile_c = tile_shape(n_rows, n_classes, block_c, block_n)
    with device_guard(logits):
        _score_forward_kernel[(triton.cdiv(n_rows, tile_n),)](
            logits, target, *written,
            runner_up if track_runner_up else out["pred"],  # unused pointer when not tracked
            n_rows, n_classes, logits.stride(0), logits.stride(1), target.stride(0), ignore_index,
            TRACK_RUNNER_UP_INDEX=track_runner_up,
            LOG2_S2_ROOT=480.0 if acc_dtype == torch.float64 else 50.0,
            BLOCK_N=tile_n, BLOCK_C=tile_c,
            num_warps=num_warps_for(tile_n, tile_c),
        )

    margin, pred, lse = out["margin"], out["pred"], out["lse"]
    if mms_mode != MMS_NONE:
        with torch.no_grad():  # a score, never differentiated: do not record the weight ops
            # distances in float64 from the weight as given (a float64 weight may lie beyond
            # float32's range); the MMS in the score dtype
            w = weight if weight.dtype == torch.float64 else weight.to(acc_dtype)
            if mms_mode == MMS_TOP2:
                mms = _mms_top2(margin, pred, runner_up, w)
            else:
                mms = mms_exact_triton(logits, pred, lse, w, block_c=block_c, block_n=block_n)
                mms = mms_for_nonfinite_weight(mms, margin, w)
        out["mms"] = mms
    return tuple(out.values())

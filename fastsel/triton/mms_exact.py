"""Exact Minimal Margin Score (Weinstein, Fine & Hel-Or) in Triton.

For a linear head z = W h + b and prediction a = pred, the smallest displacement of the
features h that makes class j tie with a has length (z_a - z_j) / ||w_a - w_j|| (the
bias cancels along the normal w_a - w_j); the MMS is the minimum over j != a
(docs/methods.md section 1). Following ``fastsel.reference``:

* ||w_a - w_j|| from the Gram form of centred rows in float64, cancelling pairs
  recomputed from the difference (``fastsel.reference.class_distances``; in float32 the
  Gram form cancels for near-duplicate classes): one matrix product on the device (torch
  ops), turned into inverse distances q = 1 / ||w_a - w_j|| (inf for identical rows, NaN
  for a non-finite weight row), so the kernel multiplies instead of divides;
* a tie z_a == z_j contributes 0 whatever the distance (the point is on the boundary);
* no competitor (C = 1) gives +inf; invalid rows (NaN lse) give NaN.

The inverse distances are dense [C, C] (row = class a) when C <= MMS_DENSE_MAX_CLASSES.
Above, [C, C] would not fit, so the rows are taken in chunks of about
MMS_CHUNK_ELEMENTS / C and each chunk gets its own [rows, C] block W[pred_chunk] @ W^T
(row = position in the chunk). Either way the kernel is one more read of the logits
rows: min_{j != a} term(z_a - z_j, q[r, j]) per row, streamed in column blocks.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastsel.reference import centred_rows, class_distances
from fastsel.triton._launch import check_device, device_guard, num_warps_for, tile_shape

__all__ = ["mms_exact_triton", "mms_exact_rows", "inverse_distances",
           "MMS_DENSE_MAX_CLASSES", "MMS_CHUNK_ELEMENTS"]

# Largest C with a dense [C, C] inverse-distance matrix (as the CPU kernel).
MMS_DENSE_MAX_CLASSES = 2048
# Above it, rows per chunk = max(1, MMS_CHUNK_ELEMENTS // C): bounds the [rows, C] block.
MMS_CHUNK_ELEMENTS = 1 << 22


@triton.jit
def _mms_exact_kernel(
    logits_ptr, pred_ptr, lse_ptr, inv_dist_ptr, out_ptr,
    n_rows, n_classes, stride_row, stride_col, stride_pred, stride_lse, stride_inv_dist,
    INV_DIST_ROW_IS_PRED: tl.constexpr,  # dense [C, C] (row = pred) or per-row [N, C]
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_dtype = out_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    offs = tl.arange(0, BLOCK_C)

    a = tl.load(pred_ptr + rows * stride_pred, mask=row_mask, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows * stride_lse, mask=row_mask, other=0.0)
    valid = lse == lse  # the scoring pass writes NaN lse exactly on invalid rows
    z_a = tl.load(row_ptrs + a * stride_col, mask=row_mask, other=0.0).to(acc_dtype)
    z_a = tl.where(valid, z_a, 0.0)  # keeps inf - inf out of invalid rows (NaN anyway)
    if INV_DIST_ROW_IS_PRED:
        q_ptrs = inv_dist_ptr + a * stride_inv_dist
    else:
        q_ptrs = inv_dist_ptr + rows * stride_inv_dist

    best = tl.full([BLOCK_N], float("inf"), acc_dtype)
    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + offs
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        cols64 = cols[None, :].to(tl.int64)
        z = tl.load(row_ptrs[:, None] + cols64 * stride_col, mask=mask, other=0.0).to(acc_dtype)
        q = tl.load(q_ptrs[:, None] + cols64, mask=mask, other=1.0)
        diff = z_a[:, None] - z  # >= 0 on valid rows: a is the argmax
        # term = diff / ||w_a - w_j||, and 0 for a tie even when the distance is 0
        # (q = inf): zero q there so that 0 * inf is never formed.
        term = diff * tl.where(diff == 0, 0.0, q)
        competitor = mask & (cols64 != a[:, None])
        best = tl.minimum(best, tl.min(tl.where(competitor, term, float("inf")), axis=1))

    tl.store(out_ptr + rows, tl.where(valid, best, float("nan")), mask=row_mask)


def mms_exact_rows(logits: torch.Tensor, pred: torch.Tensor, lse: torch.Tensor,
                   inv_dist: torch.Tensor, inv_dist_row_is_pred: bool, *,
                   out: Optional[torch.Tensor] = None, block_c: Optional[int] = None,
                   block_n: Optional[int] = None) -> torch.Tensor:
    """min_{j != pred_i} term(z_ij) per row i, one launch of the kernel.

    ``inv_dist`` is [C, C] indexed by ``pred`` when ``inv_dist_row_is_pred``, else [N, C]
    indexed by the row; unit column stride, dtype of the result (float32 / float64).
    ``out`` ([N], unit stride) receives the result when given.
    """
    n_rows, n_classes = logits.shape
    if out is None:
        out = torch.empty(n_rows, dtype=inv_dist.dtype, device=logits.device)
    if n_rows == 0:
        return out
    assert inv_dist.stride(1) == 1 and inv_dist.shape[1] == n_classes
    tile_n, tile_c = tile_shape(n_rows, n_classes, block_c, block_n)
    with device_guard(logits):
        _mms_exact_kernel[(triton.cdiv(n_rows, tile_n),)](
            logits, pred, lse, inv_dist, out,
            n_rows, n_classes, logits.stride(0), logits.stride(1), pred.stride(0), lse.stride(0),
            inv_dist.stride(0),
            INV_DIST_ROW_IS_PRED=inv_dist_row_is_pred,
            BLOCK_N=tile_n, BLOCK_C=tile_c,
            num_warps=num_warps_for(tile_n, tile_c),
        )
    return out


def inverse_distances(weight: torch.Tensor, classes: Optional[torch.Tensor] = None, *,
                      centred=None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """q[r, j] = 1 / ||w_{classes[r]} - w_j|| (all classes when ``classes`` is None), in
    ``dtype`` (default the weight's); 1 / 0 = inf for identical rows. The distances come from
    ``fastsel.reference.class_distances`` (centred rows, float64 Gram form, cancelling
    pairs recomputed), so near-duplicate classes keep their distance; ``centred`` is
    ``centred_rows(weight)``, computed once per call.
    """
    return class_distances(weight, classes, centred=centred).reciprocal_().to(dtype or weight.dtype)


def mms_exact_triton(logits: torch.Tensor, pred: torch.Tensor, lse: torch.Tensor,
                     weight: torch.Tensor, *, block_c: Optional[int] = None,
                     block_n: Optional[int] = None) -> torch.Tensor:
    """Exact MMS of every row, given the scoring pass's ``pred`` and ``lse`` (NaN = invalid).

    ``weight`` [C, D] of any float dtype (its distances are taken in float64); the result
    is in the score dtype of ``lse`` (float32 / float64). No host sync: the chunking
    depends on shapes only, and ``class_distances`` recomputes cancelling pairs with
    ``torch.where`` on an accelerator.
    """
    check_device(logits, "mms_exact_triton")
    n_rows, n_classes = logits.shape
    weight = weight.contiguous()
    acc = lse.dtype
    centred = centred_rows(weight)
    if n_classes <= MMS_DENSE_MAX_CLASSES:
        inv_dist = inverse_distances(weight, centred=centred, dtype=acc)
        return mms_exact_rows(logits, pred, lse, inv_dist, True, block_c=block_c, block_n=block_n)
    out = torch.empty(n_rows, dtype=acc, device=logits.device)
    chunk = max(1, MMS_CHUNK_ELEMENTS // n_classes)
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        inv_dist = inverse_distances(weight, pred[start:stop], centred=centred, dtype=acc)
        mms_exact_rows(logits[start:stop], pred[start:stop], lse[start:stop], inv_dist, False,
                       out=out[start:stop], block_c=block_c, block_n=block_n)
    return out

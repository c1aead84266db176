"""Backward of the fused loss in Triton: d(sum_i g_i loss_i) / dz = g_i (softmax(z_i) - onehot(y_i)).

loss_i = lse_i - z_{i,y_i}, so d loss_i / d z_ij = exp(z_ij - lse_i) - [j == y_i]: the
forward pass saves only the per-row lse (docs/methods.md section 1) and the softmax is
recomputed here in one streaming pass over the row, nothing of size [N, C] being kept
between forward and backward. Rows whose target is ``ignore_index`` have a constant loss
(0) and get a zero gradient, as do rows with an out-of-range target (the caller reports
those; the kernel only keeps memory safe). Invalid rows (NaN lse) get NaN gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastsel.triton._launch import check_device, device_guard, num_warps_for, tile_shape

__all__ = ["score_backward_triton"]


@triton.jit
def _score_backward_kernel(
    grad_logits_ptr, grad_loss_ptr, logits_ptr, target_ptr, lse_ptr,
    n_rows, n_classes, stride_row, stride_col, stride_grad_loss, stride_target, stride_lse,
    ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_dtype = lse_ptr.dtype.element_ty  # float32, or float64 for float64 logits
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    row_ptrs = logits_ptr + rows * stride_row
    out_ptrs = grad_logits_ptr + rows * n_classes  # the result is contiguous [N, C]
    offs = tl.arange(0, BLOCK_C)

    target = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
    has_gradient = (target != ignore_index) & (target >= 0) & (target < n_classes)
    g = tl.load(grad_loss_ptr + rows * stride_grad_loss, mask=row_mask, other=0.0).to(acc_dtype)
    g = tl.where(has_gradient, g, 0.0)
    lse = tl.load(lse_ptr + rows * stride_lse, mask=row_mask, other=0.0)

    for c0 in range(0, n_classes, BLOCK_C):
        cols = c0 + offs
        cols64 = cols[None, :].to(tl.int64)
        mask = row_mask[:, None] & (cols < n_classes)[None, :]
        z = tl.load(row_ptrs[:, None] + cols64 * stride_col, mask=mask, other=float("-inf")).to(acc_dtype)
        p = tl.exp(z - lse[:, None])
        onehot = tl.where(cols64 == target[:, None], 1.0, 0.0)
        grad = g[:, None] * (p - onehot)
        grad = tl.where(has_gradient[:, None], grad, 0.0)  # also clears NaN * 0 on ignored rows
        tl.store(out_ptrs[:, None] + cols64, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def score_backward_triton(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    *,
    block_c: Optional[int] = None,
    block_n: Optional[int] = None,
) -> torch.Tensor:
    """Gradient of ``sum_i grad_loss_i * loss_i`` with respect to ``logits`` [N, C].

    Same contract as ``torch.ops.fastsel.score_backward``: ``grad_loss`` and ``lse`` are
    [N] (converted to float32, float64 for float64 logits), ``target`` [N] int64 / int32;
    returns a contiguous tensor of the logits' dtype. Any strides are read in place.
    ``block_c`` / ``block_n`` override the tile shape (powers of two; tests, tuning).
    """
    n_rows, n_classes = logits.shape
    if not (grad_loss.shape == lse.shape == target.shape == (n_rows,)):
        raise ValueError("score_backward_triton: grad_loss, lse and target must have shape "
                         f"[N] = [{n_rows}], got {tuple(grad_loss.shape)}, {tuple(lse.shape)}, "
                         f"{tuple(target.shape)}")
    check_device(logits, "score_backward_triton")
    acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad_loss = grad_loss.to(acc_dtype)
    lse = lse.to(acc_dtype)
    grad_logits = torch.empty((n_rows, n_classes), dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return grad_logits
    tile_n, tile_c = tile_shape(n_rows, n_classes, block_c, block_n)
    with device_guard(logits):
        _score_backward_kernel[(triton.cdiv(n_rows, tile_n),)](
            grad_logits, grad_loss, logits, target, lse,
            n_rows, n_classes, logits.stride(0), logits.stride(1), grad_loss.stride(0),
            target.stride(0), lse.stride(0), ignore_index,
            BLOCK_N=tile_n, BLOCK_C=tile_c,
            num_warps=num_warps_for(tile_n, tile_c),
        )
    return grad_logits

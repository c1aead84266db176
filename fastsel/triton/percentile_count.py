"""Percentile of values in a history, in Triton: F(v) = #{h in history : h < v} / m.

m is the number of non-NaN history entries. The launcher sorts the history once (torch)
after replacing NaN by +inf: +inf is never strictly below any value, so a NaN entry adds
nothing to any count whichever way ``torch.sort`` would have ordered it, and m is counted
separately, on the device. Each lane then counts the entries below its value by a
lower-bound binary search of the sorted history (bit_length(len) halving steps, the same
for every lane) and divides in float32, correctly rounded (``div_rn``), as
``fastsel.reference.percentile_reference`` does (``count.to(float32) / float32(m)``).
A NaN value gives NaN; an empty (or all-NaN) history gives 1.

Comparisons are made in float64 when either input is float64 and in float32 otherwise;
both conversions are exact, so the counts equal the reference's float64 comparisons.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsel.triton._launch import check_device, device_guard
from fastsel.triton.selection_math import EXACT_FP_LAUNCH, elements_per_program

__all__ = ["percentile_triton"]


@triton.jit
def _percentile_count_kernel(out_ptr, values_ptr, sorted_history_ptr, valid_count_ptr, n, stride,
                             history_len, n_search_steps,
                             COMPARE_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    v = tl.load(values_ptr + index * stride, mask=mask, other=0.0).to(COMPARE_DTYPE)
    m = tl.load(valid_count_ptr)  # non-NaN history entries (int64, on the device)
    # Lower bound of v in the sorted history over [lo, hi): the number of entries < v.
    # A NaN v compares false everywhere and is overwritten below.
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + history_len
    for _ in range(n_search_steps):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        h = tl.load(sorted_history_ptr + mid, mask=active & mask, other=0.0).to(COMPARE_DTYPE)
        below = h < v
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & ~below, mid, hi)
    # m == 0 (empty or all-NaN history): every value ranks at 1 (no 0 / 0 evaluated).
    fraction = tl.math.div_rn(lo.to(tl.float32), tl.maximum(m, 1).to(tl.float32))
    fraction = tl.where(m > 0, fraction, 1.0)
    fraction = tl.where(v != v, float("nan"), fraction)
    tl.store(out_ptr + index, fraction, mask=mask)


def percentile_triton(values: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """F(v) [N] float32 for 1-D ``values`` [N] against 1-D ``history`` [M] (float dtypes,
    any strides, on the same device). See the module docstring."""
    if values.dim() != 1 or history.dim() != 1:
        raise ValueError("percentile_triton: values and history must be 1-D, got shapes "
                         f"{tuple(values.shape)} and {tuple(history.shape)}")
    if not (values.dtype.is_floating_point and history.dtype.is_floating_point):
        raise TypeError(f"percentile_triton: values and history must be float tensors, got "
                        f"{values.dtype} and {history.dtype}")
    check_device(values, "percentile_triton")
    n, history_len = values.shape[0], history.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    if n == 0:
        return out
    nan = torch.isnan(history)
    valid_count = (history_len - nan.sum()).to(torch.int64).reshape(1)
    sorted_history = torch.sort(history.masked_fill(nan, float("inf"))).values
    wide = torch.float64 in (values.dtype, history.dtype)
    block = elements_per_program(n)
    with device_guard(values):
        _percentile_count_kernel[(triton.cdiv(n, block),)](
            out, values, sorted_history, valid_count, n, values.stride(0),
            history_len, history_len.bit_length(),
            COMPARE_DTYPE=tl.float64 if wide else tl.float32, BLOCK=block,
            **EXACT_FP_LAUNCH,
        )
    return out

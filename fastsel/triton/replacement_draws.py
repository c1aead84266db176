"""Draws of sampling with replacement from integer prefix sums, in Triton.

Input: ``cum``, the inclusive prefix sums of the quantized importances
(``torch.cumsum(fastsel.reference.replacement_weights(importance), 0)``, int64, exact and
non-decreasing, total = cum[-1] < 2^52). Draw j (one lane per draw) takes its own Philox
block (seed, counter, j), turns it into the integer target
t_j = ``replacement_target`` in [0, total) (``csrc/include/fastsel/selection_keys.h``)
and returns the first index i with cum[i] > t_j, by an upper-bound binary search of
bit_length(N) halving steps (enough to shrink [0, N) to one point; every lane runs the
same number of steps). Integer targets and integer sums make the index the same on every
backend: ``fastsel.reference.sample_with_replacement_reference`` uses
``torch.searchsorted(cum, t, right=True)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsel.triton._launch import check_device, device_guard
from fastsel.triton.selection_math import (
    EXACT_FP_LAUNCH,
    elements_per_program,
    replacement_target,
    split_words,
)

__all__ = ["replacement_draws_triton"]


# Seed and counter halves: runtime uint32 arguments, never specialized (one compilation
# for every seed; see selection_math.split_words).
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "counter_lo", "counter_hi"])
def _replacement_draws_kernel(index_ptr, cum_ptr, n, k, n_search_steps,
                              seed_lo: tl.uint32, seed_hi: tl.uint32,
                              counter_lo: tl.uint32, counter_hi: tl.uint32, BLOCK: tl.constexpr):
    draw = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    draw_mask = draw < k
    total = tl.load(cum_ptr + (n - 1))  # read on the device: no host synchronisation
    target = replacement_target(seed_lo, seed_hi, counter_lo, counter_hi, draw, total)
    # Upper bound of target in cum over [lo, hi): the answer is in [0, N - 1] because
    # target < total = cum[N - 1]. Finished lanes (lo == hi) keep their bounds.
    lo = tl.zeros([BLOCK], dtype=tl.int64)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + n
    for _ in range(n_search_steps):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        cum_mid = tl.load(cum_ptr + mid, mask=active & draw_mask, other=0)
        above = cum_mid > target
        hi = tl.where(active & above, mid, hi)
        lo = tl.where(active & ~above, mid + 1, lo)
    tl.store(index_ptr + draw, lo, mask=draw_mask)


def replacement_draws_triton(cum: torch.Tensor, k: int, seed: int, counter: int) -> torch.Tensor:
    """k i.i.d. indices [k] (int64, draw order) drawn with P(i) = (cum[i] - cum[i-1]) / cum[-1]
    from the int64 inclusive prefix sums ``cum`` [N] (N >= 1, contiguous), for call
    ``counter`` under ``seed`` (both in [0, 2^63)). See the module docstring."""
    if cum.dim() != 1 or cum.dtype != torch.int64:
        raise ValueError(f"replacement_draws_triton: cum must be a 1-D int64 tensor, got "
                         f"{cum.dtype} of shape {tuple(cum.shape)}")
    check_device(cum, "replacement_draws_triton")
    seed_lo, seed_hi = split_words(seed)
    counter_lo, counter_hi = split_words(counter)
    n = cum.shape[0]
    index = torch.empty(k, dtype=torch.int64, device=cum.device)
    if k == 0:
        return index
    if n == 0:
        raise ValueError("replacement_draws_triton: cannot draw from an empty population")
    cum = cum.contiguous()
    block = elements_per_program(k)
    with device_guard(cum):
        _replacement_draws_kernel[(triton.cdiv(k, block),)](
            index, cum, n, k, n.bit_length(), seed_lo, seed_hi, counter_lo, counter_hi,
            BLOCK=block,
            **EXACT_FP_LAUNCH,
        )
    return index

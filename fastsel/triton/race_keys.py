"""Packed exponential-race keys for sampling without replacement, in Triton.

Element i of the output is ``pack_key_index_signed(race_key_bits(w_i, scale, seed, counter, i), i)``
(``csrc/include/fastsel/selection_keys.h``): the float32 bits of E_i / (w_i 2^s), 2^s the
power of two that puts the largest importance in [0.5, 1) (``race_scale``, computed in
the kernel from the maximum), with E_i an
Exp(1) time from Philox word 2 of element i, packed with the index. The k smallest packed
keys (``torch.topk(packed, k, largest=False, sorted=True)``) are a sample of k distinct
indices with P proportional to the importance, in race order (Efraimidis & Spirakis 2006);
zero importances rank after all positive ones (by index). Mirrors
``fastsel.reference.race_key_bits``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsel.triton._launch import check_device, device_guard
from fastsel.triton.selection_math import (
    EXACT_FP_LAUNCH,
    elements_per_program,
    pack_key_index_signed,
    race_key_bits,
    race_scale,
    split_words,
)

__all__ = ["race_keys_triton"]


# Seed and counter halves: runtime uint32 arguments, never specialized (one compilation
# for every seed; see selection_math.split_words).
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "counter_lo", "counter_hi"])
def _race_keys_kernel(packed_ptr, importance_ptr, max_ptr, n, stride,
                      seed_lo: tl.uint32, seed_hi: tl.uint32,
                      counter_lo: tl.uint32, counter_hi: tl.uint32, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    # The importance is used in float32, as in the reference: a float64 input is rounded
    # (round to nearest even, as Tensor.to) and may underflow to 0 = never drawn. The
    # maximum of the stored dtype rounds to the maximum of the float32 values (rounding
    # is monotonic); a NaN propagates through both, giving the unit scale.
    w = tl.load(importance_ptr + index * stride, mask=mask, other=0.0).to(tl.float32)
    scale_a, scale_b = race_scale(tl.load(max_ptr).to(tl.float32))
    key = race_key_bits(w, scale_a, scale_b, seed_lo, seed_hi, counter_lo, counter_hi, index)
    tl.store(packed_ptr + index, pack_key_index_signed(key, index), mask=mask)


def race_keys_triton(importance: torch.Tensor, seed: int, counter: int) -> torch.Tensor:
    """Packed signed (race key, index) int64 keys [N] of 1-D ``importance`` (any float
    dtype, any stride; N <= 2^32) for call ``counter`` under ``seed`` (both in [0, 2^63)).
    See the module docstring."""
    if importance.dim() != 1:
        raise ValueError("race_keys_triton: importance must be 1-D, got shape "
                         f"{tuple(importance.shape)}")
    if not importance.dtype.is_floating_point:
        raise TypeError("race_keys_triton: importance must be a float tensor, got "
                        f"{importance.dtype}")
    check_device(importance, "race_keys_triton")
    seed_lo, seed_hi = split_words(seed)
    counter_lo, counter_hi = split_words(counter)
    n = importance.shape[0]
    if n > 1 << 32:
        raise ValueError("race_keys_triton: at most 2^32 elements (the index is packed in "
                         f"32 bits), got {n}")
    packed = torch.empty(n, dtype=torch.int64, device=importance.device)
    if n == 0:
        return packed
    largest = importance.max()  # stays on the device (no host synchronisation)
    block = elements_per_program(n)
    with device_guard(importance):
        _race_keys_kernel[(triton.cdiv(n, block),)](
            packed, importance, largest, n, importance.stride(0), seed_lo, seed_hi, counter_lo, counter_hi,
            BLOCK=block,
            **EXACT_FP_LAUNCH,
        )
    return packed

"""Packed rank keys of scores for top-k selection, in Triton.

Element i of the output is ``pack_key_index_signed(rank_key_bits(scores[i], largest), i)``
(``csrc/include/fastsel/selection_keys.h``): one int64 per score, unique (it holds the
index) and ordered by (key, index), so the k smallest -- ``torch.topk(packed, k,
largest=False, sorted=True)`` -- are the k best scores, best first, ties by lowest index,
NaN last; the index is the low 32 bits. Mirrors ``fastsel.reference.rank_key_bits``.

float32 keys only: a float64 score needs a 64-bit key, which leaves no room for the index
in one int64 (``fastsel/triton/selection_ops.py`` falls back to the reference for float64).
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
    rank_key_bits,
)

__all__ = ["rank_keys_triton", "RANK_KEY_DTYPES"]

# Score dtypes whose values are exactly float32 values (converted exactly in the kernel).
RANK_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rank_keys_kernel(packed_ptr, scores_ptr, n, stride,
                      LARGEST: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    x = tl.load(scores_ptr + index * stride, mask=mask, other=0.0).to(tl.float32)
    key = rank_key_bits(x, LARGEST)
    tl.store(packed_ptr + index, pack_key_index_signed(key, index), mask=mask)


def rank_keys_triton(scores: torch.Tensor, largest: bool) -> torch.Tensor:
    """Packed signed (rank key, index) int64 keys [N] of 1-D ``scores`` (float32, float16
    or bfloat16, any stride; N <= 2^32). See the module docstring."""
    if scores.dim() != 1:
        raise ValueError(f"rank_keys_triton: scores must be 1-D, got shape {tuple(scores.shape)}")
    if scores.dtype not in RANK_KEY_DTYPES:
        raise TypeError("rank_keys_triton: scores must be float32, float16 or bfloat16, got "
                        f"{scores.dtype}")
    check_device(scores, "rank_keys_triton")
    n = scores.shape[0]
    if n > 1 << 32:
        raise ValueError("rank_keys_triton: at most 2^32 elements (the index is packed in "
                         f"32 bits), got {n}")
    packed = torch.empty(n, dtype=torch.int64, device=scores.device)
    if n == 0:
        return packed
    block = elements_per_program(n)
    with device_guard(scores):
        _rank_keys_kernel[(triton.cdiv(n, block),)](
            packed, scores, n, scores.stride(0), LARGEST=bool(largest), BLOCK=block,
            **EXACT_FP_LAUNCH,
        )
    return packed

"""The selection ops on the Triton kernels of ``fastsel.triton``: the implementations of
``torch.ops.fastsel.triton_select_topk`` / ``triton_sample_without_replacement`` /
``triton_sample_with_replacement`` / ``triton_percentile``, which have the compiled ops'
schemas (``fastsel.contract.SELECTION_SCHEMAS``) and are registered, with their fakes, in
``fastsel/registration/selection.py`` (no autograd: the outputs are indices, or a
non-differentiable rank).

Semantics are those of ``fastsel.reference`` (``select_topk_reference``,
``sample_without_replacement_reference``, ``sample_with_replacement_reference``,
``percentile_reference``), bit for bit: the kernels compute the per-element keys of
``csrc/include/fastsel/selection_keys.h``, and the selection itself is
``torch.topk(packed, k, largest=False, sorted=True)`` on keys packed with their index into
unique int64s, whose order is (key, index) order, hence deterministic on any device.

Inputs are validated by the public API (1-D, non-negative finite importance that is not
all zero, k <= N, k <= number of positive importances without replacement); these ops
only keep every input safe: N == 0 or k == 0 return empty results without a launch, and a
k larger than N selects all N (as the reference's ``[:k]``).

Imported at the ops' first call, so that importing fastsel never imports triton.
"""

from __future__ import annotations

import torch

from fastsel._checks import check_k
from fastsel.reference import replacement_weights, select_topk_reference
from fastsel.triton import (
    percentile_triton,
    race_keys_triton,
    rank_keys_triton,
    replacement_draws_triton,
)

_LOW_WORD = 0xFFFFFFFF


def _check_seed(op: str, seed: int, counter: int) -> None:
    if seed < 0 or counter < 0:
        raise ValueError(f"{op}: seed and counter must be in [0, 2^63), got {seed} and {counter}")


def _check_1d(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")


def _smallest_packed_indices(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (the low 32 bits) of the k smallest packed (key, index) int64s, in (key,
    index) order. The packed values are unique, so topk's result does not depend on how
    it breaks ties: it has none."""
    smallest = torch.topk(packed, k, largest=False, sorted=True).values
    return smallest & _LOW_WORD


def select_topk(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    op = "triton_select_topk"
    _check_1d(op, "scores", scores)
    check_k(k, op=op)
    k = min(k, scores.shape[0])
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    if scores.dtype == torch.float64:
        # A float64 rank key has 64 bits: no room for the index in one int64, so no
        # packed topk. The reference (stable sort of int64 keys) is already a GPU-friendly
        # torch computation and defines the result.
        return select_topk_reference(scores, k, largest)
    if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        scores = scores.to(torch.float32)  # integer scores: as the reference, via float32
    return _smallest_packed_indices(rank_keys_triton(scores, largest), k)


def sample_without_replacement(importance: torch.Tensor, k: int, seed: int, counter: int) -> torch.Tensor:
    op = "triton_sample_without_replacement"
    _check_1d(op, "importance", importance)
    check_k(k, op=op)
    _check_seed(op, seed, counter)
    k = min(k, importance.shape[0])
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=importance.device)
    if not importance.dtype.is_floating_point:
        importance = importance.to(torch.float32)
    return _smallest_packed_indices(race_keys_triton(importance, seed, counter), k)


def sample_with_replacement(importance: torch.Tensor, k: int, seed: int, counter: int) -> torch.Tensor:
    op = "triton_sample_with_replacement"
    _check_1d(op, "importance", importance)
    check_k(k, op=op)
    _check_seed(op, seed, counter)
    if k == 0 or importance.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=importance.device)
    # The quantization (scale from the largest importance) and the exact int64 prefix
    # sums are the reference's own torch code: nothing there depends on the backend.
    cum = torch.cumsum(replacement_weights(importance), 0)
    return replacement_draws_triton(cum, k, seed, counter)


def percentile(values: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    op = "triton_percentile"
    _check_1d(op, "values", values)
    _check_1d(op, "history", history)
    # Integer inputs: float64, as the reference compares (exact up to 2^53).
    if not values.dtype.is_floating_point:
        values = values.to(torch.float64)
    if not history.dtype.is_floating_point:
        history = history.to(torch.float64)
    return percentile_triton(values, history)


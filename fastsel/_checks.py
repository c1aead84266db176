"""Argument checks shared across fastsel: the strategies' constructors, ScoreSampler,
BatchSelector and the percentile rule. No fastsel imports, so any module can use it.

Every check raises with the message ``"{name} must be {expected}, got {value!r}"``:
``ValueError`` for ints and numbers (a value of the wrong type included), ``TypeError``
for bools. Bools are never accepted where an int or a number is expected, although
``bool`` is a subclass of ``int`` (``keep=True`` is rejected like ``keep=0``).
"""

from __future__ import annotations

import math
from typing import Any, Collection, Optional

import torch

__all__ = ["check_int", "check_positive_int", "check_real", "check_fraction", "check_bool", "check_choice",
           "sized_length", "checks_on_host", "check_index_range", "check_k", "MAX_INDEX"]

MAX_INDEX = (1 << 32) - 1  # the selection kernels index with 32 bits


def check_k(k: Any, n: Optional[int] = None, *, allow_above_n: bool = False, op: Optional[str] = None) -> None:
    """``k``, a number of samples to select: an int (not a bool) >= 0, at most ``n`` unless
    ``allow_above_n`` (draws with replacement) or ``n`` is None (ops that clamp k), and at
    most 2^32 - 1. ``op`` prefixes the message with the op's name."""
    where = f"{op}: " if op else ""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"{where}k must be an int, got {k!r}")
    if k < 0:
        raise ValueError(f"{where}k must be >= 0, got {k}")
    if n is not None and k > n and not allow_above_n:
        raise ValueError(f"{where}k = {k} exceeds N = {n}")
    if k > MAX_INDEX:  # with replacement: k draws, 8 bytes each
        raise ValueError(f"{where}k = {k} draws exceed the limit of 2^32 - 1 per call")


def _fail(name: str, expected: str, value: Any, optional: bool) -> None:
    raise ValueError(f"{name} must be {expected}{' or None' if optional else ''}, got {value!r}")


def check_int(name: str, value: Any, minimum: int = 1, *, expected: Optional[str] = None,
              optional: bool = False) -> None:
    """``value`` is an int (not a bool) ``>= minimum``; with ``optional``, None is accepted
    too (and the message says "or None"). ``expected`` (default "a positive int" for
    ``minimum=1``, else "an int >= {minimum}") describes the valid values in the message."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        if expected is None:
            expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        _fail(name, expected, value, optional)


def check_positive_int(name: str, value: Any) -> None:
    """``value`` is an int >= 1 (not a bool)."""
    check_int(name, value, 1)


def _interval(low: Any, high: Any, low_inclusive: bool, high_inclusive: bool) -> str:
    return f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"


def check_real(name: str, value: Any, *, low: Any = None, high: Any = None, low_inclusive: bool = True,
               high_inclusive: bool = True, finite: bool = False, expected: Optional[str] = None,
               optional: bool = False) -> None:
    """``value`` is an int or a float (not a bool) within the given bounds (each one
    inclusive or not; NaN fails every bound) and, with ``finite``, finite. With
    ``optional``, None is accepted too (and the message says "or None").

    The default ``expected`` is "in [low, high)" (brackets after the inclusiveness) with
    both bounds, "a number >= low" / "a number > low" (or ``<=`` / ``<`` high) with one,
    "a number" with none."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if ok and finite:
        ok = math.isfinite(value)
    if not ok:
        if expected is None:
            if low is not None and high is not None:
                expected = f"in {_interval(low, high, low_inclusive, high_inclusive)}"
            elif low is not None:
                expected = f"a number {'>=' if low_inclusive else '>'} {low}"
            elif high is not None:
                expected = f"a number {'<=' if high_inclusive else '<'} {high}"
            else:
                expected = "a number"
        _fail(name, expected, value, optional)


def check_fraction(name: str, value: Any) -> None:
    """``value`` is a number in (0, 1] (not a bool): a fraction of samples or batches kept."""
    check_real(name, value, low=0, high=1, low_inclusive=False, expected="a number in (0, 1]")


def check_bool(name: str, value: Any) -> None:
    """``value`` is a bool (TypeError otherwise, e.g. for 0 or 1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_choice(name: str, value: Any, allowed: Collection) -> None:
    """``value`` is one of ``allowed`` (shown as given in the message)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def sized_length(name: str, value: Any, expected: str) -> int:
    """``len(value)``; a TypeError "{name} must {expected}, got {type}" if it has none."""
    try:
        return len(value)
    except TypeError:
        raise TypeError(f"{name} must {expected}, got {type(value).__name__}") from None


# ---- checks of tensor values ----------------------------------------------------------


def checks_on_host(t: torch.Tensor) -> bool:
    """Whether the values of ``t`` are checked on the host, raising at once, rather than
    asserted asynchronously on the device (``torch._assert_async``): on a CUDA (or ROCm)
    device, reading a value would make the host wait for the device at every training
    step. On the CPU reading a value costs nothing; other devices have no asynchronous
    assertion, so they are checked on the host too. The tests turn this off to check
    that a training step never reads a tensor on the host."""
    return t.device.type != "cuda"


def check_index_range(idx: torch.Tensor, n: int, what: str) -> None:
    """Every value of the integer tensor ``idx`` lies in [0, n): an ``IndexError`` naming
    ``what`` and the range found, or an asynchronous device assertion (see
    ``checks_on_host``)."""
    if idx.numel() == 0:
        return
    if not checks_on_host(idx):
        torch._assert_async(((idx >= 0) & (idx < n)).all(), f"{what} must be in [0, {n})")
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    if lo < 0 or hi >= n:
        raise IndexError(f"{what} must be in [0, {n}), got values in [{lo}, {hi}]")

"""``BatchQueue``: backward batches of a fixed size from an in-batch selector whose number
of kept samples varies (Selective-Backprop keeps a random number, possibly 0 or 1).

    selector = fastsel.BatchSelector(model, fastsel.strategies.SelectiveBackprop())
    queue = fastsel.BatchQueue(selector, batch_size=64)
    for x, y in DataLoader(train_set, batch_size=64, shuffle=True):
        for xb, yb, w in queue(x, y):        # 0, 1 or more full batches
            (fastsel.score(model(xb), yb).loss * w).mean().backward(); opt.step(); opt.zero_grad()
    rest = queue.flush()                     # the last, shorter batch, or None

This is the queue of Jiang et al. (2019): candidates are forwarded a batch at a time, the
kept ones wait until ``batch_size`` of them are ready for one backward pass, so every
optimizer step sees a full batch. Kept samples are trained in the order they were
chosen and at most ``batch_size - 1`` wait at any time; a sample waits until enough
others are kept after it (several candidate batches when few are kept per batch).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from fastsel import _state
from fastsel._checks import check_positive_int
from fastsel.forward import batch_size_of, map_batch
from fastsel.selector import BatchSelector

__all__ = ["BatchQueue"]


def _cat(parts: list) -> Any:
    """Concatenates batches of the same structure (a tensor, or a (named)tuple / list /
    dict of them) along dimension 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_cat([p[i] for p in parts]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    raise TypeError(f"cannot queue samples of a {type(first).__name__}; inputs must be a tensor or a "
                    "tuple/list/dict of tensors with the batch in dimension 0")


class BatchQueue:
    """Collects the samples a ``BatchSelector`` keeps and hands them out in batches of
    exactly ``batch_size`` (with their loss weights).

    Args:
        selector: the in-batch selector (any strategy; most useful when the number kept
            varies: ``SelectiveBackprop``, ``select(policy="percentile")``-style rules).
        batch_size: samples per backward pass.

    ``queue(inputs, target)`` runs the selector on the candidates and returns the list of
    full batches ``(inputs, target, weights)`` now ready (usually none or one);
    ``flush()`` returns what is left as one shorter batch, or None. ``state_dict()`` holds
    the waiting samples (and the selector's state), so a resumed run trains exactly them.
    """

    def __init__(self, selector: BatchSelector, batch_size: int):
        if not isinstance(selector, BatchSelector):
            raise TypeError(f"selector must be a fastsel.BatchSelector, got {type(selector).__name__}")
        check_positive_int("batch_size", batch_size)
        self.selector = selector
        self.batch_size = batch_size
        self._parts: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self._pending = 0

    @property
    def pending(self) -> int:
        """Samples kept and waiting for a full batch."""
        return self._pending

    def __call__(self, inputs: Any, target: torch.Tensor) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
        xb, yb, w = self.selector(inputs, target)
        if yb.numel():
            self._parts.append((xb, yb, w))
            self._pending += yb.numel()
        out = []
        if self._pending >= self.batch_size:
            x_all, y_all, w_all = self._joined()
            full = self._pending - self._pending % self.batch_size
            for i in range(0, full, self.batch_size):
                out.append(self._slice(x_all, y_all, w_all, i, i + self.batch_size))
            self._parts = [self._slice(x_all, y_all, w_all, full, self._pending)] if full < self._pending else []
            self._pending -= full
        return out

    def flush(self) -> Optional[tuple[Any, torch.Tensor, torch.Tensor]]:
        """The waiting samples as one batch (shorter than ``batch_size``), or None; the
        queue is then empty."""
        if not self._pending:
            return None
        batch = self._joined()
        self._parts, self._pending = [], 0
        return batch

    def _joined(self):
        if len(self._parts) == 1:
            return self._parts[0]
        return (_cat([p[0] for p in self._parts]), torch.cat([p[1] for p in self._parts]),
                torch.cat([p[2] for p in self._parts]))

    @staticmethod
    def _slice(x, y, w, a: int, b: int):
        return map_batch(x, lambda t: t[a:b]), y[a:b], w[a:b]

    def state_dict(self) -> dict:
        batch = self._joined() if self._pending else None
        return {"batch_size": self.batch_size, "pending": batch, "selector": self.selector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores a ``state_dict()``, checked first: a tampered state raises naming the
        entry and changes nothing."""
        _state.require_keys("state", state, ("batch_size", "pending", "selector"))
        size = _state.check_int("state['batch_size']", state["batch_size"], 1)
        if size != self.batch_size:
            raise ValueError(f"state['batch_size'] is {size}, this queue's batch_size is {self.batch_size}")
        pending = state["pending"]
        parts, count = [], 0
        if pending is not None:
            if not isinstance(pending, (tuple, list)) or len(pending) != 3:
                raise TypeError("state['pending'] must be None or (inputs, target, weights)")
            x, y, w = pending
            if not isinstance(y, torch.Tensor) or y.dim() != 1 or not 0 < y.numel() < self.batch_size:
                raise ValueError(f"state['pending'][1] must be the targets of 1 to {self.batch_size - 1} waiting "
                                 "samples, a 1-D tensor")
            if not isinstance(w, torch.Tensor) or w.shape != y.shape or not w.dtype.is_floating_point:
                raise ValueError("state['pending'][2] must be the waiting samples' float weights, shaped as the targets")
            try:
                n = batch_size_of(x)
            except TypeError:
                n = -1
            if n != y.numel():
                raise ValueError(f"state['pending'][0] must hold the inputs of the {y.numel()} waiting samples")
            parts, count = [(x, y, w)], y.numel()
        self.selector.load_state_dict(state["selector"])
        self._parts, self._pending = parts, count

    def __repr__(self) -> str:
        return f"BatchQueue(batch_size={self.batch_size}, pending={self._pending}, selector={self.selector!r})"

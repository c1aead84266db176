"""What every selection strategy implements, and the per-sample score table that the
epoch-level strategies read.

Two integration styles (a strategy declares which it supports in ``styles``):

* ``"batch"`` (``fastsel.BatchSelector``): a large candidate batch is scored in inference
  mode and ``Strategy.choose`` picks the samples to train on, with their weights.
* ``"epoch"`` (``fastsel.ScoreSampler``): scores from the training forward are stored in
  a ``ScoreTable``; at the start of each epoch ``Strategy.plan_epoch`` decides which
  samples the epoch visits, in which order, and with which loss weights.

Randomness is always a pure function of ``(seed, step or epoch)``: a resumed run repeats
the uninterrupted one exactly, and every DDP rank computes the same decisions.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch

from fastsel.reference import Scores
from fastsel.selection import Selection
from fastsel import _checks, _state
from fastsel._checks import check_int

__all__ = ["Strategy", "EpochPlan", "ScoreTable", "TABLE_FIELDS", "seeded_generator", "StyleError"]


class StyleError(ValueError):
    """A strategy used in an integration style it does not support."""


def _prob_margin(s: Scores) -> torch.Tensor:
    # p_(1) - p_(2) = p_(1) (1 - exp(-(z_(1) - z_(2)))) (docs/methods.md section 1)
    return s.confidence * -torch.expm1(-s.margin)


# Per-sample quantities a ScoreTable can store, computed from the training forward's Scores.
TABLE_FIELDS: dict[str, Callable[[Scores], torch.Tensor]] = {
    "loss": lambda s: s.loss,
    "entropy": lambda s: s.entropy,
    "margin": lambda s: s.margin,
    "true_margin": lambda s: s.true_margin,
    "grad_norm": lambda s: s.grad_norm,
    "confidence": lambda s: s.confidence,
    "prob_margin": _prob_margin,
    "p_wrong": lambda s: -torch.expm1(-s.plain_loss()),  # 1 - p_y, whatever the loss's options
    "mms": lambda s: _require_mms(s),
}


def _require_mms(s: Scores) -> torch.Tensor:
    if s.mms is None:
        raise ValueError("this strategy records the MMS: score the training forward with the classifier weight, "
                         "s = fastsel.score(logits, target, head=model.fc), before sampler.update(idx, s)")
    return s.mms


def seeded_generator(seed: int, stream: int) -> torch.Generator:
    """A CPU generator determined by (seed, stream), e.g. stream = epoch or step."""
    g = torch.Generator()
    g.manual_seed((seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + 1) % (1 << 63))
    return g


class EpochPlan(NamedTuple):
    """One epoch of an epoch-level strategy: ``indices`` [M] int64, the samples to visit in
    order (M may be below N: the rest are skipped); ``weights`` [N] float32, the loss
    weight of each sample during this epoch."""

    indices: torch.Tensor
    weights: torch.Tensor


class ScoreTable:
    """The latest value, running sum and count of per-sample scores for N samples (CPU).

    ``update_values(indices, values, epoch)`` stores ``values[f]`` (``extract`` computes
    them as ``TABLE_FIELDS[f](scores)``) for each field. Never-seen samples hold NaN and
    ``last_epoch`` -1.

    Values on an accelerator are queued on their device and applied, in order, when the
    table is next read (strategies read it when they plan an epoch), at the end of each
    epoch (``ScoreSampler``), or once ``MAX_QUEUED`` updates wait: copying them to the CPU
    at once would make every training step wait for the device. The queue is copied in one
    transfer. A tensor obtained from ``values`` (or ``last``) is the table's own storage:
    it shows queued updates once the table has applied them.
    """

    MAX_QUEUED = 256

    def __init__(self, n: int, fields: tuple[str, ...] = ("loss",)):
        unknown = set(fields) - set(TABLE_FIELDS)
        if unknown:
            raise ValueError(f"unknown table fields {sorted(unknown)}; known: {sorted(TABLE_FIELDS)}")
        self.n = n
        self.fields = tuple(dict.fromkeys(fields))
        self._last = {f: torch.full((n,), float("nan")) for f in self.fields}
        self._total = {f: torch.zeros(n, dtype=torch.float64) for f in self.fields}
        self._finite = {f: torch.zeros(n, dtype=torch.int64) for f in self.fields}
        self._count = torch.zeros(n, dtype=torch.int64)
        self._last_epoch = torch.full((n,), -1, dtype=torch.int64)
        self._queued: list[tuple[torch.Tensor, dict[str, torch.Tensor], int]] = []

    # The tables, with every queued update applied.
    @property
    def last(self) -> dict[str, torch.Tensor]:
        self.apply_queued()
        return self._last

    @property
    def total(self) -> dict[str, torch.Tensor]:
        self.apply_queued()
        return self._total

    @property
    def finite(self) -> dict[str, torch.Tensor]:
        self.apply_queued()
        return self._finite

    @property
    def count(self) -> torch.Tensor:
        self.apply_queued()
        return self._count

    @property
    def last_epoch(self) -> torch.Tensor:
        self.apply_queued()
        return self._last_epoch

    def values(self, field: str) -> torch.Tensor:
        return self.last[field]

    def running_mean(self, field: str) -> torch.Tensor:
        """Mean of every finite value observed so far per sample (NaN if none): a NaN score
        (an ignored target, an invalid row) does not poison the mean for good."""
        return (self.total[field] / self.finite[field]).to(torch.float32)

    def seen(self) -> torch.Tensor:
        return self.count > 0

    def update_values(self, indices: torch.Tensor, values: dict[str, torch.Tensor], epoch: int) -> None:
        on_host = _checks.checks_on_host(indices) and all(_checks.checks_on_host(values[f]) for f in self.fields)
        if on_host and not self._queued:
            self._apply(indices, values, epoch)
            return
        # Copies on the device (cheap, asynchronous): later in-place changes of the
        # caller's tensors must not reach the table.
        self._queued.append((indices.detach().to(torch.int64, copy=True),
                             {f: values[f].detach().to(torch.float32, copy=True) for f in self.fields}, epoch))
        if len(self._queued) >= self.MAX_QUEUED:
            self.apply_queued()

    def apply_queued(self) -> None:
        """Applies the queued updates (one copy to the CPU). An update that fails stays
        queued with the ones after it, so the next read raises again."""
        if not self._queued:
            return
        # one flat float64 transfer (exact for indices below 2^53 and for float32 values)
        host = torch.cat([t.to(torch.float64) for i, v, _ in self._queued
                          for t in (i, *(v[f] for f in self.fields))]).to("cpu")
        parts = torch.split(host, [i.numel() for i, _, _ in self._queued for _ in range(1 + len(self.fields))])
        width = 1 + len(self.fields)
        for k, (_, _, epoch) in enumerate(list(self._queued)):
            indices, *values = parts[k * width:(k + 1) * width]
            self._apply(indices.to(torch.int64), dict(zip(self.fields, values)), epoch)
            self._queued.pop(0)  # only once applied: a failure keeps it and the ones after it

    def _apply(self, indices: torch.Tensor, values: dict[str, torch.Tensor], epoch: int) -> None:
        idx = indices.to("cpu", torch.int64)
        for f in self.fields:
            v = values[f].detach().to("cpu", torch.float32)
            self._last[f][idx] = v
            finite = torch.isfinite(v)
            self._total[f].index_add_(0, idx, torch.where(finite, v, 0.0).to(torch.float64))
            self._finite[f].index_add_(0, idx, finite.to(torch.int64))
        self._count.index_add_(0, idx, torch.ones_like(idx))
        self._last_epoch[idx] = epoch

    def extract(self, scores: Scores) -> dict[str, torch.Tensor]:
        return {f: TABLE_FIELDS[f](scores).detach() for f in self.fields}

    def state_dict(self) -> dict:
        return {"n": self.n, "fields": self.fields, "last": {f: t.clone() for f, t in self.last.items()},
                "total": {f: t.clone() for f, t in self.total.items()},
                "finite": {f: t.clone() for f, t in self.finite.items()}, "count": self.count.clone(),
                "last_epoch": self.last_epoch.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Loads a ``state_dict()``, checked whole first: on error nothing has changed."""
        self._prepare_load(state, "state")()

    def _prepare_load(self, state: Any, path: str) -> Callable[[], None]:
        """Checks ``state`` (``path`` names it in errors) and returns the function that
        loads it, which cannot fail."""
        _state.require_keys(path, state, ("n", "fields", "last", "total", "finite", "count", "last_epoch"))
        n = _state.check_int(_state.key(path, "n"), state["n"], 0)
        fields = state["fields"]
        if not isinstance(fields, (tuple, list)) or not all(isinstance(f, str) for f in fields):
            raise TypeError(f"{_state.key(path, 'fields')} must be a tuple of field names, got {fields!r:.80}")
        if n != self.n or tuple(fields) != self.fields:
            raise ValueError(f"score table state is for n={n} fields={tuple(fields)}, "
                             f"this table has n={self.n} fields={self.fields}")
        shape = (self.n,)
        tables = {}
        for name, dtypes, check in (("last", _state.FLOATS, {}), ("total", _state.FLOATS, {"finite": True}),
                                    ("finite", _state.INTS, {"low": 0})):
            where = _state.key(path, name)
            _state.require_keys(where, state[name], self.fields)
            tables[name] = {f: _state.check_tensor(_state.key(where, f), state[name][f], shape, dtypes, **check)
                            for f in self.fields}
        count = _state.check_tensor(_state.key(path, "count"), state["count"], shape, _state.INTS, low=0)
        last_epoch = _state.check_tensor(_state.key(path, "last_epoch"), state["last_epoch"], shape, _state.INTS,
                                         low=-1)
        for f, finite in tables["finite"].items():
            over = (finite > count).nonzero()
            if over.numel():
                i = int(over[0, 0])
                raise ValueError(f"{_state.key(_state.key(path, 'finite'), f)} must be <= {_state.key(path, 'count')} "
                                 f"elementwise (finite values among those recorded), got {int(finite[i])} > "
                                 f"{int(count[i])} at index {i}")

        def load() -> None:
            self._queued = []  # the state replaces everything, updates not yet applied included
            for f in self.fields:
                self._last[f].copy_(tables["last"][f])
                self._total[f].copy_(tables["total"][f])
                self._finite[f].copy_(tables["finite"][f])
            self._count.copy_(count)
            self._last_epoch.copy_(last_epoch)
        return load


class Strategy:
    """Base class. Subclasses set ``styles`` and implement ``choose`` (batch style) and/or
    ``plan_epoch`` (epoch style); they keep any state in attributes listed by
    ``state_dict`` (tagged ``"strategy": class name``), and ``_prepare_load`` checks a
    state whole before ``load_state_dict`` loads it.

    Attributes:
        styles: the integration styles supported, among ``"batch"`` and ``"epoch"``.
        needs_head: whether scoring needs the classifier weight (``mms``).
        table_fields: the ``ScoreTable`` fields an epoch strategy reads.
        unbiased: whether the returned weights make the training loss an unbiased (or
            self-normalised) estimate of the full-data loss.
        reads_scores: whether the epoch plans depend on the scores ``sampler.update``
            records (``ScoreSampler`` warns when an epoch ends without any update).
    """

    styles: tuple[str, ...] = ()
    needs_head: bool = False
    table_fields: tuple[str, ...] = ("loss",)
    unbiased: bool = False
    reads_scores: bool = True

    # ---- batch style ----
    def choose(self, scores: Scores, *, step: int, seed: int, inputs: Any = None,
               targets: Optional[torch.Tensor] = None) -> Selection:
        raise StyleError(f"{type(self).__name__} does not support the in-batch style (BatchSelector); "
                         f"it supports: {', '.join(self.styles) or 'nothing'}")

    # ---- epoch style ----
    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        raise StyleError(f"{type(self).__name__} does not support the epoch style (ScoreSampler); "
                         f"it supports: {', '.join(self.styles) or 'nothing'}")

    def check_style(self, style: str) -> None:
        if style not in self.styles:
            where = {"batch": "the in-batch style (BatchSelector)", "epoch": "the epoch style (ScoreSampler)"}[style]
            raise StyleError(f"{type(self).__name__} does not support {where}; "
                             f"it supports: {', '.join(self.styles) or 'nothing'}")

    def epoch_size_bound(self, epoch: int, n: int, epochs: int) -> tuple[int, bool]:
        """(samples, exact): the most samples the plan of ``epoch`` can hold over a data
        set of ``n``, and whether that is its size whatever the scores (then the sampler
        knows the run's steps ahead). Default: ``(n, False)``."""
        return n, False

    # ---- state ----
    def state_dict(self) -> dict:
        """The strategy's state, tagged with its class name: ``load_state_dict`` refuses the
        state of another strategy."""
        return {"strategy": type(self).__name__}

    def load_state_dict(self, state: dict) -> None:
        """Loads a ``state_dict()``, checked whole first: on error nothing has changed."""
        self._prepare_load(state, "state")()

    def _prepare_load(self, state: Any, path: str, n: Optional[int] = None) -> Callable[[], None]:
        """Checks ``state`` (``path`` names it in errors; ``n`` is the data set's size when
        known) and returns the function that loads it, which cannot fail. Subclasses with
        state override this and ``state_dict``."""
        _state.require_keys(path, state, (), tag=type(self).__name__)
        return lambda: None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def prepare_strategy_load(strategy: Strategy, state: Any, path: str, n: Optional[int] = None) -> Callable[[], None]:
    """``strategy._prepare_load``, for ScoreSampler and BatchSelector to check the whole of
    their state before loading any of it. A strategy that overrides ``load_state_dict``
    but not ``_prepare_load`` (written before it existed) is loaded by its own method."""
    if type(strategy).load_state_dict is not Strategy.load_state_dict and \
            type(strategy)._prepare_load is Strategy._prepare_load:
        return lambda: strategy.load_state_dict(state)
    return strategy._prepare_load(state, path, n)


def check_strategy_and_seed(strategy: Any, style: str, seed: Any) -> None:
    """The argument checks ScoreSampler (style "epoch") and BatchSelector ("batch") share."""
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a fastsel.strategies.Strategy, got {type(strategy).__name__}")
    strategy.check_style(style)
    check_int("seed", seed, 0, expected="a non-negative int")


def full_plan(n: int, seed: int, epoch: int) -> EpochPlan:
    """Every sample once, in a seeded random order, weight 1."""
    order = torch.randperm(n, generator=seeded_generator(seed, epoch))
    return EpochPlan(order, torch.ones(n))


def fraction_count(fraction: float, n: int) -> int:
    """``round(fraction * n)``, at least 1 when ``n > 0`` (the rule of ``Uniform``'s budget)."""
    return max(1, round(fraction * n)) if n else 0


def keep_in_batch(k: int, n: int) -> None:
    if k > n:
        raise ValueError(f"keep = {k} exceeds the candidate batch ({n} samples)")

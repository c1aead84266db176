"""Selective-Backprop (Jiang et al. 2019): backpropagate each sample with a probability
that grows with the percentile of its loss among recent losses."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from fastsel import _state, reference
from fastsel.reference import Scores
from fastsel.selection import History, Selection, check_percentile_rule, keep_probability, percentile, percentile_keep
from fastsel._checks import check_int, check_positive_int
from fastsel.strategies.base import EpochPlan, ScoreTable, Strategy, full_plan, seeded_generator

__all__ = ["SelectiveBackprop"]


class SelectiveBackprop(Strategy):
    """Selective-Backprop (Jiang, Wong, Zhou, Andersen, Dean, Ganger, Joshi, Kaminsky,
    Kozuch, Lipton & Pillai 2019, "Accelerating deep learning by focusing on the biggest
    losers").

    In-batch style (``fastsel.BatchSelector``): each candidate i is kept with probability
    P(i) = max(``s_min``, F_R(ℓ_i)^``beta``), F_R(ℓ) the fraction of the last R =
    ``history_size`` losses strictly below ℓ (paper: R = 1024, beta = 3, s_min = 0). The
    Bernoulli draws are those of ``fastsel.select(..., policy="percentile")``: uniforms
    ``fastsel.reference.bernoulli_uniforms(N, seed, counter=step)``, percentiles against
    the history BEFORE this batch's losses are added, then the batch's losses are pushed
    into the history. The first batch meets an empty history, which ranks every loss at
    1: it is kept whole. Weights are ones (``unbiased`` False). For i.i.d. losses the
    expected keep rate is E[U^beta] = 1 / (beta + 1) (0.25 for beta = 3).

    The queue: the paper forwards samples one batch at a time and queues the kept ones
    until ``batch_size`` of them are ready for one backward pass. ``choose`` returns this
    step's kept samples (a random number, possibly 0 or 1); ``fastsel.BatchQueue(selector,
    batch_size)`` is the paper's queue, handing out only full backward batches. Without
    it, make the candidate batch about (beta + 1) × the wanted backward batch (4× for
    beta = 3) and skip the optimizer step when nothing was kept.

    Stale variant (``staleness=n`` epochs; adds the epoch style, ``fastsel.ScoreSampler``):
    every n-th epoch (epoch % n == 0, so epoch 0 too) is a full pass, every sample once in
    a seeded random order with weight 1, whose training forward refreshes the table's
    losses (``ScoreSampler.update``). In the epochs between, sample i is visited with
    probability max(s_min, F(ℓ_i)^beta), ℓ_i its stale table loss and F(ℓ_i) the fraction
    of all the table's losses strictly below it; the Bernoulli draws use
    ``bernoulli_uniforms(N, seed, counter=epoch)`` and the visit order is a seeded
    permutation of (seed, epoch). Never-scored samples are always visited. Kept samples'
    losses are refreshed by their training forward, the others stay stale until the next
    full pass.

    State (``state_dict``): the loss history (``History.state_dict``); the epoch style is
    a pure function of the table, the seed and the epoch. ``stats()`` reports the last
    keep rate and the history's fill.
    """

    unbiased = False

    def __init__(self, *, beta: float = 3.0, s_min: float = 0.0, history_size: int = 1024,
                 staleness: Optional[int] = None):
        check_percentile_rule(beta, s_min)
        check_positive_int("history_size", history_size)
        check_int("staleness", staleness, 1, expected="a positive int (epochs)", optional=True)
        self.beta = float(beta)
        self.s_min = float(s_min)
        self.history_size = history_size
        self.staleness = staleness
        self.styles = ("batch",) if staleness is None else ("batch", "epoch")
        self.history: Optional[History] = None
        self.last_keep_rate: Optional[float] = None

    def _history_on(self, device: torch.device) -> History:
        if self.history is None:
            self.history = History(self.history_size, device=device)
        elif self.history.device != device:
            moved = History(self.history_size, device=device)
            moved.load_state_dict(self.history.state_dict())
            self.history = moved
        return self.history

    # ---- batch style ----
    def choose(self, scores: Scores, *, step: int, seed: int, inputs: Any = None,
               targets: Optional[torch.Tensor] = None) -> Selection:
        values = scores.loss.detach()
        n = values.numel()
        idx = percentile_keep(values, self._history_on(values.device), beta=self.beta, s_min=self.s_min,
                              seed=seed, counter=step)
        self.last_keep_rate = idx.numel() / n if n else None
        return Selection(idx, torch.ones(idx.numel(), dtype=torch.float32, device=values.device), scores)

    # ---- epoch style (stale variant) ----
    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        if self.staleness is None:
            return super().plan_epoch(epoch, table, seed=seed, epochs=epochs, data=data)
        n = table.n
        loss = table.values("loss")
        seen = ~torch.isnan(loss)
        if epoch % self.staleness == 0 or not bool(seen.any()):
            self.last_keep_rate = 1.0
            return full_plan(n, seed, epoch)
        f = percentile(loss, loss[seen], backend="torch")  # NaN for never-scored samples
        p = torch.where(seen, keep_probability(f, self.beta, self.s_min), torch.ones_like(f))
        u = reference.bernoulli_uniforms(n, seed, epoch)
        kept = (u < p).nonzero().squeeze(1)
        order = kept[torch.randperm(kept.numel(), generator=seeded_generator(seed, epoch))]
        self.last_keep_rate = kept.numel() / n if n else None
        return EpochPlan(order, torch.ones(n))

    def stats(self) -> dict:
        return {"keep_rate": self.last_keep_rate, "history": 0 if self.history is None else len(self.history)}

    # ---- state ----
    def state_dict(self) -> dict:
        return {"strategy": type(self).__name__,
                "history": None if self.history is None else self.history.state_dict()}

    def _prepare_load(self, state: Any, path: str, n: Optional[int] = None) -> Callable[[], None]:
        _state.require_keys(path, state, ("history",), tag=type(self).__name__)
        h = state["history"]
        if h is None:
            return lambda: setattr(self, "history", None)
        where = _state.key(path, "history")
        buffer, _, _ = _state.check_history(where, h, self.history_size, "the state holds a loss history of size "
                                            f"{{size}}, this strategy has history_size={self.history_size}")

        def load() -> None:
            device = self.history.device if self.history is not None else buffer.device
            history = History(self.history_size, device=device)
            history.load_state_dict(h)
            self.history = history
        return load

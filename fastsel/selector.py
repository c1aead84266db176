"""``BatchSelector``: in-batch selection for any training loop.

    selector = fastsel.BatchSelector(model, fastsel.strategies.MMS(keep=64), head=model.fc)
    for x, y in DataLoader(train_set, batch_size=640, shuffle=True, drop_last=True):
        xb, yb, w = selector(x, y)
        (fastsel.score(model(xb), yb).loss * w).mean().backward(); opt.step(); opt.zero_grad()

Each call scores the candidate batch in inference mode (``model.eval()`` and
``torch.inference_mode()``: no BatchNorm running-statistic update, no autograd graph; the
model's train/eval mode is restored afterwards), lets the strategy choose, and returns the
chosen samples with their loss weights. The selector never owns the model, the optimizer
or the loop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from fastsel import _state
from fastsel.ops import score
from fastsel.sampler import Costs
from fastsel._checks import check_int
from fastsel.strategies.base import Strategy, check_strategy_and_seed, prepare_strategy_load

__all__ = ["BatchSelector", "scoring_forward"]

STAT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    raise TypeError(f"cannot find the batch size of a {type(batch).__name__}")


def _map_batch(batch: Any, take) -> Any:
    """``take(t)`` for a tensor, or for each tensor of a (named)tuple / list / dict, keeping
    the structure (the batch is in dimension 0 of every tensor)."""
    if isinstance(batch, torch.Tensor):
        return take(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple (kept by default_collate)
        return type(batch)(*(_map_batch(b, take) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_batch(b, take) for b in batch)
    if isinstance(batch, dict):
        return {k: _map_batch(v, take) for k, v in batch.items()}
    raise TypeError(f"cannot select samples from a {type(batch).__name__}; inputs must be a tensor "
                    "or a tuple/list/dict of tensors with the batch in dimension 0")


def scoring_forward(model: torch.nn.Module, inputs: Any, chunk_size: Optional[int] = None) -> torch.Tensor:
    """``model(inputs)`` in inference mode with the model in eval mode, restoring the mode
    of every submodule afterwards (BatchNorm running statistics stay untouched).

    ``chunk_size`` runs the forward on consecutive slices of the batch and concatenates
    the logits: for large candidate batches on the CPU, activations that fit the caches
    can make that faster than one big forward (eval mode makes the slices independent)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            n = _batch_size(inputs) if chunk_size else 0
            if not chunk_size or n <= chunk_size:
                return model(inputs)
            return torch.cat([model(_map_batch(inputs, lambda t, i=i: t[i:i + chunk_size]))
                              for i in range(0, n, chunk_size)])
    finally:
        for m, training in modes:
            m.training = training


class BatchSelector:
    """Scores a candidate batch and returns the samples the strategy keeps.

    Args:
        model: maps the inputs to logits [N, C].
        strategy: a strategy supporting the in-batch style.
        head: the final ``nn.Linear`` (its weight [C, D] is needed for MMS).
        seed: random strategies draw from (seed, step); ``step`` counts calls.
        mms: ``"exact"`` or ``"top2"`` for strategies that rank by MMS.
        backend: the ``fastsel.score`` backend.
        score_batch_size: run the scoring forward in slices of this many candidates.

    ``selector(x, y)`` returns ``(x_sel, y_sel, weights)``; ``last_indices`` holds the
    chosen positions in the candidate batch. ``costs`` counts samples
    scored and samples returned for training; ``stats`` describes the last call (score
    quantiles, selected vs rest mean loss); ``add_hook(fn)`` calls ``fn(stats)`` each step.
    """

    def __init__(self, model: torch.nn.Module, strategy: Strategy, *, head: Optional[torch.nn.Module] = None,
                 seed: int = 0, mms: str = "exact", backend: str = "auto",
                 score_batch_size: Optional[int] = None):
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        check_strategy_and_seed(strategy, "batch", seed)
        if strategy.needs_head:
            weight = getattr(head, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"{type(strategy).__name__} needs the classifier head: pass head=model.fc "
                                 "(a module whose .weight is [C, D])")
        self.model = model
        self.strategy = strategy
        self.head = head
        self.seed = seed
        self.mms = mms
        self.backend = backend
        check_int("score_batch_size", score_batch_size, 1, optional=True)  # bools rejected too
        self.score_batch_size = score_batch_size
        self.last_indices: Optional[torch.Tensor] = None
        self.step = 0
        self.costs = Costs()
        self._stats: Optional[dict] = None
        self._pending = None  # what the last call's stats are computed from, when read
        self._hooks: list[Callable[[dict], None]] = []

    def __call__(self, inputs: Any, target: torch.Tensor):
        if not isinstance(target, torch.Tensor) or target.dim() != 1:
            raise ValueError(f"target must be a 1-D tensor of class indices, got {target!r:.80}")
        if isinstance(self.model, torch.nn.Module):
            logits = scoring_forward(self.model, inputs, self.score_batch_size)
        else:
            logits = self.model(inputs)
        if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
            raise ValueError(f"model output must be logits [N, C] with N = {target.shape[0]} (the batch), "
                             f"got shape {tuple(logits.shape)}")
        weight = self.head.weight.detach() if self.strategy.needs_head else None
        with torch.inference_mode():
            scores = score(logits, target.to(logits.device), weight=weight, mms=self.mms, backend=self.backend)
        sel = self.strategy.choose(scores, step=self.step, seed=self.seed, inputs=inputs, targets=target)
        idx = sel.indices
        n = target.shape[0]
        self._record(scores, idx, n)
        self.step += 1
        # Outside inference mode: the weights take part in the training loss.
        weights = sel.weights.clone().to(target.device) if sel.weights.is_inference() else sel.weights.to(target.device)
        self.last_indices = idx  # positions in the candidate batch, e.g. to fetch per-sample extras
        return (_map_batch(inputs, lambda t: t[idx.to(t.device)]), target[idx.to(target.device)],
                weights)

    def _record(self, scores, idx: torch.Tensor, n: int) -> None:
        # The candidates' scoring forward, plus any forward a strategy runs itself (the
        # irreducible-loss model of RHO-LOSS reports it as last_scored).
        self.costs.scored += n + int(getattr(self.strategy, "last_scored", 0) or 0)
        self.costs.trained += idx.numel()
        self.costs.steps += 1
        # The statistics need a few device-to-host copies: they are computed when read (or
        # for hooks), not on every step of a loop that never looks at them. A strategy whose
        # state lives on the device gives a snapshot that reads it only then.
        snapshot = getattr(self.strategy, "stats_snapshot", None)
        strategy_stats = getattr(self.strategy, "stats", None)
        self._pending = (self.step, scores, idx, n,
                         snapshot() if callable(snapshot) else strategy_stats() if callable(strategy_stats) else None)
        self._stats = None
        if self._hooks:
            stats = self.stats
            for hook in self._hooks:
                hook(stats)

    @property
    def stats(self) -> dict:
        """The last call's statistics: step, candidates, selected, mean loss of the selected
        and of the rest, loss / mms / margin quantiles, and the strategy's own stats."""
        if self._stats is None and self._pending is not None:
            step, scores, idx, n, strategy_stats = self._pending
            chosen = torch.zeros(n, dtype=torch.bool, device=scores.loss.device)
            chosen[idx.to(chosen.device)] = True
            loss = scores.loss.float()
            stats = {"step": step, "candidates": n, "selected": idx.numel(),
                     "mean_loss_selected": float(loss[chosen].mean()) if idx.numel() else float("nan"),
                     "mean_loss_rest": float(loss[~chosen].mean()) if idx.numel() < n else float("nan")}
            q = torch.tensor(STAT_QUANTILES, device=loss.device)
            for field in ("loss", "mms", "margin"):
                values = getattr(scores, field)
                if values is not None and values.numel():
                    finite = values[torch.isfinite(values)].float()
                    if finite.numel():
                        stats[f"{field}_quantiles"] = dict(zip(STAT_QUANTILES, finite.quantile(q).tolist()))
            if strategy_stats is not None:  # e.g. whether an importance sampler has switched on
                stats["strategy"] = strategy_stats() if callable(strategy_stats) else strategy_stats
            self._stats = stats
            self._pending = None
        return self._stats if self._stats is not None else {}

    def add_hook(self, hook: Callable[[dict], None]) -> None:
        """Calls ``hook(stats)`` after every selection (e.g. to log MMS quantiles)."""
        self._hooks.append(hook)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "strategy": self.strategy.state_dict(),
                "costs": self.costs.as_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores a ``state_dict()``, checked whole first: a tampered state or another
        strategy's raises ``ValueError`` or ``TypeError`` naming the entry, and changes nothing."""
        _state.require_keys("state", state, ("step", "seed", "strategy", "costs"))
        step = _state.check_int("state['step']", state["step"], 0)
        seed = _state.check_int("state['seed']", state["seed"], 0)
        load_strategy = prepare_strategy_load(self.strategy, state["strategy"], "state['strategy']")
        load_costs = self.costs._prepare_load(state["costs"], "state['costs']")
        load_strategy()  # first: only a strategy's own load_state_dict (see prepare_strategy_load) can fail
        self.step, self.seed = step, seed
        load_costs()

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

A cheaper scorer can stand in for the model's forward (``scorer=``, e.g. a small proxy
network that learns online, ``fastsel.experiments.proxies.OnlineProxy``):

    from fastsel.experiments.proxies import OnlineProxy, pooled_mlp
    proxy = OnlineProxy(pooled_mlp((1, 28, 28), 10))
    selector = fastsel.BatchSelector(model, fastsel.strategies.HardLoss(keep=128), scorer=proxy)
    for x, y in loader:
        xb, yb, w = selector(x, y)
        ...                      # the model's training step on (xb, yb, w)
        selector.observe(xb, yb)  # one step of the proxy, counted in selector.costs
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from fastsel import _state
from fastsel.costs import Costs, ScorerCosts
from fastsel.forward import batch_size_of, default_logits_fn, map_batch, scoring_forward
from fastsel.ops import score
from fastsel._checks import check_int
from fastsel.strategies.base import Strategy, check_strategy_and_seed, prepare_strategy_load

__all__ = ["BatchSelector"]

STAT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _linear_weight(module: Any) -> Optional[torch.Tensor]:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _scorer_head(scorer: Any, head: Any, strategy: Strategy) -> Any:
    """The head whose weight the MMS of the scorer's logits is computed with: ``head``
    if given (for an ``nn.Module`` scorer it must be one of the scorer's own modules),
    else the scorer's ``.head`` or ``.fc``. None when the strategy needs no head."""
    if head is not None and isinstance(scorer, torch.nn.Module) and \
            not any(m is head for m in scorer.modules()):
        raise ValueError("head must be the classifier layer of the scorer (the module producing the scoring "
                         "logits), not of the model: pass head=<a submodule of scorer> or leave head=None to use "
                         "scorer.head / scorer.fc")
    if not strategy.needs_head:
        return head
    if head is None:
        for name in ("head", "fc"):
            candidate = getattr(scorer, name, None)
            if _linear_weight(candidate) is not None:
                return candidate
        raise ValueError(f"{type(strategy).__name__} needs the classifier head of the scorer (the MMS is computed "
                         "with the weight of the layer producing the scoring logits): pass head=<the scorer's "
                         "final nn.Linear>, or give the scorer a .head or .fc whose .weight is [C, D]")
    if _linear_weight(head) is None:
        raise ValueError(f"{type(strategy).__name__} needs the classifier head of the scorer: head must be a "
                         "module whose .weight is [C, D]")
    return head


class BatchSelector:
    """Scores a candidate batch and returns the samples the strategy keeps.

    Args:
        model: maps the inputs to logits [N, C].
        strategy: a strategy supporting the in-batch style.
        head: the final ``nn.Linear`` of the module producing the scoring logits (its
            weight [C, D] is needed for MMS): the model's (``model.fc``) without a scorer,
            the scorer's with one (see ``scorer``).
        seed: random strategies draw from (seed, step); ``step`` counts calls.
        mms: ``"exact"`` or ``"top2"`` for strategies that rank by MMS.
        backend: the ``fastsel.score`` backend.
        score_batch_size: run the scoring forward in slices of this many candidates.
        scorer: a callable ``inputs -> logits [N, C]`` used instead of the model's forward
            to score the candidates (a cheaper proxy; the model is then not run at all by
            the selector). An ``nn.Module`` scorer is run as the model would be
            (``scoring_forward``: eval mode, inference mode, every submodule's mode
            restored, sliced by ``score_batch_size``); any other callable is called as is.
            Its forwards are counted in ``costs.scored``. Head rule: the MMS is computed
            with the weight of the layer that produces the scoring logits, so ``head`` must
            then be the scorer's (for an ``nn.Module`` scorer, one of its own modules,
            else ``ValueError``); left None, the scorer's ``.head`` or ``.fc`` is used.
            A scorer that learns online has ``observe(inputs, targets[, logits])``: train
            it through ``selector.observe``, which counts the samples in
            ``costs.scorer_trained`` (``costs`` is then a ``fastsel.costs.ScorerCosts``).
        logits_fn: ``(model, inputs) -> logits [N, C]``, the model's scoring forward, for
            models called otherwise or returning more than logits (e.g. a Hugging Face
            model: ``lambda m, batch: m(**batch).logits``). Default: ``model(inputs)``,
            or its ``logits`` when the output is a dict or has that attribute (a
            ``ModelOutput``). Runs as the model's forward does (eval mode, inference
            mode, sliced by ``score_batch_size``).

    ``selector(x, y)`` returns ``(x_sel, y_sel, weights)``; ``last_indices`` holds the
    chosen positions in the candidate batch. ``costs`` counts samples
    scored and samples returned for training; ``stats`` describes the last call (score
    quantiles, selected vs rest mean loss); ``add_hook(fn)`` calls ``fn(stats)`` each step.
    """

    def __init__(self, model: torch.nn.Module, strategy: Strategy, *, head: Optional[torch.nn.Module] = None,
                 seed: int = 0, mms: str = "exact", backend: str = "auto",
                 score_batch_size: Optional[int] = None, scorer: Optional[Callable[[Any], torch.Tensor]] = None,
                 logits_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None):
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(f"logits_fn must be callable (model, inputs) -> logits [N, C], got "
                            f"{type(logits_fn).__name__}")
        if logits_fn is not None and scorer is not None:
            raise ValueError("logits_fn is the model's scoring forward, but with scorer= the model is not run to "
                             "score: make the scorer return the logits [N, C] and leave logits_fn unset")
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        if scorer is not None and not callable(scorer):
            raise TypeError(f"scorer must be callable (inputs -> logits [N, C]) or None, got {type(scorer).__name__}")
        check_strategy_and_seed(strategy, "batch", seed)
        if scorer is not None:
            head = _scorer_head(scorer, head, strategy)
        elif strategy.needs_head:
            weight = getattr(head, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"{type(strategy).__name__} needs the classifier head: pass head=model.fc "
                                 "(a module whose .weight is [C, D])")
        self.model = model
        self.logits_fn = logits_fn
        self.scorer = scorer
        self.strategy = strategy
        self.head = head
        self.seed = seed
        self.mms = mms
        self.backend = backend
        check_int("score_batch_size", score_batch_size, 1, optional=True)  # bools rejected too
        self.score_batch_size = score_batch_size
        self.last_indices: Optional[torch.Tensor] = None
        self.step = 0
        self.costs = ScorerCosts() if callable(getattr(scorer, "observe", None)) else Costs()
        self._stats: Optional[dict] = None
        self._pending = None  # what the last call's stats are computed from, when read
        self._hooks: list[Callable[[dict], None]] = []

    def __call__(self, inputs: Any, target: torch.Tensor):
        if not isinstance(target, torch.Tensor) or target.dim() != 1:
            raise ValueError(f"target must be a 1-D tensor of class indices, got {target!r:.80}")
        forward, what = (self.model, "model") if self.scorer is None else (self.scorer, "scorer")
        fn = self.logits_fn if self.scorer is None else None
        if isinstance(forward, torch.nn.Module):
            logits = scoring_forward(forward, inputs, self.score_batch_size, fn)
        else:
            logits = (fn or default_logits_fn)(forward, inputs)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != target.shape[0]:
            got = f"shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
            how = ("pass logits_fn=lambda model, inputs: <the logits [N, C] of model on inputs> (e.g. "
                   "model(**inputs).logits)" if what == "model" else "make the scorer return logits [N, C]")
            raise ValueError(f"the {what}'s output must be logits [N, C] with N = {target.shape[0]} (the batch), "
                             f"got {got}: {how}")
        weight = self.head.weight.detach() if self.strategy.needs_head else None
        if weight is not None and weight.shape[0] != logits.shape[1]:
            raise ValueError(f"head must be the classifier layer of the {what} producing the scoring logits: its "
                             f"weight has {weight.shape[0]} rows but the logits have C = {logits.shape[1]} columns")
        with torch.inference_mode():
            scores = score(logits, target.to(logits.device), head=weight, mms=self.mms, backend=self.backend)
        sel = self.strategy.choose(scores, step=self.step, seed=self.seed, inputs=inputs, targets=target)
        idx = sel.indices
        n = target.shape[0]
        self._record(scores, idx, n)
        self.step += 1
        # Outside inference mode: the weights take part in the training loss.
        weights = sel.weights.clone().to(target.device) if sel.weights.is_inference() else sel.weights.to(target.device)
        self.last_indices = idx  # positions in the candidate batch, e.g. to fetch per-sample extras
        return (map_batch(inputs, lambda t: t[idx.to(t.device)]), target[idx.to(target.device)],
                weights)

    def observe(self, inputs: Any, target: torch.Tensor, logits: Optional[torch.Tensor] = None) -> Any:
        """One training step of a scorer that learns online: ``scorer.observe(inputs,
        target[, logits])`` (``logits``: the model's training-forward output on those
        samples, for a scorer that distils it), its samples counted in
        ``costs.scorer_trained``. Returns what the scorer's ``observe`` returns."""
        observe = getattr(self.scorer, "observe", None)
        if not callable(observe):
            raise TypeError("observe needs a scorer that learns online (with an observe method), got "
                            + ("no scorer" if self.scorer is None else type(self.scorer).__name__))
        out = observe(inputs, target) if logits is None else observe(inputs, target, logits)
        self.costs.scorer_trained += batch_size_of(inputs)
        return out

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

    def __repr__(self) -> str:
        def name(m):
            return None if m is None else type(m).__name__

        return (f"BatchSelector({self.strategy!r}, model={name(self.model)}, scorer={name(self.scorer)}, "
                f"head={name(self.head)}, seed={self.seed}, mms={self.mms!r}, backend={self.backend!r}, "
                f"score_batch_size={self.score_batch_size}, step={self.step}, costs={self.costs!r})")

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

"""In-batch importance sampling: CDF sampling (Knutsson, Unnebäck, Jönsson & Eilertsen
2023) and upper-bound importance sampling (Katharopoulos & Fleuret 2018)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch

from fastsel.reference import Scores, times_power_of_two
from fastsel.selection import Selection, sample
from fastsel import _checks, _state
from fastsel._checks import check_bool, check_choice, check_real
from fastsel.strategies.base import ScoreTable, Strategy, keep_in_batch
from fastsel.strategies.epoch_rule import EpochRule
from fastsel.strategies.rescoring import Rescorer

__all__ = ["CDFSampling", "UpperBoundIS"]

# Relative floor given to zero importances when a draw without replacement needs more
# samples than there are positive importances (see ``_importance``).
_ZERO_FLOOR = 1e-12


def _importance(values: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 importances from a score: NaN (rows whose target is
    ``ignore_index`` have NaN ``grad_norm``, invalid rows NaN everything) becomes 0, +inf
    (a loss that overflowed) float32's largest value."""
    v = values.detach().to(torch.float32)
    return torch.nan_to_num(v, nan=0.0, posinf=torch.finfo(torch.float32).max).clamp_min(0.0)


def _uniform(n: int, k: int, device, *, seed: int, step: int) -> Selection:
    """``k`` of ``n`` candidates uniformly without replacement, weights ones."""
    sel = sample(torch.ones(n, device=device), k, seed=seed, counter=step)
    return Selection(sel.indices, torch.ones(k, dtype=torch.float32, device=device), None)


def _proportional(importance: torch.Tensor, k: int, *, replacement: bool, seed: int, step: int) -> Selection:
    """``k`` draws with P ∝ importance (``fastsel.sample``), with the degenerate cases
    handled: all-zero importances give a uniform draw; without replacement, when fewer
    than ``k`` importances are positive, the zero ones are raised to 1e-12 × the largest
    so that the draw can be completed (they then come after every positive one with
    overwhelming probability).

    The cases are chosen with ``torch.where`` on the device, not with Python branches on
    counts, so a training step does not wait for the device here.

    The importances are first multiplied by the power of two that puts the largest in
    [0.5, 1): exact, so the draws are the same, and the floor 1e-12 x the largest is then
    a normal float32 even when every importance is tiny (a very confident batch, whose
    largest loss may be 1e-38: 1e-12 of that underflows to 0)."""
    if importance.numel() == 0:
        return sample(importance, k, replacement=replacement, seed=seed, counter=step)
    positive = (importance > 0).sum()
    top = importance.max()
    shift = -torch.frexp(top).exponent  # 0 for top = 0; up to 149 (a subnormal top)
    importance = times_power_of_two(importance, shift)
    if not replacement:
        raised = torch.clamp_min(importance, times_power_of_two(top, shift) * _ZERO_FLOOR)
        importance = torch.where(positive < k, raised, importance)
    importance = torch.where(positive == 0, torch.ones_like(importance), importance)
    return sample(importance, k, replacement=replacement, seed=seed, counter=step)


def _switched(on: torch.Tensor, importance: torch.Tensor, draw: Callable[[torch.Tensor], Selection],
              uniform: Callable[[], Selection]) -> Selection:
    """``draw(importance)`` where the 0-d bool ``on`` holds, else ``uniform()``. On the
    CPU ``on`` is read (free there) and only the used draw is made. On CUDA reading it
    would make the step wait for the device: both draws are made and ``torch.where``
    picks, the first one drawing from ones when unused so that it is always defined."""
    if _checks.checks_on_host(on):
        return draw(importance) if bool(on) else uniform()
    drawn, flat = draw(torch.where(on, importance, 1.0)), uniform()
    return Selection(torch.where(on, drawn.indices, flat.indices), torch.where(on, drawn.weights, flat.weights),
                     None)


class CDFSampling(EpochRule, Strategy):
    """CDF importance sampling (Knutsson, Unnebäck, Jönsson & Eilertsen 2023, "CDF-based
    importance sampling and visualization for neural network training", VCBM,
    doi:10.2312/vcbm.20231212).

    In-batch style only (``fastsel.BatchSelector``). From the scored candidate batch (1024
    in the paper: the selector's batch, the user's choice) draw ``keep`` (paper: 128)
    samples with probability proportional to the importance ``by`` (``"loss"`` or
    ``"grad_norm"``), by ``fastsel.sample`` seeded with ``(seed, step)``: without
    replacement by default (the exponential race), or by inverting the cumulative sum
    with ``replacement=True`` (the paper's code inverts the CDF with replacement).

    The sampling switches on once the running mean of the candidate batches' mean loss
    falls below ``switch_ratio`` (paper: 0.75) times its initial value (the first
    candidate batch's mean loss); before that each step keeps a uniform random ``keep``
    of the candidates (seeded, without replacement). The running mean is an exponential
    moving average with factor ``smoothing`` (0.9), started at the initial value. Once
    on, the sampling stays on (the paper switches once). The paper measures the loss on
    held-out batches; here it is the candidate batch's loss, which the selector computes
    anyway. ``switch_ratio=None`` samples from the first step.

    Weights: ones by default (the paper trains on the drawn samples unweighted, so the
    loss is biased towards hard samples: ``unbiased`` is False); ``reweight=True``
    returns fastsel's importance weights 1 / (N P(i)) normalised to mean 1
    (``fastsel.importance_weights``; self-normalised, ``unbiased`` True). NaN scores
    count as importance 0; an all-zero candidate batch is drawn uniformly; without
    replacement, when fewer than ``keep`` importances are positive (e.g. ``grad_norm``
    saturating at 0 in float32 for confident correct predictions), the zero ones are
    raised to 1e-12 × the largest so the draw can be completed (they come last).

    State (``state_dict``): the initial and running loss and whether the sampling is on
    (``active``); ``stats()`` reports them.

    Epoch style (``fastsel.ScoreSampler``, ``keep`` a float fraction of the data set):
    each epoch draws ``round(keep * N)`` samples by the same law from the scores the
    training forward recorded, every sample with an unknown score visited as well
    (``fastsel.strategies.EpochRule``; ``refresh=`` with ``rescorer=`` rescores the data
    set every R epochs). The switch compares the mean of the table's last recorded
    losses with its value at the first epoch that had any (``initial_loss``); while off,
    the epoch draws uniformly. Weights as in the in-batch style (``reweight``).
    """

    def __init__(self, keep: Union[int, float] = 128, *, by: str = "loss", replacement: bool = False,
                 switch_ratio: Optional[float] = 0.75, smoothing: float = 0.9, reweight: bool = False,
                 refresh: Optional[int] = None, rescorer: Optional[Rescorer] = None):
        self._init_epoch_rule(keep, refresh, rescorer)
        check_choice("by", by, ("loss", "grad_norm"))
        check_bool("replacement", replacement)
        check_real("switch_ratio", switch_ratio, low=0, low_inclusive=False, finite=True,
                   expected="a positive number", optional=True)
        check_real("smoothing", smoothing, low=0, high=1, high_inclusive=False)
        check_bool("reweight", reweight)
        self.by = by
        self.table_fields = tuple(dict.fromkeys((by, "loss")))
        self.replacement = replacement
        self.switch_ratio = switch_ratio
        self.smoothing = float(smoothing)
        self.reweight = reweight
        self.unbiased = reweight
        # (initial loss, running loss, active) as float64 on the scores' device, NaN while
        # no loss was seen: the switch is decided there, so a step never waits for the
        # device. Read as Python numbers only by the properties, stats() and state_dict().
        self._switch: Optional[torch.Tensor] = None

    def _switch_on(self, device: torch.device) -> torch.Tensor:
        if self._switch is None:  # made on the device: no copy from the host
            self._switch = torch.full((3,), math.nan, dtype=torch.float64, device=device)
            self._switch[2] = 0.0
        elif self._switch.device != device:
            self._switch = self._switch.to(device)
        return self._switch

    def _switch_values(self, switch: Optional[torch.Tensor]) -> tuple[Optional[float], Optional[float], bool]:
        if switch is None:
            return None, None, self.switch_ratio is None
        initial, running, active = switch.tolist()
        return (None if math.isnan(initial) else initial, None if math.isnan(running) else running,
                self.switch_ratio is None or active > 0)

    @property
    def initial_loss(self) -> Optional[float]:
        """The first candidate batch's mean loss (None before any finite loss)."""
        return self._switch_values(self._switch)[0]

    @property
    def running_loss(self) -> Optional[float]:
        """The moving average of the candidate batches' mean loss."""
        return self._switch_values(self._switch)[1]

    @property
    def active(self) -> bool:
        """Whether the sampling is on."""
        return self._switch_values(self._switch)[2]

    def _observe(self, loss: torch.Tensor) -> torch.Tensor:
        """Updates the initial and running loss with a candidate batch's losses and the
        switch; returns whether the sampling is on (a bool tensor on the device)."""
        switch = self._switch_on(loss.device)
        finite = torch.isfinite(loss)
        # NaN (0 / 0) when no loss is finite: the state is then left as it was
        mean = torch.where(finite, loss, 0).double().sum() / finite.sum()
        initial, running, active = switch.unbind()
        initial = torch.where(initial.isnan(), mean, initial)
        smoothed = torch.where(running.isnan(), mean, self.smoothing * running + (1.0 - self.smoothing) * mean)
        running = torch.where(mean.isnan(), running, smoothed)
        on = active > 0
        if self.switch_ratio is not None:
            on = on | (running < self.switch_ratio * initial)
        self._switch = torch.stack([initial, running, on.double()])
        return on

    def choose(self, scores: Scores, *, step: int, seed: int, inputs: Any = None,
               targets: Optional[torch.Tensor] = None) -> Selection:
        values = getattr(scores, self.by).detach()
        n = values.numel()
        k = self.n_keep(n)
        keep_in_batch(k, n)
        importance = _importance(values)
        on = self._observe(scores.loss.detach())

        def draw(w: torch.Tensor) -> Selection:
            return _proportional(w, k, replacement=self.replacement, seed=seed, step=step)

        sel = draw(importance) if self.switch_ratio is None else _switched(
            on, importance, draw, lambda: _uniform(n, k, values.device, seed=seed, step=step))
        # the uniform draw's weights are ones
        weights = sel.weights if self.reweight else torch.ones_like(sel.weights)
        return Selection(sel.indices, weights, scores)

    # ---- epoch style ----
    def epoch_scores(self, table: ScoreTable) -> torch.Tensor:
        """The importance score of every sample (NaN where unknown), after updating the
        switch from the table's mean loss."""
        loss = table.values("loss").to(torch.float64)
        known = ~torch.isnan(loss)
        if bool(known.any()):
            mean = float(loss[known].mean())
            initial, _, active = self._switch_values(self._switch)
            initial = mean if initial is None else initial
            on = active or (self.switch_ratio is not None and mean < self.switch_ratio * initial)
            self._switch = torch.tensor([initial, mean, float(on)], dtype=torch.float64)
        return table.values(self.by)

    def epoch_pick(self, values: torch.Tensor, k: int, *, seed: int, epoch: int):
        if not self.active:
            return _uniform(values.numel(), k, values.device, seed=seed, step=epoch).indices, None
        sel = _proportional(_importance(values), k, replacement=self.replacement, seed=seed, step=epoch)
        return sel.indices, sel.weights if self.reweight else None

    def _stats_of(self, switch: Optional[torch.Tensor]) -> dict:
        initial, running, active = self._switch_values(switch)
        return {"active": active, "initial_loss": initial, "running_loss": running}

    def stats(self) -> dict:
        return self._stats_of(self._switch)

    def stats_snapshot(self) -> Callable[[], dict]:
        """``stats()`` of this step, read from the device only when called."""
        switch = None if self._switch is None else self._switch.clone()
        return lambda: self._stats_of(switch)

    def state_dict(self) -> dict:
        initial, running, active = self._switch_values(self._switch)
        return {"strategy": type(self).__name__, "initial_loss": initial, "running_loss": running, "active": active}

    def _prepare_load(self, state: Any, path: str, n: Optional[int] = None) -> Callable[[], None]:
        _state.require_keys(path, state, ("initial_loss", "running_loss", "active"), tag=type(self).__name__)
        initial, running = (_state.check_float(_state.key(path, k), state[k], optional=True)
                            for k in ("initial_loss", "running_loss"))
        if (initial is None) != (running is None):  # both are set by the first finite loss
            raise ValueError(f"{_state.key(path, 'initial_loss')} and {_state.key(path, 'running_loss')} must both "
                             f"be None (no loss seen yet) or both numbers, got {initial} and {running}")
        active = _state.check_bool(_state.key(path, "active"), state["active"])
        switch = torch.tensor([math.nan if initial is None else initial, math.nan if running is None else running,
                               float(active)], dtype=torch.float64)
        return lambda: setattr(self, "_switch", switch)


class UpperBoundIS(EpochRule, Strategy):
    """Upper-bound importance sampling (Katharopoulos & Fleuret 2018, "Not all samples are
    created equal: deep learning with importance sampling", ICML).

    In-batch style only (``fastsel.BatchSelector``). The paper presamples B = ``presample``
    × b candidates (presample = 3) uniformly, scores them with the upper bound of the
    per-sample gradient norm, ``grad_norm`` = ‖softmax(z) − onehot(y)‖ (``by="loss"`` is
    the paper's loss-based comparison), and draws b = ``keep`` of them WITH replacement
    with P(i) = g_i = s_i / Σ_j s_j. The weights 1 / (B g_i) make the gradient estimate
    unbiased; here they are normalised to mean 1 over the draw (``fastsel.sample`` /
    ``fastsel.importance_weights``, the self-normalised estimator; ``unbiased`` is True).
    The candidate batch is the selector's batch, the user's choice: make it
    ``candidate_batch`` = presample × keep samples (e.g. ``DataLoader(batch_size=
    strategy.candidate_batch)``).

    The switch (the paper's variance-reduction estimator; the authors'
    ``VarianceReductionCondition``): with g the normalised scores of the candidate batch
    and u = 1/B the uniform distribution,

        tau = 1 / sqrt(1 − ‖g − u‖² / ‖g‖²)   (= sqrt(B ‖g‖²), since Σ g = 1),

    the equivalent batch-size increment of sampling by g instead of uniformly (1 for
    uniform scores, up to sqrt(B) when one sample dominates). tau is smoothed by an
    exponential moving average with factor ``momentum`` (a_tau = 0.9), started at 0 as
    in the authors' code, updated with each candidate batch, and importance sampling is
    on for a step when that average exceeds ``tau_threshold``; while off, a uniform
    random ``keep`` of the candidates is kept (without replacement) with weights 1.

    Default threshold, derived as in the paper (its eq. 29): with t_f the forward time of
    one sample and t_b = ``backward_cost`` × t_f its backward time (paper: t_b ≈ 2 t_f, a
    forward is ~1/3 of forward + backward), one importance-sampling step costs
    B t_f + b (t_f + t_b) and gives the variance of a uniform batch of tau b, which
    would cost tau b (t_f + t_b). Importance sampling pays when
    tau > (B t_f + b (t_f + t_b)) / (b (t_f + t_b)) = (B + (1 + r) b) / ((1 + r) b),
    r = ``backward_cost``: (B + 3b) / (3b) = 2 for B = 3b. ``tau_threshold=None`` (the
    default) computes this from the actual candidate batch size B of each step.

    Difference from the paper: while off, the paper trains on a uniform batch and
    estimates tau from the scores of that training batch, saving the presampling
    forward; ``BatchSelector`` always scores the whole candidate batch, so tau comes from
    the B candidates at every step and the off phase does not save that forward.

    State (``state_dict``): the moving average of tau; ``stats()`` reports tau, the last
    threshold and whether the last step sampled (``active``). Zero or NaN scores count
    as importance 0; an all-zero candidate batch has tau = 1 and is drawn uniformly.

    Epoch style (``fastsel.ScoreSampler``, ``keep`` a float fraction of the data set):
    each epoch draws ``round(keep * N)`` samples WITH replacement, P ∝ the recorded
    ``grad_norm`` (or loss), weights 1 / (N P(i)) normalised to mean 1, every sample with
    an unknown score visited as well at weight 1 (``fastsel.strategies.EpochRule``). The
    tau switch has no counterpart there: its point is to save the presampling forward,
    and the epoch style scores nothing beyond the training forward.
    """

    unbiased = True

    def __init__(self, keep: Union[int, float] = 128, *, presample: float = 3.0, tau_threshold: Optional[float] = None,
                 backward_cost: float = 2.0, momentum: float = 0.9, by: str = "grad_norm",
                 refresh: Optional[int] = None, rescorer: Optional[Rescorer] = None):
        self._init_epoch_rule(keep, refresh, rescorer)
        check_choice("by", by, ("grad_norm", "loss"))
        self.table_fields = (by,)
        check_real("presample", presample, low=1, low_inclusive=False,
                   expected="a number > 1 (the candidate batch is presample × keep)")
        check_real("tau_threshold", tau_threshold, low=1, optional=True)
        check_real("backward_cost", backward_cost, low=0)
        check_real("momentum", momentum, low=0, high=1, high_inclusive=False)
        self.presample = float(presample)
        self.tau_threshold = tau_threshold
        self.backward_cost = float(backward_cost)
        self.momentum = float(momentum)
        self.by = by
        # The moving average of tau and whether the last step sampled, on the scores'
        # device (the decision is made there, so a step never waits for the device); read
        # as Python numbers only by the properties, stats() and state_dict().
        self._tau: Optional[torch.Tensor] = None  # made on the first step's device (0 before)
        self._active: Optional[torch.Tensor] = None
        self.last_threshold: Optional[float] = None

    @property
    def tau(self) -> float:
        """The moving average of tau."""
        return self._stats_of(self._tau, self._active, None)["tau"]

    @property
    def active(self) -> bool:
        """Whether the last step's average tau exceeded its threshold."""
        return self._stats_of(self._tau, self._active, None)["active"]

    @property
    def candidate_batch(self) -> int:
        """The candidate batch size the paper uses: presample × keep (keep an int)."""
        if isinstance(self.keep, float):
            raise ValueError(f"candidate_batch is presample x keep for an int keep (a count); keep={self.keep!r} "
                             "is a fraction of each candidate batch")
        return int(round(self.presample * self.keep))

    def threshold(self, n: int) -> float:
        """The tau threshold for a candidate batch of ``n`` samples."""
        if self.tau_threshold is not None:
            return float(self.tau_threshold)
        c = (1.0 + self.backward_cost) * self.n_keep(n)
        return (n + c) / c

    @staticmethod
    def _increment(importance: torch.Tensor) -> torch.Tensor:
        """``equivalent_batch_increment`` as a float64 tensor on the importances' device."""
        s = importance.detach().to(torch.float64)
        # Σ (g − u)² = Σ g² − 1/B because Σ g = 1, so the ratio under the root is (1/B) / Σ g².
        if _checks.checks_on_host(s):  # the host's correctly rounded sqrt, as in earlier versions
            total = float(s.sum())
            if not total > 0:
                return torch.tensor(1.0, dtype=torch.float64)
            g = s / total
            return torch.tensor(math.sqrt(s.numel() * float((g * g).sum())), dtype=torch.float64)
        total = s.sum()
        g = s / torch.where(total > 0, total, 1.0)
        return torch.where(total > 0, (s.numel() * (g * g).sum()).sqrt(), 1.0)

    @staticmethod
    def equivalent_batch_increment(importance: torch.Tensor) -> float:
        """tau = 1 / sqrt(1 − ‖g − u‖² / ‖g‖²) of one candidate batch (1 if all zero)."""
        return float(UpperBoundIS._increment(importance))

    def choose(self, scores: Scores, *, step: int, seed: int, inputs: Any = None,
               targets: Optional[torch.Tensor] = None) -> Selection:
        importance = _importance(getattr(scores, self.by))
        n = importance.numel()
        k = self.n_keep(n)
        keep_in_batch(k, n)
        device = importance.device
        increment = self._increment(importance)
        tau = increment.new_zeros(()) if self._tau is None else self._tau.to(device)
        self._tau = self.momentum * tau + (1.0 - self.momentum) * increment
        self.last_threshold = self.threshold(n)
        self._active = self._tau > self.last_threshold
        sel = _switched(self._active & (importance > 0).any(), importance,
                        lambda w: sample(w, k, replacement=True, seed=seed, counter=step),
                        lambda: _uniform(n, k, device, seed=seed, step=step))
        return Selection(sel.indices, sel.weights, scores)

    # ---- epoch style ----
    def epoch_scores(self, table: ScoreTable) -> torch.Tensor:
        return table.values(self.by)

    def epoch_pick(self, values: torch.Tensor, k: int, *, seed: int, epoch: int):
        sel = _proportional(_importance(values), k, replacement=True, seed=seed, step=epoch)
        return sel.indices, sel.weights

    @staticmethod
    def _stats_of(tau: Optional[torch.Tensor], active: Optional[torch.Tensor], threshold) -> dict:
        return {"active": active is not None and bool(active), "tau": 0.0 if tau is None else float(tau),
                "tau_threshold": threshold}

    def stats(self) -> dict:
        return self._stats_of(self._tau, self._active, self.last_threshold)

    def stats_snapshot(self) -> Callable[[], dict]:
        """``stats()`` of this step, read from the device only when called."""
        tau = None if self._tau is None else self._tau.clone()
        active = None if self._active is None else self._active.clone()
        threshold = self.last_threshold
        return lambda: self._stats_of(tau, active, threshold)

    def state_dict(self) -> dict:
        return {"strategy": type(self).__name__, "tau": self.tau, "active": self.active,
                "last_threshold": self.last_threshold}

    def _prepare_load(self, state: Any, path: str, n: Optional[int] = None) -> Callable[[], None]:
        _state.require_keys(path, state, ("tau", "active", "last_threshold"), tag=type(self).__name__)
        tau = _state.check_float(_state.key(path, "tau"), state["tau"], low=0.0)
        active = _state.check_bool(_state.key(path, "active"), state["active"])
        # every threshold is >= 1: tau_threshold is, and (n + c) / c with c > 0
        threshold = _state.check_float(_state.key(path, "last_threshold"), state["last_threshold"], low=1.0,
                                       optional=True)

        def load() -> None:
            self._tau = torch.tensor(tau, dtype=torch.float64)
            self._active = torch.tensor(active)
            self.last_threshold = threshold
        return load

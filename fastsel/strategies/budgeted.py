"""Importance sampling under a training budget (Arazo, Ortego, Albert, O'Connor &
McGuinness 2021, "How Important is Importance Sampling for Deep Budgeted Training?",
BMVC): p-SGD and c-SGD."""

from __future__ import annotations

from typing import Any

import torch

from fastsel.selection import importance_weights, sample
from fastsel._checks import check_bool, check_choice, check_fraction, check_int
from fastsel.strategies.base import EpochPlan, ScoreTable, Strategy, fraction_count, seeded_generator

__all__ = ["PSGD", "CSGD"]

UNSEEN = ("max", "mean")


class _Budgeted(Strategy):
    """Shared by ``PSGD`` and ``CSGD``; subclasses define ``_transform(s)``."""

    styles = ("epoch",)
    table_fields = ("p_wrong",)

    def __init__(self, budget: float = 1.0, *, reweight: bool = False, unseen: str = "max",
                 warmup_epochs: int = 0):
        check_fraction("budget", budget)
        check_bool("reweight", reweight)
        check_choice("unseen", unseen, UNSEEN)
        check_int("warmup_epochs", warmup_epochs, 0)
        self.budget = budget
        self.reweight = reweight
        self.unseen = unseen
        self.warmup_epochs = warmup_epochs
        self.unbiased = reweight

    def _transform(self, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def uncertainty(self, table: ScoreTable) -> torch.Tensor:
        """s_i [N] (float64): the running mean of 1 - p_y over every training forward of
        sample i, never-seen samples filled with the largest (``unseen="max"``) or the
        mean (``"mean"``) of the seen ones, or 1 for every sample before any observation."""
        s = table.running_mean("p_wrong").to(torch.float64)
        known = torch.isfinite(s)
        if not bool(known.any()):
            return torch.ones(table.n, dtype=torch.float64)
        fill = s[known].max() if self.unseen == "max" else s[known].mean()
        return torch.where(known, s, fill)

    def importance(self, table: ScoreTable) -> torch.Tensor:
        """The unnormalised sampling probabilities [N] (float64): f + mean(f), f = the
        method's function of ``uncertainty(table)``; uniform if f is all zero."""
        f = self._transform(self.uncertainty(table))
        p = f + f.mean()
        if not bool(p.sum() > 0):
            return torch.ones_like(p)
        return p

    def epoch_size_bound(self, epoch: int, n: int, epochs: int) -> tuple[int, bool]:
        return fraction_count(self.budget, n), True

    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        n = table.n
        k = fraction_count(self.budget, n)
        if epoch < self.warmup_epochs:
            importance = torch.ones(n, dtype=torch.float64)
        else:
            importance = self.importance(table)
        p = importance.to(torch.float32)
        drawn = sample(p, k, replacement=False, seed=seed, counter=epoch).indices.cpu()
        # The race order favours high importance early in the epoch; the authors visit
        # the drawn samples in random order (SubsetRandomSampler), and so does the plan.
        order = drawn[torch.randperm(k, generator=seeded_generator(seed, epoch))]
        weights = torch.ones(n)
        if self.reweight:
            weights[drawn] = importance_weights(p, drawn)
        return EpochPlan(order, weights)


class PSGD(_Budgeted):
    """p-SGD, importance sampling by prediction uncertainty, as studied under a budget by
    Arazo et al. (2021) (after the sampling by difficulty, 1 - p̄_y + ε, of Chang,
    Learned-Miller & McCallum 2017, "Active Bias").

    s_i = the running mean of 1 - p_y(x_i) over every training forward of sample i so far
    (``table.running_mean("p_wrong")``; the training forward's scores reach the table
    through ``ScoreSampler.update``). Each epoch draws ``round(budget * N)`` distinct
    samples (at least one) with probability P(i) ∝ s_i + mean(s) (successive sampling
    without replacement: ``fastsel.sample``, seeded by ``seed`` with ``counter=epoch``;
    the authors' ``np.random.choice(replace=False, p=P)`` draws from the same
    distribution) and visits them in a seeded random order. The additive mean is the
    authors' smoothing constant: every sample keeps a chance of being drawn.

    Never-seen samples (with ``budget < 1`` after the first epochs): s = the largest s of
    the seen ones (``unseen="max"``, as the authors' code does so that every sample gets
    seen early) or their mean (``unseen="mean"``). Before any observation s = 1 for
    every sample, i.e. a uniform draw (the first epoch). ``warmup_epochs`` (the authors'
    ``c_sgd_warmup``, default 0) epochs draw uniformly regardless of the scores.

    Budget: ``budget`` in (0, 1] is the fraction of the full training's iterations;
    every epoch sees ``budget * N`` samples and the number of epochs is unchanged (the
    authors' setting). Compressing the learning-rate schedule to the budget (the authors
    decay linearly over ``epochs * budget * N / batch_size`` iterations) is the training
    harness's job; the default ``budget=1.0`` draws every sample once per epoch. The
    authors take ``int(budget * N)`` samples per epoch; fastsel rounds, like
    ``Uniform(budget=...)``, so that the uniform baseline sees as many samples.

    Weights: ones (the authors do not reweight; ``unbiased = False``). With
    ``reweight=True`` the drawn samples get fastsel's importance weights 1 / (N P(i))
    normalised to mean 1 over the draw (``fastsel.importance_weights``; ``unbiased``
    becomes True): an approximation of the inverse inclusion probabilities that is
    close when the budget is small; at ``budget=1`` every sample is drawn exactly once,
    the unweighted loss is already the full-data loss and reweighting biases it.

    Epoch style only. State: none beyond the sampler's (score table and current plan).
    """

    unbiased = False

    def _transform(self, s: torch.Tensor) -> torch.Tensor:
        return s


class CSGD(_Budgeted):
    """c-SGD, importance sampling by prediction confusion (threshold closeness), as
    studied under a budget by Arazo et al. (2021) (after the sampling by threshold
    closeness, p̄_y (1 - p̄_y) + ε, of Chang, Learned-Miller & McCallum 2017).

    Exactly ``PSGD`` with the importance s̄(1 - s̄) instead of s̄: with s̄_i the running
    mean of 1 - p_y(x_i) (never-seen samples filled as in ``PSGD``, before the product),
    f_i = s̄_i (1 - s̄_i) and P(i) ∝ f_i + mean(f) over the N samples (docs/methods.md section 3;
    the authors' code: ``curr_prob * (1 - curr_prob)`` then ``+ curr_prob.mean()``).
    f peaks for samples predicted with p_y ≈ 1/2, near the decision threshold, and
    vanishes for samples always right (p_y = 1) or always wrong (p_y = 0). If f is zero
    everywhere the draw is uniform. Before any observation s̄ = 1, f = 0: uniform.

    Knobs, budget, weights and state as in ``PSGD``.
    """

    unbiased = False

    def _transform(self, s: torch.Tensor) -> torch.Tensor:
        return s * (1.0 - s)

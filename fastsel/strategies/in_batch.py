"""Strategies that rank scores: MMS selection and its baselines (Weinstein, Fine & Hel-Or),
in the in-batch and the epoch style, and uniform sampling."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from fastsel.reference import Scores
from fastsel.selection import SCORE_DIRECTIONS, Selection, sample, select_topk
from fastsel._checks import check_choice, check_positive_int, check_real
from fastsel.strategies.base import EpochPlan, ScoreTable, Strategy, fraction_count, full_plan, keep_in_batch
from fastsel.strategies.epoch_rule import EpochRule
from fastsel.strategies.rescoring import Rescorer

__all__ = ["TopScore", "MMS", "HardLoss", "MaxEntropy", "Uniform"]


class TopScore(EpochRule, Strategy):
    """Keeps the ``keep`` best by score ``by``: by default in the direction of
    ``fastsel.SCORE_DIRECTIONS`` (largest loss, smallest margin or MMS, ...), or
    ``largest``; ties go to the lowest index, NaN ranks last.

    In-batch style (``fastsel.BatchSelector``): ``keep`` candidates of each scored
    candidate batch, an int (a count) or a float (a fraction of the batch).

    Epoch style (``fastsel.ScoreSampler``, ``keep`` a float fraction of the data set):
    each epoch visits ``round(keep * N)`` samples chosen by the same rule on the scores
    the training forward recorded (``sampler.update(idx, s)``, no extra forward), every
    sample with an unknown score included; ``refresh=R`` with ``rescorer=`` rescores the
    whole data set in inference mode every R epochs (``fastsel.strategies.EpochRule``
    gives the details). Weights are ones (``unbiased`` False).
    """

    def __init__(self, keep: Union[int, float] = 64, *, by: str = "loss", largest: Optional[bool] = None,
                 refresh: Optional[int] = None, rescorer: Optional[Rescorer] = None):
        check_choice("by", by, sorted(SCORE_DIRECTIONS))
        self._init_epoch_rule(keep, refresh, rescorer)
        self.by = by
        self.largest = SCORE_DIRECTIONS[by] == "largest" if largest is None else largest
        self.needs_head = by == "mms"  # the MMS needs the classifier weight
        self.table_fields = (by,)

    def choose(self, scores: Scores, *, step: int, seed: int, inputs: Any = None,
               targets: Optional[torch.Tensor] = None) -> Selection:
        values = getattr(scores, self.by).detach()
        k = self.n_keep(values.numel())
        keep_in_batch(k, values.numel())
        sel = select_topk(values, k, self.largest)
        return Selection(sel.indices, sel.weights, scores)

    # ---- epoch style ----
    def epoch_scores(self, table: ScoreTable) -> torch.Tensor:
        return table.values(self.by)

    def epoch_pick(self, values: torch.Tensor, k: int, *, seed: int, epoch: int):
        return select_topk(values, k, self.largest, backend="torch").indices, None


class MMS(TopScore):
    """Minimal Margin Score selection (Weinstein, Fine & Hel-Or): from a scored candidate
    batch (640 in the paper) train on the ``keep`` (64) samples with the SMALLEST MMS, the
    ones a small move of the penultimate features would flip. Needs the classifier head
    (``BatchSelector(..., head=model.fc)``); ``mms="top2"`` in the selector gives the
    paper code's runner-up approximation. The paper pairs it with an aggressive
    learning-rate schedule and monitors the batch MMS quantiles (``BatchSelector.stats``).

    Epoch style (``keep`` a fraction): the training forward must record the MMS, i.e. be
    scored with the head, ``s = fastsel.score(logits, y, head=model.fc)`` before
    ``sampler.update(idx, s)``; a ``Rescorer`` for ``refresh`` needs ``head=`` too.
    """

    def __init__(self, keep: Union[int, float] = 64, *, refresh: Optional[int] = None,
                 rescorer: Optional[Rescorer] = None):
        super().__init__(keep, by="mms", largest=False, refresh=refresh, rescorer=rescorer)


class HardLoss(TopScore):
    """Hard-example mining, the MMS paper's baseline: the ``keep`` largest losses."""

    def __init__(self, keep: Union[int, float] = 64, *, refresh: Optional[int] = None,
                 rescorer: Optional[Rescorer] = None):
        super().__init__(keep, by="loss", largest=True, refresh=refresh, rescorer=rescorer)


class MaxEntropy(TopScore):
    """Entropy selection, the MMS paper's baseline: the ``keep`` most uncertain predictions."""

    def __init__(self, keep: Union[int, float] = 64, *, refresh: Optional[int] = None,
                 rescorer: Optional[Rescorer] = None):
        super().__init__(keep, by="entropy", largest=True, refresh=refresh, rescorer=rescorer)


class Uniform(Strategy):
    """Uniform sampling, the baseline every method is measured against.

    In-batch: ``keep`` candidates drawn uniformly without replacement. Epoch: every
    sample once per epoch in random order, or a random ``budget`` fraction of them (the
    budgeted-training baseline of Arazo et al. 2021).
    """

    styles = ("batch", "epoch")
    unbiased = True
    reads_scores = False  # its plans ignore the table

    def __init__(self, keep: int = 64, *, budget: float = 1.0):
        check_positive_int("keep", keep)
        check_real("budget", budget, low=0, high=1, low_inclusive=False)
        self.keep = keep
        self.budget = budget

    def choose(self, scores: Scores, *, step: int, seed: int, inputs: Any = None,
               targets: Optional[torch.Tensor] = None) -> Selection:
        n = scores.loss.numel()
        keep_in_batch(self.keep, n)
        sel = sample(torch.ones(n, device=scores.loss.device), self.keep, seed=seed, counter=step)
        return Selection(sel.indices, sel.weights, scores)

    def epoch_size_bound(self, epoch: int, n: int, epochs: int) -> tuple[int, bool]:
        return fraction_count(self.budget, n), True

    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        plan = full_plan(table.n, seed, epoch)
        return EpochPlan(plan.indices[:fraction_count(self.budget, table.n)], plan.weights)

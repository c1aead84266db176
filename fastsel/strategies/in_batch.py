"""In-batch strategies that rank a scored candidate batch: MMS selection and its baselines
(Weinstein, Fine & Hel-Or), and uniform sampling."""

from __future__ import annotations

from typing import Any, Optional

import torch

from fastsel.reference import Scores
from fastsel.selection import SCORE_DIRECTIONS, Selection, sample, select_topk
from fastsel._checks import check_choice, check_positive_int, check_real
from fastsel.strategies.base import EpochPlan, ScoreTable, Strategy, fraction_count, full_plan, keep_in_batch

__all__ = ["TopScore", "MMS", "HardLoss", "MaxEntropy", "Uniform"]


class TopScore(Strategy):
    """Keeps the ``keep`` candidates with the best score ``by``: by default in the direction
    of ``fastsel.SCORE_DIRECTIONS`` (largest loss, smallest margin, ...), or ``largest``."""

    styles = ("batch",)

    def __init__(self, keep: int = 64, *, by: str = "loss", largest: Optional[bool] = None):
        check_positive_int("keep", keep)
        check_choice("by", by, sorted(SCORE_DIRECTIONS))
        self.keep = keep
        self.by = by
        self.largest = SCORE_DIRECTIONS[by] == "largest" if largest is None else largest
        self.needs_head = by == "mms"  # the MMS needs the classifier weight

    def choose(self, scores: Scores, *, step: int, seed: int, inputs: Any = None,
               targets: Optional[torch.Tensor] = None) -> Selection:
        values = getattr(scores, self.by).detach()
        keep_in_batch(self.keep, values.numel())
        sel = select_topk(values, self.keep, self.largest)
        return Selection(sel.indices, sel.weights, scores)


class MMS(TopScore):
    """Minimal Margin Score selection (Weinstein, Fine & Hel-Or): from a scored candidate
    batch (640 in the paper) train on the ``keep`` (64) samples with the SMALLEST MMS, the
    ones a small move of the penultimate features would flip. Needs the classifier head
    (``BatchSelector(..., head=model.fc)``); ``mms="top2"`` in the selector gives the
    paper code's runner-up approximation. The paper pairs it with an aggressive
    learning-rate schedule and monitors the batch MMS quantiles (``BatchSelector.stats``).
    """

    def __init__(self, keep: int = 64):
        super().__init__(keep, by="mms", largest=False)


class HardLoss(TopScore):
    """Hard-example mining, the MMS paper's baseline: the ``keep`` largest losses."""

    def __init__(self, keep: int = 64):
        super().__init__(keep, by="loss", largest=True)


class MaxEntropy(TopScore):
    """Entropy selection, the MMS paper's baseline: the ``keep`` most uncertain predictions."""

    def __init__(self, keep: int = 64):
        super().__init__(keep, by="entropy", largest=True)


class Uniform(Strategy):
    """Uniform sampling, the baseline every method is measured against.

    In-batch: ``keep`` candidates drawn uniformly without replacement. Epoch: every
    sample once per epoch in random order, or a random ``budget`` fraction of them (the
    budgeted-training baseline of Arazo et al. 2021).
    """

    styles = ("batch", "epoch")
    unbiased = True

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

    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        plan = full_plan(table.n, seed, epoch)
        return EpochPlan(plan.indices[:fraction_count(self.budget, table.n)], plan.weights)

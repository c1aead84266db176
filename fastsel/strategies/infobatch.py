"""InfoBatch (Qin et al., ICLR 2024): unbiased dynamic pruning by soft random pruning and
loss rescaling."""

from __future__ import annotations

from typing import Any

import torch

from fastsel._checks import check_real
from fastsel.strategies.base import EpochPlan, ScoreTable, Strategy, full_plan, seeded_generator

__all__ = ["InfoBatch"]


class InfoBatch(Strategy):
    """Each epoch before ``delta * epochs``, every sample whose last loss is below the mean
    of the last losses is dropped with probability ``prune_ratio`` (r); the kept samples of
    that group get loss weight 1 / (1 - r), so the expected gradient equals the full
    data's. Samples not yet scored are kept at weight 1. From ``delta * epochs`` on (the
    annealing phase) the whole data set is used at weight 1.

    Defaults from the paper: r = 0.5, delta = 0.875. Epoch style only: it needs the loss
    of every sample from the training forward (``ScoreSampler.update``).
    """

    styles = ("epoch",)
    unbiased = True

    def __init__(self, prune_ratio: float = 0.5, delta: float = 0.875):
        check_real("prune_ratio", prune_ratio, low=0, high=1, high_inclusive=False)
        check_real("delta", delta, low=0, high=1)
        self.prune_ratio = prune_ratio
        self.delta = delta

    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        n = table.n
        loss = table.values("loss")
        seen = table.seen() & ~torch.isnan(loss)
        if epoch >= self.delta * epochs or not bool(seen.any()):
            return full_plan(n, seed, epoch)
        well_learned = seen & (loss < loss[seen].mean())
        g = seeded_generator(seed, epoch)
        dropped = well_learned & (torch.rand(n, generator=g) < self.prune_ratio)
        kept = (~dropped).nonzero().squeeze(1)
        order = kept[torch.randperm(kept.numel(), generator=g)]
        weights = torch.ones(n)
        weights[well_learned] = 1.0 / (1.0 - self.prune_ratio)
        return EpochPlan(order, weights)

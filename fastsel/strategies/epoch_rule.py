"""The epoch style of the rules that rank or sample by a score (MMS, HardLoss,
MaxEntropy, TopScore, CDFSampling, UpperBoundIS, RhoLoss): the same rule, applied once an
epoch to the scores that the training forward already recorded in ``ScoreSampler``'s
table (docs/methods.md section 5)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from fastsel._checks import check_fraction, check_positive_int
from fastsel.strategies.base import EpochPlan, ScoreTable, StyleError, fraction_count, seeded_generator
from fastsel.strategies.rescoring import Rescorer

__all__ = ["EpochRule", "check_keep"]


def check_keep(keep: Any) -> None:
    """``keep`` is an int >= 1 (a number of candidates, in-batch style only) or a float in
    (0, 1] (a fraction: of each candidate batch, or of the data set each epoch)."""
    if isinstance(keep, float):
        check_fraction("keep", keep)
    else:
        check_positive_int("keep", keep)


class EpochRule:
    """Mixin: the epoch style of a rule.

    Each epoch the plan visits ``k = round(keep * N)`` samples (at least 1), ``keep`` a
    float fraction:

    * every sample whose score is unknown (never recorded, or NaN) is visited, with
      weight 1: a score can only come from training it (or from a refresh pass), so an
      unvisited unknown sample would stay unknown forever; the first epoch is therefore a
      full one;
    * the rest, ``k`` minus the unknown ones (none if they are more), are the rule's pick
      among the samples with a known score, from each one's last recorded score;
    * the visit order is a permutation seeded by ``(seed, epoch)``.

    Staleness: a score is the one recorded when the sample was last trained (or last
    refreshed). With ``refresh=R`` and a ``Rescorer`` (``rescorer=``), epochs 0, R, 2R,
    ... first score the whole data set in inference mode and record those scores in the
    table; the forwarded samples are counted in ``ScoreSampler.costs.scored``
    (``last_scored``), as DynaMS's are. Without ``refresh``, scoring costs nothing beyond
    the training forward.

    A subclass gives ``epoch_scores(table)`` (the rule's score of every sample, NaN where
    unknown) and ``epoch_pick(values, k, seed, epoch)`` (positions into ``values`` and their
    loss weights, or None for ones).
    """

    keep: Union[int, float]
    refresh: Optional[int] = None
    rescorer: Optional[Rescorer] = None
    last_scored: int = 0

    def _init_epoch_rule(self, keep: Union[int, float], refresh: Optional[int], rescorer: Optional[Rescorer],
                         batch_style: bool = True) -> None:
        """Sets ``styles`` from ``keep`` (a float fraction adds the epoch style) and checks
        the refresh knobs."""
        check_keep(keep)
        if refresh is not None:
            check_positive_int("refresh", refresh)
            if rescorer is None:
                raise ValueError("refresh= rescores the whole data set: pass rescorer=fastsel.strategies.Rescorer("
                                 "model, ...) as well")
        if rescorer is not None and not isinstance(rescorer, Rescorer):
            raise TypeError(f"rescorer must be a fastsel.strategies.Rescorer, got {type(rescorer).__name__}")
        if rescorer is not None and refresh is None:
            raise ValueError("rescorer= is used every refresh epochs: pass refresh= as well")
        epoch = isinstance(keep, float)
        if not epoch and refresh is not None:
            raise ValueError(f"refresh= belongs to the epoch style, which takes keep as a fraction of the data set "
                             f"(a float in (0, 1]), got keep={keep!r}")
        self.keep = keep
        self.refresh = refresh
        self.rescorer = rescorer
        self.last_scored = 0
        self.styles = (("batch",) if batch_style else ()) + (("epoch",) if epoch else ())

    def check_style(self, style: str) -> None:
        if style == "epoch" and "epoch" not in self.styles and not isinstance(self.keep, float):
            raise StyleError(f"{type(self).__name__}(keep={self.keep!r}) is the in-batch style (keep an int: a number "
                             "of candidates); for the epoch style (ScoreSampler) give keep as a fraction of the data "
                             f"set, e.g. {type(self).__name__}(keep=0.3)")
        super().check_style(style)

    def n_keep(self, n: int) -> int:
        """How many of ``n`` (candidates, or samples of the data set) are kept."""
        return fraction_count(self.keep, n) if isinstance(self.keep, float) else self.keep

    def refresh_due(self, epoch: int) -> bool:
        return self.refresh is not None and epoch % self.refresh == 0

    def epoch_scores(self, table: ScoreTable) -> torch.Tensor:
        raise NotImplementedError

    def epoch_pick(self, values: torch.Tensor, k: int, *, seed: int, epoch: int
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        self.check_style("epoch")
        self.last_scored = 0
        n = table.n
        if self.refresh_due(epoch):
            fields = table.fields
            values = self.rescorer.score_all(data, fields, seed=seed, epoch=epoch, n=n)
            table.update_values(torch.arange(n), values, epoch)
            self.last_scored = self.rescorer.last_scored
        score = self.epoch_scores(table)
        unknown = torch.isnan(score)
        unknown_idx = unknown.nonzero().squeeze(1)
        known_idx = (~unknown).nonzero().squeeze(1)
        room = max(0, min(self.n_keep(n) - unknown_idx.numel(), known_idx.numel()))
        weights = torch.ones(n)
        if room > 0:
            picked, w = self.epoch_pick(score[known_idx], room, seed=seed, epoch=epoch)
            chosen = known_idx[picked]
            if w is not None:
                weights[chosen] = w.to("cpu", torch.float32)
        else:
            chosen = known_idx[:0]
        visits = torch.cat([unknown_idx, chosen])
        order = visits[torch.randperm(visits.numel(), generator=seeded_generator(seed, epoch))]
        return EpochPlan(order, weights)

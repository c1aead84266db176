"""Hard mini-batches (Sahayam, Zakkam & Jayaraman 2023, "Can we learn better with hard
samples?"): after one full epoch, train only on the mini-batches with the highest loss."""

from __future__ import annotations

from typing import Any

import torch

from fastsel._checks import check_fraction, check_int, check_positive_int
from fastsel.strategies.base import EpochPlan, ScoreTable, Strategy, fraction_count, full_plan, seeded_generator

__all__ = ["HardBatches"]


class HardBatches(Strategy):
    """Hard mini-batch training (Sahayam, Zakkam & Jayaraman 2023).

    The first ``warmup_epochs`` epochs (default 1, the paper's single full epoch) visit
    every sample once in a random order. From then on, each epoch:

    1. shuffles the data set (seeded by ``(seed, epoch)``) and cuts it into mini-batches
       of ``batch_size`` (``form_batches``; the last one is smaller when ``batch_size``
       does not divide N);
    2. ranks the mini-batches by their *stale* batch-mean loss: the mean over the batch
       of each sample's last training loss in the ``ScoreTable`` (recorded whenever the
       sample was last trained, possibly several epochs ago);
    3. keeps the ``delta`` fraction of them with the largest mean loss
       (``round(delta * number_of_batches)``, at least one; ties go to the batch formed
       first).

    The plan visits the kept batches' samples batch after batch, in the order in which
    the batches were formed (a random order; a kept short batch comes last), so that the
    sampler's consecutive ``batch_size`` chunks are exactly the kept mini-batches.

    Samples that have never been trained (e.g. the remainder dropped by
    ``drop_last=True`` in the full epoch) count with the largest loss seen so far, so
    the batches holding them rank high and they get trained. Before any loss is
    recorded every epoch is a full one.

    Knobs:
        delta: the fraction of mini-batches trained per epoch (the paper's δ; smaller is
            faster). The paper studies several values and reports that smaller δ keeps
            similar accuracy; fastsel's default is 0.5.
        batch_size: the mini-batch size. It MUST equal the size of the batches the
            training loop sees: ``ScoreSampler(batch_size=...)`` on one process, and
            ``batch_size * num_replicas`` (the global batch) under DDP, where every rank
            takes every ``num_replicas``-th sample of the plan. The sampler does not pass
            its batch size to strategies, hence the knob.
        warmup_epochs: full epochs before the selection starts (default 1).

    Epoch style only (``ScoreSampler``): the ranking needs the training forward's losses.
    Weights are ones: the kept batches are not reweighted, so the training loss is a
    biased (hard-example) estimate of the full-data loss (``unbiased = False``).
    State: none beyond the sampler's own (the score table and the current plan); every
    decision is a function of ``(seed, epoch)`` and the table, so a restored sampler
    repeats the uninterrupted run exactly.
    """

    styles = ("epoch",)
    table_fields = ("loss",)
    unbiased = False

    def __init__(self, delta: float = 0.5, *, batch_size: int, warmup_epochs: int = 1):
        check_fraction("delta", delta)
        check_positive_int("batch_size", batch_size)
        check_int("warmup_epochs", warmup_epochs, 0)
        self.delta = delta
        self.batch_size = batch_size
        self.warmup_epochs = warmup_epochs

    def form_batches(self, n: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
        """The random mini-batches of ``epoch`` (before selection): a seeded permutation
        of ``range(n)`` cut into chunks of ``batch_size``."""
        order = torch.randperm(n, generator=seeded_generator(seed, epoch))
        return list(order.split(self.batch_size))

    def batch_losses(self, batches: list[torch.Tensor], table: ScoreTable) -> torch.Tensor:
        """The stale mean loss of each batch [B] (float64), never-trained samples counted
        at the largest recorded loss."""
        loss = table.values("loss").to(torch.float64)
        known = ~torch.isnan(loss)
        fill = loss[known].max() if bool(known.any()) else torch.tensor(0.0, dtype=torch.float64)
        loss = torch.where(known, loss, fill)
        return torch.stack([loss[b].mean() for b in batches]) if batches else torch.zeros(0, dtype=torch.float64)

    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        n = table.n
        if epoch < self.warmup_epochs or not bool((~torch.isnan(table.values("loss"))).any()):
            return full_plan(n, seed, epoch)
        batches = self.form_batches(n, seed=seed, epoch=epoch)
        means = self.batch_losses(batches, table)
        k = fraction_count(self.delta, len(batches))
        # Largest mean first; a stable sort gives ties to the batch formed first.
        ranked = torch.sort(means, descending=True, stable=True).indices[:k]
        kept = torch.sort(ranked).values  # formation order; the short batch (if kept) is last
        indices = torch.cat([batches[int(i)] for i in kept])
        return EpochPlan(indices, torch.ones(n))

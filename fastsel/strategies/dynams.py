"""DynaMS (Wang et al., ICLR 2023, "DynaMS: Dynamic Margin Selection for Efficient Deep
Learning"): train on the samples closest to the decision boundary, re-selected every few
epochs by scoring the whole training set with a parameter-sharing proxy."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from fastsel.selection import select_topk
from fastsel import _state
from fastsel._checks import check_choice, check_fraction, check_int, check_positive_int
from fastsel.strategies.base import EpochPlan, ScoreTable, Strategy, fraction_count, full_plan, seeded_generator
from fastsel.strategies.rescoring import Rescorer

__all__ = ["DynaMS"]

MARGINS = ("prob_margin", "true_margin", "margin")


class DynaMS(Strategy):
    """Dynamic margin selection (Wang et al., ICLR 2023).

    Every ``refresh`` epochs (R) the whole training set is scored with a parameter-sharing
    proxy (PSP) and the ``keep`` fraction of samples with the SMALLEST margin, the ones
    closest to the decision boundary, becomes the training subset until the next
    refresh; each epoch visits the subset once in a new random order (seeded by
    ``(seed, epoch)``).

    Schedule: epochs ``0 .. warmup_epochs - 1`` train on the full data (a freshly
    initialised model's margins carry no information; fastsel's default is one such
    epoch), then the subset is refreshed at epochs ``warmup_epochs + j * refresh``
    (j = 0, 1, ...). With ``warmup_epochs=0`` epoch 0 scores the untrained model first.

    Scoring (``fastsel.strategies.Rescorer``, ``rescorer``): ``proxy(inputs)`` on batches of ``score_batch_size``
    drawn in dataset order from ``score_data`` (default: the sampler's data set), in
    inference mode with the model (and the proxy, when it is a module) in eval mode,
    every submodule's train/eval mode restored afterwards (``fastsel.forward.scoring_forward``):
    no BatchNorm running-statistic update, no autograd graph, no gradient touched.
    The scoring loader has no shuffling and a seeded generator, so the scores do not
    depend on worker randomness; note that ``score_data`` is read through its own
    transforms, so pass an un-augmented ``fastsel.Indexed`` view of the training set as
    ``score_data`` to score clean inputs (its index ``i`` must be training sample ``i``).
    Under DDP every rank scores the whole set (the model is identical on every rank),
    so every rank keeps the same subset.

    Knobs (the paper tunes the selection ratio and the selection interval; the defaults
    are fastsel's):
        keep: the fraction of the training set kept, in (0, 1] (default 0.5;
            ``round(keep * N)``, at least one sample).
        refresh: epochs between two selections, R >= 1 (default 5).
        model: the model being trained. The default proxy is the model itself.
        proxy: the PSP, a callable ``inputs -> logits [B, C]`` that shares the model's
            parameters (e.g. a narrower slice of it); an ``nn.Module`` or any callable
            (a plain callable needs ``model=`` so that its mode can be set and restored).
        by: the margin ranked (smallest first): ``"prob_margin"`` (default, the
            probability margin p_(1) - p_(2) = confidence * (1 - exp(-margin))),
            ``"true_margin"`` (z_y - max_{j != y} z_j, negative when misclassified) or
            ``"margin"`` (z_(1) - z_(2)). NaN margins (e.g. ``ignore_index`` targets for
            ``true_margin``) rank last.
        warmup_epochs: full-data epochs before the first selection (default 1).
        score_batch_size: samples per scoring forward (default 256).
        score_data: the data set scored (items ``(x, y, index)``, e.g. ``fastsel.Indexed``);
            default the one the sampler passes.
        num_workers, collate_fn: of the scoring ``DataLoader``.
        device: where the scoring inputs go (default: the device of the model's first
            parameter, else CPU).
        backend: the ``fastsel.score`` backend.

    Costs: ``last_scored`` is the number of samples forwarded by the last ``plan_epoch``
    (N on refresh epochs, 0 otherwise); ``ScoreSampler`` adds it to ``costs.scored``.

    Epoch style only. Weights are ones (the subset is not reweighted; ``unbiased =
    False``). State (``state_dict``): the current subset and the epoch of the last
    refresh; with the sampler's state (which holds the current plan) and the model's,
    a resumed run repeats the uninterrupted one exactly.
    """

    styles = ("epoch",)
    table_fields = ("loss",)
    unbiased = False

    def __init__(self, keep: float = 0.5, refresh: int = 5, *, model: Optional[torch.nn.Module] = None,
                 proxy: Optional[Callable[[Any], torch.Tensor]] = None, by: str = "prob_margin",
                 warmup_epochs: int = 1, score_batch_size: int = 256, score_data: Any = None,
                 num_workers: int = 0, collate_fn: Optional[Callable] = None,
                 device: Union[str, torch.device, None] = None, backend: str = "auto"):
        check_fraction("keep", keep)
        check_positive_int("refresh", refresh)
        check_int("warmup_epochs", warmup_epochs, 0)
        check_choice("by", by, MARGINS)
        check_positive_int("score_batch_size", score_batch_size)
        check_int("num_workers", num_workers, 0)
        # the scoring pass (model / proxy / data checks are the Rescorer's)
        self.rescorer = Rescorer(model, proxy=proxy, data=score_data, batch_size=score_batch_size,
                                 num_workers=num_workers, collate_fn=collate_fn, device=device, backend=backend)
        self.keep = keep
        self.refresh = refresh
        self.by = by
        self.warmup_epochs = warmup_epochs
        self._subset: Optional[torch.Tensor] = None  # the current training subset (int64)
        self._refreshed_at = -1                       # the epoch of the last refresh
        self.last_scored = 0

    @property
    def subset(self) -> Optional[torch.Tensor]:
        """The current training subset (int64 sample indices, smallest margin first), or
        None before the first selection."""
        return None if self._subset is None else self._subset.clone()

    @property
    def refreshed_at(self) -> int:
        """The epoch of the last selection (-1 before the first)."""
        return self._refreshed_at

    def is_refresh_epoch(self, epoch: int) -> bool:
        return epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.refresh == 0

    def margins(self, data: Any, *, seed: int = 0, epoch: int = 0) -> torch.Tensor:
        """Scores the whole of ``data`` (or ``score_data``) with the proxy and returns the
        margin ``by`` of every sample [N] (float32, CPU). Counts the forwarded samples in
        ``last_scored``."""
        values = self.rescorer.score_all(data, (self.by,), seed=seed, epoch=epoch)[self.by]
        self.last_scored += self.rescorer.last_scored
        return values

    def select(self, margins: torch.Tensor) -> torch.Tensor:
        """The ``keep`` fraction of samples with the smallest margins (ties: lowest index
        first; NaN last), smallest first."""
        return select_topk(margins, fraction_count(self.keep, margins.numel()), largest=False).indices.cpu()

    def plan_epoch(self, epoch: int, table: ScoreTable, *, seed: int, epochs: int,
                   data: Any = None) -> EpochPlan:
        self.last_scored = 0
        n = table.n
        if epoch < self.warmup_epochs:
            return full_plan(n, seed, epoch)
        if self.is_refresh_epoch(epoch) or self._subset is None:
            if data is None and self.rescorer.data is None:
                raise ValueError("DynaMS needs the data set to score: use it through fastsel.ScoreSampler (which "
                                 "passes it) or pass score_data=")
            values = self.rescorer.score_all(data, (self.by,), seed=seed, epoch=epoch, n=n)[self.by]
            self.last_scored += self.rescorer.last_scored
            self._subset = self.select(values)
            self._refreshed_at = epoch
        order = torch.randperm(self._subset.numel(), generator=seeded_generator(seed, epoch))
        return EpochPlan(self._subset[order], torch.ones(n))

    def state_dict(self) -> dict:
        return {"strategy": type(self).__name__, "subset": None if self._subset is None else self._subset.clone(),
                "refreshed_at": self._refreshed_at}

    def _prepare_load(self, state: Any, path: str, n: Optional[int] = None) -> Callable[[], None]:
        _state.require_keys(path, state, ("subset", "refreshed_at"), tag=type(self).__name__)
        refreshed_at = _state.check_int(_state.key(path, "refreshed_at"), state["refreshed_at"], -1)
        subset = state["subset"]
        if subset is not None:
            where = _state.key(path, "subset")
            subset = _state.check_tensor(where, subset, (None,), _state.INTS, low=0, high=n)
            if subset.unique().numel() != subset.numel():
                raise ValueError(f"{where} must hold distinct sample indices, got repeated ones")
            subset = subset.to("cpu", torch.int64, copy=True)
        if (subset is None) != (refreshed_at == -1):  # both are set by the first selection
            raise ValueError(f"{_state.key(path, 'subset')} must be None exactly when "
                             f"{_state.key(path, 'refreshed_at')} is -1 (before the first selection), got "
                             f"{'None' if subset is None else 'a subset'} and {refreshed_at}")

        def load() -> None:
            self._subset, self._refreshed_at = subset, refreshed_at
        return load

"""RHO-LOSS (Mindermann et al. 2022): train on the candidates with the largest reducible
holdout loss."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch

from fastsel.forward import scoring_forward
from fastsel.ops import score
from fastsel.reference import Scores
from fastsel.selection import Selection, select_topk
from fastsel._checks import check_index_range, check_positive_int, check_real
from fastsel.strategies.base import ScoreTable, Strategy, StyleError, keep_in_batch
from fastsel.strategies.epoch_rule import EpochRule
from fastsel.strategies.rescoring import Rescorer

__all__ = ["RhoLoss"]


class RhoLoss(EpochRule, Strategy):
    """Reducible holdout loss selection (Mindermann, Brauner, Razzak, Sharma, Kirsch, Xu,
    Höltgen, Gomez, Morisot, Farquhar & Gal 2022, "Prioritized training on points that
    are learnable, worth learning, and not yet learnt", ICML).

    In-batch style (``fastsel.BatchSelector``): for each candidate,
    reducible loss = training loss (the selector's ``scores.loss``, the current model in
    inference mode) − irreducible loss; the ``keep`` candidates with the largest
    reducible loss are trained on, weights ones (biased on purpose: ``unbiased`` False).
    ``keep_fraction`` (paper: 0.1, e.g. 320 of 3200) keeps round(fraction × N) of a
    candidate batch of N (at least 1); ``keep`` keeps an absolute number instead (give
    one of the two). Ties go to the lowest index, NaN reducible losses rank last.

    ``irreducible`` gives the irreducible losses of the candidate batch, one of:

    * an ``nn.Module``: the irreducible-loss model (a small model trained on a holdout
      set). Its logits on the candidate inputs are computed exactly as the selector
      computes the main model's (``fastsel.forward.scoring_forward``: eval mode,
      ``torch.inference_mode``, each submodule's train/eval mode restored, so no
      parameter, gradient or BatchNorm running statistic is touched), and the loss is
      ``fastsel.score(logits, targets).loss``. The module receives the same ``inputs`` as
      the main model.
    * a callable ``(inputs, targets) -> losses [N]``: called under
      ``torch.inference_mode()``; if it runs a model, putting that model in eval mode is
      the callable's job (inference mode alone does not stop BatchNorm from updating its
      running statistics in train mode).
    * a tensor ``[N_dataset]`` of precomputed irreducible losses (the paper's cheap
      variant: the irreducible-loss model is evaluated once on the training set). Then
      ``ids`` is required: a callable ``inputs -> int64 tensor [N]`` returning the dataset
      indices of the candidate batch, e.g. with ``fastsel.Indexed`` batches
      ``(x, y, i)`` call ``selector((x, i), y)`` with a model that reads ``inputs[0]``
      and ``ids=lambda inputs: inputs[1]``.

    No state: the irreducible model or table is the user's to save (``state_dict`` is
    empty). The irreducible model's forward is counted as scoring cost in
    ``BatchSelector.costs`` (``last_scored``); a precomputed table costs nothing.

    Epoch style (``fastsel.ScoreSampler``), with a precomputed table of the data set's
    irreducible losses (``ids`` is then not needed): each epoch visits
    ``round(keep_fraction * N)`` samples, those with the largest reducible loss = the
    last recorded training loss − the irreducible loss, every sample whose loss is
    unknown included (``fastsel.strategies.EpochRule``; ``refresh=`` with ``rescorer=``
    rescores the losses every R epochs).
    """

    def __init__(self, irreducible: Union[torch.nn.Module, Callable[[Any, torch.Tensor], torch.Tensor], torch.Tensor],
                 *, keep_fraction: Optional[float] = None, keep: Optional[int] = None,
                 ids: Optional[Callable[[Any], torch.Tensor]] = None, refresh: Optional[int] = None,
                 rescorer: Optional[Rescorer] = None):
        if keep is not None and keep_fraction is not None:
            raise ValueError("give keep_fraction or keep, not both")
        if keep is not None:
            check_positive_int("keep", keep)
        else:
            keep_fraction = 0.1 if keep_fraction is None else keep_fraction
            check_real("keep_fraction", keep_fraction, low=0, high=1, low_inclusive=False)
        if isinstance(irreducible, torch.Tensor):
            if irreducible.dim() != 1 or not irreducible.dtype.is_floating_point:
                raise ValueError("an irreducible-loss table must be a 1-D floating point tensor [N_dataset], "
                                 f"got shape {tuple(irreducible.shape)} and dtype {irreducible.dtype}")
            irreducible = irreducible.detach()
        elif not callable(irreducible):
            raise TypeError("irreducible must be an nn.Module, a callable (inputs, targets) -> losses, or a "
                            f"1-D tensor of per-sample losses, got {type(irreducible).__name__}")
        if ids is not None and not callable(ids):
            raise TypeError(f"ids must be a callable inputs -> indices, got {type(ids).__name__}")
        table = isinstance(irreducible, torch.Tensor)
        # the in-batch style needs the candidates' losses: a model, a callable, or the table
        # with ids; the epoch style the table (indexed by sample) and a fraction
        self._init_epoch_rule(keep if keep is not None else float(keep_fraction), refresh, rescorer,
                              batch_style=not table or ids is not None)
        if not table or keep is not None:
            self.styles = tuple(st for st in self.styles if st != "epoch")
        if not self.styles:
            raise ValueError("an irreducible-loss table needs ids=, a callable returning the dataset indices "
                             "of the candidate batch from its inputs (e.g. ids=lambda inputs: inputs[1]), for "
                             "the in-batch style; with keep_fraction= (not keep=) it serves the epoch style "
                             "(ScoreSampler) without ids")
        self.irreducible = irreducible
        self._table_copy: Optional[tuple] = None  # (device, data_ptr, version) and the table there
        self.keep_fraction = keep_fraction
        self.keep = keep
        self.ids = ids

    def n_keep(self, n: int) -> int:
        """How many of a candidate batch (or of a data set) of ``n`` are kept."""
        if self.keep is not None:
            return self.keep
        return max(1, int(round(self.keep_fraction * n)))

    def check_style(self, style: str) -> None:
        if style == "epoch" and style not in self.styles:
            raise StyleError("RhoLoss in the epoch style (ScoreSampler) needs a precomputed table of the data "
                             "set's irreducible losses and keep_fraction= (not keep=)")
        Strategy.check_style(self, style)

    # ---- epoch style ----
    def epoch_scores(self, table: ScoreTable) -> torch.Tensor:
        irr = self.irreducible
        if irr.numel() != table.n:
            raise ValueError(f"the irreducible-loss table has {irr.numel()} entries but the data set {table.n}")
        return table.values("loss") - irr.to("cpu", torch.float32)

    def epoch_pick(self, values: torch.Tensor, k: int, *, seed: int, epoch: int):
        return select_topk(values, k, True, backend="torch").indices, None

    def _table_on(self, device: torch.device) -> torch.Tensor:
        """The irreducible-loss table on the ids' device, copied there once (and again only
        if the table is changed in place), not at every step."""
        irr = self.irreducible
        if irr.device == device:
            return irr
        key = (device, irr.data_ptr(), irr._version)
        cached = self._table_copy
        if cached is None or cached[0] != key:
            self._table_copy = (key, irr.to(device))
        return self._table_copy[1]

    def irreducible_losses(self, inputs: Any, targets: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """The irreducible losses [n] of the candidate batch."""
        irr = self.irreducible
        if isinstance(irr, torch.Tensor):
            idx = self.ids(inputs)
            if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"ids(inputs) must return a 1-D int64 tensor of dataset indices, got {idx!r:.80}")
            check_index_range(idx, irr.numel(), "ids(inputs) (indices into the irreducible-loss table)")
            out = self._table_on(idx.device)[idx.long()]
        else:
            if targets is None:
                raise ValueError("RhoLoss needs the candidate batch's targets to compute irreducible losses")
            if isinstance(irr, torch.nn.Module):
                logits = scoring_forward(irr, inputs)
                with torch.inference_mode():
                    out = score(logits, targets.to(logits.device)).loss
            else:
                with torch.inference_mode():
                    out = irr(inputs, targets)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"the irreducible-loss callable must return a tensor, got {type(out).__name__}")
        if out.shape != (n,):
            raise ValueError(f"irreducible losses must have shape ({n},) (one per candidate), "
                             f"got {tuple(out.shape)}")
        return out.detach()

    def choose(self, scores: Scores, *, step: int, seed: int, inputs: Any = None,
               targets: Optional[torch.Tensor] = None) -> Selection:
        if inputs is None:
            raise ValueError("RhoLoss needs the candidate batch's inputs (use it through fastsel.BatchSelector, "
                             "which passes inputs and targets to choose)")
        loss = scores.loss.detach()
        n = loss.numel()
        k = self.n_keep(n)
        keep_in_batch(k, n)
        irr = self.irreducible_losses(inputs, targets, n)
        # A model run on the candidates is a scoring forward too (BatchSelector.costs).
        self.last_scored = 0 if isinstance(self.irreducible, torch.Tensor) else n
        reducible = loss.to(torch.float32) - irr.to(loss.device, torch.float32)
        sel = select_topk(reducible, k, True)
        return Selection(sel.indices, torch.ones(k, dtype=torch.float32, device=loss.device), scores)

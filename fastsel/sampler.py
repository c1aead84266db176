"""``ScoreSampler``: epoch-level selection as a batch sampler for any ``DataLoader``.

    data = fastsel.Indexed(train_set)
    sampler = fastsel.ScoreSampler(data, fastsel.strategies.InfoBatch(), batch_size=128, epochs=E)
    for x, y, idx in DataLoader(data, batch_sampler=sampler):
        s = fastsel.score(model(x), y)
        (s.loss * sampler.weights(idx)).mean().backward(); opt.step(); opt.zero_grad()
        sampler.update(idx, s)

Each ``iter(sampler)`` (one per epoch, as a DataLoader does) asks the strategy for the
epoch's plan, from the scores recorded by ``update`` during earlier epochs; no extra
forward pass is spent on scoring unless the strategy says so (DynaMS).

Resume: ``state_dict()`` holds the current epoch's plan and the number of batches already
trained (``update`` calls), the score table and the strategy's state; a run restored with
``load_state_dict`` yields exactly the remaining batches and weights of the uninterrupted
run.

``load_state_dict`` checks the whole state before loading any of it: a tampered state, or
one of another data set, table or strategy, raises naming the offending entry.

DDP: with ``torch.distributed`` initialised, every rank computes the same global plan and
takes every ``num_replicas``-th sample of it (padded by wrapping, like
``DistributedSampler``), and ``update`` all-gathers the indices and scores, so every rank
keeps the same table and therefore the same future plans. ``num_replicas``/``rank``
default to the process group's; ``update`` raises if they are given (> 1) without one.

An epoch whose plan is empty (e.g. Selective-Backprop's stale variant when every recorded
loss is equal, or an empty data set) has no batch and ends as soon as it is iterated.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from fastsel import _state
from fastsel.costs import Costs, ScorerCosts
from fastsel.data import Indexed
from fastsel.reference import Scores
from fastsel._checks import check_index_range, check_positive_int, sized_length
from fastsel.strategies.base import EpochPlan, ScoreTable, Strategy, check_strategy_and_seed, prepare_strategy_load

__all__ = ["ScoreSampler"]


def _world(num_replicas: Optional[int], rank: Optional[int]) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
    if not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank!r}")
    return num_replicas, rank


def _check_indexed(data: Any) -> None:
    """Warns when the data set's items do not end with their index: the training loop needs
    the indices of each batch for ``sampler.update`` and ``sampler.weights``, and without
    them it fails later with an unpacking error far from the cause."""
    if isinstance(data, Indexed) or len(data) == 0:
        return
    probe = len(data) - 1  # the last item: a label rarely equals it, unlike item 0's
    try:
        item = data[probe]
    except Exception:  # a data set that cannot be probed: nothing to say
        return
    last = (item[-1] if item else None) if isinstance(item, (tuple, list)) else item  # an item may be its index
    if isinstance(last, torch.Tensor) and last.dim() == 0 and not last.dtype.is_floating_point:
        last = int(last)
    if not (isinstance(last, int) and not isinstance(last, bool) and last == probe):
        warnings.warn(f"ScoreSampler: data[{probe}] does not end with its index, so the batches will not "
                      "carry the indices that sampler.update(idx, scores) and sampler.weights(idx) need; wrap "
                      "the data set: fastsel.Indexed(data) (items become (x, y, index))", UserWarning, stacklevel=3)


class ScoreSampler(torch.utils.data.Sampler):
    """Batch sampler whose epochs follow an epoch-level ``Strategy``.

    Args:
        data: the (``Indexed``) dataset; only its length is used, and it is passed to
            strategies that score the whole set themselves (DynaMS).
        strategy: a strategy supporting the epoch style.
        batch_size: samples per batch on each rank.
        epochs: the planned number of epochs (schedules such as InfoBatch's annealing use it).
        seed: every random decision is a function of (seed, epoch).
        drop_last: drop each epoch's last incomplete batch (default). Epoch-level rules
            change the epoch's length, so without it the last batch can hold any number
            of samples, one included, which BatchNorm in training mode refuses and which
            gives a noisy step; the dropped samples are a different random few each
            epoch (plans are shuffled). ``False`` trains on every planned sample.
        num_replicas, rank: DDP layout; default from ``torch.distributed`` if initialised.
            ``update`` needs ``torch.distributed`` initialised when ``num_replicas > 1``.
    """

    def __init__(self, data: Any, strategy: Strategy, *, batch_size: int, epochs: int, seed: int = 0,
                 drop_last: bool = True, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        n = sized_length("data", data, "have a length (__len__)")
        check_strategy_and_seed(strategy, "epoch", seed)
        check_positive_int("batch_size", batch_size)
        check_positive_int("epochs", epochs)
        self.data = data
        self.n = n
        self.strategy = strategy
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self._check_planned_batches()
        _check_indexed(data)
        if drop_last and n > 0 and self.max_epoch_steps() == 0:
            warnings.warn(f"ScoreSampler: no epoch of {type(strategy).__name__} can plan one full batch of "
                          f"{batch_size} per replica ({self.num_replicas}) over {n} samples, and drop_last=True "
                          "drops every incomplete batch: every epoch would be empty. Use a smaller batch_size or "
                          "drop_last=False.", UserWarning, stacklevel=2)
        self.table = ScoreTable(n, strategy.table_fields)
        self.costs = Costs()
        self.epoch = 0
        self._plan: Optional[EpochPlan] = None  # the current epoch's plan, once made
        self._plan_weights: Optional[tuple[EpochPlan, torch.Tensor]] = None  # (plan, its weights on a device)
        self._consumed = 0                      # batches of this epoch passed to update()
        self._exhausted = False                 # every batch of this epoch handed out
        self._batch_cache: Optional[tuple[EpochPlan, list[torch.Tensor]]] = None
        self._hooks: list[Callable[[dict], None]] = []
        self._warned_no_update = False
        self._stats: Optional[dict] = {}
        self._pending_stats = None  # what the last update's stats are computed from, when read

    def _check_planned_batches(self) -> None:
        planned = getattr(self.strategy, "batch_size", None)  # strategies that plan whole batches
        if planned is not None and planned != self.batch_size * self.num_replicas:
            raise ValueError(f"{type(self.strategy).__name__} plans batches of {planned} samples but the sampler "
                             f"draws global batches of {self.batch_size * self.num_replicas} "
                             f"(batch_size={self.batch_size} x {self.num_replicas} replicas): make them equal")

    def set_world(self, num_replicas: int, rank: int) -> None:
        """Sets the DDP layout after construction, for frameworks that start the process
        group after the user built the sampler (Lightning's DDP launches its processes
        inside ``fit``). Only at the start of an epoch: no batch of it trained."""
        if self._consumed:
            raise RuntimeError(f"set_world: {self._consumed} batches of epoch {self.epoch} are already trained on "
                               "this layout; change it only at the start of an epoch")
        old = self.num_replicas, self.rank
        self.num_replicas, self.rank = _world(num_replicas, rank)
        try:
            self._check_planned_batches()
        except ValueError:
            self.num_replicas, self.rank = old
            raise
        self._batch_cache = None  # this rank's batches follow the layout

    def __repr__(self) -> str:
        return (f"ScoreSampler({self.strategy!r}, n={self.n}, batch_size={self.batch_size}, epochs={self.epochs}, "
                f"seed={self.seed}, drop_last={self.drop_last}, num_replicas={self.num_replicas}, rank={self.rank}, "
                f"epoch={self.epoch}, costs={self.costs!r})")

    # ---- the plan ----
    def _current_plan(self) -> EpochPlan:
        if self._plan is None:
            plan = self.strategy.plan_epoch(self.epoch, self.table, seed=self.seed, epochs=self.epochs,
                                            data=self.data)
            self._check_plan(plan)
            self._plan = plan
            self.costs.scored += getattr(self.strategy, "last_scored", 0)
        return self._plan

    def _check_plan(self, plan: EpochPlan) -> None:
        idx = plan.indices
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise RuntimeError(f"{type(self.strategy).__name__}.plan_epoch returned indices that are not 1-D int64")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise RuntimeError(f"{type(self.strategy).__name__}.plan_epoch returned indices outside [0, {self.n})")
        if plan.weights.shape != (self.n,):
            raise RuntimeError(f"{type(self.strategy).__name__}.plan_epoch returned weights of shape "
                               f"{tuple(plan.weights.shape)}, expected ({self.n},)")

    def _rank_indices(self, plan: EpochPlan) -> torch.Tensor:
        idx = plan.indices
        if self.num_replicas == 1 or idx.numel() == 0:
            return idx
        per_rank = -(-idx.numel() // self.num_replicas)
        total = per_rank * self.num_replicas
        if total > idx.numel():  # pad by wrapping so every rank gets as many batches
            idx = torch.cat([idx, idx[: total - idx.numel()].repeat(-(-(total - idx.numel()) // idx.numel()))[: total - idx.numel()]])
        return idx[self.rank::self.num_replicas]

    def _batches(self) -> list[torch.Tensor]:
        """This rank's batches of the current plan, split once per plan (``update`` asks for
        their number at every step)."""
        plan = self._current_plan()
        if self._batch_cache is None or self._batch_cache[0] is not plan:
            self._batch_cache = (plan, self._split(plan))
        return self._batch_cache[1]

    def _split(self, plan: EpochPlan) -> list[torch.Tensor]:
        idx = self._rank_indices(plan)
        if idx.numel() == 0:  # no batch at all: split() would give one empty batch
            return []
        batches = list(idx.split(self.batch_size))
        if self.drop_last and batches[-1].numel() < self.batch_size:
            batches.pop()
        return batches

    def _advance_epoch(self) -> None:
        if (self._consumed == 0 and self._exhausted and self._batch_cache is not None and self._batch_cache[1]
                and getattr(self.strategy, "reads_scores", True) and not self._warned_no_update):
            self._warned_no_update = True
            warnings.warn(f"ScoreSampler: epoch {self.epoch} ended without any sampler.update(): "
                          f"{type(self.strategy).__name__} plans its epochs from the scores update() records, "
                          "so without them it selects blindly. Call sampler.update(idx, scores) after each "
                          "training step (scores = fastsel.score(logits, y), or a per-sample loss tensor).",
                          RuntimeWarning, stacklevel=3)
        self.table.apply_queued()  # an accelerator's scores of the epoch: one copy, once an epoch
        self.epoch += 1
        self._plan = None
        self._consumed = 0
        self._exhausted = False

    def __len__(self) -> int:
        if self._plan is not None and self._exhausted and self._consumed >= len(self._batches()):
            self._advance_epoch()
        return len(self._batches())

    def __iter__(self):
        # An epoch ends when the next one starts, not when its last batch is handed out: a
        # DataLoader with workers fetches batches ahead, and the last ones still need the
        # epoch's weights and count towards its progress when they are trained.
        # A plan of no batches (made by len() or restored) is served, as nothing, before the
        # next epoch starts.
        if self._plan is not None and (self._exhausted or 0 < len(self._batches()) <= self._consumed):
            self._advance_epoch()
        batches = self._batches()
        serving = self.epoch
        self._exhausted = False
        for b in batches[self._consumed:]:  # skips the trained ones after a mid-epoch resume
            yield b.tolist()
        if self.epoch == serving:  # not already ended by the update of its last batch
            if batches:
                self._exhausted = True
            else:  # no batch, so no update to end the epoch: it ends here, no weights needed later
                self._advance_epoch()

    # ---- steps, for schedules ----
    @property
    def steps_in_epoch(self) -> int:
        """Batches (optimizer steps) of the current epoch on this rank: ``len(sampler)``,
        true for the epoch being iterated (epoch-level rules change it every epoch)."""
        return len(self)

    def _batches_of(self, samples: int) -> int:
        per_rank = -(-samples // self.num_replicas)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def total_steps(self) -> tuple[int, bool]:
        """(steps, exact): the optimizer steps of the whole run on this rank as far as they
        are known now: the steps trained in earlier epochs, this epoch's batches, and for
        each later epoch the most its plan can hold (``Strategy.epoch_size_bound``).
        ``exact`` is True when every later epoch's size is known whatever the scores
        (Uniform, PSGD, CSGD); otherwise the count is an upper bound (InfoBatch, the
        score rules): for a per-step schedule, prefer ``progress``."""
        if self.epoch >= self.epochs:  # the planned run is over
            return self.costs.steps, True
        later = self._epoch_bounds(self.epoch + 1)
        return (len(self) + self.costs.steps - self._consumed + sum(b for b, _ in later),
                all(known for _, known in later))

    def _epoch_bounds(self, first: int = 0) -> list[tuple[int, bool]]:
        """(most batches on this rank, whether that is the epoch's size whatever the
        scores) of every epoch from ``first`` on (``Strategy.epoch_size_bound``)."""
        bounds = (self.strategy.epoch_size_bound(e, self.n, self.epochs) for e in range(first, self.epochs))
        return [(self._batches_of(size), known) for size, known in bounds]

    def epoch_sizes_known(self) -> bool:
        """Whether every epoch's size is known ahead, whatever the scores (Uniform, PSGD,
        CSGD): then ``planned_steps()`` is exact."""
        return all(known for _, known in self._epoch_bounds())

    def max_epoch_steps(self) -> int:
        """The most batches any epoch of the run can hold on this rank (the bound of
        ``Strategy.epoch_size_bound``): a constant epoch length for frameworks that size
        their epochs once."""
        return max((b for b, _ in self._epoch_bounds()), default=0)

    def planned_steps(self) -> int:
        """The run's steps as counted before it starts, a pure function of the strategy,
        the data set's size and the batch layout (the same in a resumed process): the
        sum over epochs of the most each epoch's plan can hold
        (``Strategy.epoch_size_bound``). Exact when ``epoch_sizes_known()``."""
        return sum(b for b, _ in self._epoch_bounds())

    @property
    def progress(self) -> float:
        """The fraction of the planned run trained, in [0, 1]: (epoch + batches trained in
        it / its batches) / epochs. A learning-rate schedule that follows it
        (``LambdaLR(opt, lambda _: f(sampler.progress))``, stepped each batch) keeps the
        shape it has over full epochs whatever each epoch's length."""
        batches = len(self._batches()) if self._plan is not None else 0
        within = self._consumed / batches if batches else 0.0
        return min(1.0, (self.epoch + within) / self.epochs)

    # ---- training-loop calls ----
    def weights(self, indices: torch.Tensor) -> torch.Tensor:
        """Loss weights [B] of these samples for the current epoch (float32, on the
        indices' device)."""
        if self._plan is None:
            raise RuntimeError("sampler.weights() needs the current epoch's plan: iterate the sampler "
                               "(DataLoader(data, batch_sampler=sampler)) before asking for weights")
        idx = self._check_indices(indices, "weights")
        cached = self._plan_weights
        if cached is None or cached[0] is not self._plan or cached[1].device != indices.device:
            # the epoch's weights copied to the device once, not per batch
            cached = self._plan_weights = (self._plan, self._plan.weights.to(indices.device, torch.float32))
        return cached[1][idx]

    def _check_indices(self, indices, where: str, device: Optional[torch.device] = None) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{where}: indices must be a 1-D int64 (or int32) tensor (the dataset indices of "
                             f"the batch, from fastsel.Indexed), got {indices!r:.80}")
        if device is not None and indices.device != device:
            raise ValueError(f"{where}: indices are on {indices.device} but scores on {device}; "
                             "pass the indices on the scores' device")
        if indices.device.type == "meta":
            raise ValueError(f"{where}: indices are on the meta device: they must hold the batch's dataset indices")
        check_index_range(indices, self.n, f"{where}: indices")
        return indices.long()

    def update(self, indices: torch.Tensor, scores: Union[Scores, torch.Tensor]) -> None:
        """Records the training forward's scores of the batch's samples (all ranks' under DDP).

        ``scores``: the batch's ``fastsel.Scores``, or, for a strategy that reads only the
        loss (``strategy.table_fields == ("loss",)``: InfoBatch, the loss rules), any
        per-sample loss tensor [B] (a custom or library loss with ``reduction="none"``)."""
        if isinstance(scores, torch.Tensor):
            scores = self._loss_as_scores(scores)
        elif not isinstance(scores, Scores):
            raise TypeError(f"update: scores must be the fastsel.Scores of the batch or a per-sample loss tensor "
                            f"[B], got {type(scores).__name__}")
        if self.num_replicas > 1 and not (dist.is_available() and dist.is_initialized()):
            # Without the gather each rank's table would hold only its own scores, and the
            # ranks' plans would silently diverge from the next epoch on.
            raise RuntimeError(
                f"update: this sampler has num_replicas={self.num_replicas} but torch.distributed is not "
                "initialised, so the ranks' scores cannot be gathered and their plans would diverge: call "
                "torch.distributed.init_process_group(...) on every rank before training, or leave num_replicas "
                "and rank unset to train in one process")
        idx = self._check_indices(indices, "update", device=scores.loss.device)
        if scores.loss.shape != idx.shape:
            raise ValueError(f"update: scores are for {scores.loss.numel()} samples but indices has {idx.numel()}")
        values = self.table.extract(scores)
        idx, values = self._gather(idx, values)
        self.table.update_values(idx, values, self.epoch)
        self._consumed += 1
        self.costs.trained += idx.numel()
        self.costs.steps += 1
        # The mean loss is read from the device when the stats are (or for hooks), not on
        # every step of a loop that never looks at them.
        self._stats = None
        loss = values.get("loss")  # its mean is taken now, on the device, and read later
        mean = loss.to(torch.float32).mean() if loss is not None and idx.numel() else None
        self._pending_stats = (self.epoch, self.costs.steps, idx.numel(), mean)
        if self._hooks:
            stats = self.stats
            for hook in self._hooks:
                hook(stats)
        if self._plan is not None and self._consumed >= len(self._batches()):
            # Last batch of the epoch trained: the epoch is over (so a checkpoint taken now
            # says epoch + 1, and a loop resuming from sampler.epoch does not repeat one).
            self._advance_epoch()

    def _loss_as_scores(self, loss: torch.Tensor) -> Scores:
        if self.table.fields != ("loss",):
            raise TypeError(f"update: {type(self.strategy).__name__} records {list(self.table.fields)}, not only the "
                            "loss, so a loss tensor is not enough: pass the batch's scores, "
                            "s = fastsel.score(logits, y" + (", head=model.fc" if "mms" in self.table.fields else "")
                            + "), sampler.update(idx, s)")
        if loss.dim() != 1 or not loss.dtype.is_floating_point:
            raise ValueError(f"update: a loss tensor must be the per-sample loss, 1-D floating point [B] "
                             f"(reduction='none'), got shape {tuple(loss.shape)} and dtype {loss.dtype}")
        return Scores(loss, *(None,) * (len(Scores._fields) - 1))

    def _gather(self, idx: torch.Tensor, values: dict) -> tuple[torch.Tensor, dict]:
        if self.num_replicas == 1 or not (dist.is_available() and dist.is_initialized()):
            return idx, values
        # Batches can differ in size (the last one): pad to the largest with index -1.
        size = torch.tensor([idx.numel()], device=idx.device)
        sizes = [torch.zeros_like(size) for _ in range(self.num_replicas)]
        dist.all_gather(sizes, size)
        longest = int(max(s.item() for s in sizes))
        def padded(t, fill):
            out = torch.full((longest,), fill, dtype=t.dtype, device=t.device)
            out[: t.numel()] = t
            return out
        def gather(t, fill):
            parts = [torch.empty(longest, dtype=t.dtype, device=t.device) for _ in range(self.num_replicas)]
            dist.all_gather(parts, padded(t, fill))
            return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
        return gather(idx, -1), {f: gather(v.to(torch.float32), float("nan")) for f, v in values.items()}

    @property
    def stats(self) -> dict:
        """The last ``update``'s statistics: epoch, step, samples and their mean loss."""
        if self._stats is None:
            epoch, step, samples, mean = self._pending_stats
            self._stats = {"epoch": epoch, "step": step, "samples": samples,
                           "mean_loss": float("nan") if mean is None else float(mean)}
            self._pending_stats = None
        return self._stats

    def add_hook(self, hook: Callable[[dict], None]) -> None:
        """Calls ``hook(stats)`` after every ``update`` (e.g. to log the batch's mean loss)."""
        self._hooks.append(hook)

    # ---- state ----
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "consumed": self._consumed, "seed": self.seed, "n": self.n,
            "drop_last": self.drop_last,
            "plan": None if self._plan is None else (self._plan.indices.clone(), self._plan.weights.clone()),
            "table": self.table.state_dict(), "strategy": self.strategy.state_dict(),
            "costs": self.costs.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a ``state_dict()``. The whole state is checked first (a state of another
        data set, table layout or strategy, or a tampered one, raises ``ValueError`` or
        ``TypeError`` naming the entry) and a failed load changes nothing."""
        saved_drop_last = ("drop_last",) if isinstance(state, dict) and "drop_last" in state else ()  # older: none
        _state.require_keys("state", state,
                            ("epoch", "consumed", "seed", "n", "plan", "table", "strategy", "costs") + saved_drop_last)
        n = _state.check_int("state['n']", state["n"], 0)
        if n != self.n:
            raise ValueError(f"state['n'] is {n}: the sampler state is for {n} samples, this sampler has {self.n}")
        if "drop_last" in state and state["drop_last"] is not self.drop_last:  # states before it was saved: none
            raise ValueError(f"state['drop_last'] is {state['drop_last']!r} but this sampler has "
                             f"drop_last={self.drop_last}: the epoch's batches would differ; build the sampler with "
                             f"drop_last={state['drop_last']!r}")
        epoch = _state.check_int("state['epoch']", state["epoch"], 0)
        seed = _state.check_int("state['seed']", state["seed"], 0)
        plan = self._plan_from_state(state["plan"])
        batches = 0 if plan is None else len(self._split(plan))
        consumed = _state.check_int("state['consumed']", state["consumed"], 0, batches,
                                    why=" (the number of batches of the plan on this rank)")
        load_table = self.table._prepare_load(state["table"], "state['table']")
        last_epoch = state["table"]["last_epoch"]
        if last_epoch.numel() and int(last_epoch.max()) > epoch:  # scores cannot come from a later epoch
            raise ValueError(f"state['table']['last_epoch'] holds epoch {int(last_epoch.max())}, after the "
                             f"sampler's state['epoch'] = {epoch}")
        load_strategy = prepare_strategy_load(self.strategy, state["strategy"], "state['strategy']", self.n)
        load_costs = self.costs._prepare_load(state["costs"], "state['costs']")
        load_strategy()  # first: only a strategy's own load_state_dict (see prepare_strategy_load) can fail
        self.epoch, self._consumed, self.seed, self._plan = epoch, consumed, seed, plan
        self._exhausted = False
        load_table()
        load_costs()

    def _plan_from_state(self, plan: Any) -> Optional[EpochPlan]:
        if plan is None:
            return None
        if not isinstance(plan, (tuple, list)) or len(plan) != 2:
            raise TypeError(f"state['plan'] must be None or a pair (indices, weights), got {plan!r:.80}")
        indices = _state.check_tensor("state['plan'][0]", plan[0], (None,), (torch.int64,), low=0, high=self.n)
        weights = _state.check_tensor("state['plan'][1]", plan[1], (self.n,), _state.FLOATS, low=0, finite=True)
        return EpochPlan(indices.to("cpu", copy=True), weights.to("cpu", copy=True))

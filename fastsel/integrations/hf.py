"""Hugging Face ``Trainer``: a ``ScoreSampler`` through a ``Trainer`` subclass.

    from fastsel.integrations.hf import SelectionTrainer

    sampler = fastsel.ScoreSampler(fastsel.Indexed(train_set), fastsel.strategies.InfoBatch(), batch_size=32, epochs=3)
    trainer = SelectionTrainer(model=model, args=TrainingArguments(output_dir="out", per_device_train_batch_size=32,
                               save_steps=100), train_dataset=train_set, sampler=sampler)
    trainer.train()                                  # trainer.train(resume_from_checkpoint=True) resumes

What the subclass changes, through the ``Trainer``'s documented extension points:

* ``get_train_dataloader``: the batches are the sampler's, one sampler epoch per
  Trainer epoch, each batch with its data set indices. The Trainer sizes every epoch
  once, so the loader's length is the most batches an epoch can hold
  (``sampler.max_epoch_steps()``) and an epoch that selection shortens ends early; the
  sampler's ``epochs`` replace ``num_train_epochs``, and the Trainer's ``max_steps`` is
  their sum (exact for Uniform / PSGD / CSGD, an upper bound otherwise).
* ``compute_loss``: ``fastsel.score`` of the model's logits (``label_smoothing_factor``
  included), weighted by ``sampler.weights``, and ``sampler.update`` with the scores.
  The model's own loss is not computed (the labels are not passed to it). Evaluation
  batches (no indices) take the Trainer's own ``compute_loss``.
* ``create_scheduler``: with ``schedule="progress"`` (the default) the learning-rate
  schedule follows the fraction of the sampler's run done (``sampler.progress``), so that
  warm-up and decay keep their shape when selection shortens the epochs; ``"steps"``
  keeps the Trainer's (over the steps bound).
* Checkpoints: each holds ``fastsel_sampler.pt`` (the sampler's state) beside the
  Trainer's files; ``train(resume_from_checkpoint=...)`` restores it, and the sampler
  itself skips the batches already trained (``args.ignore_data_skip`` is set). Training
  ends when the sampler's run does (a resumed Trainer, counting epochs as if all were
  full, can believe fewer done).

``gradient_accumulation_steps > 1`` is refused unless every epoch's length is known
ahead (Uniform, PSGD, CSGD): the Trainer steps the optimizer at its own epoch
boundaries, so a shortened epoch's last accumulation group would be carried into the
next epoch or never stepped. The Trainer's logged ``epoch`` counts in units of the
longest epoch.

The model must return logits ``[B, C]`` (a ``ModelOutput``, a dict with ``logits``, or a
tensor) for the ``labels`` of the batch. One process: under several processes the
Trainer's accelerator would shard the sampler's batches a second time, which is
refused.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Optional

import torch

from fastsel.data import Indexed
from fastsel.ops import score
from fastsel.sampler import ScoreSampler
from fastsel.forward import output_logits

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:
    raise ImportError("fastsel.integrations.hf needs transformers (and accelerate): "
                      "pip install transformers accelerate") from exc

__all__ = ["SelectionTrainer", "SAMPLER_STATE_NAME", "INDEX_KEY"]

SAMPLER_STATE_NAME = "fastsel_sampler.pt"
INDEX_KEY = "fastsel_index"  # the batch's data set indices, removed before the model's forward
SCHEDULES = ("progress", "steps")


class _EpochBatches(torch.utils.data.Sampler):
    """One epoch of the sampler per pass of the Trainer, nothing once the sampler's run is
    over. Its length is the most batches any epoch can hold, the same for every epoch:
    the Trainer sizes its epochs and its resume arithmetic by it, and an epoch that
    selection shortens simply ends early."""

    def __init__(self, sampler: ScoreSampler, steps: int):
        self.sampler = sampler
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        if self.sampler.epoch < self.sampler.epochs:
            yield from self.sampler


class _SamplerCheckpoints(TrainerCallback):
    """Writes the sampler's state into each checkpoint, and ends training when the
    sampler's run is over (a resumed Trainer, which counts epochs as if all had the same
    length, may believe fewer epochs done than there were)."""

    def __init__(self, sampler: ScoreSampler):
        self.sampler = sampler

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.sampler.state_dict(), os.path.join(folder, SAMPLER_STATE_NAME))
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.sampler.epoch >= self.sampler.epochs:
            control.should_training_stop = True
        return control


class SelectionTrainer(Trainer):
    """A ``transformers.Trainer`` whose training batches, loss weights and schedule come
    from a ``fastsel.ScoreSampler`` (see the module docstring).

    Args:
        sampler: over ``train_dataset`` (the same length), ``batch_size`` the per-device
            batch size.
        schedule: ``"progress"`` or ``"steps"`` (see the module docstring).
        *args, **kwargs: the ``Trainer``'s.
    """

    def __init__(self, *args: Any, sampler: ScoreSampler, schedule: str = "progress", **kwargs: Any):
        if not isinstance(sampler, ScoreSampler):
            raise TypeError(f"sampler must be a fastsel.ScoreSampler, got {type(sampler).__name__}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        super().__init__(*args, **kwargs)
        self.args = copy.copy(self.args)  # max_steps, num_train_epochs and ignore_data_skip are set on a copy
        if self.train_dataset is None or len(self.train_dataset) != sampler.n:
            raise ValueError(f"sampler is over {sampler.n} samples but train_dataset has "
                             f"{None if self.train_dataset is None else len(self.train_dataset)}: build the sampler "
                             "over the train_dataset")
        if self.args.world_size > 1:
            raise ValueError("SelectionTrainer runs in one process: under several, the Trainer's accelerator would "
                             "shard the sampler's batches again (use ScoreSampler in your own DDP loop)")
        if self.args.gradient_accumulation_steps > 1 and not sampler.epoch_sizes_known():
            raise ValueError(f"gradient_accumulation_steps={self.args.gradient_accumulation_steps} needs epochs of "
                             f"known length, but {type(sampler.strategy).__name__}'s depend on the scores: the Trainer "
                             "steps the optimizer at its own epoch boundaries only, so a shortened epoch's last "
                             "accumulation group would be carried into the next epoch or never stepped. Use "
                             "gradient_accumulation_steps=1 (a larger batch_size instead)")
        if self.args.per_device_train_batch_size != sampler.batch_size:
            raise ValueError(f"args.per_device_train_batch_size is {self.args.per_device_train_batch_size} but the "
                             f"sampler's batch_size is {sampler.batch_size}: make them equal")
        self.sampler = sampler
        self.schedule = schedule
        self.loss_is_scaled_for_ga = False  # compute_loss returns a batch mean: divide by the accumulation steps
        self._epoch_steps = sampler.max_epoch_steps()
        self.add_callback(_SamplerCheckpoints(sampler))

    # ---- data ----
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        collator = self.data_collator
        if self.args.max_steps != -1:
            raise ValueError(f"args.max_steps is {self.args.max_steps}: with a sampler the run is the sampler's "
                             f"{self.sampler.epochs} epochs; leave max_steps at -1")
        self.args.num_train_epochs = self.sampler.epochs
        self.args.ignore_data_skip = True  # the sampler resumes at its own batch

        def collate(items):
            batch = collator([item for item, _ in items])
            batch[INDEX_KEY] = torch.tensor([i for _, i in items], dtype=torch.int64)
            return batch

        loader = torch.utils.data.DataLoader(
            Indexed(self.train_dataset), batch_sampler=_EpochBatches(self.sampler, self._epoch_steps),
            collate_fn=collate, num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    # ---- loss ----
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch: Optional[Any] = None):
        if INDEX_KEY not in inputs:  # evaluation: the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        idx = inputs.pop(INDEX_KEY)
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs.pop("label", None)
        if not isinstance(labels, torch.Tensor):
            raise ValueError("SelectionTrainer: the batch has no 'labels' (class indices [B]) to score against")
        outputs = model(**inputs)
        logits = output_logits(outputs)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"SelectionTrainer: the model must return logits [B, C] (a ModelOutput or dict with "
                             f"'logits'), got {got}: per-token outputs are not supported")
        s = score(logits, labels.to(logits.device), label_smoothing=self.args.label_smoothing_factor)
        idx = idx.to(logits.device)
        loss = (s.loss * self.sampler.weights(idx)).mean()
        self.sampler.update(idx, s)
        return (loss, outputs) if return_outputs else loss

    # ---- schedule ----
    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and self.schedule == "progress":
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(f"schedule='progress' needs a step-indexed schedule (a LambdaLR), the Trainer built "
                                 f"a {type(scheduler).__name__}: pass schedule='steps'")
            sampler = self.sampler
            scheduler.lr_lambdas = [
                (lambda _step, f=f: f(int(round(sampler.progress * num_training_steps))))
                for f in scheduler.lr_lambdas]
            for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * f(0)  # the learning rate at the run's current progress
        return scheduler

    # ---- resume ----
    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
                if folder is None:
                    raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
            path = os.path.join(str(folder), SAMPLER_STATE_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: the checkpoint holds no sampler state (it was not written by "
                                        "SelectionTrainer), so the selection cannot resume")
            self.sampler.load_state_dict(torch.load(path, weights_only=True))
            resume_from_checkpoint = folder
        return super().train(resume_from_checkpoint, *args, **kwargs)

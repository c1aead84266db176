"""PyTorch Lightning: a ``ScoreSampler`` in a ``LightningModule`` run, through a callback.

    from fastsel.integrations.lightning import SelectionCallback

    data = fastsel.Indexed(train_set)
    sampler = fastsel.ScoreSampler(data, fastsel.strategies.InfoBatch(), batch_size=64, epochs=E)

    class Net(LightningModule):
        def train_dataloader(self):
            return DataLoader(data, batch_sampler=sampler)

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            s = fastsel.score(self(x), y)
            return {"loss": (s.loss * sampler.weights(idx)).mean(), "scores": s}

    trainer = Trainer(max_epochs=E, callbacks=[SelectionCallback(sampler)],
                      reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False)

The callback records each batch's scores (``sampler.update``) after the training step,
from the step's output ``scores`` (a ``fastsel.Scores`` or any per-sample loss [B]) and
the batch's indices (its last element, or the output's ``indices``). Its state is the
sampler's, so a Lightning checkpoint holds it and ``fit(ckpt_path=...)`` resumes the
selection where it stopped. Nothing of Lightning is patched; the Trainer must be set so:

* ``reload_dataloaders_every_n_epochs=1``: selection changes the epoch's length, and
  Lightning reads a train dataloader's length only when it (re)loads it;
* ``use_distributed_sampler=False`` under DDP: the sampler shards the global plan over
  the ranks itself (it would otherwise be wrapped, and Lightning refuses to wrap a batch
  sampler that is not a ``BatchSampler``). At ``setup`` the callback gives the sampler
  the Trainer's world size and rank (the process group starts inside ``fit``).

A strategy that plans whole global batches (``HardBatches(batch_size=...)``) checks the
layout when the sampler is built: under DDP give the sampler ``num_replicas`` and
``rank`` (from the launcher's environment) there.

Lightning is imported as ``lightning.pytorch`` when that package is installed, else as
``pytorch_lightning``: pass the callback to the Trainer of the same package.
"""

from __future__ import annotations

from typing import Any

import torch

from fastsel.reference import Scores
from fastsel.sampler import ScoreSampler

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("fastsel.integrations.lightning needs PyTorch Lightning: pip install lightning "
                          "(or pytorch-lightning)") from exc

__all__ = ["SelectionCallback"]


class SelectionCallback(pl.Callback):
    """Feeds a ``ScoreSampler`` the scores of Lightning's training steps and keeps its state
    in Lightning's checkpoints.

    Args:
        sampler: the ``ScoreSampler`` the module's ``train_dataloader`` uses as
            ``batch_sampler``.
        scores_key: the key of the training step's output holding the batch's scores.
        indices_key: the key holding the batch's data set indices, if the step returns
            them; else the batch's last element is (``fastsel.Indexed`` items).
    """

    def __init__(self, sampler: ScoreSampler, *, scores_key: str = "scores", indices_key: str = "indices"):
        if not isinstance(sampler, ScoreSampler):
            raise TypeError(f"sampler must be a fastsel.ScoreSampler, got {type(sampler).__name__}")
        self.sampler = sampler
        self.scores_key = scores_key
        self.indices_key = indices_key

    @property
    def state_key(self) -> str:
        return f"fastsel.SelectionCallback[{self.scores_key}]"

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("SelectionCallback needs Trainer(reload_dataloaders_every_n_epochs=1): selection changes "
                             "each epoch's length, which Lightning reads only when it reloads the train dataloader "
                             f"(got reload_dataloaders_every_n_epochs={trainer.reload_dataloaders_every_n_epochs})")
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError("SelectionCallback under DDP needs Trainer(use_distributed_sampler=False): the "
                             "ScoreSampler shards the global plan over the ranks itself")
        if (self.sampler.num_replicas, self.sampler.rank) != (trainer.world_size, trainer.global_rank):
            self.sampler.set_world(trainer.world_size, trainer.global_rank)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        loader = trainer.train_dataloader
        loaders = loader if isinstance(loader, (list, tuple)) else \
            list(loader.values()) if isinstance(loader, dict) else [loader]
        if not any(getattr(dl, "batch_sampler", None) is self.sampler for dl in loaders):
            raise ValueError("SelectionCallback: the train dataloader does not draw its batches from this sampler; "
                             "return DataLoader(data, batch_sampler=sampler) from train_dataloader()")

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not isinstance(outputs, dict) or self.scores_key not in outputs:
            raise KeyError(f"SelectionCallback: the training step must return a dict with the batch's scores under "
                           f"{self.scores_key!r}, e.g. return {{'loss': loss, {self.scores_key!r}: s}} with "
                           "s = fastsel.score(logits, y) or a per-sample loss tensor")
        scores = outputs[self.scores_key]
        if isinstance(scores, Scores):
            scores = Scores(*(None if t is None else t.detach() for t in scores))
        elif isinstance(scores, torch.Tensor):
            scores = scores.detach()
        indices = outputs.get(self.indices_key)
        if indices is None:
            indices = batch[-1] if isinstance(batch, (tuple, list)) else None
        if not isinstance(indices, torch.Tensor):
            raise ValueError("SelectionCallback: cannot find the batch's indices: use fastsel.Indexed(data) (the "
                             f"batch's last element) or return them under {self.indices_key!r}")
        self.sampler.update(indices, scores)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "sampler" not in state_dict:
            raise ValueError("SelectionCallback: the checkpoint's callback state must be {'sampler': ...} as "
                             "state_dict() writes it")
        self.sampler.load_state_dict(state_dict["sampler"])

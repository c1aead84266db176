"""A Lightning DDP run on 2 CPU processes (gloo) with SelectionCallback, for
tests/test_lightning.py: Lightning's "ddp" strategy launches rank 1 by running this
script again; each rank writes the indices and weights it trained, per epoch, to
<out>/rank<r>.pt. The sampler is built before fit (process group not started yet)."""

from __future__ import annotations

import os
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.strategies import InfoBatch
import pytorch_lightning as pl

from fastsel.integrations.lightning import SelectionCallback

N, D, C, E, B = 96, 5, 3, 4, 8


class Net(pl.LightningModule):
    def __init__(self, data, sampler):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.ReLU(), torch.nn.Linear(16, C))
        self.data, self.sampler, self.seen = data, sampler, []

    def train_dataloader(self):
        return DataLoader(self.data, batch_sampler=self.sampler)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        s = fastsel.score(self.net(x), y)
        w = self.sampler.weights(idx)
        self.seen.append((self.sampler.epoch, idx.tolist(), w.tolist()))
        return {"loss": (s.loss * w).mean(), "scores": s}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    data = fastsel.Indexed(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()))
    sampler = fastsel.ScoreSampler(data, InfoBatch(prune_ratio=0.5), batch_size=B, epochs=E, seed=1)
    model = Net(data, sampler)
    trainer = pl.Trainer(max_epochs=E, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False,
                         default_root_dir=out, callbacks=[SelectionCallback(sampler)])
    trainer.fit(model)
    torch.save({"seen": model.seen, "world": (sampler.num_replicas, sampler.rank),
                "loss": sampler.table.last["loss"]}, os.path.join(out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])

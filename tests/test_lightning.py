"""``fastsel.integrations.lightning.SelectionCallback`` in real PyTorch Lightning runs (a
tiny model, a few epochs, on the CPU): the scores reach the sampler, InfoBatch prunes
and reweights, a Lightning checkpoint resumes the selection exactly, and misconfigured
Trainers are refused naming the setting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.strategies import InfoBatch

pl = pytest.importorskip("pytorch_lightning")
from fastsel.integrations.lightning import SelectionCallback  # noqa: E402

N, D, C, E, B = 96, 5, 3, 5, 16


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return fastsel.Indexed(TensorDataset(x, y))


class Net(pl.LightningModule):
    def __init__(self, data, sampler, log=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, C))
        self.data, self.sampler, self.seen = data, sampler, log if log is not None else []

    def forward(self, x):
        return self.net(x)

    def train_dataloader(self):
        return DataLoader(self.data, batch_sampler=self.sampler)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        s = fastsel.score(self(x), y)
        w = self.sampler.weights(idx)
        self.seen.append((self.sampler.epoch, idx.clone(), w.clone()))
        return {"loss": (s.loss * w).mean(), "scores": s}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, epochs=E, **kw):
    kw.setdefault("reload_dataloaders_every_n_epochs", 1)
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **kw)


def _sampler(data):
    return fastsel.ScoreSampler(data, InfoBatch(prune_ratio=0.5), batch_size=B, epochs=E, seed=1)


def _manual(data, epochs=E):
    """The same run as a plain loop: what the callback must reproduce."""
    sampler = _sampler(data)
    model = Net(data, sampler)
    opt = model.configure_optimizers()
    seen = []
    for epoch in range(epochs):
        for step, batch in enumerate(DataLoader(data, batch_sampler=sampler)):
            out = model.training_step(batch, step)
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            sampler.update(batch[2], out["scores"])
    return model.seen, sampler


def test_a_lightning_run_selects_as_the_plain_loop_does(tmp_path):
    data = _data()
    sampler = _sampler(data)
    model = Net(data, sampler)
    _trainer(tmp_path, callbacks=[SelectionCallback(sampler)], enable_checkpointing=False).fit(model)
    want, manual = _manual(data)
    got = model.seen
    assert len(got) == len(want) and sampler.costs.steps == len(want)
    for (e1, i1, w1), (e2, i2, w2) in zip(got, want):
        assert e1 == e2 and torch.equal(i1, i2) and torch.equal(w1, w2)
    per_epoch = [sum(len(i) for e, i, _ in got if e == k) for k in range(E)]
    assert per_epoch[0] == N and min(per_epoch) < N  # InfoBatch pruned some epochs
    assert any((w > 1).any() for _, _, w in got)  # and reweighted the kept below-mean samples
    torch.testing.assert_close(sampler.table.last["loss"], manual.table.last["loss"])


def test_resume_from_a_lightning_checkpoint(tmp_path):
    data = _data()
    full_sampler = _sampler(data)
    full = Net(data, full_sampler)
    _trainer(tmp_path / "full", callbacks=[SelectionCallback(full_sampler)], enable_checkpointing=False).fit(full)

    s1 = _sampler(data)
    first = Net(data, s1)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    _trainer(tmp_path / "a", epochs=2, callbacks=[SelectionCallback(s1), ckpt]).fit(first)
    s2 = _sampler(data)  # a new process: a fresh sampler, restored from the checkpoint
    second = Net(data, s2)
    _trainer(tmp_path / "b", callbacks=[SelectionCallback(s2)], enable_checkpointing=False).fit(
        second, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    resumed = first.seen + second.seen
    assert [(e, i.tolist(), w.tolist()) for e, i, w in resumed] == \
        [(e, i.tolist(), w.tolist()) for e, i, w in full.seen]
    assert s2.epoch == E and s2.costs.steps == full_sampler.costs.steps


def test_misconfigured_runs_name_the_setting(tmp_path):
    data = _data()
    sampler = _sampler(data)
    with pytest.raises(ValueError, match=r"reload_dataloaders_every_n_epochs=1"):
        _trainer(tmp_path, callbacks=[SelectionCallback(sampler)], reload_dataloaders_every_n_epochs=0,
                 enable_checkpointing=False).fit(Net(data, sampler))

    class NoScores(Net):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    with pytest.raises(KeyError, match=r"return \{'loss': loss, 'scores': s\}"):
        _trainer(tmp_path, callbacks=[SelectionCallback(sampler)], enable_checkpointing=False).fit(
            NoScores(data, sampler))

    class OtherLoader(Net):
        def train_dataloader(self):
            return DataLoader(self.data, batch_size=B)

    with pytest.raises(ValueError, match=r"batch_sampler=sampler"):
        _trainer(tmp_path, callbacks=[SelectionCallback(_sampler(data))], enable_checkpointing=False).fit(
            OtherLoader(data, sampler))
    with pytest.raises(TypeError, match="ScoreSampler"):
        SelectionCallback(object())


def test_set_world_only_at_an_epoch_start():
    data = _data()
    sampler = _sampler(data)
    sampler.set_world(2, 1)
    batches = list(iter(sampler))
    assert sum(len(b) for b in batches) == N // 2 and sampler.num_replicas == 2 and sampler.rank == 1
    sampler.set_world(1, 0)
    first = next(iter(sampler))
    sampler.update(torch.tensor(first), torch.ones(len(first)))
    with pytest.raises(RuntimeError, match="start of an epoch"):
        sampler.set_world(2, 0)
    with pytest.raises(ValueError, match="rank"):
        _sampler(data).set_world(2, 2)


def test_ddp_two_processes_share_one_plan(tmp_path):
    """Lightning's DDP on 2 CPU processes: the callback gives the sampler the Trainer's
    world (set inside fit), the ranks train disjoint shards of one global plan per epoch,
    and keep identical score tables."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    worker = Path(__file__).resolve().parent / "lightning_ddp_worker.py"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, str(worker), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["world"] == (2, 0) and r1["world"] == (2, 1)
    torch.testing.assert_close(r0["loss"], r1["loss"], equal_nan=True)  # one table on both ranks
    epochs = {e for e, _, _ in r0["seen"]}
    assert epochs == set(range(4))
    sizes = []
    for epoch in sorted(epochs):
        a = [i for e, idx, _ in r0["seen"] if e == epoch for i in idx]
        b = [i for e, idx, _ in r1["seen"] if e == epoch for i in idx]
        assert len(a) == len(b) and not set(a) & set(b)  # disjoint shards of one plan
        sizes.append(len(a) + len(b))
    assert sizes[0] == 96 and min(sizes) < 96  # every sample at first, then InfoBatch pruned

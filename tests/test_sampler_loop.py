"""What a real epoch loop needs of ScoreSampler: no tiny last batch by default (BatchNorm
in training mode refuses a batch of one), len() true for each epoch being iterated, and
the steps of the epoch and of the run for a per-step learning-rate schedule."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.strategies import CSGD, InfoBatch, Uniform


def _data(n):
    g = torch.Generator().manual_seed(0)
    return fastsel.Indexed(TensorDataset(torch.randn(n, 4, generator=g), torch.arange(n) % 3))


def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _train(sampler, data, epochs, model=None, scheduler=None, opt=None):
    model = model or _bn_model()
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    sizes, lens = [], []
    for _ in range(epochs):
        loader = DataLoader(data, batch_sampler=sampler)
        lens.append(len(loader))
        epoch_sizes = []
        for x, y, idx in loader:
            s = fastsel.score(model(x), y)
            (s.loss * sampler.weights(idx)).mean().backward()
            opt.step()
            opt.zero_grad()
            if scheduler is not None:
                scheduler.step()
            sampler.update(idx, s)
            epoch_sizes.append(len(idx))
        sizes.append(epoch_sizes)
    return sizes, lens


def test_a_batch_of_one_is_not_served_by_default():
    data = _data(17)  # 16 + 1
    _train(fastsel.ScoreSampler(data, Uniform(), batch_size=16, epochs=2), data, 2)  # trains
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _train(fastsel.ScoreSampler(data, Uniform(), batch_size=16, epochs=2, drop_last=False), data, 2)


def test_infobatch_epochs_change_length_but_every_batch_is_full():
    data = _data(203)
    sampler = fastsel.ScoreSampler(data, InfoBatch(prune_ratio=0.5), batch_size=16, epochs=6, seed=1)
    sizes, lens = _train(sampler, data, 6)
    assert all(b == 16 for epoch in sizes for b in epoch)
    assert lens == [len(e) for e in sizes]  # len(loader) was true for each epoch
    assert len(set(lens)) > 1  # pruning changed the epoch's length
    keep = fastsel.ScoreSampler(data, InfoBatch(prune_ratio=0.5), batch_size=16, epochs=6, seed=1,
                                drop_last=False)
    loose, loose_lens = _train(keep, data, 6)
    assert loose_lens == [len(e) for e in loose]
    assert {e[-1] for e in loose} - {16}  # without drop_last the last batches vary


def test_epochs_smaller_than_a_batch_warn():
    with pytest.warns(UserWarning, match="every epoch would be empty"):
        fastsel.ScoreSampler(_data(10), Uniform(), batch_size=16, epochs=2)
    with pytest.warns(UserWarning, match="Uniform can plan one full batch of 16"):  # 10 of 100 samples an epoch
        fastsel.ScoreSampler(_data(100), Uniform(budget=0.1), batch_size=16, epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastsel.ScoreSampler(_data(10), Uniform(), batch_size=16, epochs=2, drop_last=False)
        fastsel.ScoreSampler(_data(0), Uniform(), batch_size=16, epochs=2)
        two = fastsel.ScoreSampler(_data(31), Uniform(), batch_size=16, epochs=2, num_replicas=2, rank=1)
        assert len(two) == 1  # 16 of the (wrapped) 32 on this rank: a full batch, no warning


def test_a_state_of_the_other_drop_last_is_refused():
    data = _data(40)
    old = fastsel.ScoreSampler(data, Uniform(), batch_size=16, epochs=2, drop_last=False)
    first = next(iter(old))
    old.update(torch.tensor(first), torch.ones(len(first)))
    new = fastsel.ScoreSampler(data, Uniform(), batch_size=16, epochs=2)
    with pytest.raises(ValueError, match=r"state\['drop_last'\] is False.*drop_last=True"):
        new.load_state_dict(old.state_dict())
    legacy = old.state_dict()
    del legacy["drop_last"]  # a state saved before the key existed: loads as before
    again = fastsel.ScoreSampler(data, Uniform(), batch_size=16, epochs=2, drop_last=False)
    again.load_state_dict(legacy)
    assert again.steps_in_epoch == 3


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("strategy", [lambda: Uniform(budget=0.7), lambda: CSGD(0.5)], ids=["uniform", "csgd"])
def test_total_steps_is_exact_when_epoch_sizes_are_known(strategy, drop_last):
    data = _data(150)
    sampler = fastsel.ScoreSampler(data, strategy(), batch_size=16, epochs=4, drop_last=drop_last)
    steps, exact = sampler.total_steps()
    assert exact
    sizes, _ = _train(sampler, data, 4)
    assert steps == sum(len(e) for e in sizes) == sampler.costs.steps
    assert sampler.total_steps() == (steps, True)  # still, after the run


def test_total_steps_bounds_infobatch_and_tightens_as_it_goes():
    data = _data(200)
    sampler = fastsel.ScoreSampler(data, InfoBatch(prune_ratio=0.5), batch_size=16, epochs=5, seed=2)
    bounds = []
    model, opt = _bn_model(), None
    for epoch in range(5):
        bounds.append(sampler.total_steps())
        assert sampler.steps_in_epoch == len(sampler)
        _train(sampler, data, 1, model=model)
    actual = sampler.costs.steps
    assert all(not exact for _, exact in bounds[:-1]) and bounds[-1] == (actual, True)
    assert bounds[0][0] == 5 * (200 // 16) and all(b >= actual for b, _ in bounds)
    assert [b for b, _ in bounds] == sorted((b for b, _ in bounds), reverse=True)


def test_progress_drives_a_per_step_schedule_over_pruned_epochs():
    data = _data(200)
    epochs = 4
    sampler = fastsel.ScoreSampler(data, InfoBatch(prune_ratio=0.5), batch_size=16, epochs=epochs, seed=3)
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0 - sampler.progress)
    assert sampler.progress == 0.0
    for _ in range(epochs):
        for x, y, idx in DataLoader(data, batch_sampler=sampler):
            s = fastsel.score(model(x), y)
            (s.loss * sampler.weights(idx)).mean().backward()
            opt.step(); opt.zero_grad()
            sampler.update(idx, s)
            sched.step()
            seen.append((sampler.epoch, sampler.progress, opt.param_groups[0]["lr"]))
    progress = [p for _, p, _ in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and seen[-1][2] == 0.0
    # The update of an epoch's last batch ends it: progress is then exactly the epochs done.
    ends = [p2 for (e, _, _), (e2, p2, _) in zip(seen, seen[1:]) if e2 != e]
    assert ends == [0.25, 0.5, 0.75, 1.0]
    state = sampler.state_dict()
    again = fastsel.ScoreSampler(data, InfoBatch(prune_ratio=0.5), batch_size=16, epochs=epochs, seed=3)
    again.load_state_dict(state)
    assert again.progress == 1.0 and again.total_steps() == sampler.total_steps()

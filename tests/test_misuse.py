"""Misuse of the epoch style is reported where it happens, naming the fix: a
ScoreSampler passed as ``sampler=`` instead of ``batch_sampler=``, a data set whose items
do not carry their index, and an epoch that ends without any ``sampler.update``."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastsel
from fastsel.strategies import InfoBatch, Uniform


def _data(n=40):
    return torch.utils.data.TensorDataset(torch.randn(n, 3), torch.arange(n) % 4)


def test_sampler_instead_of_batch_sampler_names_the_fix():
    data = fastsel.Indexed(_data())
    sampler = fastsel.ScoreSampler(data, InfoBatch(), batch_size=8, epochs=2)
    loader = torch.utils.data.DataLoader(data, sampler=sampler)
    with pytest.raises(TypeError, match=r"batch_sampler=sampler"):
        next(iter(loader))
    batches = list(torch.utils.data.DataLoader(data, batch_sampler=sampler))  # the documented form works
    assert sum(len(b[2]) for b in batches) == 40 and all(b[2].dtype == torch.int64 for b in batches)
    assert fastsel.Indexed(_data())[torch.tensor(3)][2] == 3  # a 0-d tensor index is still one index


def test_data_without_indices_warns_at_construction():
    with pytest.warns(UserWarning, match=r"fastsel\.Indexed\(data\)"):
        fastsel.ScoreSampler(_data(), InfoBatch(), batch_size=8, epochs=2)

    class WithIndex(torch.utils.data.Dataset):  # a user's data set that already returns its index
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.zeros(3), 0, torch.tensor(i)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastsel.ScoreSampler(fastsel.Indexed(_data()), InfoBatch(), batch_size=8, epochs=2)
        fastsel.ScoreSampler(WithIndex(), InfoBatch(), batch_size=8, epochs=2)
        fastsel.ScoreSampler(fastsel.Indexed(_data(0)), InfoBatch(), batch_size=8, epochs=2)


def _epoch(sampler, data, update: bool):
    for x, y, idx in torch.utils.data.DataLoader(data, batch_sampler=sampler):
        if update:
            sampler.update(idx, fastsel.score(torch.randn(len(idx), 4), y))


def test_an_epoch_without_update_warns_once():
    data = fastsel.Indexed(_data())
    sampler = fastsel.ScoreSampler(data, InfoBatch(), batch_size=8, epochs=4)
    _epoch(sampler, data, update=False)
    with pytest.warns(RuntimeWarning, match=r"epoch 0 ended without any sampler\.update\(\).*InfoBatch"):
        _epoch(sampler, data, update=False)  # the next epoch starts: the first one had no update
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _epoch(sampler, data, update=False)  # once per sampler
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = fastsel.ScoreSampler(data, InfoBatch(), batch_size=8, epochs=4)
        for _ in range(3):
            _epoch(ok, data, update=True)
        uniform = fastsel.ScoreSampler(data, Uniform(), batch_size=8, epochs=4)  # reads no score
        for _ in range(3):
            _epoch(uniform, data, update=False)


def test_repr_shows_the_knobs():
    data = fastsel.Indexed(_data())
    sampler = fastsel.ScoreSampler(data, InfoBatch(prune_ratio=0.3), batch_size=8, epochs=5, seed=7, drop_last=True)
    r = repr(sampler)
    assert r.startswith("ScoreSampler(InfoBatch(prune_ratio=0.3, delta=0.875), n=40, batch_size=8, epochs=5, seed=7, "
                        "drop_last=True, num_replicas=1, rank=0, epoch=0, costs=Costs(scored=0, trained=0, steps=0))")
    model, head = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    sel = fastsel.BatchSelector(model, fastsel.strategies.MMS(keep=2), head=head, seed=3, score_batch_size=16)
    sel(torch.randn(6, 3), torch.arange(6) % 4)
    r = repr(sel)
    assert r.startswith("BatchSelector(MMS(keep=2") and "model=Linear, scorer=None, head=Linear, seed=3, " \
        "mms='exact', backend='auto', score_batch_size=16, step=1, costs=Costs(scored=6, trained=2, steps=1))" in r

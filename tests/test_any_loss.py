"""Any per-sample loss drives the strategies that read only the loss: ``sampler.update``
takes a loss tensor [B]; strategies that need more of the scores refuse it naming the
fix; ``p_wrong`` (1 - p_y) stays that of the hard target when the loss has class weights
or label smoothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel.strategies import CSGD, InfoBatch, MMS

N, C = 64, 5


def _data():
    g = torch.Generator().manual_seed(0)
    return fastsel.Indexed(torch.utils.data.TensorDataset(torch.randn(N, 3, generator=g), torch.arange(N) % C))


def _logits(x):
    return torch.stack([x.sum(1) * (k - 2) for k in range(C)], dim=1)  # a fixed "model"


def _run(update_with, strategy_factory=InfoBatch, epochs=4):
    data = _data()
    sampler = fastsel.ScoreSampler(data, strategy_factory(), batch_size=16, epochs=epochs, seed=3)
    plans = []
    for _ in range(epochs):
        seen = []
        for x, y, idx in torch.utils.data.DataLoader(data, batch_sampler=sampler):
            seen.append(idx)
            sampler.update(idx, update_with(_logits(x), y))
        plans.append(torch.cat(seen))
    return plans, sampler


def test_a_loss_tensor_drives_infobatch_as_the_scores_do():
    with_scores, a = _run(lambda z, y: fastsel.score(z, y))
    with_tensor, b = _run(lambda z, y: F.cross_entropy(z, y, reduction="none"))
    assert all(torch.equal(p, q) for p, q in zip(with_scores, with_tensor))
    assert sum(len(p) for p in with_scores) < 4 * N  # InfoBatch pruned something: the plans read the loss
    torch.testing.assert_close(a.table.last["loss"], b.table.last["loss"])


def test_a_custom_loss_is_what_the_table_holds():
    """A focal-style loss, not cross-entropy: the table records it as given."""
    def focal(z, y):
        ce = F.cross_entropy(z, y, reduction="none")
        return (1 - torch.exp(-ce)) ** 2 * ce

    _, sampler = _run(focal, epochs=1)
    data = _data()
    x, y = data.dataset.tensors
    torch.testing.assert_close(sampler.table.last["loss"], focal(_logits(x), y))


def test_a_loss_tensor_with_grad_is_detached():
    data = _data()
    sampler = fastsel.ScoreSampler(data, InfoBatch(), batch_size=16, epochs=2)
    x, y, idx = next(iter(torch.utils.data.DataLoader(data, batch_sampler=sampler)))
    z = _logits(x).requires_grad_(True)
    loss = F.cross_entropy(z, y, reduction="none")
    sampler.update(idx, loss)
    assert not sampler.table.last["loss"].requires_grad
    loss.mean().backward()  # the graph is still the caller's
    assert z.grad is not None


def test_strategies_that_need_more_than_the_loss_refuse_a_tensor():
    data = _data()
    for strategy, fix in ((MMS(keep=0.5), r"head=model\.fc"), (CSGD(0.5), r"fastsel\.score")):
        sampler = fastsel.ScoreSampler(data, strategy, batch_size=16, epochs=2)
        x, y, idx = next(iter(torch.utils.data.DataLoader(data, batch_sampler=sampler)))
        with pytest.raises(TypeError, match=rf"{type(strategy).__name__} records.*{fix}"):
            sampler.update(idx, F.cross_entropy(_logits(x), y, reduction="none"))


@pytest.mark.parametrize("bad, match", [
    (lambda b: torch.ones(b, 1), r"1-D floating point"),
    (lambda b: torch.ones(b, dtype=torch.long), r"1-D floating point"),
    (lambda b: torch.ones(b + 1), r"samples but indices"),
    (lambda b: torch.ones(()), r"1-D floating point"),
])
def test_bad_loss_tensors_raise(bad, match):
    data = _data()
    sampler = fastsel.ScoreSampler(data, InfoBatch(), batch_size=16, epochs=2)
    _, _, idx = next(iter(torch.utils.data.DataLoader(data, batch_sampler=sampler)))
    with pytest.raises(ValueError, match=match):
        sampler.update(idx, bad(len(idx)))
    with pytest.raises(TypeError, match=r"Scores of the batch or a per-sample loss tensor"):
        sampler.update(idx, [1.0] * len(idx))


def test_p_wrong_is_the_hard_targets_whatever_the_loss_options():
    """CSGD ranks by 1 - p_y: class weights and label smoothing on the training loss do not
    change it."""
    plain, _ = _run(lambda z, y: fastsel.score(z, y), lambda: CSGD(0.5))
    w = torch.tensor([0.2, 3.0, 1.0, 0.5, 7.0])
    options, s = _run(lambda z, y: fastsel.score(z, y, weight=w, label_smoothing=0.3), lambda: CSGD(0.5))
    assert all(torch.equal(p, q) for p, q in zip(plain, options))
    data = _data()
    x, y = data.dataset.tensors
    want = 1 - F.softmax(_logits(x).double(), 1).gather(1, y[:, None]).squeeze(1)
    seen = ~torch.isnan(s.table.last["p_wrong"])
    assert seen.sum() >= N // 2
    torch.testing.assert_close(s.table.last["p_wrong"][seen].double(), want[seen], rtol=1e-5, atol=1e-6)

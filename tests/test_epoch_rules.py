"""The epoch style of the score rules (MMS, HardLoss, MaxEntropy, TopScore, CDFSampling,
UpperBoundIS, RhoLoss) through ``fastsel.ScoreSampler``: what each picks from the table,
unknown scores visited, refresh passes counted, resume, and the errors of misuse.

Controlled scores: sample i at epoch e has logits ``h_e(i) * (1, 0, ..., 0)`` and
target ``i % C``, so every score is a known function of (i, e)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.utils.data import TensorDataset

import fastsel
from fastsel.strategies import (MMS, CDFSampling, HardLoss, MaxEntropy, Rescorer, RhoLoss, ScoreTable, StyleError,
                                TopScore, UpperBoundIS)

N, C, D, BS = 200, 5, 3, 16
W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.5, 0.0, 3.0]])


def logits_of(idx: torch.Tensor, epoch: int) -> torch.Tensor:
    i = idx.to(torch.float64)[:, None]
    j = torch.arange(C, dtype=torch.float64)[None, :]
    return (2.5 * torch.sin(0.37 * i * (j + 1) + 0.91 * epoch + j)).to(torch.float32)


def scores_of(idx: torch.Tensor, epoch: int) -> fastsel.Scores:
    return fastsel.score(logits_of(idx, epoch), idx % C, head=W)


def data(n: int = N):
    """Items (i, target, i): the input is the sample index (the controlled logits' argument)."""
    return fastsel.Indexed(TensorDataset(torch.arange(n), torch.arange(n) % C))


def run(sampler, epochs, record=None, stop_after=None):
    """Trains ``epochs`` epochs with the controlled scores; returns the (batch, weights)
    stream. ``stop_after``: return after that many updates."""
    stream = []
    for _ in range(epochs):
        for (b,) in _batches(sampler):
            idx = torch.as_tensor(b)
            stream.append((idx.tolist(), sampler.weights(idx).tolist()))
            sampler.update(idx, scores_of(idx, sampler.epoch))
            if stop_after is not None and len(stream) == stop_after:
                return stream
        if record is not None:
            record.append(sampler.epoch)
    return stream


def _batches(sampler):
    for b in sampler:
        yield (b,)


def table_with(values: dict, n: int = N, known: torch.Tensor | None = None) -> ScoreTable:
    table = ScoreTable(n, tuple(values))
    idx = torch.arange(n) if known is None else known
    table.update_values(idx, {f: v[idx] for f, v in values.items()}, epoch=0)
    return table


# ---- what each rule picks ------------------------------------------------------------------

@pytest.mark.parametrize("make,field,largest", [
    (lambda: MMS(0.3), "mms", False), (lambda: HardLoss(0.3), "loss", True),
    (lambda: MaxEntropy(0.3), "entropy", True), (lambda: TopScore(0.3, by="margin"), "margin", False),
    (lambda: TopScore(0.3, by="loss", largest=False), "loss", False),
])
def test_top_rules_pick_the_best_known_and_every_unknown(make, field, largest):
    g = torch.Generator().manual_seed(0)
    values = torch.rand(N, generator=g)
    known = torch.randperm(N, generator=g)[:170]  # 30 samples never scored
    strategy = make()
    plan = strategy.plan_epoch(3, table_with({field: values}, known=known), seed=1, epochs=5)
    k = round(0.3 * N)
    unknown = sorted(set(range(N)) - set(known.tolist()))
    visited = plan.indices.tolist()
    assert len(visited) == len(set(visited)) == k
    assert set(unknown) <= set(visited)
    order = known[torch.sort(values[known], descending=largest, stable=True).indices]
    assert set(visited) - set(unknown) == set(order[:k - len(unknown)].tolist())
    assert torch.equal(plan.weights, torch.ones(N))
    # the visit order is a seeded permutation: another epoch or seed, another order
    again = strategy.plan_epoch(3, table_with({field: values}, known=known), seed=1, epochs=5)
    assert torch.equal(again.indices, plan.indices)
    other = strategy.plan_epoch(4, table_with({field: values}, known=known), seed=1, epochs=5)
    assert set(other.indices.tolist()) == set(visited) and not torch.equal(other.indices, plan.indices)


def test_more_unknown_than_keep_visits_every_unknown():
    values = torch.rand(N)
    plan = HardLoss(0.2).plan_epoch(1, table_with({"loss": values}, known=torch.arange(100)), seed=0, epochs=3)
    assert sorted(plan.indices.tolist()) == list(range(100, N))


def test_first_epoch_is_full_then_keep_fraction():
    sampler = fastsel.ScoreSampler(data(), HardLoss(0.25), batch_size=BS, epochs=3, seed=2, drop_last=False)
    stream = run(sampler, 1)
    assert sorted(i for b, _ in stream for i in b) == list(range(N))
    second = run(sampler, 1)
    visited = [i for b, _ in second for i in b]
    assert len(visited) == round(0.25 * N)
    losses = scores_of(torch.arange(N), 0).loss  # the table holds epoch 0's losses
    assert set(visited) == set(torch.topk(losses, len(visited)).indices.tolist())


def test_cdf_epoch_draws_in_proportion_and_reweights():
    g = torch.Generator().manual_seed(3)
    importance = torch.rand(N, generator=g) ** 3
    strategy = CDFSampling(0.25, switch_ratio=None, replacement=True, reweight=True)
    counts = torch.zeros(N)
    k = round(0.25 * N)
    for epoch in range(400):
        plan = strategy.plan_epoch(epoch, table_with({"loss": importance}), seed=5, epochs=400)
        assert plan.indices.numel() == k
        counts += torch.bincount(plan.indices, minlength=N)
        drawn = plan.indices.unique()
        inv = 1.0 / importance[drawn].double()
        # weights 1 / (N P(i)) normalised to mean 1 over the draw (with repeats)
        per_draw = 1.0 / importance[plan.indices].double()
        torch.testing.assert_close(plan.weights[drawn].double(), inv * k / per_draw.sum(), rtol=1e-5, atol=0)
    expected = importance.double() / importance.double().sum() * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < N + 6 * math.sqrt(2 * N), chi2  # ~ chi-square(N - 1)


def test_cdf_epoch_switch_starts_uniform_and_turns_on():
    strategy = CDFSampling(0.5, switch_ratio=0.75)
    loss = torch.full((N,), 2.0)
    strategy.plan_epoch(1, table_with({"loss": loss}), seed=0, epochs=5)
    assert not strategy.active and strategy.initial_loss == pytest.approx(2.0)
    strategy.plan_epoch(2, table_with({"loss": loss * 0.8}), seed=0, epochs=5)
    assert not strategy.active
    strategy.plan_epoch(3, table_with({"loss": loss * 0.7}), seed=0, epochs=5)
    assert strategy.active and strategy.running_loss == pytest.approx(1.4)
    strategy.plan_epoch(4, table_with({"loss": loss}), seed=0, epochs=5)
    assert strategy.active, "once on, the sampling stays on"


def test_upper_bound_epoch_samples_with_replacement_by_grad_norm():
    g = torch.Generator().manual_seed(4)
    gn = torch.rand(N, generator=g) + 0.01
    strategy = UpperBoundIS(0.5)
    assert strategy.table_fields == ("grad_norm",)
    counts = torch.zeros(N)
    for epoch in range(200):
        plan = strategy.plan_epoch(epoch, table_with({"grad_norm": gn}), seed=1, epochs=200)
        assert plan.indices.numel() == N // 2
        counts += torch.bincount(plan.indices, minlength=N)
    assert counts.max() > 0 and (plan.indices.unique().numel() < N // 2)  # repeats happen
    expected = gn.double() / gn.double().sum() * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < N + 6 * math.sqrt(2 * N), chi2


def test_rho_loss_epoch_ranks_reducible_loss():
    g = torch.Generator().manual_seed(6)
    loss, irreducible = torch.rand(N, generator=g) * 3, torch.rand(N, generator=g) * 3
    strategy = RhoLoss(irreducible, keep_fraction=0.2)
    assert strategy.styles == ("epoch",)
    plan = strategy.plan_epoch(1, table_with({"loss": loss}), seed=0, epochs=2)
    want = torch.topk(loss - irreducible, round(0.2 * N)).indices
    assert set(plan.indices.tolist()) == set(want.tolist())
    with pytest.raises(ValueError, match="irreducible-loss table has 10 entries but the data set 200"):
        RhoLoss(torch.zeros(10), keep_fraction=0.2).plan_epoch(1, table_with({"loss": loss}), seed=0, epochs=2)


# ---- through a sampler: MMS from the training forward, errors of misuse ------------------------

def test_mms_epoch_reads_the_recorded_mms():
    sampler = fastsel.ScoreSampler(data(), MMS(0.4), batch_size=BS, epochs=3, seed=0, drop_last=False)
    run(sampler, 1)
    visited = [i for b, _ in run(sampler, 1) for i in b]
    mms = scores_of(torch.arange(N), 0).mms
    assert set(visited) == set(torch.topk(mms, round(0.4 * N), largest=False).indices.tolist())


def test_mms_epoch_without_the_weight_is_a_clear_error():
    sampler = fastsel.ScoreSampler(data(), MMS(0.4), batch_size=BS, epochs=2, drop_last=False)
    b = torch.as_tensor(next(iter(sampler)))
    with pytest.raises(ValueError, match=r"score the training forward with the classifier weight"):
        sampler.update(b, fastsel.score(logits_of(b, 0), b % C))


@pytest.mark.parametrize("make", [lambda: MMS(64), lambda: HardLoss(8), lambda: CDFSampling(16),
                                  lambda: UpperBoundIS(4)])
def test_an_int_keep_is_the_in_batch_style(make):
    strategy = make()
    assert strategy.styles == ("batch",)
    with pytest.raises(StyleError, match=r"give keep as a fraction of the data set, e\.g\. .*\(keep=0\.3\)"):
        fastsel.ScoreSampler(data(), strategy, batch_size=BS, epochs=2, drop_last=False)


def test_a_float_keep_works_in_batch_too():
    s = scores_of(torch.arange(40), 0)
    sel = HardLoss(0.25).choose(s, step=0, seed=0)
    assert sel.indices.numel() == 10
    assert set(sel.indices.tolist()) == set(torch.topk(s.loss, 10).indices.tolist())
    assert CDFSampling(0.5, switch_ratio=None).choose(s, step=0, seed=0).indices.numel() == 20
    assert UpperBoundIS(0.5).choose(s, step=0, seed=0).indices.numel() == 20


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(keep=0.3, refresh=2), ValueError, "pass rescorer="),
    (dict(keep=0.3, rescorer="m"), TypeError, "rescorer must be a fastsel.strategies.Rescorer"),
    (dict(keep=16, refresh=2, rescorer=None), ValueError, "pass rescorer="),
    (dict(keep=0.3, refresh=0), ValueError, "refresh must be a positive int"),
    (dict(keep=1.5), ValueError, r"keep must be a number in \(0, 1\]"),
    (dict(keep=0), ValueError, "keep must be a positive int"),
])
def test_epoch_knob_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        HardLoss(**kwargs)


# ---- refresh passes ------------------------------------------------------------------------------

class Frozen(torch.nn.Module):
    """A model whose logits are the controlled ones of epoch 0 (inputs are the indices),
    with a BatchNorm to show that the scoring pass leaves it untouched."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)
        self.fc = torch.nn.Linear(D, C)
        with torch.no_grad():
            self.fc.weight.copy_(W)

    def forward(self, x):
        self.bn(x.float()[:, None])  # running statistics would move in train mode
        return logits_of(x, 0)


def test_refresh_rescores_every_r_epochs_and_counts_the_cost():
    model = Frozen()
    running = model.bn.running_mean.clone()
    strategy = MMS(0.3, refresh=2, rescorer=Rescorer(model, head=model.fc, batch_size=64))
    sampler = fastsel.ScoreSampler(data(), strategy, batch_size=BS, epochs=5, seed=0, drop_last=False)
    scored = []
    for epoch in range(5):
        before = sampler.costs.scored
        len(sampler)  # plans the epoch, refreshing first on refresh epochs
        if epoch % 2 == 0:  # the refresh recorded the model's (epoch-0) scores for every sample
            torch.testing.assert_close(sampler.table.values("mms"), scores_of(torch.arange(N), 0).mms)
        stream = run(sampler, 1)
        scored.append(sampler.costs.scored - before)
        if epoch == 0:  # refreshed before anything was trained: keep, not everything
            assert sum(len(b) for b, _ in stream) == round(0.3 * N)
    assert scored == [N, 0, N, 0, N]
    assert torch.equal(model.bn.running_mean, running) and model.training


def test_refresh_needs_a_head_for_the_mms():
    strategy = MMS(0.3, refresh=1, rescorer=Rescorer(Frozen()))
    sampler = fastsel.ScoreSampler(data(), strategy, batch_size=BS, epochs=2, drop_last=False)
    with pytest.raises(ValueError, match="needs the classifier layer: Rescorer"):
        next(iter(sampler))


# ---- resume and state ---------------------------------------------------------------------------

MAKERS = {
    "mms": lambda: MMS(0.4),
    "hard": lambda: HardLoss(0.3),
    "cdf": lambda: CDFSampling(0.3, switch_ratio=0.9, reweight=True),
    "upper": lambda: UpperBoundIS(0.4),
    "rho": lambda: RhoLoss(torch.linspace(0.0, 1.0, N), keep_fraction=0.3),
    "refresh": lambda: HardLoss(0.3, refresh=2, rescorer=Rescorer(Frozen(), batch_size=50)),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("stop", [1, 13, 14, 30, 41])
def test_exact_resume(name, stop):
    epochs = 4
    whole = fastsel.ScoreSampler(data(), MAKERS[name](), batch_size=BS, epochs=epochs, seed=7, drop_last=False)
    stream = run(whole, epochs)
    first = fastsel.ScoreSampler(data(), MAKERS[name](), batch_size=BS, epochs=epochs, seed=7, drop_last=False)
    head = run(first, epochs, stop_after=stop)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = fastsel.ScoreSampler(data(), MAKERS[name](), batch_size=BS, epochs=epochs, seed=7, drop_last=False)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = []
    while resumed.epoch < epochs:
        rest += run(resumed, 1)
    assert head + rest == stream
    assert resumed.costs.as_dict() == whole.costs.as_dict()

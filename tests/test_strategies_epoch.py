"""Epoch-level strategies driven through ``fastsel.ScoreSampler`` and a ``DataLoader``:
HardBatches (Sahayam, Zakkam & Jayaraman 2023), DynaMS (Wang et al. 2023), p-SGD / c-SGD
(Arazo et al. 2021).

Most tests replace the model by controlled logits: sample i has two-class logits
(h_i, 0) and target 1, so its loss is softplus(h_i) and 1 - p_y = sigmoid(h_i), and the
expected selections are known. DynaMS trains a tiny model with BatchNorm, because it
scores the whole set with the model itself."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.strategies import InfoBatch, ScoreTable, StyleError, Uniform
from fastsel.strategies.budgeted import CSGD, PSGD
from fastsel.strategies.dynams import DynaMS
from fastsel.strategies.hard_batches import HardBatches

N, D, C = 512, 10, 4


def make_data(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return fastsel.Indexed(TensorDataset(x, y))


def make_model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, C))


class FakeTrainer:
    """No model: sample i at epoch e has logits (h(e)[i], 0) and target 1. Keeps its own
    record of each sample's last loss and of the running mean of 1 - p_y."""

    def __init__(self, hardness):
        self.hardness = hardness  # epoch -> [N] float64
        self.last_loss = None
        self.p_wrong_sum = None
        self.count = None

    def step(self, sampler, x, y, idx):
        h = self.hardness(sampler.epoch)[idx]
        logits = torch.stack([h, torch.zeros_like(h)], 1).float()
        sampler.update(idx, fastsel.score(logits, torch.ones(len(idx), dtype=torch.int64)))
        n = sampler.n
        if self.last_loss is None:
            self.last_loss = torch.full((n,), float("nan"), dtype=torch.float64)
            self.p_wrong_sum = torch.zeros(n, dtype=torch.float64)
            self.count = torch.zeros(n, dtype=torch.float64)
        self.last_loss[idx] = F.softplus(h.double())
        self.p_wrong_sum[idx] += torch.sigmoid(h.double())
        self.count[idx] += 1

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class ModelTrainer:
    """A real (tiny) training loop: SGD on the weighted loss, scores recorded."""

    def __init__(self, seed: int = 0):
        self.model = make_model(seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.2, momentum=0.9)

    def step(self, sampler, x, y, idx):
        s = fastsel.score(self.model(x), y)
        (s.loss * sampler.weights(idx)).mean().backward()
        self.opt.step()
        self.opt.zero_grad()
        sampler.update(idx, s)

    def state_dict(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


def random_hardness(seed: int = 1, n: int = N):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=torch.float64) * 2
    drift = torch.randn(n, generator=g, dtype=torch.float64)
    return lambda epoch: base + 0.5 * epoch * drift


def run_epoch(sampler, trainer, before_batch=None):
    """One epoch through a DataLoader; returns [(epoch, indices, weights)] per batch."""
    out = []
    for j, (x, y, idx) in enumerate(DataLoader(sampler.data, batch_sampler=sampler)):
        if before_batch is not None and before_batch(j):
            break
        out.append((sampler.epoch, idx.tolist(), sampler.weights(idx).tolist()))
        trainer.step(sampler, x, y, idx)
    return out


def epoch_indices(batches) -> list[int]:
    return [i for _, idx, _ in batches for i in idx]


# ---------------------------------------------------------------- HardBatches

def test_hard_batches_keeps_top_delta_by_stale_batch_mean_loss():
    data = make_data()
    hardness = random_hardness()
    base = hardness(0).clone()
    hot = torch.tensor([5, 77, 300, 411])  # four very hard samples: their batches must be kept
    base[hot] = 50.0
    trainer = FakeTrainer(lambda e: base + (hardness(e) - hardness(0)))
    strategy = HardBatches(0.25, batch_size=32)
    sampler = fastsel.ScoreSampler(data, strategy, batch_size=32, epochs=4, seed=3, drop_last=False)

    first = run_epoch(sampler, trainer)
    assert sorted(epoch_indices(first)) == list(range(N)), "epoch 0 must visit every sample once"
    assert all(len(idx) == 32 for _, idx, _ in first)

    for epoch in (1, 2, 3):
        # Expected, from the test's own record of each sample's last loss (stale values).
        formed = strategy.form_batches(N, seed=3, epoch=epoch)
        assert sorted(torch.cat(formed).tolist()) == list(range(N)) and len(formed) == 16
        means = torch.stack([trainer.last_loss[b].mean() for b in formed])
        top = sorted(torch.argsort(means, descending=True)[:4].tolist())
        batches = run_epoch(sampler, trainer)
        got = [idx for _, idx, _ in batches]
        assert got == [formed[i].tolist() for i in top], f"epoch {epoch}: not the top-4 batches in formation order"
        assert all(w == 1.0 for _, _, ws in batches for w in ws)
        if epoch == 1:
            assert set(hot.tolist()) <= set(epoch_indices(batches))
    assert sampler.costs.as_dict() == {"scored": 0, "trained": N + 3 * 128, "steps": 16 + 3 * 4}


def test_hard_batches_short_batch_comes_last_and_chunks_are_kept_batches():
    n = 500  # 15 batches of 32 and one of 20
    data = make_data(n)
    strategy = HardBatches(0.2, batch_size=32)
    formed = strategy.form_batches(n, seed=0, epoch=1)
    assert [len(b) for b in formed] == [32] * 15 + [20]
    base = torch.zeros(n, dtype=torch.float64)
    base[formed[-1]] = 9.0   # the short batch is the hardest
    base[formed[4]] = 5.0    # then batches 4 and 11
    base[formed[11]] = 4.0
    trainer = FakeTrainer(lambda e: base)
    sampler = fastsel.ScoreSampler(data, strategy, batch_size=32, epochs=2, drop_last=False)
    run_epoch(sampler, trainer)
    got = [idx for _, idx, _ in run_epoch(sampler, trainer)]
    assert got == [formed[4].tolist(), formed[11].tolist(), formed[-1].tolist()]


def test_hard_batches_never_trained_samples_count_at_the_largest_loss():
    data = make_data()
    strategy = HardBatches(2 / 16, batch_size=32)  # keeps 2 of the 16 batches
    formed = strategy.form_batches(N, seed=0, epoch=1)
    hard, unseen = 3, N - 1
    where = [i for i, b in enumerate(formed) if hard in b.tolist() or unseen in b.tolist()]
    assert len(where) == 2, "the test needs the two samples in different batches"
    table = ScoreTable(N, ("loss",))
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(N, generator=g)
    loss[hard] = 20.0
    seen = torch.arange(N) != unseen
    table.update_values(torch.arange(N)[seen], {"loss": loss[seen]}, 0)
    plan = strategy.plan_epoch(1, table, seed=0, epochs=3, data=data)
    assert plan.indices.tolist() == torch.cat([formed[i] for i in where]).tolist()


# ---------------------------------------------------------------- DynaMS

def prob_margins(logits: torch.Tensor) -> torch.Tensor:
    top = logits.double().softmax(1).topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def true_margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).max(1).values
    return zy - others


def eval_logits(model, x, fn=None):
    """Independent whole-set forward in eval mode (the mode is restored afterwards)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = (fn or model)(x)
    model.train(was)
    return out


def assert_smallest(chosen: torch.Tensor, values: torch.Tensor, k: int, tol: float = 1e-5):
    """``chosen`` holds k distinct samples, all with values within ``tol`` of the k
    smallest (exact sets may differ only at float ties)."""
    chosen = chosen.tolist()
    assert len(chosen) == k and len(set(chosen)) == k
    threshold = float(values.sort().values[k - 1])
    assert float(values[chosen].max()) <= threshold + tol
    rest = torch.ones(values.numel(), dtype=torch.bool)
    rest[chosen] = False
    assert float(values[rest].min()) >= threshold - tol


def test_dynams_refreshes_the_smallest_margin_subset_every_r_epochs():
    data = make_data()
    x = data.dataset.tensors[0]
    trainer = ModelTrainer()
    strategy = DynaMS(0.25, 2, model=trainer.model, score_batch_size=100)
    sampler = fastsel.ScoreSampler(data, strategy, batch_size=32, epochs=6, seed=5, drop_last=False)
    k = N // 4
    subsets, scored = [], []
    for epoch in range(6):
        expected = prob_margins(eval_logits(trainer.model, x))
        batches = run_epoch(sampler, trainer)
        got = torch.tensor(epoch_indices(batches))
        scored.append(strategy.last_scored)
        assert all(w == 1.0 for _, _, ws in batches for w in ws)
        if epoch == 0:
            assert sorted(got.tolist()) == list(range(N)), "epoch 0 (warm-up) trains on everything"
            assert strategy.subset is None
            continue
        assert strategy.refreshed_at == (epoch if epoch % 2 == 1 else epoch - 1)
        if epoch % 2 == 1:
            assert_smallest(got, expected, k)
        else:
            assert sorted(got.tolist()) == sorted(subsets[-1].tolist()), "the subset is fixed between refreshes"
            assert got.tolist() != subsets[-1].tolist(), "each epoch visits the subset in a new order"
        assert sorted(strategy.subset.tolist()) == sorted(got.tolist())
        subsets.append(got)
    assert scored == [0, N, 0, N, 0, N]
    assert sampler.costs.scored == 3 * N
    assert sampler.costs.trained == N + 5 * k


def test_dynams_scoring_leaves_the_model_untouched():
    data = make_data()
    model = make_model()
    model.train()
    model[3].eval()  # a mixed-mode model: every submodule's own mode must come back
    model(data.dataset.tensors[0][:64]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = [m.training for m in model.modules()]

    strategy = DynaMS(0.5, 3, model=model, warmup_epochs=0, score_batch_size=128)
    plan = strategy.plan_epoch(0, ScoreTable(N), seed=0, epochs=3, data=data)

    assert strategy.last_scored == N
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p.detach(), q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert_smallest(plan.indices, prob_margins(eval_logits(model, data.dataset.tensors[0])), N // 2)
    # Not a refresh epoch: the subset is kept and nothing is scored.
    plan = strategy.plan_epoch(1, ScoreTable(N), seed=0, epochs=3, data=data)
    assert strategy.last_scored == 0 and strategy.refreshed_at == 0
    assert sorted(plan.indices.tolist()) == sorted(strategy.subset.tolist())


def test_dynams_parameter_sharing_proxy():
    data = make_data()
    x = data.dataset.tensors[0]
    model = make_model()
    model.train()
    lin1, bn, _, lin2 = model

    def narrow(inputs):  # the first half of the hidden units, sharing the model's weights
        h = F.relu(bn(lin1(inputs)))[:, :8]
        return F.linear(h, lin2.weight[:, :8], lin2.bias)

    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    strategy = DynaMS(0.25, 1, model=model, proxy=narrow, warmup_epochs=0, score_batch_size=200)
    sampler = fastsel.ScoreSampler(data, strategy, batch_size=64, epochs=1, drop_last=False)
    got = torch.tensor([i for b in sampler for i in b])
    assert model.training and bn.training
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)))
    assert_smallest(got, prob_margins(eval_logits(model, x, narrow)), N // 4)
    assert sampler.costs.scored == N


def test_dynams_true_margin():
    data = make_data()
    x, y = data.dataset.tensors
    model = make_model()
    strategy = DynaMS(0.1, 2, model=model, by="true_margin", warmup_epochs=0)
    plan = strategy.plan_epoch(0, ScoreTable(N), seed=0, epochs=2, data=data)
    margins = true_margins(eval_logits(model, x), y)
    assert_smallest(plan.indices, margins, round(0.1 * N))
    assert sorted(strategy.subset.tolist()) == sorted(plan.indices.tolist())
    assert strategy.subset.tolist() == sorted(strategy.subset.tolist(), key=lambda i: float(margins[i]))


# ---------------------------------------------------------------- p-SGD / c-SGD

def test_budgeted_draws_budget_n_distinct_samples_with_the_running_mean_importance():
    data = make_data()
    trainer = FakeTrainer(random_hardness(seed=2))
    strategy = PSGD(0.3)
    sampler = fastsel.ScoreSampler(data, strategy, batch_size=32, epochs=4, seed=11, drop_last=False)
    k = round(0.3 * N)
    seen_any = torch.zeros(N, dtype=torch.bool)
    for epoch in range(4):
        if epoch > 0:  # the importance the strategy uses, from the test's own running means
            s = trainer.p_wrong_sum / trainer.count
            s = torch.where(trainer.count > 0, s, s[trainer.count > 0].max())
            torch.testing.assert_close(strategy.importance(sampler.table), s + s.mean(), rtol=1e-6, atol=1e-7)
        batches = run_epoch(sampler, trainer)
        idx = epoch_indices(batches)
        assert len(idx) == k and len(set(idx)) == k
        assert all(w == 1.0 for _, _, ws in batches for w in ws)
        seen_any[idx] = True
    assert sampler.costs.trained == 4 * k and sampler.costs.scored == 0


def test_budgeted_unseen_and_first_epoch():
    table = ScoreTable(6, ("p_wrong",))
    assert torch.equal(PSGD().uncertainty(table), torch.ones(6, dtype=torch.float64))
    assert torch.equal(CSGD().importance(table), torch.ones(6, dtype=torch.float64))  # f = 0: uniform
    table.update_values(torch.tensor([0, 1, 2]), {"p_wrong": torch.tensor([0.25, 0.5, 0.75])}, 0)
    table.update_values(torch.tensor([0]), {"p_wrong": torch.tensor([0.75])}, 1)  # running mean 0.5
    want_max = torch.tensor([0.5, 0.5, 0.75, 0.75, 0.75, 0.75], dtype=torch.float64)
    want_mean = torch.tensor([0.5, 0.5, 0.75] + [1.75 / 3] * 3, dtype=torch.float64)
    torch.testing.assert_close(PSGD().uncertainty(table), want_max)
    torch.testing.assert_close(PSGD(unseen="mean").uncertainty(table), want_mean)
    f = want_max * (1 - want_max)
    torch.testing.assert_close(CSGD().importance(table), f + f.mean())
    # Before any observation, and in warm-up epochs, the draw is uniform.
    empty = ScoreTable(6, ("p_wrong",))
    uniform = PSGD(0.5).plan_epoch(0, empty, seed=4, epochs=3)
    warm = PSGD(0.5, warmup_epochs=1).plan_epoch(0, table, seed=4, epochs=3)
    assert torch.equal(uniform.indices, warm.indices)
    # budget 1: every sample once per epoch.
    full = CSGD(1.0).plan_epoch(2, table, seed=4, epochs=3)
    assert sorted(full.indices.tolist()) == list(range(6))


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p / p.sum() * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("cls", [PSGD, CSGD])
def test_budgeted_frequencies_track_importance_plus_mean(cls):
    n = 20
    s = torch.linspace(0.0, 1.0, n, dtype=torch.float64) ** 2
    table = ScoreTable(n, ("p_wrong",))
    table.update_values(torch.arange(n), {"p_wrong": s.float()}, 0)
    strategy = cls(1 / n)  # one sample per epoch: its frequency is P(i) itself
    counts = torch.zeros(n, dtype=torch.float64)
    for seed in (0, 1):
        for epoch in range(2000):
            plan = strategy.plan_epoch(epoch, table, seed=seed, epochs=2000)
            assert plan.indices.numel() == 1
            counts[plan.indices] += 1
    f = s.float().double()
    f = f if cls is PSGD else f * (1 - f)
    # chi-square with 19 degrees of freedom: P(X > 50) < 1e-4 (deterministic: fixed seeds).
    assert chi_square(counts, f + f.mean()) < 50
    # Without the smoothing constant the fit is far worse (the test can tell them apart).
    assert chi_square(counts + 1, f + 1e-3) > 200


def test_budgeted_visits_the_draw_in_random_order():
    # The race order of sampling without replacement puts high importance first; the
    # plan visits the drawn samples in a random order, as the authors' SubsetRandomSampler.
    n = 512
    table = ScoreTable(n, ("p_wrong",))
    table.update_values(torch.arange(n), {"p_wrong": torch.linspace(0, 1, n) ** 3}, 0)
    strategy = PSGD(0.5)
    p = strategy.importance(table)
    ratios = []
    for epoch in range(40):
        idx = strategy.plan_epoch(epoch, table, seed=0, epochs=40).indices
        ratios.append(float(p[idx[:128]].mean() / p[idx[128:]].mean()))
    assert abs(sum(ratios) / len(ratios) - 1) < 0.05


def test_budgeted_reweight_gives_importance_weights():
    data = make_data()
    trainer = FakeTrainer(random_hardness(seed=3))
    strategy = CSGD(0.25, reweight=True)
    assert strategy.unbiased and not CSGD(0.25).unbiased
    sampler = fastsel.ScoreSampler(data, strategy, batch_size=64, epochs=3, drop_last=False)
    for epoch in range(3):
        p = strategy.importance(sampler.table).float()
        batches = run_epoch(sampler, trainer)
        idx = torch.tensor(epoch_indices(batches))
        w = torch.tensor([v for _, _, ws in batches for v in ws])
        if epoch == 0:
            assert torch.allclose(w, torch.ones_like(w))
            continue
        want = 1.0 / p[idx].double()
        torch.testing.assert_close(w.double(), want * len(idx) / want.sum(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- all strategies

def make_hard_batches(seed=0):
    return (fastsel.ScoreSampler(make_data(), HardBatches(0.5, batch_size=32), batch_size=32, epochs=5, seed=seed, drop_last=False),
            FakeTrainer(random_hardness()))


def make_dynams(seed=0):
    trainer = ModelTrainer()
    strategy = DynaMS(0.25, 2, model=trainer.model, score_batch_size=128)
    return fastsel.ScoreSampler(make_data(), strategy, batch_size=32, epochs=5, seed=seed, drop_last=False), trainer


def make_psgd(seed=0):
    return (fastsel.ScoreSampler(make_data(), PSGD(0.4), batch_size=32, epochs=5, seed=seed, drop_last=False),
            FakeTrainer(random_hardness()))


def make_csgd(seed=0):
    return (fastsel.ScoreSampler(make_data(), CSGD(0.4, reweight=True), batch_size=32, epochs=5, seed=seed, drop_last=False),
            FakeTrainer(random_hardness()))


MAKERS = {"hard_batches": make_hard_batches, "dynams": make_dynams, "psgd": make_psgd, "csgd": make_csgd}


def full_run(make, epochs=5, seed=0):
    sampler, trainer = make(seed)
    stream = [b for _ in range(epochs) for b in run_epoch(sampler, trainer)]
    return stream, sampler


@pytest.mark.parametrize("name", list(MAKERS))
def test_reproducible_by_seed(name):
    a, _ = full_run(MAKERS[name], epochs=4)
    b, _ = full_run(MAKERS[name], epochs=4)
    c, _ = full_run(MAKERS[name], epochs=4, seed=1)
    assert a == b
    assert a != c


@pytest.mark.parametrize("name,stop_epoch,stop_batch", [
    ("hard_batches", 2, 3), ("dynams", 1, 2), ("dynams", 2, 0), ("psgd", 2, 2), ("csgd", 3, 1),
])
def test_exact_resume_mid_epoch(name, stop_epoch, stop_batch):
    make, epochs = MAKERS[name], 5
    full, full_sampler = full_run(make, epochs)

    sampler, trainer = make()
    part = []
    for epoch in range(stop_epoch + 1):
        stop = (lambda j: j == stop_batch) if epoch == stop_epoch else None
        part += run_epoch(sampler, trainer, before_batch=stop)
    buffer = io.BytesIO()
    torch.save({"sampler": sampler.state_dict(), "trainer": trainer.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)

    sampler, trainer = make()  # a fresh sampler, strategy and trainer
    sampler.load_state_dict(state["sampler"])
    trainer.load_state_dict(state["trainer"])
    for _ in range(stop_epoch, epochs):
        part += run_epoch(sampler, trainer)
    assert part == full
    assert sampler.costs.as_dict() == full_sampler.costs.as_dict()
    assert sampler.epoch == full_sampler.epoch == epochs  # the last update ended the last epoch


def test_dynams_state_dict_holds_subset_and_refresh_epoch():
    sampler, trainer = make_dynams()
    for _ in range(2):
        run_epoch(sampler, trainer)
    state = sampler.strategy.state_dict()
    assert state["refreshed_at"] == 1 and torch.equal(state["subset"], sampler.strategy.subset)
    other = DynaMS(0.25, 2, model=trainer.model)
    other.load_state_dict(state)
    assert torch.equal(other.subset, sampler.strategy.subset) and other.refreshed_at == 1


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("build,match", [
    (lambda: HardBatches(0.0, batch_size=32), "delta"),
    (lambda: HardBatches(1.5, batch_size=32), "delta"),
    (lambda: HardBatches(0.5, batch_size=0), "batch_size"),
    (lambda: HardBatches(0.5, batch_size=32, warmup_epochs=-1), "warmup_epochs"),
    (lambda: DynaMS(0.0, model=make_model()), "keep"),
    (lambda: DynaMS(1.2, model=make_model()), "keep"),
    (lambda: DynaMS(0.5, 0, model=make_model()), "refresh"),
    (lambda: DynaMS(0.5, model=make_model(), by="loss"), "by"),
    (lambda: DynaMS(0.5), "model="),
    (lambda: DynaMS(0.5, proxy=lambda x: x), "model="),
    (lambda: DynaMS(0.5, model=make_model(), score_batch_size=0), "score_batch_size"),
    (lambda: PSGD(0.0), "budget"),
    (lambda: PSGD(1.01), "budget"),
    (lambda: CSGD(True), "budget"),
    (lambda: CSGD(0.5, unseen="min"), "unseen"),
])
def test_bad_knobs_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


NAN = float("nan")
BAD_FRACTIONS = [0, 0.0, -0.5, 1.01, True, False, NAN, "0.5", None]
BAD_POSITIVE_INTS = [0, -1, True, False, 2.0, "8", None]
BAD_NON_NEGATIVE_INTS = [-1, True, False, 1.0, "0", None]

# (id, build(value), argument name, bad values): every bad value raises a ValueError whose
# message starts with "<name> must be" and ends with ", got <repr(value)>".
BAD_EPOCH_KNOBS = [
    ("hard-delta", lambda v: HardBatches(v, batch_size=32), "delta", BAD_FRACTIONS),
    ("hard-batch_size", lambda v: HardBatches(0.5, batch_size=v), "batch_size", BAD_POSITIVE_INTS),
    ("hard-warmup_epochs", lambda v: HardBatches(0.5, batch_size=32, warmup_epochs=v), "warmup_epochs",
     BAD_NON_NEGATIVE_INTS),
    ("dynams-keep", lambda v: DynaMS(v, model=make_model()), "keep", BAD_FRACTIONS),
    ("dynams-refresh", lambda v: DynaMS(0.5, v, model=make_model()), "refresh", BAD_POSITIVE_INTS),
    ("dynams-warmup_epochs", lambda v: DynaMS(0.5, model=make_model(), warmup_epochs=v), "warmup_epochs",
     BAD_NON_NEGATIVE_INTS),
    ("dynams-score_batch_size", lambda v: DynaMS(0.5, model=make_model(), score_batch_size=v), "score_batch_size",
     BAD_POSITIVE_INTS),
    ("dynams-num_workers", lambda v: DynaMS(0.5, model=make_model(), num_workers=v), "num_workers",
     BAD_NON_NEGATIVE_INTS),
    ("psgd-budget", lambda v: PSGD(v), "budget", BAD_FRACTIONS),
    ("csgd-budget", lambda v: CSGD(v), "budget", BAD_FRACTIONS),
    ("psgd-warmup_epochs", lambda v: PSGD(0.5, warmup_epochs=v), "warmup_epochs", BAD_NON_NEGATIVE_INTS),
    ("uniform-budget", lambda v: Uniform(budget=v), "budget", BAD_FRACTIONS),
    ("infobatch-prune_ratio", lambda v: InfoBatch(v), "prune_ratio", [-0.1, 1, 1.0, True, False, NAN, "0.5", None]),
    ("infobatch-delta", lambda v: InfoBatch(0.5, v), "delta", [-0.1, 1.5, True, False, NAN, "0.5", None]),
]


@pytest.mark.parametrize("build,name,value", [pytest.param(b, n, v, id=f"{i}={v!r}")
                                              for i, b, n, vs in BAD_EPOCH_KNOBS for v in vs])
def test_bad_epoch_knobs_raise_naming_the_argument(build, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        build(value)


def test_epoch_knob_messages_unchanged():
    cases = [
        (lambda: HardBatches(0.0, batch_size=32), "delta must be a number in (0, 1], got 0.0"),
        (lambda: HardBatches(0.5, batch_size=0), "batch_size must be a positive int, got 0"),
        (lambda: HardBatches(0.5, batch_size=8, warmup_epochs=-1), "warmup_epochs must be an int >= 0, got -1"),
        (lambda: DynaMS(True, model=make_model()), "keep must be a number in (0, 1], got True"),
        (lambda: DynaMS(0.5, 0, model=make_model()), "refresh must be a positive int, got 0"),
        (lambda: DynaMS(0.5, model=make_model(), num_workers=-1), "num_workers must be an int >= 0, got -1"),
        (lambda: DynaMS(0.5, model=make_model(), by="loss"),
         "by must be one of ('prob_margin', 'true_margin', 'margin'), got 'loss'"),
        (lambda: PSGD(1.5), "budget must be a number in (0, 1], got 1.5"),
        (lambda: CSGD(0.5, unseen="min"), "unseen must be one of ('max', 'mean'), got 'min'"),
        (lambda: Uniform(budget=0), "budget must be in (0, 1], got 0"),
        (lambda: InfoBatch(1.0), "prune_ratio must be in [0, 1), got 1.0"),
        (lambda: InfoBatch(0.5, 2), "delta must be in [0, 1], got 2"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError) as err:
            build()
        assert str(err.value) == message


def test_epoch_knob_boundaries_accepted():
    HardBatches(1, batch_size=1, warmup_epochs=0)
    DynaMS(1, 1, model=make_model(), warmup_epochs=0, score_batch_size=1, num_workers=0)
    PSGD(1, warmup_epochs=0)
    CSGD(1e-9)
    Uniform(budget=1)
    InfoBatch(0, 0)
    InfoBatch(0.999, 1)


def test_bad_types_raise():
    with pytest.raises(TypeError, match="model"):
        DynaMS(0.5, model=lambda x: x)
    with pytest.raises(TypeError, match="reweight"):
        PSGD(0.5, reweight=1)


@pytest.mark.parametrize("strategy", [
    HardBatches(batch_size=32), DynaMS(model=make_model()), PSGD(0.5), CSGD(0.5),
])
def test_epoch_only_strategies_refuse_the_batch_style(strategy):
    assert strategy.styles == ("epoch",)
    with pytest.raises(StyleError, match="BatchSelector"):
        fastsel.BatchSelector(make_model(), strategy)
    fastsel.ScoreSampler(make_data(), strategy, batch_size=32, epochs=2, drop_last=False)  # the epoch style is fine


def test_dynams_data_errors():
    model = make_model()
    strategy = DynaMS(0.5, model=model, warmup_epochs=0)
    with pytest.raises(ValueError, match="score_data"):
        strategy.plan_epoch(0, ScoreTable(N), seed=0, epochs=1, data=None)
    plain = make_data().dataset  # items (x, y): not indexed
    with pytest.raises(ValueError, match="fastsel.Indexed"):
        strategy.plan_epoch(0, ScoreTable(N), seed=0, epochs=1, data=plain)
    with pytest.raises(ValueError, match="samples"):
        strategy.plan_epoch(0, ScoreTable(N + 1), seed=0, epochs=1, data=make_data())
    # score_data stands in for the sampler's data set.
    plan = DynaMS(0.5, model=model, warmup_epochs=0, score_data=make_data()).plan_epoch(
        0, ScoreTable(N), seed=0, epochs=1, data=None)
    assert plan.indices.numel() == N // 2
    bad_proxy = DynaMS(0.5, model=model, proxy=lambda x: x[:, 0], warmup_epochs=0)
    with pytest.raises(ValueError, match="logits"):
        bad_proxy.plan_epoch(0, ScoreTable(N), seed=0, epochs=1, data=make_data())

"""In-batch importance strategies (CDF sampling, upper-bound importance sampling),
RHO-LOSS and Selective-Backprop (in-batch and stale epoch variant): each selects what its
definition in docs/methods.md says, reproducibly, resumably, and through BatchSelector /
ScoreSampler without touching the models."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel import reference
from fastsel.strategies import MMS, HardLoss, MaxEntropy, StyleError, TopScore, Uniform
from fastsel._checks import (check_bool, check_choice, check_fraction, check_int, check_positive_int,
                                        check_real)
from fastsel.strategies.importance import CDFSampling, UpperBoundIS
from fastsel.strategies.rho_loss import RhoLoss
from fastsel.strategies.selective_backprop import SelectiveBackprop

# ---------------------------------------------------------------- helpers


def fake_scores(loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> fastsel.Scores:
    """Scores with the given loss (and grad_norm); the other fields are zeros."""
    loss = loss.to(torch.float32)
    z = torch.zeros_like(loss)
    return fastsel.Scores(loss, z, z, z, loss if grad_norm is None else grad_norm.to(torch.float32), z,
                          torch.zeros(loss.shape, dtype=torch.int64), None, z)


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) by Wilson-Hilferty (z = 3.719: p = 1e-4)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() / probs.double().sum() * counts.sum().double()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def counts_of(indices: list[torch.Tensor], n: int) -> torch.Tensor:
    return torch.bincount(torch.cat(indices), minlength=n)


def bn_model(d: int = 6, c: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, c))
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            m(torch.randn(32, d))
    return m


def snapshot(model: torch.nn.Module) -> tuple[dict, list[bool]]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def assert_untouched(model: torch.nn.Module, snap) -> None:
    state, modes = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by selection"
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def run(strategy, scores_seq, *, seed: int = 3, start: int = 0):
    out = []
    for t, s in enumerate(scores_seq):
        sel = strategy.choose(s, step=start + t, seed=seed)
        out.append((sel.indices.clone(), sel.weights.clone()))
    return out


def random_scores_seq(steps: int, n: int, *, seed: int = 0, decay: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    seq = []
    for t in range(steps):
        loss = torch.rand(n, generator=g) * 2.0 * (1.0 - decay) ** t + 1e-3
        gn = torch.rand(n, generator=g) + 1e-3
        seq.append(fake_scores(loss, gn))
    return seq


# ---------------------------------------------------------------- CDFSampling


def test_cdf_uniform_before_switch():
    n, k, steps = 32, 4, 1500
    gn = torch.linspace(0.01, 1.0, n) ** 3  # strongly skewed importance: must NOT matter yet
    s = fake_scores(torch.ones(n), gn)       # constant loss: never switches on
    strat = CDFSampling(k, by="grad_norm")
    picks = []
    for t in range(steps):
        sel = strat.choose(s, step=t, seed=11)
        assert sel.indices.unique().numel() == k
        assert torch.equal(sel.weights, torch.ones(k))
        picks.append(sel.indices)
    assert not strat.active and strat.state_dict()["active"] is False
    counts = counts_of(picks, n)
    assert chi2(counts, torch.ones(n)) < chi2_critical(n - 1)


@pytest.mark.parametrize("replacement", [True, False])
def test_cdf_proportional_after_switch(replacement):
    n, steps = 24, 3000
    k = 6 if replacement else 1  # without replacement only a single draw is exactly P ∝ s
    imp = torch.linspace(0.05, 1.0, n)
    strat = CDFSampling(k, replacement=replacement, switch_ratio=None)  # on from the start
    picks = [strat.choose(fake_scores(imp), step=t, seed=5).indices for t in range(steps)]
    counts = counts_of(picks, n)
    assert chi2(counts, imp) < chi2_critical(n - 1)
    assert chi2(counts, torch.ones(n)) > 10 * chi2_critical(n - 1)  # clearly not uniform


def test_cdf_without_replacement_distinct_and_favours_large():
    n, k = 64, 16
    imp = torch.linspace(0.01, 1.0, n) ** 2
    strat = CDFSampling(k, switch_ratio=None)
    picks = []
    for t in range(400):
        idx = strat.choose(fake_scores(imp), step=t, seed=2).indices
        assert idx.unique().numel() == k
        picks.append(idx)
    counts = counts_of(picks, n).double()
    assert counts[-8:].mean() > 5 * counts[:8].mean()


def test_cdf_switch_follows_running_mean_and_latches():
    strat = CDFSampling(2, switch_ratio=0.75, smoothing=0.5)
    losses = [4.0, 4.0, 2.0, 2.0, 2.0, 9.0, 9.0]
    running, expect_on, on = None, [], False
    for t, l in enumerate(losses):
        running = l if running is None else 0.5 * running + 0.5 * l
        on = on or running < 0.75 * 4.0
        expect_on.append(on)
        strat.choose(fake_scores(torch.full((8,), l)), step=t, seed=0)
        assert strat.active == on, t
        assert strat.running_loss == pytest.approx(running)
        assert strat.stats()["active"] == on
    assert expect_on == [False, False, False, True, True, True, True]  # stays on when the loss rises
    assert strat.initial_loss == 4.0


def test_cdf_uniform_phase_matches_seeded_uniform_draw():
    n, k = 40, 7
    strat = CDFSampling(k)
    for t in range(5):
        sel = strat.choose(fake_scores(torch.rand(n) + 1), step=t, seed=9)
        want = fastsel.sample(torch.ones(n), k, seed=9, counter=t).indices
        assert torch.equal(sel.indices, want)


def test_cdf_weights_ones_or_importance_weights():
    n, k = 50, 10
    imp = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.1
    for reweight in (False, True):
        strat = CDFSampling(k, by="grad_norm", switch_ratio=None, reweight=reweight)
        assert strat.unbiased is reweight
        sel = strat.choose(fake_scores(torch.ones(n), imp), step=3, seed=4)
        want = fastsel.sample(imp, k, seed=4, counter=3)
        assert torch.equal(sel.indices, want.indices)
        expected = fastsel.importance_weights(imp, sel.indices) if reweight else torch.ones(k)
        torch.testing.assert_close(sel.weights, expected)
        if reweight:
            w = 1.0 / imp[sel.indices].double()
            torch.testing.assert_close(sel.weights.double(), w * k / w.sum())


def test_cdf_zero_and_nan_importances():
    # grad_norm saturates at 0 for confident samples and is NaN for ignore_index targets.
    gn = torch.tensor([0.0, 0.5, float("nan"), 0.0, 0.25, 0.0])
    strat = CDFSampling(4, by="grad_norm", switch_ratio=None)
    for t in range(20):
        idx = strat.choose(fake_scores(torch.ones(6), gn), step=t, seed=1).indices
        assert idx.unique().numel() == 4
        assert {1, 4} <= set(idx.tolist())  # the positive ones always come first
    strat_all_zero = CDFSampling(3, by="grad_norm", switch_ratio=None)
    idx = strat_all_zero.choose(fake_scores(torch.ones(6), torch.zeros(6)), step=0, seed=1).indices
    assert idx.unique().numel() == 3


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("case", ["all_zero", "few_positive", "enough_positive"])
def test_proportional_degenerate_cases_match_their_definition(case, replacement):
    """The device-side case selection of importance._proportional draws exactly what the
    definition says: uniform when all importances are 0; without replacement and fewer
    than k positive, the zeros raised to 1e-12 x the largest; otherwise the importances."""
    from fastsel.strategies.importance import _ZERO_FLOOR, _proportional

    imp = {"all_zero": torch.zeros(9),
           "few_positive": torch.tensor([0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]),
           "enough_positive": torch.tensor([0.5, 2.0, 0.0, 3.0, 1.0, 0.0, 4.0, 0.2, 0.0])}[case]
    k = 5
    if case == "all_zero":
        want_imp = torch.ones(9)
    elif case == "few_positive" and not replacement:
        want_imp = imp.clamp_min(float(imp.max()) * _ZERO_FLOOR)
    else:
        want_imp = imp
    for step in range(5):
        got = _proportional(imp, k, replacement=replacement, seed=3, step=step)
        want = fastsel.sample(want_imp, k, replacement=replacement, seed=3, counter=step)
        assert got.indices.tolist() == want.indices.tolist()
        torch.testing.assert_close(got.weights, want.weights)


def test_cdf_errors():
    with pytest.raises(ValueError, match="by must be one of"):
        CDFSampling(4, by="entropy")
    with pytest.raises(ValueError, match="keep"):
        CDFSampling(0)
    with pytest.raises(ValueError, match="switch_ratio"):
        CDFSampling(4, switch_ratio=-1)
    with pytest.raises(ValueError, match="smoothing"):
        CDFSampling(4, smoothing=1.0)
    with pytest.raises(ValueError, match="exceeds the candidate batch"):
        CDFSampling(16).choose(fake_scores(torch.ones(8)), step=0, seed=0)


# ---------------------------------------------------------------- UpperBoundIS


def test_upper_bound_tau_formula_and_threshold():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(90, generator=g).double() ** 4
    gg = s / s.sum()
    u = 1.0 / s.numel()
    want = 1.0 / math.sqrt(1.0 - float(((gg - u) ** 2).sum()) / float((gg ** 2).sum()))
    assert UpperBoundIS.equivalent_batch_increment(s) == pytest.approx(want, rel=1e-9)
    # on the CPU, bit for bit the host formula (states saved by earlier versions resume
    # exactly); torch's float64 sqrt differs from it in the last bit for ~1.5% of batches
    for _ in range(300):
        b = torch.rand(90, generator=g).double() ** 4
        gb = b / b.sum()
        assert UpperBoundIS.equivalent_batch_increment(b) == math.sqrt(b.numel() * float((gb * gb).sum()))
    assert UpperBoundIS.equivalent_batch_increment(torch.ones(30)) == pytest.approx(1.0)
    one_hot = torch.zeros(36)
    one_hot[3] = 1
    assert UpperBoundIS.equivalent_batch_increment(one_hot) == pytest.approx(6.0)  # sqrt(B)
    strat = UpperBoundIS(32)
    assert strat.candidate_batch == 96
    assert strat.threshold(96) == pytest.approx(2.0)          # (B + 3b) / (3b) with B = 3b
    assert strat.threshold(160) == pytest.approx((160 + 96) / 96)
    assert UpperBoundIS(32, tau_threshold=1.5).threshold(96) == 1.5
    assert UpperBoundIS(32, backward_cost=1.0).threshold(96) == pytest.approx((96 + 64) / 64)


def test_upper_bound_off_for_uniform_scores():
    n, k = 48, 16
    strat = UpperBoundIS(k)
    for t in range(60):
        sel = strat.choose(fake_scores(torch.ones(n), torch.full((n,), 0.7)), step=t, seed=8)
        assert not strat.active
        assert torch.equal(sel.weights, torch.ones(k))
        assert torch.equal(sel.indices, fastsel.sample(torch.ones(n), k, seed=8, counter=t).indices)
        assert sel.indices.unique().numel() == k  # uniform subset, without replacement
    assert strat.tau == pytest.approx(1.0, abs=0.01)


def test_upper_bound_switches_on_when_few_dominate():
    n, k = 48, 16
    gn = torch.full((n,), 1e-3)
    gn[[5, 17, 30]] = 1.0  # three samples dominate
    tau_now = UpperBoundIS.equivalent_batch_increment(gn)
    strat = UpperBoundIS(k)
    ema, on_at = 0.0, None
    for t in range(40):
        ema = 0.9 * ema + 0.1 * tau_now
        sel = strat.choose(fake_scores(torch.ones(n), gn), step=t, seed=1)
        assert strat.tau == pytest.approx(ema)
        assert strat.active == (ema > 2.0)
        if strat.active:
            on_at = t if on_at is None else on_at
            # with replacement, P ∝ score, weights 1/(B P(i)) normalised to mean 1
            p = gn.double() / gn.double().sum()
            w = 1.0 / (n * p[sel.indices])
            torch.testing.assert_close(sel.weights.double(), w * k / w.sum(), rtol=1e-5, atol=1e-6)
            assert torch.equal(sel.indices, fastsel.sample(gn, k, replacement=True, seed=1, counter=t).indices)
        else:
            assert torch.equal(sel.weights, torch.ones(k))
    assert on_at is not None and on_at == next(t for t in range(40) if tau_now * (1 - 0.9 ** (t + 1)) > 2.0)
    assert strat.stats() == {"active": True, "tau": strat.tau, "tau_threshold": 2.0}


def test_upper_bound_draw_frequencies():
    n, k, steps = 30, 10, 600
    gn = torch.linspace(0.02, 1.0, n) ** 2
    strat = UpperBoundIS(k, tau_threshold=1.0, momentum=0.0)  # always on
    picks = [strat.choose(fake_scores(torch.ones(n), gn), step=t, seed=6).indices for t in range(steps)]
    assert strat.active
    assert chi2(counts_of(picks, n), gn) < chi2_critical(n - 1)


def test_upper_bound_errors():
    with pytest.raises(ValueError, match="presample"):
        UpperBoundIS(8, presample=1.0)
    with pytest.raises(ValueError, match="tau_threshold"):
        UpperBoundIS(8, tau_threshold=0.5)
    with pytest.raises(ValueError, match="by must be one of"):
        UpperBoundIS(8, by="margin")
    with pytest.raises(ValueError, match="momentum"):
        UpperBoundIS(8, momentum=1.5)
    with pytest.raises(ValueError, match="exceeds the candidate batch"):
        UpperBoundIS(8).choose(fake_scores(torch.ones(4)), step=0, seed=0)


# ---------------------------------------------------------------- RhoLoss


def test_rho_loss_keeps_top_reducible_loss():
    n = 50
    g = torch.Generator().manual_seed(3)
    loss = torch.rand(n, generator=g) * 3
    irr = torch.rand(n, generator=g) * 3
    calls = []

    def irreducible(inputs, targets):
        calls.append((inputs, targets))
        assert torch.is_inference_mode_enabled()
        return irr

    x, y = torch.randn(n, 2), torch.zeros(n, dtype=torch.long)
    strat = RhoLoss(irreducible)
    sel = strat.choose(fake_scores(loss), step=0, seed=0, inputs=x, targets=y)
    assert sel.indices.numel() == 5  # 10% of 50
    want = torch.argsort(loss - irr, descending=True)[:5]
    assert set(sel.indices.tolist()) == set(want.tolist())
    assert torch.equal(sel.weights, torch.ones(5))
    assert calls[0][0] is x and calls[0][1] is y
    # an absolute keep; the largest raw loss is not necessarily kept
    sel = RhoLoss(irreducible, keep=12).choose(fake_scores(loss), step=0, seed=0, inputs=x, targets=y)
    assert set(sel.indices.tolist()) == set(torch.argsort(loss - irr, descending=True)[:12].tolist())
    assert RhoLoss(irreducible, keep_fraction=0.25).n_keep(50) == 12
    assert RhoLoss(irreducible, keep_fraction=0.001).n_keep(50) == 1


def test_rho_loss_table_with_ids():
    table = torch.arange(100, dtype=torch.float32) / 10  # irreducible loss grows with the id
    ids = torch.tensor([90, 3, 50, 7, 60, 1, 99, 20])
    loss = torch.full((8,), 5.0)
    strat = RhoLoss(table, keep=3, ids=lambda inputs: inputs[1])
    sel = strat.choose(fake_scores(loss), step=0, seed=0, inputs=(torch.zeros(8, 2), ids), targets=None)
    assert set(ids[sel.indices].tolist()) == {1, 3, 7}  # the smallest irreducible losses
    with pytest.raises(IndexError, match=r"irreducible-loss table\) must be in \[0, 100\), got values in \[11, 109\]"):
        strat.choose(fake_scores(loss), step=0, seed=0, inputs=(None, ids + 10), targets=None)


def test_rho_loss_errors():
    f = lambda inputs, targets: torch.zeros(len(targets))  # noqa: E731
    with pytest.raises(ValueError, match="not both"):
        RhoLoss(f, keep=3, keep_fraction=0.1)
    with pytest.raises(ValueError, match="keep_fraction"):
        RhoLoss(f, keep_fraction=1.5)
    with pytest.raises(ValueError, match="needs ids="):
        RhoLoss(torch.zeros(10), keep=3)  # a table without ids, and a count: neither style
    table_only = RhoLoss(torch.zeros(10))  # a table without ids: the epoch style only
    assert table_only.styles == ("epoch",)
    with pytest.raises(StyleError, match="BatchSelector"):
        fastsel.BatchSelector(torch.nn.Linear(1, 2), table_only)
    with pytest.raises(TypeError, match="irreducible must be"):
        RhoLoss("model")
    with pytest.raises(ValueError, match="needs the candidate batch's inputs"):
        RhoLoss(f).choose(fake_scores(torch.ones(4)), step=0, seed=0)
    with pytest.raises(ValueError, match="exceeds the candidate batch"):
        RhoLoss(f, keep=9).choose(fake_scores(torch.ones(4)), step=0, seed=0, inputs=torch.zeros(4, 1),
                                  targets=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        RhoLoss(lambda i, t: torch.zeros(3), keep=1).choose(fake_scores(torch.ones(4)), step=0, seed=0,
                                                          inputs=torch.zeros(4, 1),
                                                          targets=torch.zeros(4, dtype=torch.long))


def test_rho_loss_through_selector_leaves_both_models_untouched():
    n, d, c = 40, 6, 4
    model, small = bn_model(d, c, seed=0), bn_model(d, c, seed=1)
    small.eval()  # the user's irreducible model, in whatever mode: it must come back as it was
    snaps = snapshot(model), snapshot(small)
    strat = RhoLoss(small)
    selector = fastsel.BatchSelector(model, strat, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
    xs, ys, w = selector(x, y)
    assert_untouched(model, snaps[0])
    assert_untouched(small, snaps[1])
    with torch.no_grad():
        model.eval(), small.eval()
        reducible = F.cross_entropy(model(x), y, reduction="none") - F.cross_entropy(small(x), y, reduction="none")
        model.train()
    want = torch.argsort(reducible, descending=True)[:4]
    assert {tuple(r) for r in xs.tolist()} == {tuple(r) for r in x[want].tolist()}
    assert torch.equal(w, torch.ones(4)) and not w.is_inference()


# ---------------------------------------------------------------- SelectiveBackprop


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_selective_backprop_keep_rate(beta):
    g = torch.Generator().manual_seed(int(beta))
    strat = SelectiveBackprop(beta=beta)
    kept = total = 0
    for t in range(120):
        sel = strat.choose(fake_scores(torch.rand(256, generator=g)), step=t, seed=4)
        if t >= 4:  # history full (R = 1024)
            kept += sel.indices.numel()
            total += 256
        assert len(strat.history) == min(1024, 256 * (t + 1))
    assert kept / total == pytest.approx(1.0 / (beta + 1.0), abs=0.015)


def test_selective_backprop_matches_select_percentile():
    g = torch.Generator().manual_seed(0)
    strat = SelectiveBackprop(beta=2.0, s_min=0.05, history_size=100)
    history = fastsel.History(100)
    for t in range(12):
        logits, target = torch.randn(37, 5, generator=g), torch.randint(0, 5, (37,), generator=g)
        want = fastsel.select(logits, target, policy="percentile", history=history, beta=2.0, s_min=0.05,
                              seed=7, counter=t)
        got = strat.choose(fastsel.score(logits, target), step=t, seed=7)
        assert torch.equal(got.indices, want.indices), t
        assert torch.equal(strat.history.values, history.values)
    assert len(strat.history) == 100


def test_selective_backprop_first_batch_kept_and_floor():
    strat = SelectiveBackprop()
    assert strat.choose(fake_scores(torch.rand(50)), step=0, seed=0).indices.numel() == 50
    # s_min floor: with a huge beta F^beta ~ 0 for all but the largest losses, so the keep
    # rate is about s_min, and every sample whose uniform is below s_min is kept.
    n, s_min = 4000, 0.3
    strat = SelectiveBackprop(beta=60.0, s_min=s_min, history_size=n)
    strat.choose(fake_scores(torch.rand(n)), step=0, seed=1)  # fills the history
    history = strat.history.values.clone()
    loss = torch.rand(n, generator=torch.Generator().manual_seed(2))
    sel = strat.choose(fake_scores(loss), step=1, seed=1)
    f = (history[None, :] < loss[:, None]).double().mean(1)
    p = torch.clamp_min(f ** 60, s_min)
    u = reference.bernoulli_uniforms(n, 1, 1)
    assert sel.indices.tolist() == (u.double() < p).nonzero().squeeze(1).tolist()
    kept = torch.zeros(n, dtype=torch.bool)
    kept[sel.indices] = True
    assert kept[u < s_min].all()
    assert sel.indices.numel() / n == pytest.approx(s_min, abs=0.03)
    assert strat.stats() == {"keep_rate": sel.indices.numel() / n, "history": n}


def test_selective_backprop_may_keep_nothing_through_selector():
    model = bn_model()
    snap = snapshot(model)
    strat = SelectiveBackprop(history_size=64)
    strat._history_on(torch.device("cpu")).push(torch.full((64,), 1e9))  # every new loss ranks at 0
    selector = fastsel.BatchSelector(model, strat, seed=0)
    xs, ys, w = selector(torch.randn(20, 6), torch.randint(0, 4, (20,)))
    assert xs.shape == (0, 6) and ys.shape == (0,) and w.shape == (0,)
    assert selector.costs.trained == 0 and selector.costs.scored == 20
    assert strat.stats()["keep_rate"] == 0.0
    assert_untouched(model, snap)


def test_selective_backprop_epoch_style_stale():
    n, c, bs = 60, 3, 16
    g = torch.Generator().manual_seed(0)
    logits_table = torch.randn(n, c, generator=g) * 2
    targets = torch.randint(0, c, (n,), generator=g)
    data = fastsel.Indexed(torch.utils.data.TensorDataset(torch.zeros(n, 1)))
    strat = SelectiveBackprop(staleness=3)
    assert strat.styles == ("batch", "epoch")
    sampler = fastsel.ScoreSampler(data, strat, batch_size=bs, epochs=7, seed=5, drop_last=False)
    shift = 0.0
    for epoch in range(7):
        table_before = sampler.table.values("loss").clone()  # what the epoch's plan reads
        visited = []
        for batch in sampler:
            idx = torch.tensor(batch)
            assert torch.equal(sampler.weights(idx), torch.ones(idx.numel()))
            visited.append(idx)
            # the losses drift between epochs, so stale and fresh values differ
            sampler.update(idx, fastsel.score(logits_table[idx] + shift * targets[idx, None].eq(
                torch.arange(c)).float(), targets[idx]))
        visited = torch.cat(visited)
        assert visited.unique().numel() == visited.numel()
        if epoch % 3 == 0:  # full pass, refreshing every loss of the table
            assert sorted(visited.tolist()) == list(range(n)), epoch
            assert torch.equal(sampler.table.last_epoch, torch.full((n,), epoch))
        else:  # Bernoulli epoch on the (stale) table losses
            f = (table_before[None, :] < table_before[:, None]).double().mean(1)
            want = (reference.bernoulli_uniforms(n, 5, epoch).double() < f ** 3).nonzero().squeeze(1)
            assert sorted(visited.tolist()) == want.tolist(), epoch
            assert 0 < visited.numel() < n
            stale = sampler.table.last_epoch < epoch
            assert stale.any() and torch.equal(sampler.table.values("loss")[stale], table_before[stale])
        shift += 0.3
    assert sampler.costs.trained < 7 * n


def test_selective_backprop_epoch_plan_direct():
    n = 200
    table = fastsel.strategies.ScoreTable(n)
    loss = torch.rand(n, generator=torch.Generator().manual_seed(1))
    loss[:10] = float("nan")  # never scored: always visited
    seen = ~torch.isnan(loss)
    table.update_values(seen.nonzero().squeeze(1), {"loss": loss[seen]}, epoch=0)
    strat = SelectiveBackprop(beta=3.0, s_min=0.1, staleness=2)
    full = strat.plan_epoch(0, table, seed=3, epochs=4)
    assert sorted(full.indices.tolist()) == list(range(n))
    plan = strat.plan_epoch(1, table, seed=3, epochs=4)
    finite = loss[seen]
    f = torch.tensor([float((finite < v).sum()) / finite.numel() if not math.isnan(v) else 1.0
                      for v in loss.tolist()])
    p = torch.clamp_min(f ** 3, 0.1)
    want = (reference.bernoulli_uniforms(n, 3, 1) < p).nonzero().squeeze(1)
    assert sorted(plan.indices.tolist()) == want.tolist()
    assert set(range(10)) <= set(plan.indices.tolist())
    assert torch.equal(plan.weights, torch.ones(n))
    again = SelectiveBackprop(beta=3.0, s_min=0.1, staleness=2).plan_epoch(1, table, seed=3, epochs=4)
    assert torch.equal(again.indices, plan.indices)  # same order too
    assert not torch.equal(strat.plan_epoch(1, table, seed=4, epochs=4).indices, plan.indices)


def test_selective_backprop_errors():
    for kw in ({"beta": -1}, {"s_min": 2}, {"history_size": 0}, {"staleness": 0}):
        with pytest.raises(ValueError):
            SelectiveBackprop(**kw)
    with pytest.raises(StyleError, match="epoch style"):
        SelectiveBackprop().plan_epoch(0, fastsel.strategies.ScoreTable(4), seed=0, epochs=1)
    state = SelectiveBackprop(history_size=8)
    state.choose(fake_scores(torch.rand(5)), step=0, seed=0)
    with pytest.raises(ValueError, match="history_size"):
        SelectiveBackprop(history_size=16).load_state_dict(state.state_dict())


# ---------------------------------------------------------------- shared: styles, seeds, resume, selector


BATCH_ONLY = [lambda: CDFSampling(4), lambda: UpperBoundIS(4), lambda: RhoLoss(lambda i, t: torch.zeros(len(t))),
              lambda: SelectiveBackprop()]


@pytest.mark.parametrize("make", BATCH_ONLY, ids=["cdf", "ubis", "rho", "sb"])
def test_epoch_style_raises_style_error(make):
    data = fastsel.Indexed(torch.utils.data.TensorDataset(torch.zeros(8, 1)))
    with pytest.raises(StyleError, match="epoch style"):
        fastsel.ScoreSampler(data, make(), batch_size=4, epochs=1, drop_last=False)


def resumable_strategies():
    return {
        "cdf": (lambda: CDFSampling(6, switch_ratio=0.8), 40),
        "cdf_reweight": (lambda: CDFSampling(6, by="grad_norm", replacement=True, reweight=True, smoothing=0.5), 40),
        "ubis": (lambda: UpperBoundIS(6, momentum=0.5), 18),
        "sb": (lambda: SelectiveBackprop(beta=2.0, history_size=50), 40),
    }


@pytest.mark.parametrize("name", sorted(resumable_strategies()))
def test_state_dict_round_trip(name):
    make, n = resumable_strategies()[name]
    seq = random_scores_seq(30, n, seed=1, decay=0.05)
    if name == "ubis":  # make tau cross the threshold mid-run
        seq = [fake_scores(s.loss, s.grad_norm ** (1 + t)) for t, s in enumerate(seq)]
    full = run(make(), seq)
    first = make()
    head = run(first, seq[:12])
    state = first.state_dict()
    restored = make()
    restored.load_state_dict(state)
    tail = run(restored, seq[12:], start=12)
    got = head + tail
    assert len(got) == len(full)
    for (gi, gw), (fi, fw) in zip(got, full):
        assert torch.equal(gi, fi) and torch.equal(gw, fw)
    if name.startswith("cdf"):
        assert restored.state_dict()["active"] is True and not make().active, "the run should switch on"
    if name == "ubis":
        states = []
        s = make()
        for t, sc in enumerate(seq):
            s.choose(sc, step=t, seed=3)
            states.append(s.active)
        assert not states[0] and any(states), "the run should switch on mid-way"


@pytest.mark.parametrize("name", sorted(resumable_strategies()))
def test_reproducible_by_seed(name):
    make, n = resumable_strategies()[name]
    seq = random_scores_seq(10, n, seed=2)
    a, b, c = run(make(), seq, seed=1), run(make(), seq, seed=1), run(make(), seq, seed=2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert any(x[0].shape != z[0].shape or not torch.equal(x[0], z[0]) for x, z in zip(a, c))


@pytest.mark.parametrize("name", ["cdf", "ubis", "sb"])
def test_through_batch_selector_with_batchnorm(name):
    n, d, c = 48, 6, 4
    model = bn_model(d, c)
    snap = snapshot(model)
    strat = {"cdf": CDFSampling(8, switch_ratio=None), "ubis": UpperBoundIS(16, tau_threshold=1.0, momentum=0.0),
             "sb": SelectiveBackprop(history_size=64)}[name]
    selector = fastsel.BatchSelector(model, strat, seed=3)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        x, y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
        xs, ys, w = selector(x, y)
        assert_untouched(model, snap)
        assert xs.shape[0] == ys.shape[0] == w.shape[0]
        assert not w.is_inference()
        # the choice is the strategy's on the inference-mode scores of the candidate batch
        with torch.no_grad():
            model.eval()
            s = fastsel.score(model(x), y)
            model.train()
        if name != "sb":
            rows = {tuple(r) for r in x.tolist()}
            assert all(tuple(r) in rows for r in xs.tolist())
        if name == "cdf":
            want = fastsel.sample(s.loss, 8, seed=3, counter=step).indices
            assert torch.equal(ys, y[want])
        if name == "ubis":
            want = fastsel.sample(s.grad_norm, 16, replacement=True, seed=3, counter=step)
            assert torch.equal(ys, y[want.indices])
            torch.testing.assert_close(w, want.weights)
    state = selector.state_dict()
    assert state["step"] == 3 and isinstance(state["strategy"], dict)


# ---------------------------------------------------------------- shared argument checks

_IRR = lambda inputs, targets: torch.zeros(len(targets))  # noqa: E731
NAN, INF = float("nan"), float("inf")

# (id, build(value), argument name, bad values): every bad value raises a ValueError whose
# message starts with "<name> must be" and ends with ", got <repr(value)>".
BAD_BATCH_KNOBS = [
    ("topscore-keep", lambda v: TopScore(v), "keep", [0, -1, True, False, 2.0, "8", None]),
    ("mms-keep", lambda v: MMS(v), "keep", [0, True]),
    ("hardloss-keep", lambda v: HardLoss(v), "keep", [0, True]),
    ("maxentropy-keep", lambda v: MaxEntropy(v), "keep", [0, True]),
    ("uniform-keep", lambda v: Uniform(v), "keep", [0, -1, True, False, 2.0, "8", None]),
    ("uniform-budget", lambda v: Uniform(8, budget=v), "budget", [0, 0.0, -0.5, 1.5, True, False, NAN, "0.5"]),
    ("cdf-keep", lambda v: CDFSampling(v), "keep", [0, -1, True, False, 2.0, None]),
    ("cdf-switch_ratio", lambda v: CDFSampling(4, switch_ratio=v), "switch_ratio", [0, -1, INF, NAN, True, "1"]),
    ("cdf-smoothing", lambda v: CDFSampling(4, smoothing=v), "smoothing", [-0.1, 1, 1.0, True, False, NAN, "0.5"]),
    ("ubis-keep", lambda v: UpperBoundIS(v), "keep", [0, -1, True, False, 2.0, None]),
    ("ubis-presample", lambda v: UpperBoundIS(8, presample=v), "presample", [1, 1.0, 0.5, True, NAN, None]),
    ("ubis-tau_threshold", lambda v: UpperBoundIS(8, tau_threshold=v), "tau_threshold", [0.5, 0, True, NAN, "2"]),
    ("ubis-backward_cost", lambda v: UpperBoundIS(8, backward_cost=v), "backward_cost", [-1, True, False, NAN]),
    ("ubis-momentum", lambda v: UpperBoundIS(8, momentum=v), "momentum", [1, 1.5, -0.1, True, False, NAN]),
    ("rho-keep", lambda v: RhoLoss(_IRR, keep=v), "keep", [0, -1, True, False, 2.0, "8"]),
    ("rho-keep_fraction", lambda v: RhoLoss(_IRR, keep_fraction=v), "keep_fraction",
     [0, 0.0, -0.5, 1.5, True, False, NAN, "0.5"]),
    ("sb-history_size", lambda v: SelectiveBackprop(history_size=v), "history_size", [0, -1, True, False, 8.0]),
    ("sb-staleness", lambda v: SelectiveBackprop(staleness=v), "staleness", [0, -1, True, False, 2.0]),
]


@pytest.mark.parametrize("build,name,value", [pytest.param(b, n, v, id=f"{i}={v!r}")
                                              for i, b, n, vs in BAD_BATCH_KNOBS for v in vs])
def test_bad_batch_knobs_raise_naming_the_argument(build, name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        build(value)


@pytest.mark.parametrize("build", [lambda v: TopScore(v), lambda v: Uniform(v), lambda v: CDFSampling(v),
                                   lambda v: UpperBoundIS(v), lambda v: RhoLoss(_IRR, keep=v)],
                         ids=["topscore", "uniform", "cdf", "ubis", "rho"])
@pytest.mark.parametrize("value", [True, False, 0])
def test_keep_bool_rejected_like_zero(build, value):
    with pytest.raises(ValueError) as err:
        build(value)
    assert str(err.value) == f"keep must be a positive int, got {value!r}"


def test_batch_knob_messages_unchanged():
    cases = [
        (lambda: TopScore(0), "keep must be a positive int, got 0"),
        (lambda: TopScore(4, by="nope"), f"by must be one of {sorted(fastsel.SCORE_DIRECTIONS)}, got 'nope'"),
        (lambda: Uniform(4, budget=2), "budget must be in (0, 1], got 2"),
        (lambda: CDFSampling(4, by="margin"), "by must be one of ('loss', 'grad_norm'), got 'margin'"),
        (lambda: CDFSampling(4, switch_ratio=0), "switch_ratio must be a positive number or None, got 0"),
        (lambda: CDFSampling(4, smoothing=1), "smoothing must be in [0, 1), got 1"),
        (lambda: UpperBoundIS(4, by="margin"), "by must be one of ('grad_norm', 'loss'), got 'margin'"),
        (lambda: UpperBoundIS(4, presample=1),
         "presample must be a number > 1 (the candidate batch is presample × keep), got 1"),
        (lambda: UpperBoundIS(4, tau_threshold=0.5), "tau_threshold must be a number >= 1 or None, got 0.5"),
        (lambda: UpperBoundIS(4, backward_cost=-1), "backward_cost must be a number >= 0, got -1"),
        (lambda: UpperBoundIS(4, momentum=1), "momentum must be in [0, 1), got 1"),
        (lambda: RhoLoss(_IRR, keep_fraction=0), "keep_fraction must be in (0, 1], got 0"),
        (lambda: SelectiveBackprop(history_size=0), "history_size must be a positive int, got 0"),
        (lambda: SelectiveBackprop(staleness=0), "staleness must be a positive int (epochs) or None, got 0"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError) as err:
            build()
        assert str(err.value) == message
    for build, message in [(lambda: CDFSampling(4, replacement=1), "replacement must be a bool, got 1"),
                           (lambda: CDFSampling(4, reweight=0), "reweight must be a bool, got 0")]:
        with pytest.raises(TypeError) as err:
            build()
        assert str(err.value) == message


def test_batch_knob_boundaries_accepted():
    TopScore(1)
    Uniform(1, budget=1)
    Uniform(1, budget=1e-9)
    CDFSampling(1, switch_ratio=None, smoothing=0)
    CDFSampling(1, switch_ratio=1e-9, smoothing=0.999)
    UpperBoundIS(1, presample=1.5, tau_threshold=1, backward_cost=0, momentum=0)
    UpperBoundIS(1, tau_threshold=None, backward_cost=INF)
    RhoLoss(_IRR, keep=1)
    RhoLoss(_IRR, keep_fraction=1)
    RhoLoss(_IRR)
    SelectiveBackprop(history_size=1, staleness=None)
    SelectiveBackprop(history_size=1, staleness=1)


def test_check_helpers():
    def message(f, *args, **kw):
        with pytest.raises((ValueError, TypeError)) as err:
            f(*args, **kw)
        return type(err.value).__name__, str(err.value)

    assert message(check_positive_int, "k", True) == ("ValueError", "k must be a positive int, got True")
    assert message(check_int, "w", -1, 0) == ("ValueError", "w must be an int >= 0, got -1")
    assert message(check_int, "w", False, 0) == ("ValueError", "w must be an int >= 0, got False")
    assert message(check_int, "s", 0, expected="a positive int (epochs)", optional=True) == (
        "ValueError", "s must be a positive int (epochs) or None, got 0")
    assert message(check_fraction, "f", True) == ("ValueError", "f must be a number in (0, 1], got True")
    assert message(check_real, "x", 1, low=0, high=1, high_inclusive=False) == (
        "ValueError", "x must be in [0, 1), got 1")
    assert message(check_real, "x", NAN, low=0) == ("ValueError", "x must be a number >= 0, got nan")
    assert message(check_real, "x", 2, high=1, high_inclusive=False) == ("ValueError", "x must be a number < 1, got 2")
    assert message(check_real, "x", "a") == ("ValueError", "x must be a number, got 'a'")
    assert message(check_real, "x", INF, finite=True, optional=True) == (
        "ValueError", "x must be a number or None, got inf")
    assert message(check_bool, "b", 1) == ("TypeError", "b must be a bool, got 1")
    assert message(check_choice, "c", "z", ("a", "b")) == ("ValueError", "c must be one of ('a', 'b'), got 'z'")
    check_int("s", None, optional=True)
    check_real("x", None, optional=True)
    check_real("x", 0.5, low=0, high=1)
    check_int("w", 0, 0)
    check_bool("b", False)
    check_choice("c", "a", ("a", "b"))


@pytest.mark.parametrize("tiny", [1e-38, 1e-40, 1e-45])
@pytest.mark.parametrize("by", ["loss", "grad_norm"])
def test_cdf_very_confident_batch_completes_the_draw(tiny, by):
    """A very confident batch: most losses are exactly 0 in float32 and the few others are
    tiny (down to subnormal). The floor for the zeros, 1e-12 x the largest, used to
    underflow to 0, leaving fewer positive importances than draws; the draw must complete
    with the positive ones first."""
    values = torch.zeros(64)
    values[[5, 17, 40]] = torch.tensor([tiny, tiny * 0.5, tiny * 0.25], dtype=torch.float32)
    positive = [int(i) for i in (values > 0).nonzero().squeeze(1)]
    assert 1 <= len(positive) <= 3
    strat = CDFSampling(16, by=by, switch_ratio=None, reweight=True)
    for step in range(5):
        sel = strat.choose(fake_scores(values, values), step=step, seed=2)
        idx = sel.indices.tolist()
        assert len(set(idx)) == 16
        assert sorted(idx[:len(positive)]) == sorted(positive)  # they finish the race first
        assert torch.isfinite(sel.weights).all() and (sel.weights > 0).all()
    # the same from a real very confident model's scores
    logits = torch.zeros(64, 10)
    logits[:, 0] = 120.0  # loss exp(-120) ~ 8e-53: 0 in float32
    logits[:3, 0] = 95.0
    s = fastsel.score(logits, torch.zeros(64, dtype=torch.long))
    assert int((s.loss > 0).sum()) == 3
    assert CDFSampling(16, switch_ratio=None).choose(s, step=0, seed=0).indices.unique().numel() == 16


def test_cdf_infinite_loss_counts_as_the_largest_importance():
    """A loss that overflowed to +inf is the most important sample, not an error."""
    values = torch.tensor([1.0, float("inf"), 2.0, 0.5])
    sel = CDFSampling(2, switch_ratio=None).choose(fake_scores(values), step=0, seed=0)
    assert sel.indices[0] == 1 and sel.indices.unique().numel() == 2

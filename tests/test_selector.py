"""BatchSelector (in-batch style): the model is left as found, the chosen samples are the
strategy's (checked against fastsel.score on the same model output), inputs of any
structure are indexed consistently, costs, stats, hooks, resume and bad input."""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch
from torch import nn

import fastsel
from fastsel.forward import scoring_forward
from fastsel.strategies import MMS, HardLoss, InfoBatch, MaxEntropy, StyleError, TopScore, Uniform

D, C = 12, 10


class Net(nn.Module):
    """BatchNorm (running statistics), Dropout (mode-dependent output) and an ``fc`` head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5))
        self.mid = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, C)

    def forward(self, x):
        return self.fc(self.mid(self.body(x)))


def make_model(seed=0) -> Net:
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():  # non-trivial running statistics
        model.train()
        for _ in range(3):
            model(torch.randn(64, D) * 2 + 1)
    return model


def candidates(n=640, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def eval_scores(model, x, y, **kw) -> fastsel.Scores:
    """What the selector should see: the model's output in eval mode, scored by fastsel."""
    was = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        logits = model(x)
    for m, t in was.items():
        m.training = t
    return fastsel.score(logits, y, **kw)


def rows_of(xb, x) -> list[int]:
    """Positions in x of each row of xb (rows of random x are distinct)."""
    eq = (xb[:, None, :] == x[None, :, :]).all(-1)
    assert (eq.sum(1) == 1).all()
    return eq.float().argmax(1).tolist()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {m: m.training for m in model.modules()}


# ---------------------------------------------------------------- the model is left as found

@pytest.mark.parametrize("strategy", [MMS(64), HardLoss(64), Uniform(64)], ids=["mms", "hard", "uniform"])
def test_model_left_as_found(strategy):
    model = make_model()
    model.train()
    model.mid[1].eval()  # a submodule deliberately in eval mode while the parent trains
    state, modes = snapshot(model)
    assert modes[model.mid[1]] is False and modes[model.body[1]] is True
    selector = fastsel.BatchSelector(model, strategy, head=model.fc)
    x, y = candidates()
    xb, yb, w = selector(x, y)
    after, modes_after = snapshot(model)
    for k in state:
        assert torch.equal(state[k], after[k]), f"{k} changed by selection"
    assert modes_after == modes, "train/eval mode of some submodule not restored"
    assert all(p.grad is None for p in model.parameters()), "selection accumulated gradients"
    for t in (xb, yb, w):
        assert t.grad_fn is None and not t.requires_grad
        assert not t.is_inference(), "returned tensors must be usable in the training step"
    assert w.dtype == torch.float32 and w.shape == (64,)
    # the training step on the selection works and only then touches the statistics / grads
    loss = (fastsel.score(model(xb), yb).loss * w).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert int(model.body[1].num_batches_tracked) == int(state["body.1.num_batches_tracked"]) + 1
    assert int(model.mid[1].num_batches_tracked) == int(state["mid.1.num_batches_tracked"])


def test_model_in_eval_mode_stays_in_eval_mode():
    model = make_model().eval()
    state, modes = snapshot(model)
    fastsel.BatchSelector(model, MMS(64), head=model.fc)(*candidates())
    assert snapshot(model)[1] == modes and not any(modes.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_scoring_forward_restores_modes_when_the_model_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.inner = nn.Linear(4, 4).eval()

        def forward(self, x):
            assert not self.training and not torch.is_grad_enabled()
            raise RuntimeError("boom")

    m = Boom().train()
    m.inner.eval()
    with pytest.raises(RuntimeError, match="boom"):
        scoring_forward(m, torch.zeros(2, 4))
    assert m.training and m.bn.training and not m.inner.training


def test_scoring_forward_is_inference_without_graph():
    model = make_model().train()
    out = scoring_forward(model, candidates(8)[0])
    assert out.is_inference() and out.grad_fn is None and model.training


# ---------------------------------------------------------------- which samples are kept

def test_mms_keeps_the_64_smallest_mms_candidates():
    model = make_model().train()
    x, y = candidates()
    want = eval_scores(model, x, y, head=model.fc.weight.detach())
    selector = fastsel.BatchSelector(model, MMS(keep=64), head=model.fc)
    xb, yb, w = selector(x, y)
    rows = rows_of(xb, x)
    assert len(set(rows)) == 64
    expected = torch.argsort(want.mms, stable=True)[:64].tolist()
    assert set(rows) == set(expected)
    chosen = torch.zeros(640, dtype=torch.bool)
    chosen[rows] = True
    assert want.mms[chosen].max() < want.mms[~chosen].min()
    assert torch.equal(yb, y[rows]) and (w == 1).all()


@pytest.mark.parametrize("mms", ["exact", "top2"])
def test_mms_mode_is_passed_to_scoring(mms):
    model = make_model()
    x, y = candidates()
    w = model.fc.weight.detach()
    want = eval_scores(model, x, y, head=w, mms=mms)
    other = eval_scores(model, x, y, head=w, mms={"exact": "top2", "top2": "exact"}[mms])
    keep = 200  # for this model and batch the exact and top-2 selections differ at 200
    expected = set(torch.argsort(want.mms, stable=True)[:keep].tolist())
    assert expected != set(torch.argsort(other.mms, stable=True)[:keep].tolist())
    xb, _, _ = fastsel.BatchSelector(model, MMS(keep=keep), head=model.fc, mms=mms)(x, y)
    assert set(rows_of(xb, x)) == expected


@pytest.mark.parametrize("strategy,field", [(HardLoss(50), "loss"), (MaxEntropy(50), "entropy"),
                                            (TopScore(50, by="grad_norm"), "grad_norm")])
def test_largest_score_top_k(strategy, field):
    model = make_model()
    x, y = candidates()
    want = getattr(eval_scores(model, x, y), field)
    xb, yb, w = fastsel.BatchSelector(model, strategy)(x, y)
    rows = rows_of(xb, x)
    assert set(rows) == set(torch.argsort(want, descending=True, stable=True)[:50].tolist())
    assert torch.equal(yb, y[rows]) and (w == 1).all()


def test_selection_uses_eval_mode_outputs():
    """Dropout and BatchNorm batch statistics would change the ranking in train mode."""
    model = make_model().train()
    x, y = candidates()
    torch.manual_seed(123)
    with torch.no_grad():
        train_loss = fastsel.score(model(x), y).loss
    model.train()
    eval_loss = eval_scores(model, x, y).loss
    top_train = set(torch.argsort(train_loss, descending=True)[:64].tolist())
    top_eval = set(torch.argsort(eval_loss, descending=True)[:64].tolist())
    assert top_train != top_eval
    xb, _, _ = fastsel.BatchSelector(model, HardLoss(64))(x, y)
    assert set(rows_of(xb, x)) == top_eval


def test_uniform_reproducible_by_seed_and_fresh_each_step():
    model = make_model()
    x, y = candidates(200)

    def run(seed, steps=4):
        sel = fastsel.BatchSelector(model, Uniform(keep=30), seed=seed)
        out = []
        for _ in range(steps):
            xb, yb, w = sel(x, y)
            rows = rows_of(xb, x)
            assert len(set(rows)) == 30 and torch.equal(yb, y[rows])
            torch.testing.assert_close(w, torch.ones(30))
            out.append(rows)
        return out

    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert a != c
    assert len({tuple(sorted(r)) for r in a}) == 4, "each step draws a new subset"


def test_uniform_is_roughly_uniform():
    model = make_model()
    x, y = candidates(100)
    sel = fastsel.BatchSelector(model, Uniform(keep=20), seed=0)
    counts = torch.zeros(100)
    for _ in range(200):
        counts[rows_of(sel(x, y)[0], x)] += 1
    # each candidate ~ Binomial(200, 0.2): mean 40, sd ~5.7
    assert counts.sum() == 4000 and counts.min() > 15 and counts.max() < 65


# ---------------------------------------------------------------- structured inputs

class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, C)
        self.b = nn.Linear(3, C)
        self.fc = self.a

    def forward(self, inputs):
        if isinstance(inputs, dict):
            a, b, _ = inputs["a"], inputs["b"], inputs["id"]
        else:
            a, b, _ = inputs
        return self.a(a) + self.b(b.float())


def structured(n=120):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, D, generator=g)
    b = torch.randint(0, 5, (n, 3), generator=g)
    ids = torch.arange(n)
    return a, b, ids, torch.randint(0, C, (n,), generator=g)


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_structured_inputs_are_indexed_consistently(kind):
    a, b, ids, y = structured()
    inputs = {"tuple": lambda: (a, b, ids), "list": lambda: [a, b, ids],
              "dict": lambda: {"a": a, "b": b, "id": ids}}[kind]()
    model = DictNet()
    with torch.no_grad():
        loss = fastsel.score(model(inputs), y).loss
    xb, yb, w = fastsel.BatchSelector(model, HardLoss(17))(inputs, y)
    assert type(xb) is type(inputs)
    if kind == "dict":
        assert set(xb) == {"a", "b", "id"}
        ab, bb, ib = xb["a"], xb["b"], xb["id"]
    else:
        ab, bb, ib = xb
    assert set(ib.tolist()) == set(torch.argsort(loss, descending=True)[:17].tolist())
    assert torch.equal(ab, a[ib]) and torch.equal(bb, b[ib]) and torch.equal(yb, y[ib])
    assert bb.dtype == b.dtype and w.shape == (17,)


def test_namedtuple_inputs_are_indexed_consistently():
    Batch = collections.namedtuple("Batch", "a b id")
    a, b, ids, y = structured()
    model = DictNet()
    xb, yb, _ = fastsel.BatchSelector(model, HardLoss(17))(Batch(a, b, ids), y)
    assert isinstance(xb, Batch) and torch.equal(xb.a, a[xb.id]) and torch.equal(yb, y[xb.id])


# ---------------------------------------------------------------- costs, stats, hooks

def test_costs_count_candidates_and_kept():
    model = make_model()
    selector = fastsel.BatchSelector(model, MMS(64), head=model.fc)
    for n in (640, 300, 64):
        selector(*candidates(n, seed=n))
    assert selector.costs.as_dict() == {"scored": 640 + 300 + 64, "trained": 3 * 64, "steps": 3}
    assert selector.step == 3


def test_stats_mms_quantiles_and_selected_vs_rest_loss():
    model = make_model()
    x, y = candidates()
    want = eval_scores(model, x, y, head=model.fc.weight.detach())
    got = []
    selector = fastsel.BatchSelector(model, MMS(64), head=model.fc)
    selector.add_hook(got.append)
    xb, _, _ = selector(x, y)
    stats = selector.stats
    assert got == [stats]
    assert stats["candidates"] == 640 and stats["selected"] == 64 and stats["step"] == 0
    levels = [0.1, 0.25, 0.5, 0.75, 0.9]
    q = torch.tensor(levels)
    for field in ("mms", "loss", "margin"):
        quant = stats[f"{field}_quantiles"]
        assert list(quant) == levels
        torch.testing.assert_close(torch.tensor(list(quant.values())), getattr(want, field).quantile(q),
                                   rtol=1e-5, atol=1e-5)
    chosen = torch.zeros(640, dtype=torch.bool)
    chosen[rows_of(xb, x)] = True
    assert stats["mean_loss_selected"] == pytest.approx(float(want.loss[chosen].mean()), rel=1e-5)
    assert stats["mean_loss_rest"] == pytest.approx(float(want.loss[~chosen].mean()), rel=1e-5)


def test_stats_without_mms_and_hardloss_selected_loss_is_larger():
    model = make_model()
    selector = fastsel.BatchSelector(model, HardLoss(64))
    calls = []
    selector.add_hook(calls.append)
    for step in range(3):
        selector(*candidates(seed=step))
        s = selector.stats
        assert "mms_quantiles" not in s and "loss_quantiles" in s
        assert s["step"] == step
        assert s["mean_loss_selected"] >= s["mean_loss_rest"]
        assert s["mean_loss_selected"] >= s["loss_quantiles"][0.9]
    assert [c["step"] for c in calls] == [0, 1, 2]


def test_stats_when_everything_is_kept():
    model = make_model()
    selector = fastsel.BatchSelector(model, HardLoss(32))
    selector(*candidates(32))
    assert selector.stats["selected"] == 32
    assert selector.stats["mean_loss_rest"] != selector.stats["mean_loss_rest"]  # NaN: no rest


# ---------------------------------------------------------------- resume

def test_state_dict_resume_gives_identical_selections():
    model = make_model()
    batches = [candidates(150, seed=s) for s in range(6)]

    def rows(selector, xs):
        return [rows_of(selector(x, y)[0], x) for x, y in xs]

    ref = fastsel.BatchSelector(model, Uniform(keep=25), seed=9)
    full = rows(ref, batches)
    first = fastsel.BatchSelector(model, Uniform(keep=25), seed=9)
    head = rows(first, batches[:2])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = fastsel.BatchSelector(copy.deepcopy(model), Uniform(keep=25), seed=0)
    resumed.load_state_dict(torch.load(buf))
    assert resumed.seed == 9 and resumed.step == 2
    assert head + rows(resumed, batches[2:]) == full
    assert resumed.costs.as_dict() == ref.costs.as_dict()


# ---------------------------------------------------------------- errors

def test_keep_larger_than_the_candidate_batch():
    model = make_model()
    for strategy in (MMS(64), HardLoss(64), Uniform(64)):
        selector = fastsel.BatchSelector(model, strategy, head=model.fc)
        with pytest.raises(ValueError, match="keep"):
            selector(*candidates(63))
        assert selector.costs.steps == 0


def test_mms_needs_the_head():
    model = make_model()
    with pytest.raises(ValueError, match="head"):
        fastsel.BatchSelector(model, MMS(8))
    with pytest.raises(ValueError, match="head"):
        fastsel.BatchSelector(model, MMS(8), head=model.body)  # no .weight
    fastsel.BatchSelector(model, HardLoss(8))  # no head needed


def test_epoch_only_strategy_is_a_style_error():
    with pytest.raises(StyleError, match="in-batch"):
        fastsel.BatchSelector(make_model(), InfoBatch())
    assert issubclass(StyleError, ValueError)


def test_bad_constructor_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="Strategy"):
        fastsel.BatchSelector(model, "mms")
    with pytest.raises(TypeError, match="callable"):
        fastsel.BatchSelector(42, HardLoss(8))
    with pytest.raises(ValueError, match="seed"):
        fastsel.BatchSelector(model, HardLoss(8), seed=-1)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="keep"):
            HardLoss(bad)


@pytest.mark.parametrize("target", [torch.zeros(64, 1, dtype=torch.long), torch.tensor(3), [0] * 64],
                         ids=["2-D", "0-D", "list"])
def test_target_not_1d(target):
    model = make_model()
    before = snapshot(model)
    selector = fastsel.BatchSelector(model, HardLoss(8))
    with pytest.raises(ValueError, match="target"):
        selector(candidates(64)[0], target)
    assert snapshot(model)[1] == before[1]


class Reshaped(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.inner = make_model()
        self.fn = fn

    def forward(self, x):
        return self.fn(self.inner(x))


@pytest.mark.parametrize("fn", [lambda z: z[:, :, None], lambda z: z[:-1], lambda z: z[:, 0], lambda z: z.t()],
                         ids=["3-D", "fewer rows", "1-D", "transposed"])
def test_model_output_of_the_wrong_shape(fn):
    model = Reshaped(fn).train()
    selector = fastsel.BatchSelector(model, HardLoss(8))
    x, y = candidates(64)
    with pytest.raises(ValueError, match=r"logits \[N, C\]"):
        selector(x, y)
    assert model.training and model.inner.body[1].training, "mode restored after the error"
    assert selector.costs.steps == 0 and selector.step == 0


def test_score_batch_size_slices_the_scoring_forward_and_last_indices():
    """Slicing the candidate batch gives the selection of one forward (eval mode makes
    the slices independent); last_indices are the chosen candidate positions."""
    torch.manual_seed(0)
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU())
            self.fc = torch.nn.Linear(16, 5)

        def forward(self, x):
            return self.fc(self.body(x))

    model = Net()
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    x, y = torch.randn(100, 6), torch.randint(0, 5, (100,))
    whole = fastsel.BatchSelector(model, fastsel.strategies.MMS(keep=10), head=model.fc)
    sliced = fastsel.BatchSelector(model, fastsel.strategies.MMS(keep=10), head=model.fc, score_batch_size=32)
    xa, ya, _ = whole(x, y)
    assert calls == [100]
    xb, yb, _ = sliced(x, y)
    assert calls[1:] == [32, 32, 32, 4]
    assert torch.equal(whole.last_indices, sliced.last_indices)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(x[sliced.last_indices], xb)
    for bad in (0, True, 2.0):  # True was accepted (a bool is an int) before the shared check
        with pytest.raises(ValueError, match="score_batch_size must be a positive int or None"):
            fastsel.BatchSelector(model, fastsel.strategies.MMS(keep=10), head=model.fc, score_batch_size=bad)


def test_topscore_follows_score_directions_and_needs_the_head_for_mms():
    """TopScore(by=...) ranks in the direction of SCORE_DIRECTIONS unless told otherwise,
    and by="mms" asks the selector for the classifier head (else scores.mms is None)."""
    torch.manual_seed(3)
    model = nn.Linear(6, 5)  # a linear model is its own head
    x, y = torch.randn(50, 6), torch.randint(0, 5, (50,))
    logits = model(x).detach()
    s = fastsel.score(logits, y, head=model.weight.detach())
    for by in ("margin", "loss", "mms"):
        strategy = TopScore(8, by=by)
        assert strategy.needs_head == (by == "mms")
        selector = fastsel.BatchSelector(model, strategy, head=model)
        selector(x, y)
        largest = fastsel.SCORE_DIRECTIONS[by] == "largest"
        want = fastsel.select_topk(getattr(s, by), 8, largest).indices
        assert torch.equal(selector.last_indices, want), by
    with pytest.raises(ValueError, match="needs the classifier head"):
        fastsel.BatchSelector(model, TopScore(8, by="mms"))
    with pytest.raises(ValueError, match="by must be one of"):
        TopScore(8, by="lose")

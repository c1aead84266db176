"""States: every ``load_state_dict`` (ScoreSampler, ScoreTable, Costs, History,
BatchSelector, every strategy) checks the whole state before changing anything and names
the offending key path; states round-trip through ``torch.save`` and
``torch.load(weights_only=True)``. Also: ``update`` refuses ``num_replicas > 1`` without
``torch.distributed``, and an epoch whose plan is empty has no batch."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.strategies import (CSGD, MMS, PSGD, CDFSampling, DynaMS, HardBatches, HardLoss, InfoBatch, MaxEntropy,
                                RhoLoss, ScoreTable, SelectiveBackprop, TopScore, Uniform, UpperBoundIS)
from fastsel.costs import Costs

C = 4
DELETE = object()


# ---------------------------------------------------------------- helpers

def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def same(a, b) -> bool:
    """Deep equality of states: tensors of the same shape, dtype and values (NaN == NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
                and torch.equal(a.isnan() if a.is_floating_point() else a, b.isnan() if b.is_floating_point() else b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def tampered(state, path: tuple, value):
    """A deep copy of ``state`` with the entry at ``path`` replaced by ``value`` (a callable
    gets the old value), or removed (``DELETE``). The plan pair is changed by ``with_plan``."""
    state = copy.deepcopy(state)
    *parents, last = path
    node = state
    for k in parents:
        node = node[k]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value(node[last]) if callable(value) else value
    return state


def with_plan(i: int, value):
    """Replaces entry ``i`` of the plan pair."""
    def change(plan):
        plan = list(plan)
        plan[i] = value(plan[i]) if callable(value) else value
        return tuple(plan)
    return change


def fake_scores(idx: torch.Tensor, epoch: int = 0) -> fastsel.Scores:
    i = idx.to(torch.float64)[:, None]
    j = torch.arange(C, dtype=torch.float64)[None, :]
    logits = (3.0 * torch.sin(0.731 * i * (j + 1) + 0.37 * epoch * (j + 2))).to(torch.float32)
    return fastsel.score(logits, idx % C)


def equal_scores(idx: torch.Tensor, epoch: int = 0) -> fastsel.Scores:
    """Every sample gets the same loss."""
    return fastsel.score(torch.zeros(idx.numel(), C), torch.zeros(idx.numel(), dtype=torch.int64))


def indexed(n: int) -> fastsel.Indexed:
    return fastsel.Indexed(TensorDataset(torch.arange(n)))


def train(sampler, batches: int, scores=fake_scores) -> list:
    """``batches`` updates over as many epochs as needed; returns [(batch, weights)]."""
    out = []
    while len(out) < batches:
        for b in sampler:
            idx = torch.tensor(b)
            out.append((b, sampler.weights(idx).tolist()))
            sampler.update(idx, scores(idx, sampler.epoch))
            if len(out) == batches:
                break
    return out


# ---------------------------------------------------------------- ScoreSampler

N, BS = 37, 8


def make_sampler(strategy=None, seed=7, n=N):
    return fastsel.ScoreSampler(indexed(n), strategy if strategy is not None else InfoBatch(), batch_size=BS,
                                epochs=4, seed=seed, drop_last=False)


def saved_state():
    """Mid-epoch 1: a plan, consumed batches and a filled table."""
    s = make_sampler()
    train(s, 7)
    state = s.state_dict()
    assert state["plan"] is not None and 0 < state["consumed"] < len(s) and state["epoch"] == 1
    return state, len(s)


def other_sampler():
    """A sampler with progress of its own, to check that a failed load leaves it as it was."""
    s = make_sampler(seed=3)
    train(s, 2)
    return s


SAMPLER_CASES = [
    # (id, path, new value, exception, message)
    ("n", ("n",), N + 1, ValueError, f"state['n'] is {N + 1}: the sampler state is for {N + 1} samples"),
    ("n-float", ("n",), 37.0, TypeError, "state['n'] must be an int"),
    ("epoch-negative", ("epoch",), -1, ValueError, "state['epoch'] must be an int >= 0, got -1"),
    ("epoch-float", ("epoch",), 1.5, TypeError, "state['epoch'] must be an int, got 1.5"),
    ("epoch-bool", ("epoch",), True, TypeError, "state['epoch'] must be an int, got True"),
    ("consumed-negative", ("consumed",), -1, ValueError, "state['consumed'] must be an int in [0, "),
    ("consumed-too-many", ("consumed",), 99, ValueError, "state['consumed'] must be an int in [0, "),
    ("consumed-without-plan", ("plan",), None, ValueError, "state['consumed'] must be an int in [0, 0]"),
    ("seed", ("seed",), -3, ValueError, "state['seed'] must be an int >= 0, got -3"),
    ("seed-str", ("seed",), "7", TypeError, "state['seed'] must be an int"),
    ("plan-not-pair", ("plan",), "plan", TypeError, "state['plan'] must be None or a pair (indices, weights)"),
    ("plan-triple", ("plan",), lambda p: (*p, p[0]), TypeError, "state['plan'] must be None or a pair"),
    ("indices-float", ("plan",), with_plan(0, lambda t: t.double()), TypeError,
     "state['plan'][0] must be a tensor of dtype int64, got torch.float64"),
    ("indices-int32", ("plan",), with_plan(0, lambda t: t.int()), TypeError,
     "state['plan'][0] must be a tensor of dtype int64"),
    ("indices-2d", ("plan",), with_plan(0, lambda t: t[None]), ValueError,
     "state['plan'][0] must be a tensor of shape (N,), got shape (1, "),
    ("indices-list", ("plan",), with_plan(0, lambda t: t.tolist()), TypeError,
     "state['plan'][0] must be a tensor of shape (N,) and dtype int64, got list"),
    ("indices-above-n", ("plan",), with_plan(0, lambda t: torch.cat([t, torch.tensor([N])])), ValueError,
     f"state['plan'][0] must hold values in [0, {N}), got values in ["),
    ("indices-negative", ("plan",), with_plan(0, lambda t: torch.cat([t, torch.tensor([-1])])), ValueError,
     f"state['plan'][0] must hold values in [0, {N}), got values in [-1, "),
    ("weights-nan", ("plan",), with_plan(1, lambda t: torch.cat([t[:3], torch.tensor([float("nan")]), t[4:]])),
     ValueError, "state['plan'][1] must be finite, got nan at index 3"),
    ("weights-inf", ("plan",), with_plan(1, lambda t: torch.cat([torch.tensor([float("inf")]), t[1:]])),
     ValueError, "state['plan'][1] must be finite, got inf at index 0"),
    ("weights-negative", ("plan",), with_plan(1, lambda t: torch.cat([t[:-1], torch.tensor([-2.0])])),
     ValueError, "state['plan'][1] must hold values >= 0, got values in [-2.0, "),
    ("weights-broadcast", ("plan",), with_plan(1, torch.ones(1)), ValueError,
     f"state['plan'][1] must be a tensor of shape ({N},), got shape (1,)"),
    ("weights-longer", ("plan",), with_plan(1, torch.ones(N + 1)), ValueError,
     f"state['plan'][1] must be a tensor of shape ({N},), got shape ({N + 1},)"),
    ("weights-int", ("plan",), with_plan(1, torch.ones(N, dtype=torch.int64)), TypeError,
     "state['plan'][1] must be a tensor of dtype float32 or float64, got torch.int64"),
    ("table-not-dict", ("table",), [1, 2], TypeError, "state['table'] must be a dict (a state_dict()), got list"),
    ("table-missing", ("table", "count"), DELETE, ValueError, "state['table'] is missing the key 'count'"),
    ("table-unknown", ("table", "extra"), 1, ValueError, "state['table'] has unknown keys ['extra']"),
    ("table-n", ("table", "n"), N + 1, ValueError, f"score table state is for n={N + 1}"),
    ("table-fields", ("table", "fields"), ("loss", "p_wrong"), ValueError, "fields=('loss', 'p_wrong')"),
    ("table-fields-type", ("table", "fields"), "loss", TypeError,
     "state['table']['fields'] must be a tuple of field names"),
    ("last-broadcast", ("table", "last", "loss"), torch.zeros(1), ValueError,
     f"state['table']['last']['loss'] must be a tensor of shape ({N},), got shape (1,)"),
    ("last-2d", ("table", "last", "loss"), torch.zeros(N, 1), ValueError,
     f"state['table']['last']['loss'] must be a tensor of shape ({N},), got shape ({N}, 1)"),
    ("last-int", ("table", "last", "loss"), torch.zeros(N, dtype=torch.int64), TypeError,
     "state['table']['last']['loss'] must be a tensor of dtype float32 or float64, got torch.int64"),
    ("last-list", ("table", "last", "loss"), [0.0] * N, TypeError,
     "state['table']['last']['loss'] must be a tensor of shape"),
    ("last-meta", ("table", "last", "loss"), torch.zeros(N, device="meta"), TypeError,
     "state['table']['last']['loss'] must be a dense tensor holding values, got a torch.strided tensor on meta"),
    ("count-sparse", ("table", "count"), torch.zeros(N, dtype=torch.int64).to_sparse(), TypeError,
     "state['table']['count'] must be a dense tensor holding values, got a torch.sparse_coo tensor"),
    ("last-missing-field", ("table", "last", "loss"), DELETE, ValueError,
     "state['table']['last'] is missing the key 'loss'"),
    ("last-extra-field", ("table", "last", "entropy"), torch.zeros(N), ValueError,
     "state['table']['last'] has unknown keys ['entropy']"),
    ("total-nan", ("table", "total", "loss"), lambda t: torch.cat([t[:5], torch.tensor([float("nan")],
                                                                                        dtype=t.dtype), t[6:]]),
     ValueError, "state['table']['total']['loss'] must be finite, got nan at index 5"),
    ("total-shape", ("table", "total", "loss"), torch.zeros((), dtype=torch.float64), ValueError,
     "state['table']['total']['loss'] must be a tensor of shape"),
    ("finite-negative", ("table", "finite", "loss"), lambda t: t - 5, ValueError,
     "state['table']['finite']['loss'] must hold values >= 0"),
    ("finite-above-count", ("table", "finite", "loss"), lambda t: t + 1, ValueError,
     "state['table']['finite']['loss'] must be <= state['table']['count'] elementwise"),
    ("finite-float", ("table", "finite", "loss"), lambda t: t.double(), TypeError,
     "state['table']['finite']['loss'] must be a tensor of dtype int64 or int32"),
    ("count-negative", ("table", "count"), lambda t: t - 10, ValueError,
     "state['table']['count'] must hold values >= 0"),
    ("count-broadcast", ("table", "count"), torch.ones(1, dtype=torch.int64), ValueError,
     f"state['table']['count'] must be a tensor of shape ({N},)"),
    ("last-epoch-below", ("table", "last_epoch"), lambda t: t - 5, ValueError,
     "state['table']['last_epoch'] must hold values >= -1"),
    ("last-epoch-future", ("table", "last_epoch"), torch.full((N,), 9), ValueError,
     "state['table']['last_epoch'] holds epoch 9, after the sampler's state['epoch'] = 1"),
    ("strategy-not-dict", ("strategy",), None, TypeError, "state['strategy'] must be a dict"),
    ("strategy-other", ("strategy", "strategy"), "HardBatches", ValueError,
     "state['strategy']['strategy'] must be 'InfoBatch', got 'HardBatches': a state saved by HardBatches "
     "cannot be loaded into InfoBatch"),
    ("strategy-unknown", ("strategy", "tau"), 1.0, ValueError, "state['strategy'] has unknown keys ['tau']"),
    ("costs-negative", ("costs", "steps"), -1, ValueError, "state['costs']['steps'] must be an int >= 0, got -1"),
    ("costs-float", ("costs", "scored"), 2.5, TypeError, "state['costs']['scored'] must be an int, got 2.5"),
    ("costs-missing", ("costs", "trained"), DELETE, ValueError, "state['costs'] is missing the key 'trained'"),
    ("unknown-key", ("extra",), 0, ValueError, "state has unknown keys ['extra']"),
]


@pytest.mark.parametrize("path,value,exc,message", [pytest.param(*c[1:], id=c[0]) for c in SAMPLER_CASES])
def test_sampler_rejects_tampered_state_and_stays_untouched(path, value, exc, message):
    state, _ = saved_state()
    bad = tampered(state, path, value)
    target = other_sampler()
    before = target.state_dict()
    with pytest.raises(exc, match=re.escape(message)):
        target.load_state_dict(bad)
    assert same(target.state_dict(), before)
    twin = other_sampler()
    assert train(target, 6) == train(twin, 6), "a failed load changed what the sampler does"


@pytest.mark.parametrize("missing", ["epoch", "consumed", "seed", "n", "plan", "table", "strategy", "costs"])
def test_sampler_missing_key_is_named(missing):
    state, _ = saved_state()
    del state[missing]
    target = other_sampler()
    before = target.state_dict()
    with pytest.raises(ValueError, match=re.escape(f"state is missing the key {missing!r}")):
        target.load_state_dict(state)
    assert same(target.state_dict(), before)


@pytest.mark.parametrize("state", [None, [], "state", 3])
def test_sampler_state_must_be_a_dict(state):
    with pytest.raises(TypeError, match=re.escape("state must be a dict (a state_dict())")):
        make_sampler().load_state_dict(state)


def test_consumed_bound_is_the_plans_batch_count():
    state, batches = saved_state()
    s = make_sampler()
    s.load_state_dict(tampered(state, ("consumed",), batches))  # every batch trained: allowed
    with pytest.raises(ValueError, match=re.escape(f"state['consumed'] must be an int in [0, {batches}] "
                                                   "(the number of batches of the plan on this rank), got")):
        make_sampler().load_state_dict(tampered(state, ("consumed",), batches + 1))


def test_sampler_refuses_another_strategys_state_naming_both():
    model = torch.nn.Linear(1, C)
    data = fastsel.Indexed(TensorDataset(torch.arange(N, dtype=torch.float32)[:, None], torch.arange(N) % C))
    dynams = fastsel.ScoreSampler(data, DynaMS(0.5, 1, model=model), batch_size=BS, epochs=4, drop_last=False)
    for _, _, idx in DataLoader(data, batch_sampler=dynams):
        dynams.update(idx, fake_scores(idx))
    target = fastsel.ScoreSampler(data, InfoBatch(), batch_size=BS, epochs=4, drop_last=False)
    train(target, 3)
    before = target.state_dict()
    with pytest.raises(ValueError, match=re.escape("state['strategy']['strategy'] must be 'InfoBatch', got 'DynaMS': "
                                                   "a state saved by DynaMS cannot be loaded into InfoBatch")):
        target.load_state_dict(roundtrip(dynams.state_dict()))
    assert same(target.state_dict(), before)


def test_sampler_accepts_int_tensor_counters():
    state, _ = saved_state()
    for k in ("epoch", "consumed", "seed"):
        state[k] = torch.tensor(state[k])
    s = make_sampler()
    s.load_state_dict(state)
    assert (s.epoch, type(s.epoch)) == (1, int)


class Counting(Uniform):
    """A user's strategy with its own state methods (no ``_prepare_load``)."""

    def __init__(self):
        super().__init__()
        self.plans = 0

    def plan_epoch(self, epoch, table, **kw):
        self.plans += 1
        return super().plan_epoch(epoch, table, **kw)

    def state_dict(self):
        return {"plans": self.plans}

    def load_state_dict(self, state):
        self.plans = int(state["plans"])


def test_user_strategy_with_its_own_load_state_dict():
    first = make_sampler(Counting())
    train(first, 7)
    fresh = make_sampler(Counting())
    fresh.load_state_dict(roundtrip(first.state_dict()))
    assert fresh.strategy.plans == first.strategy.plans == 2 and same(fresh.state_dict(), first.state_dict())
    # its load is run before anything else is changed: when it raises, the sampler is as it was
    target = make_sampler(Counting())
    before = target.state_dict()
    with pytest.raises(KeyError):
        target.load_state_dict(tampered(first.state_dict(), ("strategy", "plans"), DELETE))
    assert same(target.state_dict(), before)


# ---------------------------------------------------------------- round trips through torch.load(weights_only=True)

def epoch_strategies():
    model = torch.nn.Linear(1, C)
    torch.nn.init.normal_(model.weight, generator=torch.Generator().manual_seed(0))
    return {
        "infobatch": lambda: InfoBatch(0.5, 0.875),
        "uniform": lambda: Uniform(budget=0.6),
        "sb-stale": lambda: SelectiveBackprop(staleness=2),
        "hard_batches": lambda: HardBatches(0.5, batch_size=BS),
        "psgd": lambda: PSGD(0.5),
        "csgd": lambda: CSGD(0.5, reweight=True),
        "dynams": lambda: DynaMS(0.4, 2, model=model, score_batch_size=16),
    }


def epoch_data(n=N):
    return fastsel.Indexed(TensorDataset(torch.linspace(-2, 2, n)[:, None], torch.arange(n) % C))


def dl_train(sampler, batches=None, scores=fake_scores):
    """Epochs through a DataLoader (until ``batches`` updates if given): [(epoch, batch, weights)]."""
    out = []
    while True:
        for _, _, idx in DataLoader(sampler.data, batch_sampler=sampler):
            out.append((sampler.epoch, idx.tolist(), sampler.weights(idx).tolist()))
            sampler.update(idx, scores(idx, sampler.epoch))
            if batches is not None and len(out) == batches:
                return out
        if batches is None:
            return out


@pytest.mark.parametrize("name", list(epoch_strategies()))
def test_sampler_round_trip_weights_only_resumes_identically(name):
    make = epoch_strategies()[name]

    def sampler():
        return fastsel.ScoreSampler(epoch_data(), make(), batch_size=BS, epochs=6, seed=2, drop_last=False)

    full = sampler()
    stream = [b for _ in range(6) for b in dl_train(full)]
    for stop in (7, 13):
        first = sampler()
        head = dl_train(first, stop)
        state = roundtrip(first.state_dict())
        assert same(state, first.state_dict()) and state["strategy"]["strategy"] == type(first.strategy).__name__
        fresh = sampler()
        fresh.load_state_dict(state)
        assert same(fresh.state_dict(), first.state_dict())
        tail = []
        while fresh.epoch < 6:
            tail += dl_train(fresh)
        assert head + tail == stream, f"{name}: resume after {stop} batches differs"
        assert fresh.costs.as_dict() == full.costs.as_dict()


# ---------------------------------------------------------------- strategies

def loss_scores(loss: torch.Tensor) -> fastsel.Scores:
    loss = loss.to(torch.float32)
    z = torch.zeros_like(loss)
    return fastsel.Scores(loss, loss.flip(0), z, z, loss + 0.5, z, torch.zeros(loss.shape, dtype=torch.int64),
                          loss * 2, z)


def score_seq(steps=12, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [loss_scores(torch.rand(n, generator=g) * 2 * 0.9 ** t + 1e-3) for t in range(steps)]


def all_strategies():
    """Every strategy class, made to hold state after ``warm`` (name -> (make, warm, behave))."""
    model = torch.nn.Linear(1, C)
    torch.nn.init.normal_(model.weight, generator=torch.Generator().manual_seed(0))
    data = epoch_data()

    def choose_run(start, stop):
        def run(strategy):
            return [tuple(t.tolist() for t in strategy.choose(s, step=t, seed=1)[:2])
                    for t, s in enumerate(score_seq()[start:stop], start)]
        return run

    def table():
        t = ScoreTable(N, ("loss", "p_wrong"))
        idx = torch.arange(N)
        t.update_values(idx, t.extract(fake_scores(idx)), 0)
        return t

    def plan_run(start, stop):
        def run(strategy):
            return [tuple(t.tolist() for t in strategy.plan_epoch(e, table(), seed=1, epochs=8, data=data))
                    for e in range(start, stop)]
        return run

    batch, epoch = (choose_run(0, 6), choose_run(6, 12)), (plan_run(0, 3), plan_run(3, 6))
    return {
        "TopScore": (lambda: TopScore(5, by="grad_norm"), *batch),
        "MMS": (lambda: MMS(5), *batch),
        "HardLoss": (lambda: HardLoss(5), *batch),
        "MaxEntropy": (lambda: MaxEntropy(5), *batch),
        "Uniform": (lambda: Uniform(5, budget=0.5), *batch),
        "CDFSampling": (lambda: CDFSampling(5, switch_ratio=0.8, smoothing=0.5), *batch),
        "UpperBoundIS": (lambda: UpperBoundIS(5, momentum=0.5), *batch),
        "RhoLoss": (lambda: RhoLoss(lambda x, y: torch.zeros(len(y)), keep=5), *batch),
        "SelectiveBackprop": (lambda: SelectiveBackprop(history_size=50, staleness=2), *batch),
        "InfoBatch": (lambda: InfoBatch(), *epoch),
        "HardBatches": (lambda: HardBatches(0.5, batch_size=BS), *epoch),
        "PSGD": (lambda: PSGD(0.5), *epoch),
        "CSGD": (lambda: CSGD(0.5), *epoch),
        "DynaMS": (lambda: DynaMS(0.4, 2, model=model, warmup_epochs=1), *epoch),
    }


def choose_inputs(strategy, scores):
    return strategy.choose(scores, step=0, seed=0, inputs=torch.zeros(len(scores.loss), 1),
                           targets=torch.zeros(len(scores.loss), dtype=torch.int64))


STRATEGIES = list(all_strategies())


def warmed(name):
    make, warm, _ = all_strategies()[name]
    s = make()
    if isinstance(s, RhoLoss):  # needs inputs and targets
        return s
    warm(s)
    return s


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_round_trip_weights_only_behaves_identically(name):
    make, warm, behave = all_strategies()[name]
    if name == "RhoLoss":
        first = make()
        seq = score_seq()
        run = lambda s, part: [choose_inputs(s, x).indices.tolist() for x in part]  # noqa: E731
        head = run(first, seq[:6])
        fresh = make()
        fresh.load_state_dict(roundtrip(first.state_dict()))
        assert head + run(fresh, seq[6:]) == run(make(), seq)
        return
    first = make()
    warm(first)
    state = first.state_dict()
    assert state["strategy"] == name
    loaded = roundtrip(state)
    assert same(loaded, state)
    fresh = make()
    fresh.load_state_dict(loaded)
    assert same(fresh.state_dict(), state)
    assert behave(fresh) == behave(first)


def test_warm_states_are_not_trivial():
    assert warmed("CDFSampling").state_dict()["active"] is True
    assert warmed("UpperBoundIS").state_dict()["tau"] > 0
    assert warmed("SelectiveBackprop").state_dict()["history"]["count"] == 50
    assert warmed("DynaMS").state_dict()["refreshed_at"] == 1


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_refuses_another_strategys_state(name):
    other = STRATEGIES[(STRATEGIES.index(name) + 1) % len(STRATEGIES)]
    target = warmed(name)
    before = target.state_dict()
    with pytest.raises(ValueError, match=re.escape(f"state['strategy'] must be {name!r}, got {other!r}: a state saved "
                                                   f"by {other} cannot be loaded into {name}")):
        target.load_state_dict(warmed(other).state_dict())
    assert same(target.state_dict(), before)


@pytest.mark.parametrize("name", STRATEGIES)
def test_untagged_state_of_an_earlier_version_loads_with_a_warning(name):
    """States saved before the tag existed load on the strength of their keys, with a
    warning; another strategy's untagged state still fails on its keys when they differ."""
    source = warmed(name)
    state = copy.deepcopy(source.state_dict())
    state.pop("strategy")
    target = warmed(name)
    with pytest.warns(UserWarning, match=re.escape(f"state carries no 'strategy' tag (saved by an earlier fastsel): "
                                                   f"loaded into {name}")):
        target.load_state_dict(state)
    assert same(target.state_dict(), source.state_dict())


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("change,exc,message", [
    (lambda s: s.update(strategy=None), ValueError, "state['strategy'] must be"),
    (lambda s: s.update(unexpected=1), ValueError, "state has unknown keys ['unexpected']"),
], ids=["tag-none", "unknown-key"])
def test_strategy_tag_and_keys(name, change, exc, message):
    target = warmed(name)
    state = copy.deepcopy(target.state_dict())
    change(state)
    before = target.state_dict()
    with pytest.raises(exc, match=re.escape(message)):
        target.load_state_dict(state)
    assert same(target.state_dict(), before)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_state_must_be_a_dict(name):
    with pytest.raises(TypeError, match=re.escape("state must be a dict (a state_dict()), got list")):
        warmed(name).load_state_dict([])


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in ("CDFSampling", "UpperBoundIS",
                                                                      "SelectiveBackprop", "DynaMS")])
def test_stateless_strategies_hold_only_their_tag(name):
    assert warmed(name).state_dict() == {"strategy": name}


STRATEGY_CASES = [
    # (strategy, path, new value, exception, message)
    ("CDFSampling", ("initial_loss",), float("nan"), ValueError,
     "state['initial_loss'] must be a finite number, got nan"),
    ("CDFSampling", ("running_loss",), float("inf"), ValueError,
     "state['running_loss'] must be a finite number, got inf"),
    ("CDFSampling", ("running_loss",), "0.5", TypeError, "state['running_loss'] must be a number or None, got '0.5'"),
    ("CDFSampling", ("running_loss",), None, ValueError,
     "state['initial_loss'] and state['running_loss'] must both be None (no loss seen yet) or both numbers"),
    ("CDFSampling", ("active",), 1, TypeError, "state['active'] must be a bool, got 1"),
    ("CDFSampling", ("active",), DELETE, ValueError, "state is missing the key 'active'"),
    ("UpperBoundIS", ("tau",), float("nan"), ValueError, "state['tau'] must be a finite number >= 0.0, got nan"),
    ("UpperBoundIS", ("tau",), -0.5, ValueError, "state['tau'] must be a finite number >= 0.0, got -0.5"),
    ("UpperBoundIS", ("tau",), None, TypeError, "state['tau'] must be a number, got None"),
    ("UpperBoundIS", ("active",), "yes", TypeError, "state['active'] must be a bool, got 'yes'"),
    ("UpperBoundIS", ("last_threshold",), 0.5, ValueError,
     "state['last_threshold'] must be a finite number >= 1.0, got 0.5"),
    ("UpperBoundIS", ("last_threshold",), float("inf"), ValueError, "state['last_threshold'] must be a finite number"),
    ("SelectiveBackprop", ("history",), [], TypeError, "state['history'] must be a dict"),
    ("SelectiveBackprop", ("history", "size"), 8, ValueError,
     "state['history']['size'] is 8: the state holds a loss history of size 8, this strategy has history_size=50"),
    ("SelectiveBackprop", ("history", "buffer"), torch.zeros(49), ValueError,
     "state['history']['buffer'] must be a tensor of shape (50,), got shape (49,)"),
    ("SelectiveBackprop", ("history", "buffer"), torch.zeros(1), ValueError,
     "state['history']['buffer'] must be a tensor of shape (50,), got shape (1,)"),
    ("SelectiveBackprop", ("history", "buffer"), torch.zeros(50, dtype=torch.int64), TypeError,
     "state['history']['buffer'] must be a tensor of dtype"),
    ("SelectiveBackprop", ("history", "count"), 51, ValueError,
     "state['history']['count'] must be an int in [0, 50] (the history's size), got 51"),
    ("SelectiveBackprop", ("history", "count"), -1, ValueError, "state['history']['count'] must be an int in [0, 50]"),
    ("SelectiveBackprop", ("history", "pos"), 50, ValueError,
     "state['history']['pos'] must be an int in [0, 49], got 50"),
    ("SelectiveBackprop", ("history", "pos"), -1, ValueError, "state['history']['pos'] must be an int in [0, 49]"),
    ("SelectiveBackprop", ("history", "pos"), 1.0, TypeError, "state['history']['pos'] must be an int, got 1.0"),
    ("SelectiveBackprop", ("history", "count"), 10, ValueError,
     "state['history']['pos'] must equal state['history']['count'] = 10 while the history is not full"),
    ("SelectiveBackprop", ("history", "pos"), DELETE, ValueError, "state['history'] is missing the key 'pos'"),
    ("DynaMS", ("subset",), lambda t: t.double(), TypeError,
     "state['subset'] must be a tensor of dtype int64 or int32, got torch.float64"),
    ("DynaMS", ("subset",), lambda t: t[None], ValueError,
     "state['subset'] must be a tensor of shape (N,), got shape (1,"),
    ("DynaMS", ("subset",), lambda t: torch.cat([t, torch.tensor([-4])]), ValueError,
     "state['subset'] must hold values >= 0, got values in [-4, "),
    ("DynaMS", ("subset",), lambda t: torch.cat([t, t[:1]]), ValueError,
     "state['subset'] must hold distinct sample indices"),
    ("DynaMS", ("subset",), None, ValueError,
     "state['subset'] must be None exactly when state['refreshed_at'] is -1 (before the first selection), got None "
     "and 1"),
    ("DynaMS", ("refreshed_at",), -1, ValueError,
     "state['subset'] must be None exactly when state['refreshed_at'] is -1 (before the first selection), got a "
     "subset and -1"),
    ("DynaMS", ("refreshed_at",), -2, ValueError, "state['refreshed_at'] must be an int >= -1, got -2"),
    ("DynaMS", ("refreshed_at",), 2.0, TypeError, "state['refreshed_at'] must be an int, got 2.0"),
]


@pytest.mark.parametrize("name,path,value,exc,message",
                         [pytest.param(*c, id=f"{c[0]}-{'.'.join(c[1])}-{c[2]!r:.20}") for c in STRATEGY_CASES])
def test_strategy_rejects_tampered_state_and_stays_untouched(name, path, value, exc, message):
    state = warmed(name).state_dict()
    target = all_strategies()[name][0]()
    before = target.state_dict()
    with pytest.raises(exc, match=re.escape(message)):
        target.load_state_dict(tampered(state, path, value))
    assert same(target.state_dict(), before)
    target.load_state_dict(state)  # the untampered state loads
    assert same(target.state_dict(), state)


def test_dynams_subset_beyond_the_data_set_is_refused_by_the_sampler():
    name = "DynaMS"
    strategy_state = warmed(name).state_dict()
    s = fastsel.ScoreSampler(epoch_data(), all_strategies()[name][0](), batch_size=BS, epochs=4, drop_last=False)
    state = s.state_dict()
    state["strategy"] = tampered(strategy_state, ("subset",), lambda t: torch.cat([t, torch.tensor([N])]))
    with pytest.raises(ValueError, match=re.escape(f"state['strategy']['subset'] must hold values in [0, {N}), got "
                                                   f"values in [")):
        s.load_state_dict(state)
    assert s.strategy.subset is None


def test_cdf_and_ubis_accept_fresh_states():
    for make in (lambda: CDFSampling(5), lambda: UpperBoundIS(5)):
        state = roundtrip(make().state_dict())
        s = make()
        s.load_state_dict(state)
        assert same(s.state_dict(), state)


# ---------------------------------------------------------------- History, ScoreTable, Costs directly

def history_state():
    h = fastsel.History(8)
    h.push(torch.arange(5, dtype=torch.float32))
    return h.state_dict()


@pytest.mark.parametrize("path,value,exc,message", [
    (("count",), 9, ValueError, "state['count'] must be an int in [0, 8] (the history's size), got 9"),
    (("count",), -1, ValueError, "state['count'] must be an int in [0, 8]"),
    (("pos",), 8, ValueError, "state['pos'] must be an int in [0, 7], got 8"),
    (("pos",), 2, ValueError, "state['pos'] must equal state['count'] = 5 while the history is not full"),
    (("size",), 4, ValueError, "state['size'] is 4: the state is of a History of size 4, this one has size 8"),
    (("size",), 0, ValueError, "state['size'] must be an int >= 1, got 0"),
    (("buffer",), torch.zeros(1), ValueError, "state['buffer'] must be a tensor of shape (8,), got shape (1,)"),
    (("buffer",), torch.zeros(8, dtype=torch.int32), TypeError, "state['buffer'] must be a tensor of dtype"),
    (("buffer",), DELETE, ValueError, "state is missing the key 'buffer'"),
], ids=["count-above-size", "count-negative", "pos-size", "pos-not-count", "size", "size-zero", "buffer-broadcast",
        "buffer-int", "buffer-missing"])
def test_history_rejects_tampered_state(path, value, exc, message):
    h = fastsel.History(8)
    h.push(torch.tensor([9.0, 8.0]))
    before = h.state_dict()
    with pytest.raises(exc, match=re.escape(message)):
        h.load_state_dict(tampered(history_state(), path, value))
    assert same(h.state_dict(), before)


def test_history_round_trip_weights_only_and_full_ring():
    h = fastsel.History(8)
    h.push(torch.arange(11, dtype=torch.float32))  # wrapped: pos 3, count 8
    restored = fastsel.History(8)
    restored.load_state_dict(roundtrip(h.state_dict()))
    assert same(restored.state_dict(), h.state_dict())
    h2 = fastsel.History(8)
    h2.push(torch.arange(3, dtype=torch.float32))
    h2.push(torch.arange(7, dtype=torch.float32))  # pos 2, count 8
    r2 = fastsel.History(8)
    r2.load_state_dict(roundtrip(h2.state_dict()))
    for hist in (h2, r2):
        hist.push(torch.tensor([100.0]))
    assert torch.equal(h2.values, r2.values)


def table_state():
    t = ScoreTable(6, ("loss", "p_wrong"))
    idx = torch.tensor([1, 4])
    t.update_values(idx, t.extract(fake_scores(idx)), epoch=2)
    return t.state_dict()


@pytest.mark.parametrize("path,value,exc,message", [
    (("last", "p_wrong"), torch.zeros(1), ValueError,
     "state['last']['p_wrong'] must be a tensor of shape (6,), got shape (1,)"),
    (("finite", "p_wrong"), torch.tensor([0, 2, 0, 0, 1, 0]), ValueError,
     "state['finite']['p_wrong'] must be <= state['count'] elementwise (finite values among those recorded), "
     "got 2 > 1 at index 1"),
    (("total", "loss"), torch.full((6,), float("inf"), dtype=torch.float64), ValueError,
     "state['total']['loss'] must be finite, got inf at index 0"),
    (("last_epoch",), torch.full((6,), -3), ValueError, "state['last_epoch'] must hold values >= -1, got values in "
                                                         "[-3, -3]"),
    (("count",), torch.zeros(6, 1, dtype=torch.int64), ValueError, "state['count'] must be a tensor of shape (6,)"),
    (("fields",), ("loss",), ValueError, "score table state is for n=6 fields=('loss',)"),
    (("n",), -1, ValueError, "state['n'] must be an int >= 0, got -1"),
], ids=["last-broadcast", "finite-above-count", "total-inf", "last-epoch", "count-2d", "fields", "n"])
def test_score_table_rejects_tampered_state(path, value, exc, message):
    t = ScoreTable(6, ("loss", "p_wrong"))
    t.update_values(torch.tensor([0]), t.extract(fake_scores(torch.tensor([3]))), epoch=0)
    before = t.state_dict()
    with pytest.raises(exc, match=re.escape(message)):
        t.load_state_dict(tampered(table_state(), path, value))
    assert same(t.state_dict(), before)
    t.load_state_dict(roundtrip(table_state()))
    assert same(t.state_dict(), table_state())


def test_score_table_load_drops_queued_updates_only_when_valid():
    t = ScoreTable(6)
    t._queued.append((torch.tensor([2]), {"loss": torch.tensor([5.0])}, 0))  # as an accelerator's update waits
    with pytest.raises(ValueError):
        t.load_state_dict(tampered(ScoreTable(6).state_dict(), ("count",), torch.full((6,), -1)))
    assert t.values("loss")[2] == 5.0, "a failed load dropped the queued update"


@pytest.mark.parametrize("state,exc,message", [
    ({"scored": 1, "trained": -2, "steps": 0}, ValueError, "state['trained'] must be an int >= 0, got -2"),
    ({"scored": 1, "trained": 2}, ValueError, "state is missing the key 'steps'"),
    ({"scored": True, "trained": 2, "steps": 0}, TypeError, "state['scored'] must be an int, got True"),
    ({"scored": 1, "trained": 2, "steps": 0, "epochs": 1}, ValueError, "state has unknown keys ['epochs']"),
], ids=["negative", "missing", "bool", "unknown"])
def test_costs_reject_tampered_state(state, exc, message):
    c = Costs()
    c.scored = 5
    with pytest.raises(exc, match=re.escape(message)):
        c.load(state)
    assert c.as_dict() == {"scored": 5, "trained": 0, "steps": 0}
    c.load_state_dict(roundtrip({"scored": 1, "trained": 2, "steps": torch.tensor(3)}))
    assert c.as_dict() == {"scored": 1, "trained": 2, "steps": 3}


# ---------------------------------------------------------------- BatchSelector

def selector_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, C))


def candidates(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(30, 3, generator=g), torch.randint(0, C, (30,), generator=g)


def select_steps(selector, steps):
    return [selector(*candidates(t))[1].tolist() for t in steps]


@pytest.mark.parametrize("make", [lambda: CDFSampling(6, switch_ratio=0.9), lambda: UpperBoundIS(6, momentum=0.5),
                                  lambda: SelectiveBackprop(history_size=40), lambda: Uniform(6)],
                         ids=["cdf", "ubis", "sb", "uniform"])
def test_selector_round_trip_weights_only(make):
    model = selector_model()
    full = select_steps(fastsel.BatchSelector(model, make(), seed=4), range(8))
    first = fastsel.BatchSelector(model, make(), seed=4)
    head = select_steps(first, range(4))
    fresh = fastsel.BatchSelector(model, make(), seed=0)
    state = roundtrip(first.state_dict())
    assert state["strategy"]["strategy"] == type(first.strategy).__name__
    fresh.load_state_dict(state)
    assert same(fresh.state_dict(), first.state_dict())
    assert head + select_steps(fresh, range(4, 8)) == full


@pytest.mark.parametrize("path,value,exc,message", [
    (("step",), -1, ValueError, "state['step'] must be an int >= 0, got -1"),
    (("step",), 2.0, TypeError, "state['step'] must be an int, got 2.0"),
    (("seed",), -1, ValueError, "state['seed'] must be an int >= 0, got -1"),
    (("step",), DELETE, ValueError, "state is missing the key 'step'"),
    (("costs", "steps"), -4, ValueError, "state['costs']['steps'] must be an int >= 0, got -4"),
    (("strategy", "strategy"), "UpperBoundIS", ValueError,
     "state['strategy']['strategy'] must be 'CDFSampling', got 'UpperBoundIS'"),
    (("strategy", "running_loss"), float("nan"), ValueError,
     "state['strategy']['running_loss'] must be a finite number, got nan"),
    (("extra",), 1, ValueError, "state has unknown keys ['extra']"),
], ids=["step-negative", "step-float", "seed", "step-missing", "costs", "strategy-tag", "strategy-nan", "unknown"])
def test_selector_rejects_tampered_state_and_stays_untouched(path, value, exc, message):
    model = selector_model()
    source = fastsel.BatchSelector(model, CDFSampling(6, switch_ratio=0.9), seed=4)
    select_steps(source, range(3))
    target = fastsel.BatchSelector(model, CDFSampling(6, switch_ratio=0.9), seed=1)
    select_steps(target, range(2))
    before = target.state_dict()
    with pytest.raises(exc, match=re.escape(message)):
        target.load_state_dict(tampered(source.state_dict(), path, value))
    assert same(target.state_dict(), before)


# ---------------------------------------------------------------- num_replicas without torch.distributed

@pytest.mark.skipif(torch.distributed.is_available() and torch.distributed.is_initialized(),
                    reason="needs a process without a process group")
def test_update_with_replicas_but_no_process_group_raises():
    s = fastsel.ScoreSampler(indexed(20), InfoBatch(), batch_size=4, epochs=2, num_replicas=2, rank=1, drop_last=False)
    batches = list(s)  # planning and sharding stay allowed (e.g. to inspect a rank's batches)
    assert len(s) == len(batches) == 3 and sorted(i for b in batches for i in b) == sorted(
        s.state_dict()["plan"][0][1::2].tolist())
    idx = torch.tensor(batches[0])
    with pytest.raises(RuntimeError, match=r"num_replicas=2 but torch\.distributed is not initialised.*"
                                           r"init_process_group.*leave num_replicas and rank unset"):
        s.update(idx, fake_scores(idx))
    assert int(s.table.count.sum()) == 0 and s.costs.as_dict() == {"scored": 0, "trained": 0, "steps": 0}
    one = fastsel.ScoreSampler(indexed(20), InfoBatch(), batch_size=4, epochs=2, num_replicas=1, rank=0, drop_last=False)
    b = torch.tensor(next(iter(one)))
    one.update(b, fake_scores(b))
    assert one.costs.steps == 1


# ---------------------------------------------------------------- empty epochs

def test_selective_backprop_equal_losses_give_empty_epochs_through_a_dataloader():
    n, bs = 10, 4
    data = fastsel.Indexed(TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.int64)))

    def make():
        return fastsel.ScoreSampler(data, SelectiveBackprop(staleness=2), batch_size=bs, epochs=6, seed=1, drop_last=False)

    def run_epochs(s, epochs):
        out = []
        for _ in range(epochs):
            epoch, length = s.epoch, len(s)
            got = []
            for x, y, idx in DataLoader(data, batch_sampler=s):
                assert s.epoch == epoch
                got.append(idx.tolist())
                s.update(idx, equal_scores(idx))
            out.append((epoch, length, got))
            assert s.epoch == epoch + 1, "the epoch did not end"
        return out

    s = make()
    stream = run_epochs(s, 6)
    for epoch, length, got in stream:
        if epoch % 2 == 0:  # full pass
            assert length == len(got) == 3 and sorted(i for b in got for i in b) == list(range(n))
        else:  # every percentile is 0, so P(keep) = 0: nothing to train
            assert length == 0 and got == []
    assert s.costs.steps == 9 and s.strategy.last_keep_rate == 0.0
    # resume after the empty epoch, and with the empty plan made (by len()) but not yet served
    for stop, call_len in ((2, False), (1, True)):
        first = make()
        head = run_epochs(first, stop)
        if call_len:
            assert len(first) == 0 and first.state_dict()["plan"][0].numel() == 0
        fresh = make()
        fresh.load_state_dict(roundtrip(first.state_dict()))
        assert head + run_epochs(fresh, 6 - stop) == stream


@pytest.mark.filterwarnings("ignore:ScoreSampler. no epoch of:UserWarning")  # empty epochs on purpose
def test_len_then_iter_serves_the_empty_epoch_before_the_next():
    s = fastsel.ScoreSampler(indexed(10), Uniform(budget=0.2), batch_size=4, epochs=4, drop_last=True)
    assert len(s) == 0 and s.epoch == 0
    assert list(s) == [] and s.epoch == 1
    assert len(s) == 0 and list(iter(s)) == [] and s.epoch == 2


@pytest.mark.parametrize("name", list(epoch_strategies()))
def test_empty_data_set_gives_epochs_of_no_batch(name):
    s = fastsel.ScoreSampler(epoch_data(0), epoch_strategies()[name](), batch_size=BS, epochs=3, drop_last=False)
    for epoch in range(3):
        assert len(s) == 0
        assert list(DataLoader(s.data, batch_sampler=s)) == []
        assert s.epoch == epoch + 1
    state = roundtrip(s.state_dict())
    fresh = fastsel.ScoreSampler(epoch_data(0), epoch_strategies()[name](), batch_size=BS, epochs=3, drop_last=False)
    fresh.load_state_dict(state)
    assert fresh.epoch == 3 and list(fresh) == [] and fresh.epoch == 4


SMALL_PLANS = {  # strategies whose plan of 10 samples keeps 2 (from epoch 0 on)
    "uniform": lambda: Uniform(budget=0.2),
    "psgd": lambda: PSGD(0.2),
    "csgd": lambda: CSGD(0.2),
    "dynams": lambda: DynaMS(0.2, 1, model=torch.nn.Linear(1, C), warmup_epochs=0),
}


@pytest.mark.filterwarnings("ignore:ScoreSampler. no epoch of:UserWarning")  # empty epochs on purpose
@pytest.mark.parametrize("name", list(SMALL_PLANS))
@pytest.mark.parametrize("drop_last,expected", [(True, []), (False, [2])])
def test_plan_smaller_than_one_batch(name, drop_last, expected):
    s = fastsel.ScoreSampler(epoch_data(10), SMALL_PLANS[name](), batch_size=4, epochs=3, drop_last=drop_last)
    for epoch in range(3):
        assert len(s) == len(expected) and s.state_dict()["plan"][0].numel() == 2
        sizes = []
        for _, _, idx in DataLoader(s.data, batch_sampler=s):
            sizes.append(idx.numel())
            s.update(idx, fake_scores(idx))
        assert sizes == expected and s.epoch == epoch + 1


def test_hard_batches_keeping_only_the_short_batch_with_drop_last():
    # n = 5, batch 4: batches of 4 and 1; the single one has the largest loss and is the only one kept
    n = 5
    data = indexed(n)
    s = fastsel.ScoreSampler(data, HardBatches(0.5, batch_size=4, warmup_epochs=0), batch_size=4, epochs=3,
                             drop_last=True)
    lonely = int(s.strategy.form_batches(n, seed=0, epoch=0)[1])
    loss = torch.zeros(n)
    loss[lonely] = 5.0
    s.table.update_values(torch.arange(n), {"loss": loss}, 0)
    assert len(s) == 0 and s.state_dict()["plan"][0].tolist() == [lonely]
    assert list(DataLoader(data, batch_sampler=s)) == [] and s.epoch == 1

"""Fuzzing of the STATES of the training-loop API: random runs of ``fastsel.ScoreSampler``
(InfoBatch, Selective-Backprop's stale variant, HardBatches, DynaMS on a tiny linear
model, PSGD / CSGD, Uniform) and ``fastsel.BatchSelector`` (CDF sampling, upper-bound
importance sampling, Selective-Backprop) under hypothesis, checked against exact
invariants:

* every batch holds in-range indices, no batch is empty, and ``len(sampler)`` taken at
  the start of an epoch is the number of batches that epoch yields (zero batches for an
  empty plan, never one empty batch);
* loss weights are finite, non-negative float32;
* a ``state_dict()`` taken at any step, saved with ``torch.save`` and read back with
  ``torch.load(weights_only=True)``, restored into a fresh sampler (or selector) with a
  fresh strategy, gives exactly the remaining batches / selections and weights of the
  uninterrupted run;
* late-training states: every loss equal, every loss 0, very confident models whose
  loss and grad_norm underflow to 0 or to subnormals, NaN scores, n = 0 data sets.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fastsel
from fastsel import strategies as S

INF, NAN = math.inf, math.nan


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def roundtrip(state):
    """torch.save, then torch.load(weights_only=True): what a checkpoint goes through."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- a deterministic fake training forward -------------------------------------------------

C = 5
REGIMES = ("normal", "equal", "zero", "confident", "subnormal", "nan", "drifting")


def fake_logits(idx: torch.Tensor, epoch: int, regime: str) -> torch.Tensor:
    """Logits [B, C] of the samples ``idx`` at ``epoch``, a pure function of both (a resumed
    run sees the same ones), in one of the late-training regimes."""
    idx = idx.long()
    label = idx % C
    onehot = torch.nn.functional.one_hot(label, C).float()
    if regime == "equal":  # every loss log C
        return torch.zeros(len(idx), C)
    if regime == "zero":  # the target leads by 1e4: loss exactly 0 in float32
        return onehot * 1e4
    if regime == "confident":  # losses ~1e-13 .. 1e-39, grad_norm 0 (squares underflow)
        return onehot * (30.0 + (idx % 7).float() * 10.0)[:, None]
    if regime == "subnormal":  # losses in float32's subnormal range, some exactly 0
        return onehot * (88.0 + (idx % 5).float() * 4.0)[:, None]
    g = torch.Generator().manual_seed(1000 * epoch + 7)
    noise = torch.randn(max(1, int(idx.max()) + 1 if len(idx) else 1), C, generator=g)[idx]
    if regime == "nan":  # a few invalid rows: NaN scores
        z = noise * 2
        z[idx % 4 == 1, 0] = NAN
        return z
    if regime == "drifting":  # the model learns: the target's logit grows with the epoch
        return noise + onehot * (epoch * 2.0 + (idx % 3).float()[:, None])
    return noise * 3


def fake_scores(idx: torch.Tensor, epoch: int, regime: str) -> fastsel.Scores:
    return fastsel.score(fake_logits(idx, epoch, regime), idx.long() % C)


class TinyData(torch.utils.data.Dataset):
    """n items (x, y): x a 4-vector that depends on the index, y = index % C."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        return torch.randn(4, generator=g), int(i) % C


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, C)


# ---- the epoch-style strategies --------------------------------------------------------------

EPOCH_STRATEGIES = ("InfoBatch", "SelectiveBackprop", "HardBatches", "DynaMS", "PSGD", "CSGD")


def make_strategy(name: str, params: dict, batch_size: int, model: nn.Module):
    if name == "InfoBatch":
        return S.InfoBatch(prune_ratio=params["ratio"], delta=params["delta"])
    if name == "SelectiveBackprop":
        return S.SelectiveBackprop(staleness=2, beta=params["beta"], s_min=params["s_min"])
    if name == "HardBatches":
        return S.HardBatches(delta=params["fraction"], batch_size=batch_size, warmup_epochs=params["warmup"])
    if name == "DynaMS":
        return S.DynaMS(keep=params["fraction"], refresh=params["refresh"], model=model,
                        warmup_epochs=params["warmup"], score_batch_size=7)
    if name == "PSGD":
        return S.PSGD(budget=params["fraction"], reweight=params["reweight"])
    if name == "CSGD":
        return S.CSGD(budget=params["fraction"], reweight=params["reweight"])
    raise ValueError(name)


@st.composite
def sampler_runs(draw) -> dict:
    return {
        "strategy": draw(st.sampled_from(EPOCH_STRATEGIES)),
        "n": draw(st.one_of(st.integers(0, 40), st.sampled_from([0, 1, 2]))),
        "batch_size": draw(st.integers(1, 9)),
        "epochs": draw(st.integers(1, 5)),
        "seed": draw(st.one_of(st.integers(0, 2 ** 63 - 1), st.just(0))),
        "drop_last": draw(st.booleans()),
        "regime": draw(st.sampled_from(REGIMES)),
        "dataloader": draw(st.sampled_from([False, False, True])),
        "params": {"ratio": draw(st.sampled_from([0.0, 0.3, 0.5, 0.99])),
                   "delta": draw(st.sampled_from([0.0, 0.5, 0.875, 1.0])),
                   "beta": draw(st.sampled_from([0.0, 1.0, 3.0])),
                   "s_min": draw(st.sampled_from([0.0, 0.1, 1.0])),
                   "fraction": draw(st.sampled_from([0.01, 0.3, 0.5, 1.0])),
                   "warmup": draw(st.integers(0, 2)),
                   "refresh": draw(st.integers(1, 3)),
                   "reweight": draw(st.booleans())},
        "stop": draw(st.integers(0, 60)),
    }


def new_sampler(run: dict):
    model = tiny_model()
    data = fastsel.Indexed(TinyData(run["n"]))
    strategy = make_strategy(run["strategy"], run["params"], run["batch_size"], model)
    return fastsel.ScoreSampler(data, strategy, batch_size=run["batch_size"], epochs=run["epochs"],
                                seed=run["seed"], drop_last=run["drop_last"])


def train(sampler, run: dict, record: list, *, stop=None, checks: list):
    """A resumable training loop (``for epoch in range(sampler.epoch, epochs)``) with fake scores.
    Records (epoch, batch, weights); returns the state_dict after ``stop`` updates (taken
    inside the loop), else None. Appends every invariant violation to ``checks``."""
    n, bs = run["n"], run["batch_size"]
    for _ in range(sampler.epoch, run["epochs"]):
        epoch = sampler.epoch
        fresh_epoch = sampler.state_dict()["consumed"] == 0
        expected = len(sampler)
        yielded = 0
        if run["dataloader"]:
            source = ((idx.tolist(), idx) for _x, _y, idx in
                      torch.utils.data.DataLoader(sampler.data, batch_sampler=sampler))
        else:
            source = ((b, torch.tensor(b, dtype=torch.int64)) for b in sampler)
        for b, idx in source:
            yielded += 1
            if not b:
                checks.append(f"epoch {epoch}: an empty batch")
                continue
            if min(b) < 0 or max(b) >= n:
                checks.append(f"epoch {epoch}: index out of range in {b}")
            if len(b) > bs or (run["drop_last"] and len(b) != bs):
                checks.append(f"epoch {epoch}: batch of {len(b)} with batch_size={bs} drop_last={run['drop_last']}")
            w = sampler.weights(idx)
            if w.dtype != torch.float32 or w.shape != (len(b),) or not (torch.isfinite(w).all() and (w >= 0).all()):
                checks.append(f"epoch {epoch}: weights {w}")
            record.append((epoch, b, w.tolist()))
            sampler.update(idx, fake_scores(idx, epoch, run["regime"]))
            if stop is not None and sampler.costs.steps == stop:
                return sampler.state_dict()
        if fresh_epoch and yielded != expected:
            checks.append(f"epoch {epoch}: len(sampler) was {expected}, the epoch yielded {yielded} batches")
    return None


@fuzz_settings(200)
@pytest.mark.filterwarnings("ignore:ScoreSampler. no epoch of:UserWarning")  # drawn tiny plans
@given(run=sampler_runs())
def test_sampler_runs_invariants_and_exact_resume(run):
    checks = []
    full = []
    ref = new_sampler(run)
    try:
        train(ref, run, full, checks=checks)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"uninterrupted run raised {type(e).__name__}: {e}\nrun={run}")
    assert not checks, f"run={run}\n" + "\n".join(checks[:10])
    if run["n"] > 0:
        assert ref.costs.steps == len(full)
    assert ref.epoch == run["epochs"], f"run={run}: {ref.epoch} epochs ended, {run['epochs']} planned"

    # stop after `stop` updates (0: before any), checkpoint, resume in a fresh sampler
    stop = min(run["stop"], len(full))
    first = []
    s = new_sampler(run)
    state = train(s, run, first, stop=stop, checks=checks) if stop > 0 else s.state_dict()
    if state is None:  # the run ended before `stop` updates: checkpoint its end
        state = s.state_dict()
    assert first == full[:len(first)], f"run={run}: a second identical run differs"
    fresh = new_sampler(run)
    fresh.load_state_dict(roundtrip(state))
    rest = []
    train(fresh, run, rest, checks=checks)
    assert not checks, f"run={run}\n" + "\n".join(checks[:10])
    assert first + rest == full, (f"run={run}\nresumed after {len(first)} updates:\n"
                                  f"uninterrupted {full[len(first):len(first) + 3]}\nresumed {rest[:3]}")
    assert fresh.costs.as_dict() == ref.costs.as_dict()
    assert fresh.epoch == ref.epoch


# ---- in-batch selectors ------------------------------------------------------------------------

class Scaled(nn.Module):
    """A linear model whose logits are scaled by ``temperature``: large values make it very
    confident (loss and grad_norm underflow to 0 or to subnormals in float32)."""

    def __init__(self, temperature: float):
        super().__init__()
        torch.manual_seed(1)
        self.fc = nn.Linear(4, C)
        self.temperature = temperature

    def forward(self, x):
        return self.fc(x) * self.temperature


@st.composite
def selector_runs(draw) -> dict:
    keep = draw(st.integers(1, 6))
    return {
        "strategy": draw(st.sampled_from(["CDF", "CDF-grad", "CDF-rep", "UpperBound", "UpperBound-loss",
                                          "SelectiveBackprop"])),
        "keep": keep,
        "batch": draw(st.integers(keep, keep * 4 + 2)),
        "steps": draw(st.integers(1, 8)),
        "temperature": draw(st.sampled_from([1.0, 10.0, 100.0, 1e3, 1e5, 0.0])),
        "seed": draw(st.integers(0, 2 ** 40)),
        "stop": draw(st.integers(0, 8)),
        "switch": draw(st.sampled_from([None, 0.75, 1e9])),
    }


def new_selector(run: dict):
    k = run["keep"]
    name = run["strategy"]
    if name.startswith("CDF"):
        strategy = S.CDFSampling(k, by="grad_norm" if name == "CDF-grad" else "loss",
                                 replacement=name == "CDF-rep", switch_ratio=run["switch"], reweight=True)
    elif name.startswith("UpperBound"):
        strategy = S.UpperBoundIS(k, by="loss" if name == "UpperBound-loss" else "grad_norm",
                                  tau_threshold=None if run["switch"] is None else 1.0)
    else:
        strategy = S.SelectiveBackprop(history_size=16)
    model = Scaled(run["temperature"])
    return fastsel.BatchSelector(model, strategy, seed=run["seed"]), model


def candidate_batch(step: int, size: int):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(size, 4, generator=g)
    return x, torch.randint(0, C, (size,), generator=g)


def select_steps(selector, run: dict, record: list, start: int, stop=None):
    for step in range(start, run["steps"]):
        x, y = candidate_batch(step, run["batch"])
        xb, yb, w = selector(x, y)
        idx = selector.last_indices
        record.append((step, idx.tolist(), w.tolist()))
        if stop is not None and step + 1 == stop:
            return selector.state_dict()
    return None


@fuzz_settings(150)
@given(run=selector_runs())
def test_selector_runs_invariants_and_exact_resume(run):
    """Every selection holds ``keep`` in-range indices (distinct without replacement, with
    finite positive weights) whatever the confidence of the model, and a state restored
    after any step (through torch.save / torch.load(weights_only=True)) repeats the rest."""
    selector, _ = new_selector(run)
    full = []
    select_steps(selector, run, full, 0)
    k, b = run["keep"], run["batch"]
    for step, idx, w in full:
        where = f"run={run} step {step}: indices {idx} weights {w}"
        assert all(0 <= i < b for i in idx), where
        assert all(math.isfinite(v) and v >= 0 for v in w) and len(w) == len(idx), where
        if run["strategy"] in ("CDF", "CDF-grad"):
            assert len(idx) == k and len(set(idx)) == k, where
            assert all(v > 0 for v in w), where
        elif run["strategy"] != "SelectiveBackprop":
            assert len(idx) == k, where
    stop = min(run["stop"], run["steps"])
    first = []
    sel, _ = new_selector(run)
    state = select_steps(sel, run, first, 0, stop=stop) if stop > 0 else sel.state_dict()
    assert first == full[:stop]
    fresh, _ = new_selector(run)
    fresh.load_state_dict(roundtrip(state))
    rest = []
    select_steps(fresh, run, rest, stop)
    assert first + rest == full, f"run={run}: resumed after {stop} steps differs\n{full[stop:stop + 2]}\n{rest[:2]}"


# ---- very confident batches for CDF sampling, directly --------------------------------------

@pytest.mark.parametrize("by", ["loss", "grad_norm"])
@pytest.mark.parametrize("replacement", [False, True])
@fuzz_settings(40)
@given(margin=st.sampled_from([20.0, 30.0, 60.0, 87.0, 90.0, 103.0, 110.0, 1e4]),
       n=st.integers(1, 40), data=st.data())
def test_cdf_sampling_on_a_very_confident_batch(by, replacement, margin, n, data):
    """Scores of a batch whose every sample is predicted right with a large margin: loss
    and grad_norm are tiny, subnormal or 0 in float32. CDF sampling (switched on) must
    still return ``keep`` in-range indices (distinct without replacement) with finite
    positive weights."""
    keep = data.draw(st.integers(1, n))
    y = torch.arange(n) % C
    jitter = torch.linspace(0, 3, n)
    logits = torch.nn.functional.one_hot(y, C).float() * (margin + jitter)[:, None]
    s = fastsel.score(logits, y)
    strategy = S.CDFSampling(keep, by=by, replacement=replacement, switch_ratio=None, reweight=True)
    sel = strategy.choose(s, step=data.draw(st.integers(0, 100)), seed=3)
    idx, w = sel.indices.tolist(), sel.weights.tolist()
    where = f"margin={margin} n={n} keep={keep}: {by} {getattr(s, by).tolist()} -> indices {idx} weights {w}"
    assert len(idx) == keep and all(0 <= i < n for i in idx), where
    if not replacement:
        assert len(set(idx)) == keep, where
    assert all(math.isfinite(v) and v > 0 for v in w), where


# ---- n = 0, and plans with no batch, through a DataLoader ------------------------------------

@pytest.mark.parametrize("name", EPOCH_STRATEGIES)
def test_empty_data_set_runs_epochs_of_no_batch(name):
    run = {"strategy": name, "n": 0, "batch_size": 3, "epochs": 3, "seed": 0, "drop_last": False,
           "regime": "normal", "dataloader": True, "stop": 0,
           "params": {"ratio": 0.5, "delta": 0.875, "beta": 3.0, "s_min": 0.0, "fraction": 0.5, "warmup": 0,
                      "refresh": 1, "reweight": False}}
    sampler = new_sampler(run)
    checks, record = [], []
    train(sampler, run, record, checks=checks)
    assert not checks and record == [] and sampler.epoch == 3
    assert roundtrip(sampler.state_dict())["epoch"] == 3


# ---- tampered states: refused with a clear error and no change, or harmless -----------------

def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, (tuple, list)) and obj and not isinstance(obj, str):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    yield path, obj


def _replace(obj, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        out = dict(obj)
        out[head] = _replace(obj[head], rest, value)
        return out
    out = list(obj)
    out[head] = _replace(obj[head], rest, value)
    return type(obj)(out) if isinstance(obj, tuple) else out


def _nasty(data, original):
    if isinstance(original, torch.Tensor) and original.numel():
        t = original.clone()
        flat = t.view(-1)
        i = data.draw(st.integers(0, flat.numel() - 1))
        kind = data.draw(st.sampled_from(["big", "negative", "nan", "dtype", "shape", "empty"]))
        if kind == "big":
            flat[i] = 2 ** 40 if not t.is_floating_point() else 1e30
        elif kind == "negative":
            flat[i] = -5
        elif kind == "nan" and t.is_floating_point():
            flat[i] = NAN
        elif kind == "dtype":
            return t.to(torch.int16 if t.is_floating_point() else torch.float16)
        elif kind == "shape":
            return t.reshape(-1)[:-1] if t.numel() > 1 else t.reshape(1, 1)
        else:
            return t[:0]
        return t
    return data.draw(st.sampled_from([None, -1, 2 ** 62, 1.5, NAN, "x", True, [], {}, torch.tensor([1, 2])]))


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            torch.nan_to_num(a.double(), nan=-7.25), torch.nan_to_num(b.double(), nan=-7.25))
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@fuzz_settings(150)
@pytest.mark.filterwarnings("ignore:ScoreSampler. no epoch of:UserWarning")  # drawn tiny plans
@given(run=sampler_runs(), data=st.data())
def test_tampered_sampler_state_is_refused_cleanly_or_harmless(run, data):
    """One entry of a real checkpoint replaced by a nasty value: load_state_dict raises a
    TypeError / ValueError naming ``state[...]`` and leaves the sampler as it was, or it
    accepts the state and the next epochs run with every invariant intact."""
    assume(run["n"] > 0)
    run = dict(run, dataloader=False)
    s = new_sampler(run)
    state = train(s, run, [], stop=max(1, run["stop"] % 7), checks=[]) or s.state_dict()
    leaves = [(p, v) for p, v in _leaves(state) if p]
    path, original = data.draw(st.sampled_from(leaves))
    tampered = _replace(state, path, _nasty(data, original))
    target = new_sampler(run)
    train(target, run, [], stop=1, checks=[])  # a sampler with a state of its own
    before = target.state_dict()
    try:
        target.load_state_dict(tampered)
    except (TypeError, ValueError) as e:
        # the message names an entry by its key path: the tampered one, or one the tampering
        # made inconsistent (a plan's length against 'consumed', the table's epochs, 'n')
        msg = str(e)
        named = [repr(k) for k in path if isinstance(k, str)] + ["'consumed'", "'last_epoch'", "'n'"]
        assert msg.startswith("state") and any(k in msg for k in named), f"message does not name the entry: {e}"
        assert _same_state(before, target.state_dict()), f"a failed load changed the sampler (path {path})"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"tampered {path}: {type(e).__name__} {e}")
    checks = []
    try:
        train(target, run, [], checks=checks)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"accepted tampered {path} = {_replace({}, (), tampered)!r:.200}, then training raised "
                    f"{type(e).__name__}: {e}")
    assert not checks, f"accepted tampered {path}, then: {checks[:5]}"


# ---- History: a ring buffer of the last ``size`` values, and its state -----------------------

@fuzz_settings(150)
@given(size=st.integers(1, 12), pushes=st.lists(st.integers(0, 30), max_size=8), dtype=st.sampled_from(
    [torch.float32, torch.float64, torch.float16, torch.bfloat16]), stop=st.integers(0, 8), data=st.data())
def test_history_keeps_the_last_values_and_resumes(size, pushes, dtype, stop, data):
    """After any sequence of pushes the History holds exactly the last ``size`` values
    pushed (as a multiset, in its dtype), ``percentile`` against it equals the count
    against those values, and a state taken after any push (through torch.save /
    torch.load(weights_only=True)) continues identically."""
    h = fastsel.History(size, dtype=dtype)
    pushed = []
    saved = None
    for k, m in enumerate(pushes):
        v = torch.tensor([float(data.draw(st.one_of(st.integers(-50, 50), st.sampled_from([INF, -INF]))))
                          for _ in range(m)])
        h.push(v)
        pushed += v.to(dtype).double().tolist()
        if k + 1 == stop:
            saved = (roundtrip(h.state_dict()), len(pushed))
        want = sorted(pushed[-size:]) if pushed else []
        assert len(h) == len(want) and sorted(h.values.double().tolist()) == want, (size, pushes, k)
        probe = torch.tensor([-60.0, 0.0, 0.5, 60.0, INF])
        got = fastsel.percentile(probe, h, backend="torch").tolist()
        for x, g in zip(probe.tolist(), got):
            exp = 1.0 if not want else float(torch.tensor(sum(1 for y in want if y < x) / len(want)).float())
            assert g == exp, (x, g, exp, want)
    if saved is not None:
        state, count = saved
        fresh = fastsel.History(size, dtype=dtype)
        fresh.load_state_dict(state)
        # the pushes after the checkpoint, replayed into two restored copies
        replay = fastsel.History(size, dtype=dtype)
        replay.load_state_dict(state)
        tail = pushed[count:]
        if tail:
            replay.push(torch.tensor(tail))
            fresh.push(torch.tensor(tail))
        assert sorted(replay.values.double().tolist()) == sorted(h.values.double().tolist())
        assert torch.equal(fresh.values, replay.values)

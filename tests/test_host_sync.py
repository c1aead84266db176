"""A training step never waits for the device: no tensor value is read on the host.

On an accelerator every ``.item()``, ``bool(t)``, ``float(t)`` or ``.tolist()`` of a device
tensor makes the host wait until the device has run everything queued before it. There is
no GPU here, so the tests simulate one on the CPU: ``fastsel._checks.checks_on_host`` is
turned off (so value checks take their asynchronous device path and the score table
queues its updates, as they do on an accelerator), and the usual ways of reading a
tensor value on the host raise: ``item``, ``tolist``, ``bool``/``int``/``float``/index
conversion, ``cpu``, ``numpy`` and ``to("cpu")``. Syncs that go through none of them
(``nonzero``, boolean-mask indexing, ``torch.equal``) are not caught. A selector step, a sampler update, and each in-batch strategy's
choose then have to run through; reading their statistics or state afterwards may sync,
and does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastsel
from fastsel import _checks
from fastsel.strategies import MMS, HardLoss, InfoBatch, MaxEntropy, RhoLoss, Uniform
from fastsel.strategies.importance import CDFSampling, UpperBoundIS

C, D = 10, 8
# Ways to read a value on the host; copies to the host (.cpu(), .numpy(), .to("cpu")) too,
# which on a GPU wait for the device as well.
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class HostRead(AssertionError):
    pass


@pytest.fixture
def device_like():
    """Within the test: checks as on an accelerator, and host reads of tensors raise.
    Yields a function that runs a callable as on the CPU, host reads allowed (for the
    references and the asserts)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS + ("to",)}
    on_host = _checks.checks_on_host

    def to(self, *args, **kwargs):
        # a copy to the host names it ("cpu"); .to(x.device) with x on the device does not
        target = [a for a in args if isinstance(a, (str, torch.device))] + [kwargs.get("device")]
        if any(isinstance(t, str) and t.startswith("cpu") for t in target):
            raise HostRead("Tensor.to('cpu') called during a training step")
        return saved["to"](self, *args, **kwargs)

    def forbid():
        _checks.checks_on_host = lambda t: False
        for name in HOST_READS:
            def read(self, *args, _name=name, **kwargs):
                raise HostRead(f"Tensor.{_name} called during a training step")
            setattr(torch.Tensor, name, read)
        torch.Tensor.to = to

    def allow():
        _checks.checks_on_host = on_host
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)

    def with_host_reads(fn):
        allow()
        try:
            return fn()
        finally:
            forbid()

    forbid()
    try:
        yield with_host_reads
    finally:
        allow()


def test_the_fixture_catches_a_host_read(device_like):
    t = torch.ones(3)
    for read in (lambda: t.sum().item(), lambda: bool(t.any()), lambda: float(t[0]), lambda: t.tolist(),
                 lambda: int(t.long()[0]), lambda: t.cpu(), lambda: t.to("cpu"), lambda: t.to(device="cpu"),
                 lambda: t.numpy()):
        with pytest.raises(HostRead):
            read()
    assert device_like(lambda: float(t.sum())) == 3.0
    assert t.to(t.device, torch.float64).dtype == torch.float64  # a copy that stays put is allowed


def model_and_batch(n=96, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


@pytest.mark.parametrize("make, on", [
    (lambda: MMS(16), None), (lambda: HardLoss(16), None), (lambda: MaxEntropy(16), None),
    (lambda: Uniform(16), None),
    (lambda: CDFSampling(16), False), (lambda: CDFSampling(16, switch_ratio=None, reweight=True), True),
    (lambda: CDFSampling(16, replacement=True, reweight=True, switch_ratio=2.0), True),  # on at step 0
    (lambda: UpperBoundIS(16), False), (lambda: UpperBoundIS(16, tau_threshold=1.0, momentum=0.0), True),
], ids=["mms", "hard", "entropy", "uniform", "cdf-off", "cdf-on", "cdf-switching", "ub-off", "ub-on"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_selector_step_reads_nothing_on_the_host(device_like, monkeypatch, make, on, backend):
    if backend == "torch":  # "auto" then resolves to the pure-PyTorch ops, scoring and selection
        monkeypatch.setattr(fastsel.ops, "CPU_EXTENSION_AVAILABLE", False)
    model, x, y = model_and_batch()
    strategy = make()
    selector = fastsel.BatchSelector(model, strategy, head=model[2], seed=3)
    reference = fastsel.BatchSelector(model, make(), head=model[2], seed=3)
    for step in range(3):
        xs, ys, w = selector(x, y)
        # the same picks as on the CPU's host path (the step's result does not depend on it)
        xr, yr, wr = device_like(lambda: reference(x, y))
        assert device_like(lambda: torch.equal(ys, yr) and torch.equal(w, wr)), step
        loss = (nn.functional.cross_entropy(model(xs), ys, reduction="none") * w).mean()
        loss.backward()
    if on is not None:  # the switch is in the state the case is for
        assert device_like(lambda: strategy.active) == on
        if on and strategy.unbiased:
            assert device_like(lambda: not torch.equal(w, torch.ones_like(w)))  # importance weights
    stats = device_like(lambda: selector.stats)  # read afterwards: may sync
    assert stats["step"] == 2 and stats["selected"] == 16


def test_cdf_switch_decided_on_the_device_matches_the_host_rule(device_like):
    # losses 4, 2, 1: running mean (smoothing 0.5) 4, 3, 2 -> on at the third step (2 < 0.75 * 4)
    strategy = CDFSampling(2, switch_ratio=0.75, smoothing=0.5)
    for step, (loss, on) in enumerate([(4.0, False), (2.0, False), (1.0, True)]):
        v = torch.full((6,), loss)
        scores = fastsel.Scores(v, v, v, v, v, v, torch.zeros(6, dtype=torch.int64), None, v)
        strategy.choose(scores, step=step, seed=0)
        assert device_like(lambda: strategy.active) == on
    assert device_like(lambda: strategy.state_dict()) == {"strategy": "CDFSampling", "initial_loss": 4.0,
                                                          "running_loss": 2.0, "active": True}


def test_rho_loss_table_lookup_reads_nothing_on_the_host(device_like):
    table = torch.arange(100, dtype=torch.float32) / 10
    ids = torch.tensor([90, 3, 50, 7, 60, 1, 99, 20])
    strategy = RhoLoss(table, keep=3, ids=lambda inputs: inputs[1])
    scores = fastsel.score(torch.zeros(8, 4), torch.zeros(8, dtype=torch.int64))
    sel = strategy.choose(scores, step=0, seed=0, inputs=(None, ids), targets=None)
    assert device_like(lambda: sorted(ids[sel.indices].tolist())) == [1, 3, 7]


def test_sampler_update_reads_nothing_on_the_host_and_the_queued_table_matches(device_like):
    n, batch = 64, 16

    def run(sampler, plan=lambda f: f(), queues=False):
        g = torch.Generator().manual_seed(5)
        for epoch in range(2):
            # planning an epoch reads the (CPU) table: once an epoch, not a step
            batches = plan(lambda: list(sampler))
            for i, b in enumerate(batches):
                idx = torch.as_tensor(b)
                logits = torch.randn(len(b), C, generator=g)
                scores = fastsel.score(logits, torch.randint(0, C, (len(b),), generator=g))
                w = sampler.weights(idx)
                assert w.shape == idx.shape
                # the last update of an epoch copies the epoch's queued scores to the table
                # (one copy an epoch, not a step)
                if i < len(batches) - 1:
                    sampler.update(idx, scores)
                    if queues:  # an accelerator's scores wait on it until the epoch ends
                        assert len(sampler.table._queued) == i + 1
                else:
                    plan(lambda: sampler.update(idx, scores))
                    assert not sampler.table._queued  # applied at the end of the epoch

    def make():
        return fastsel.ScoreSampler(list(range(n)), InfoBatch(0.5), batch_size=batch, epochs=4, seed=1, drop_last=False)

    queued = make()
    run(queued, plan=device_like, queues=True)
    eager = make()
    device_like(lambda: run(eager))
    assert not eager.table._queued  # CPU values are applied at once
    want, got = eager.table.state_dict(), device_like(lambda: queued.table.state_dict())
    for key in ("last", "total", "finite"):
        for f in want[key]:
            assert torch.equal(got[key][f], want[key][f]), (key, f)
    assert torch.equal(got["count"], want["count"]) and torch.equal(got["last_epoch"], want["last_epoch"])
    assert device_like(lambda: queued.stats) == device_like(lambda: eager.stats)


def test_device_checks_still_catch_bad_indices(device_like):
    # on an accelerator the range check is an asynchronous assertion; on the CPU that
    # assertion fails at once
    sampler = fastsel.ScoreSampler(list(range(8)), InfoBatch(0.5), batch_size=4, epochs=1, drop_last=False)
    device_like(lambda: next(iter(sampler)))
    scores = fastsel.score(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"update: indices must be in \[0, 8\)"):
        sampler.update(torch.tensor([1, 8]), scores)


def test_cdf_without_switch_still_tracks_the_loss(device_like):
    strategy = CDFSampling(2, switch_ratio=None, smoothing=0.5)
    for step, loss in enumerate([4.0, 2.0]):
        v = torch.full((6,), loss)
        strategy.choose(fastsel.Scores(v, v, v, v, v, v, torch.zeros(6, dtype=torch.int64), None, v),
                        step=step, seed=0)
    assert device_like(lambda: strategy.stats()) == {"active": True, "initial_loss": 4.0, "running_loss": 3.0}


def test_score_table_queue_is_bounded_and_keeps_what_it_could_not_apply(device_like, monkeypatch):
    from fastsel.strategies.base import ScoreTable

    monkeypatch.setattr(ScoreTable, "MAX_QUEUED", 3)
    table = ScoreTable(10)
    for k in range(2):
        table.update_values(torch.tensor([k]), {"loss": torch.tensor([float(k + 1)])}, epoch=0)
    assert len(table._queued) == 2
    # the third waits for nothing: the queue is applied (one copy per MAX_QUEUED updates)
    device_like(lambda: table.update_values(torch.tensor([2]), {"loss": torch.tensor([3.0])}, epoch=0))
    assert not table._queued
    # an update that cannot be applied (an index a device assertion would have caught)
    # stays queued with the ones after it: every later read raises, none is lost silently
    table.update_values(torch.tensor([99]), {"loss": torch.tensor([1.0])}, epoch=1)
    table.update_values(torch.tensor([4]), {"loss": torch.tensor([5.0])}, epoch=1)
    for _ in range(2):
        with pytest.raises(IndexError):
            device_like(lambda: table.values("loss"))
        assert len(table._queued) == 2
    table._queued.pop(0)  # without the bad one, the rest applies
    got = device_like(lambda: table.values("loss")[:5].tolist())
    assert got[:3] == [1.0, 2.0, 3.0] and got[3] != got[3] and got[4] == 5.0


def test_sampler_stats_are_the_values_at_update_time(device_like):
    sampler = fastsel.ScoreSampler(list(range(8)), InfoBatch(0.5), batch_size=4, epochs=2, drop_last=False)
    batch = device_like(lambda: next(iter(sampler)))
    scores = fastsel.score(torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]),
                           torch.tensor([0, 0, 1, 1]))
    want = device_like(lambda: float(scores.loss.mean()))
    sampler.update(torch.tensor(batch), scores)
    scores.loss.zero_()  # the caller reuses its buffer before reading the stats
    assert device_like(lambda: sampler.stats["mean_loss"]) == pytest.approx(want)


def test_rho_loss_table_copy_follows_in_place_changes():
    table = torch.arange(10, dtype=torch.float32)
    strategy = RhoLoss(table, keep=1, ids=lambda inputs: inputs)
    meta = torch.device("meta")  # another device than the table's: a copy is made and kept
    first = strategy._table_on(meta)
    assert strategy._table_on(meta) is first
    table.mul_(2)  # changed in place: copied again
    assert strategy._table_on(meta) is not first
    assert strategy._table_on(table.device) is strategy.irreducible  # same device: no copy

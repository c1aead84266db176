"""A training step never waits for the device: no tensor value is read on the host.

On an accelerator every ``.item()``, ``bool(t)``, ``float(t)`` or ``.tolist()`` of a device
tensor makes the host wait until the device has run everything queued before it. There is
no GPU here, so the tests simulate one on the CPU: ``fastsel._checks.checks_on_host`` is
turned off (so value checks take their asynchronous device path and the score table
queues its updates, as they do on an accelerator), and every way of reading a tensor
value on the host raises. A selector step, a sampler update, and each in-batch strategy's
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
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class HostRead(AssertionError):
    pass


@pytest.fixture
def device_like():
    """Within the test: checks as on an accelerator, and host reads of tensors raise.
    Yields a function that runs a callable as on the CPU, host reads allowed (for the
    references and the asserts)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    on_host = _checks.checks_on_host

    def forbid():
        _checks.checks_on_host = lambda t: False
        for name in HOST_READS:
            def read(self, *args, _name=name, **kwargs):
                raise HostRead(f"Tensor.{_name} called during a training step")
            setattr(torch.Tensor, name, read)

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
                 lambda: int(t.long()[0])):
        with pytest.raises(HostRead):
            read()
    assert device_like(lambda: float(t.sum())) == 3.0


def model_and_batch(n=96, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


@pytest.mark.parametrize("make", [
    lambda: MMS(16), lambda: HardLoss(16), lambda: MaxEntropy(16), lambda: Uniform(16),
    lambda: CDFSampling(16), lambda: CDFSampling(16, switch_ratio=None, reweight=True),
    lambda: CDFSampling(16, replacement=True, switch_ratio=2.0),  # switches on at the first step
    lambda: UpperBoundIS(16), lambda: UpperBoundIS(16, tau_threshold=1.0),
], ids=["mms", "hard", "entropy", "uniform", "cdf", "cdf-on", "cdf-switching", "ub", "ub-on"])
def test_selector_step_reads_nothing_on_the_host(device_like, make):
    model, x, y = model_and_batch()
    strategy = make()
    selector = fastsel.BatchSelector(model, strategy, head=model[2], seed=3)
    reference = fastsel.BatchSelector(model, make(), head=model[2], seed=3)
    for step in range(3):
        xs, ys, w = selector(x, y)
        # the same picks as with host checks (the step's result does not depend on them)
        xr, yr, wr = device_like(lambda: reference(x, y))
        assert device_like(lambda: torch.equal(ys, yr) and torch.equal(w, wr)), step
        loss = (nn.functional.cross_entropy(model(xs), ys, reduction="none") * w).mean()
        loss.backward()
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
    assert device_like(lambda: strategy.state_dict()) == {"initial_loss": 4.0, "running_loss": 2.0, "active": True}


def test_rho_loss_table_lookup_reads_nothing_on_the_host(device_like):
    table = torch.arange(100, dtype=torch.float32) / 10
    ids = torch.tensor([90, 3, 50, 7, 60, 1, 99, 20])
    strategy = RhoLoss(table, keep=3, ids=lambda inputs: inputs[1])
    scores = fastsel.score(torch.zeros(8, 4), torch.zeros(8, dtype=torch.int64))
    sel = strategy.choose(scores, step=0, seed=0, inputs=(None, ids), targets=None)
    assert device_like(lambda: sorted(ids[sel.indices].tolist())) == [1, 3, 7]


def test_sampler_update_reads_nothing_on_the_host_and_the_queued_table_matches(device_like):
    n, batch = 64, 16

    def run(sampler, plan=lambda f: f()):
        g = torch.Generator().manual_seed(5)
        for epoch in range(2):
            # planning an epoch reads the (CPU) table: once an epoch, not a step
            batches = plan(lambda: list(sampler))
            for b in batches:
                idx = torch.as_tensor(b)
                logits = torch.randn(len(b), C, generator=g)
                scores = fastsel.score(logits, torch.randint(0, C, (len(b),), generator=g))
                sampler.update(idx, scores)
        return len(batches)

    def make():
        return fastsel.ScoreSampler(list(range(n)), InfoBatch(0.5), batch_size=batch, epochs=4, seed=1)

    queued = make()
    last_epoch_batches = run(queued, plan=device_like)  # updates queued (checks_on_host is off), applied when the next epoch is planned
    # an accelerator's values stay on it until the table is read: the last epoch's are still queued
    assert len(queued.table._queued) == last_epoch_batches > 0
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
    sampler = fastsel.ScoreSampler(list(range(8)), InfoBatch(0.5), batch_size=4, epochs=1)
    device_like(lambda: next(iter(sampler)))
    scores = fastsel.score(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"update: indices must be in \[0, 8\)"):
        sampler.update(torch.tensor([1, 8]), scores)

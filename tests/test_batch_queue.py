"""``BatchQueue``: Selective-Backprop's fixed-size backward batches. Every step sees exactly
``batch_size`` samples, no kept sample is lost or repeated, the weights travel with
their samples, structured inputs keep their structure, and the queue resumes exactly."""

from __future__ import annotations

import pytest
import torch

import fastsel
from fastsel.strategies import HardLoss, SelectiveBackprop

C = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, C))


def _stream(steps, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        x = torch.randn(n, 3, generator=g)
        yield x, torch.randint(0, C, (n,), generator=g), torch.arange(s * n, (s + 1) * n)


def test_selective_backprop_without_the_queue_gives_tiny_batches_and_with_it_full_ones():
    model = _model()
    bare = fastsel.BatchSelector(model, SelectiveBackprop(history_size=64), seed=1)
    sizes = [bare(x, y)[1].numel() for x, y, _ in _stream(40)]
    assert min(sizes) <= 1 and len(set(sizes)) > 3  # the hazard: random sizes, 0 or 1 among them

    sel = fastsel.BatchSelector(model, SelectiveBackprop(history_size=64), seed=1, logits_fn=lambda m, b: m(b[0]))
    queue = fastsel.BatchQueue(sel, batch_size=8)
    got, kept = [], []
    for x, y, ids in _stream(40):
        # the candidates' ids ride along as an input, to follow each kept sample
        for (xb, idb), yb, w in queue((x, ids), y):
            assert xb.shape == (8, 3) and idb.shape == (8,) and yb.shape == (8,) and w.shape == (8,)
            got.append(idb)
        kept.append(ids[sel.last_indices])
        assert queue.pending < 8
    rest = queue.flush()
    tail = rest[0][1] if rest is not None else torch.empty(0, dtype=torch.long)
    assert queue.pending == 0 and queue.flush() is None
    everything = torch.cat(got + [tail])
    assert torch.equal(everything, torch.cat(kept))  # all kept samples, once, in order
    assert len(got) == torch.cat(kept).numel() // 8 >= 3


def test_weights_travel_with_their_samples():
    """A strategy with non-unit weights: each sample's weight is the selector's."""
    from fastsel.strategies import CDFSampling

    sel = fastsel.BatchSelector(_model(), CDFSampling(keep=5, reweight=True, switch_ratio=1.0), seed=2,
                                logits_fn=lambda m, b: m(b[0]))
    queue = fastsel.BatchQueue(sel, batch_size=7)
    got_w = []
    for x, y, ids in _stream(12):
        for (xb, idb), yb, w in queue((x, ids), y):
            got_w.append(w)
    # compare against a plain selector with the same seed, step by step
    plain = fastsel.BatchSelector(_model(), CDFSampling(keep=5, reweight=True, switch_ratio=1.0), seed=2)
    ws = torch.cat([plain(x, y)[2] for x, y, _ in _stream(12)])
    assert len(got_w) == 60 // 7 and not torch.equal(ws, torch.ones_like(ws))  # weights that are not all 1
    assert torch.equal(torch.cat(got_w), ws[: 7 * len(got_w)])


def test_dict_inputs_and_resume():
    def run(stop_at=None, state=None):
        sel = fastsel.BatchSelector(_model(), HardLoss(keep=5), seed=3, logits_fn=lambda m, b: m(b["x"]))
        queue = fastsel.BatchQueue(sel, batch_size=6)
        if state is not None:
            queue.load_state_dict(state)
        out = []
        for step, (x, y, ids) in enumerate(_stream(10)):
            if state is not None and step < stop_at:
                continue
            for xb, yb, w in queue({"x": x, "id": ids}, y):
                out.append(xb["id"])
            if stop_at is not None and state is None and step + 1 == stop_at:
                return out, queue.state_dict()
        return out, None

    full, _ = run()
    first, state = run(stop_at=4)
    assert state["pending"] is not None  # something waits at the cut
    second, _ = run(stop_at=4, state=state)
    assert torch.equal(torch.cat(first + second), torch.cat(full))


def test_bad_arguments_and_tampered_state():
    sel = fastsel.BatchSelector(_model(), HardLoss(keep=5))
    with pytest.raises(TypeError, match="selector must be a fastsel.BatchSelector"):
        fastsel.BatchQueue(_model(), batch_size=4)
    for bad in (0, -1, 2.5, True):
        with pytest.raises((TypeError, ValueError), match="batch_size"):
            fastsel.BatchQueue(sel, batch_size=bad)
    queue = fastsel.BatchQueue(sel, batch_size=8)
    x, y, _ = next(_stream(1))
    queue(x, y)
    good = queue.state_dict()
    bad_states = [
        (dict(good, batch_size=9), ValueError, r"batch_size"),
        (dict(good, pending=(x, y)), TypeError, r"pending"),
        (dict(good, pending=(x[:5], y[:5], torch.ones(4))), ValueError, r"pending'\]\[2\]"),
        (dict(good, pending=(x[:4], y[:5], torch.ones(5))), ValueError, r"pending'\]\[0\]"),
        (dict(good, pending=(x[:8], y[:8], torch.ones(8))), ValueError, r"1 to 7"),
        ({"pending": None}, (KeyError, ValueError), r"batch_size|selector"),
    ]
    for state, exc, match in bad_states:
        with pytest.raises(exc, match=match):
            queue.load_state_dict(state)
        assert queue.pending == 5  # unchanged

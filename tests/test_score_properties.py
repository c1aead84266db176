"""Hypothesis property tests: every backend matches the float64 oracle, and invariants hold.

Logits are drawn from a small grid of floats (exact in every dtype, so ties are frequent and
exact) including -inf; a few rows may get a NaN or +inf. ``derandomize=True`` keeps CI
deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastsel
from fastsel_test_helpers import BACKENDS, FLOAT_DTYPES, assert_scores_close, logit_scale, oracle, python_oracle, tolerances

INF, NAN = math.inf, math.nan
GRID = [-INF, -8.0, -2.5, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0, 6.0]
WGRID = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)


@st.composite
def cases(draw, *, dtypes=FLOAT_DTYPES, poison=True, with_weight=True):
    n = draw(st.integers(0, 20))
    c = draw(st.integers(1, 50))
    dtype = draw(st.sampled_from(dtypes))
    z = draw(hnp.arrays(np.float64, (n, c), elements=st.sampled_from(GRID)))
    if poison and n > 0:
        for _ in range(draw(st.integers(0, 2))):
            i = draw(st.integers(0, n - 1))
            j = draw(st.integers(0, c - 1))
            z[i, j] = draw(st.sampled_from([NAN, INF]))
    ignore_index = draw(st.sampled_from([-100, -1, 1]))
    target = draw(st.lists(st.one_of(st.integers(0, c - 1), st.just(ignore_index)), min_size=n, max_size=n))
    weight, mms = None, "exact"
    if with_weight and draw(st.booleans()):
        d = draw(st.integers(1, 4))
        weight = torch.from_numpy(draw(hnp.arrays(np.float64, (c, d), elements=st.sampled_from(WGRID))))
        weight = weight.to(draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])))
        mms = draw(st.sampled_from(["exact", "top2"]))
    logits = torch.from_numpy(z).to(dtype)
    tdtype = draw(st.sampled_from([torch.int64, torch.int32]))
    return logits, torch.tensor(target, dtype=torch.int64).reshape(n).to(tdtype), weight, mms, ignore_index


def _valid_rows(logits):
    z = logits.double()
    if z.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    return torch.isfinite(z.amax(dim=1)) & ~torch.isnan(z).any(dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases())
def test_matches_oracle(backend, case):
    logits, target, weight, mms, ignore_index = case
    got = fastsel.score(logits, target, head=weight, mms=mms, ignore_index=ignore_index, backend=backend)
    want = oracle(logits, target, weight=weight, mms=mms, ignore_index=ignore_index)
    assert_scores_close(got, want, logits.dtype, logits=logits)


@SETTINGS
@given(case=cases())
def test_reference_matches_python_definition(case):
    """The oracle itself against the plain-Python transcription of the definitions."""
    logits, target, weight, mms, ignore_index = case
    want = python_oracle(logits, target, weight=weight, mms=mms, ignore_index=ignore_index)
    got = oracle(logits, target, weight=weight, mms=mms, ignore_index=ignore_index)
    assert_scores_close(got, want, torch.float64, logits=logits)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases())
def test_invariants(backend, case):
    logits, target, weight, mms, ignore_index = case
    n, c = logits.shape
    s = fastsel.score(logits, target, head=weight, mms=mms, ignore_index=ignore_index, backend=backend)
    valid = _valid_rows(logits)
    ignored = target.long() == ignore_index
    tol = 1e-5 if logits.dtype != torch.float64 else 1e-12
    # pred is an index into the row, and equals torch.argmax on every row.
    assert s.pred.tolist() == (logits.argmax(dim=1).tolist() if n else [])
    # Invalid rows: every float score NaN (the loss is 0 when the row is ignored).
    inv = ~valid
    for name in ("entropy", "margin", "true_margin", "grad_norm", "confidence", "lse") + (("mms",) if weight is not None else ()):
        assert torch.isnan(getattr(s, name)[inv]).all(), name
    assert torch.isnan(s.loss[inv & ~ignored]).all() and (s.loss[inv & ignored] == 0).all()

    v = valid
    ent = s.entropy[v].double()
    assert (ent >= -tol).all() and (ent <= math.log(c) * (1 + tol) + tol).all(), ent
    conf = s.confidence[v].double()
    assert (conf > 0).all() and (conf <= 1 + tol).all()
    assert (conf >= 1.0 / c - tol).all()  # the top class has at least the average probability
    assert (s.margin[v] >= 0).all()
    loss = s.loss[v].double()
    assert (loss >= 0).all() and not torch.isnan(loss).any()
    assert (s.loss[ignored] == 0).all()
    vt = v & ~ignored
    gn = s.grad_norm[vt].double()
    assert (gn >= 0).all() and (gn <= math.sqrt(2) + tol).all()
    assert (s.true_margin[vt] <= s.margin[vt]).all()
    # loss = -log p_y >= -log p_max = -log confidence.
    assert (s.loss[vt].double() >= -torch.log(s.confidence[vt].double()) - 1e-4).all()
    # Target-dependent scores are NaN exactly on ignored rows (for valid rows).
    assert torch.isnan(s.true_margin[v & ignored]).all() and torch.isnan(s.grad_norm[v & ignored]).all()
    assert not torch.isnan(s.true_margin[vt]).any() and not torch.isnan(s.grad_norm[vt]).any()
    if weight is not None:
        assert (s.mms[v] >= 0).all()
        # mms is 0 exactly when the top logit is tied (otherwise every ratio is > 0).
        assert torch.equal(s.mms[v] == 0, s.margin[v] == 0)
        if mms == "exact":  # the min over all competitors is at most the runner-up's ratio
            top2 = fastsel.score(logits, target, head=weight, mms="top2", ignore_index=ignore_index,
                                 backend=backend).mms
            assert (s.mms[v].double() <= top2[v].double() * (1 + tol)).all()
    if c == 1:
        assert (s.margin[v] == INF).all()


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=cases(dtypes=(torch.float32, torch.float64)),
       shifts=st.lists(st.sampled_from([-7.0, -1.5, 0.0, 3.0, 100.0]), min_size=20, max_size=20))
def test_shift_invariance(backend, case, shifts):
    logits, target, weight, mms, ignore_index = case
    n = logits.shape[0]
    shift = torch.tensor(shifts[:n], dtype=logits.dtype)
    shifted = logits + shift[:, None]
    # The grid values plus these shifts are exact in float32 and float64.
    assert torch.equal(torch.isnan(shifted), torch.isnan(logits))
    s0 = fastsel.score(logits, target, head=weight, mms=mms, ignore_index=ignore_index, backend=backend)
    s1 = fastsel.score(shifted, target, head=weight, mms=mms, ignore_index=ignore_index, backend=backend)
    rtol, atol = tolerances(logits.dtype, max(logit_scale(s0, shifted), 1.0))
    for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "mms"):
        a, b = getattr(s1, name), getattr(s0, name)
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert s1.pred.tolist() == s0.pred.tolist()
    torch.testing.assert_close(s1.lse, s0.lse + shift.to(s0.lse.dtype), rtol=rtol, atol=atol, equal_nan=True)

"""Values of ``fastsel.score`` against the float64 oracle and against the definitions.

Every test runs for every backend in ``fastsel.available_backends()``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel_test_helpers import (
    BACKENDS,
    requires_extension,
    FLOAT_DTYPES,
    assert_scores_close,
    oracle,
    out_dtype,
    python_oracle,
    random_logits,
    random_target,
    score_and_check,
    tolerances,
)

INF, NAN = math.inf, math.nan
NARROW = (torch.float16, torch.bfloat16)
dtype_ids = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}
all_dtypes = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: dtype_ids[d])


# --------------------------------------------------------------------------------------
# Shape / dtype grid against the oracle
# --------------------------------------------------------------------------------------

def _grid():
    for n in (0, 1, 7, 4097):
        for c in (1, 2, 3, 10, 1000, 32771):
            for dtype in FLOAT_DTYPES:
                for tdtype in (torch.int64, torch.int32):
                    marks = ()
                    if n * c > 10_000_000:
                        # 134M elements: the float64 oracle alone needs several GB.
                        if dtype != torch.float32 or tdtype != torch.int64:
                            continue
                        marks = (pytest.mark.slow,)
                    yield pytest.param(
                        n, c, dtype, tdtype, marks=marks,
                        id=f"N{n}-C{c}-{dtype_ids[dtype]}-{str(tdtype)[6:]}",
                    )


@pytest.mark.parametrize("n,c,dtype,tdtype", list(_grid()))
def test_grid_matches_oracle(backend, n, c, dtype, tdtype):
    logits = random_logits(n, c, scale=3.0, dtype=dtype, seed=n * 7 + c)
    target = random_target(n, c, seed=c, ignore_frac=0.1, dtype=tdtype)
    if n * c > 10_000_000:
        # Score the whole batch, check a strided subset of rows (plus the last ones) against
        # the float64 oracle, which would otherwise dominate the runtime.
        got = fastsel.score(logits, target, backend=backend)
        rows = torch.unique(torch.cat([torch.arange(0, n, 16), torch.arange(n - 5, n)]))
        sub = fastsel.Scores(*[None if f is None else f[rows] for f in got])
        assert_scores_close(sub, oracle(logits[rows], target[rows]), dtype, logits=logits[rows],
                            msg=f"N={n} C={c} (rows {rows.tolist()[:3]}...)")
    else:
        got = score_and_check(logits, target, backend, msg=f"N={n} C={c}")
    assert got.mms is None
    if n > 0:
        # The loss is always finite on finite inputs and never negative.
        assert torch.isfinite(got.loss).all()
        assert (got.loss >= 0).all()


def test_auto_backend_is_first_available(backend):
    """For CPU tensors "auto" is the C++ kernel when built, else pure PyTorch."""
    logits = random_logits(9, 17, seed=3)
    target = random_target(9, 17)
    auto = fastsel.score(logits, target)
    first = "cpu" if fastsel.CPU_EXTENSION_AVAILABLE else "torch"
    assert first == BACKENDS[0]
    explicit = fastsel.score(logits, target, backend=first)
    for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "pred", "lse"):
        torch.testing.assert_close(getattr(auto, name), getattr(explicit, name), rtol=0, atol=0)


def test_output_types(backend):
    for dtype in FLOAT_DTYPES:
        for tdtype in (torch.int32, torch.int64):
            logits = random_logits(4, 6, dtype=dtype)
            target = random_target(4, 6, dtype=tdtype)
            s = fastsel.score(logits, target, backend=backend)
            assert isinstance(s, fastsel.Scores) and isinstance(s, tuple) and len(s) == 10
            assert s.mms is None and s.cross_entropy is s.loss  # no class weights nor smoothing
            for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "lse"):
                t = getattr(s, name)
                assert t.dtype == out_dtype(dtype), (name, dtype, t.dtype)
                assert t.shape == (4,)
            assert s.pred.dtype == torch.int64 and s.pred.shape == (4,)
            w = torch.randn(6, 3)
            s = fastsel.score(logits, target, head=w, backend=backend)
            assert s.mms is not None and s.mms.dtype == out_dtype(dtype) and s.mms.shape == (4,)


# --------------------------------------------------------------------------------------
# Hand-made rows: independent pure-Python definition (checks the reference too)
# --------------------------------------------------------------------------------------

HAND_ROWS = [
    ([0.0, 0.0, 0.0, 0.0], 0),
    ([1.0, 2.0, 3.0, -2.0], 2),
    ([1.0, 2.0, 3.0, 0.5], 0),
    ([1.0, 3.0, 3.0, 0.0], 2),  # target tied with the max but not pred
    ([1.0, 3.0, 3.0, 0.0], 1),  # target is pred, tied
    ([5.0, 2.0, 3.0, 3.0], 3),  # runner-up tie
    ([-INF, 1.0, 0.5, -INF], 1),
    ([-INF, 1.0, 0.5, -INF], 0),  # target at -inf: loss +inf
    ([-INF, -INF, -INF, -INF], 2),  # invalid
    ([1.0, NAN, 5.0, NAN], 0),  # invalid
    ([1.0, INF, 5.0, INF], 0),  # invalid
    ([7.0, -INF, -INF, -INF], 0),  # only one finite class
    ([2.5, 2.5, 2.5, 2.5], 3),  # all equal
    ([-1e4, 1e4, 0.0, 1e4 - 1.0], 0),
]


@all_dtypes
def test_hand_rows_match_python_definition(backend, dtype):
    logits = torch.tensor([r for r, _ in HAND_ROWS], dtype=torch.float64).to(dtype)
    target = torch.tensor([t for _, t in HAND_ROWS])
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0]], dtype=torch.float64)
    for mms in ("exact", "top2"):
        want = python_oracle(logits, target, weight=weight, mms=mms)
        # The torch reference must agree with the plain-Python definition ...
        assert_scores_close(oracle(logits, target, weight=weight, mms=mms), want, torch.float64,
                            logits=logits, msg=f"reference vs definition ({mms})")
        # ... and so must the backend.
        got = fastsel.score(logits, target, head=weight, mms=mms, backend=backend)
        assert_scores_close(got, want, dtype, logits=logits, msg=f"mms={mms}")


# --------------------------------------------------------------------------------------
# Ties
# --------------------------------------------------------------------------------------

@all_dtypes
@pytest.mark.parametrize("c", [4, 37, 1000, 3000])
def test_ties_lowest_index_wins(backend, dtype, c):
    g = torch.Generator().manual_seed(c)
    base = -1.0 - torch.rand(6, c, generator=g, dtype=torch.float64) * 4  # all < -1
    base = base.to(dtype).double()
    # (positions holding the max value 2.0, target)
    positions = [
        ([1, 3], 3),
        ([0, c - 1], c - 1),
        ([c - 1, c - 2], c - 2) if c > 2 else ([0, 1], 1),
        ([c // 2, c // 3, c - 1], c // 3),
        ([2, c // 2 + 1], 2),
        (list(range(c)), 0),  # all equal
    ]
    target = []
    for i, (pos, t) in enumerate(positions):
        base[i, pos] = 2.0
        target.append(t)
    logits = base.to(dtype)
    target = torch.tensor(target)
    s = score_and_check(logits, target, backend, msg=f"ties C={c}")
    expected_pred = torch.tensor([min(p) for p, _ in positions])
    assert s.pred.tolist() == expected_pred.tolist()
    assert (s.margin == 0).all(), s.margin
    # Target tied with the max (whether or not it is pred): true margin 0.
    assert (s.true_margin == 0).all(), s.true_margin
    # Confidence is the probability of ONE of the tied maxima.
    k = torch.tensor([float(len(set(p))) for p, _ in positions], dtype=torch.float64)
    p_max = torch.softmax(logits.double(), dim=1).amax(dim=1)
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(s.confidence.double(), p_max, rtol=rtol, atol=atol)
    assert (s.confidence.double() <= 1.0 / k + 1e-6).all()
    # All-equal row: entropy = log C, confidence = 1/C, grad_norm = sqrt(1 - 1/C).
    torch.testing.assert_close(s.entropy[5].double().item(), math.log(c), rtol=rtol, atol=atol)
    torch.testing.assert_close(s.confidence[5].double().item(), 1.0 / c, rtol=rtol, atol=atol)
    torch.testing.assert_close(s.grad_norm[5].double().item(), math.sqrt(1 - 1.0 / c), rtol=rtol, atol=atol)
    # Tied maxima: exact mms is 0 (the point is on the boundary), and so is top2 mms.
    w = torch.randn(c, 5, generator=g)
    for mms in ("exact", "top2"):
        sm = score_and_check(logits, target, backend, weight=w, mms=mms)
        assert (sm.mms == 0).all(), (mms, sm.mms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: dtype_ids[d])
@pytest.mark.parametrize("c", [4, 37, 1000, 3000])
def test_top2_runner_up_is_lowest_index_among_remaining_maxima(backend, dtype, c):
    """Row: max 5 at ``a``; runner-up value 3 at positions r1 < r2 (< r3); rest below.

    The weight puts w_a at 0 and w_r1, w_r2, w_r3 at distances 1, 2, 4 from it, so
    top2 mms = 2 / ||w_a - w_runner|| tells which runner-up the backend chose: 2.0
    (lowest index r1) is right, 1.0 or 0.5 is wrong.
    """
    rows = []
    if c == 4:
        layouts = [(0, [2, 3]), (3, [1, 2]), (1, [0, 3]), (2, [0, 1, 3])]
    else:
        layouts = [(0, [c // 2, c - 1]), (c - 1, [5, c // 3, c - 2]), (c // 2, [1, c // 2 + 1]),
                   (7, [c - 9, c - 3]), (c // 3, [0, c // 3 + 17, c - 1])]
    for a, runners in layouts:
        z = torch.full((c,), 0.0, dtype=torch.float64)
        z[a] = 5.0
        z[runners] = 3.0
        rows.append((z, a, runners))
    logits = torch.stack([r[0] for r in rows]).to(dtype)
    target = torch.tensor([r[2][-1] for r in rows])  # target = a non-pred runner-up
    d = 3
    ones = torch.ones(d, dtype=torch.float64)
    for i, (z, a, runners) in enumerate(rows):
        # One weight per row so each row's runner-ups are at distances 1, 2, 4 from w_a.
        w = torch.zeros(c, d, dtype=torch.float64)
        w[a] = 10.0 * ones
        for k, r in enumerate(sorted(runners)):
            w[r] = w[a] + (2.0 ** k) * torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        others = [j for j in range(c) if j != a and j not in runners]
        w[others] = -10.0 * ones  # far away: every other class is far in both logit and W
        s = score_and_check(logits[i:i + 1], target[i:i + 1], backend, weight=w, mms="top2",
                            msg=f"row {i}")
        assert s.pred.item() == a
        assert s.margin.item() == 2.0
        assert s.true_margin.item() == -2.0
        got = s.mms.item()
        assert got == pytest.approx(2.0, rel=1e-5), (
            f"top2 mms {got}: runner-up should be index {min(runners)} (mms 2.0), "
            f"1.0 / 0.5 mean index {sorted(runners)[1:]} was used"
        )
        # The exact mms is the min over competitors: the farthest tied runner-up gives
        # 2 / 2**(k-1); every other class (logit 0, weight -10) gives 5 / (20 sqrt(D)).
        se = score_and_check(logits[i:i + 1], target[i:i + 1], backend, weight=w, mms="exact")
        want = 2.0 / 2.0 ** (len(runners) - 1)
        if others:
            want = min(want, 5.0 / (20.0 * math.sqrt(d)))
        assert se.mms.item() == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------------------
# Infinite and NaN entries
# --------------------------------------------------------------------------------------

@all_dtypes
@pytest.mark.parametrize("c", [5, 1000, 3000])
def test_neg_inf_entries(backend, dtype, c):
    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, c, generator=g, dtype=torch.float64) * 2
    z[0, 1] = -INF
    z[1, ::2] = -INF  # half the classes impossible
    z[2, 0] = -INF  # target below is 0: loss +inf
    z[3, :] = -INF  # invalid
    z[4, :-1] = -INF  # one finite class, last position
    z[5, c // 2:] = -INF
    logits = z.to(dtype)
    target = torch.tensor([0, 1, 0, 2, c - 1, 1])
    w = torch.randn(c, 4, generator=g)
    for mms in ("exact", "top2"):
        s = score_and_check(logits, target, backend, weight=w, mms=mms, msg=f"-inf C={c}")
        assert s.loss[2].item() == INF
        assert s.true_margin[2].item() == -INF
        assert math.isfinite(s.grad_norm[2].item()) and math.isfinite(s.entropy[2].item())
        # All -inf: every float score NaN, pred 0.
        for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "mms", "lse"):
            assert math.isnan(getattr(s, name)[3].item()), name
        assert s.pred[3].item() == 0
        # A single finite class: certain prediction, infinitely far from any boundary.
        assert s.pred[4].item() == c - 1
        assert s.loss[4].item() == 0.0 and s.entropy[4].item() == 0.0
        assert s.confidence[4].item() == 1.0 and s.grad_norm[4].item() == 0.0
        assert s.margin[4].item() == INF and s.true_margin[4].item() == INF and s.mms[4].item() == INF
        # Finite rows stay finite.
        for i in (0, 1, 5):
            for name in ("loss", "entropy", "margin", "confidence", "lse", "grad_norm"):
                assert math.isfinite(getattr(s, name)[i].item()), (i, name)


@all_dtypes
@pytest.mark.parametrize("c", [4, 1000, 3000])
def test_nan_and_posinf_rows(backend, dtype, c):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(8, c, generator=g, dtype=torch.float64)
    bad = {
        1: [(c // 2, NAN)],
        2: [(c - 1, INF)],
        3: [(1, INF), (c - 2, NAN)],  # +inf first, NaN later: argmax is the NaN
        4: [(0, -INF), (c - 1, INF)],
        6: [(c // 3, NAN), (c - 1, NAN)],  # first NaN wins
    }
    for i, entries in bad.items():
        for j, v in entries:
            z[i, j] = v
    logits = z.to(dtype)
    target = random_target(8, c, seed=2)
    target[6] = -100  # an ignored invalid row: loss 0
    w = torch.randn(c, 3, generator=g)
    s = score_and_check(logits, target, backend, weight=w, msg=f"nan/inf C={c}")
    # pred still follows torch.argmax on every row.
    assert s.pred.tolist() == torch.argmax(logits, dim=1).tolist()
    bad_rows = sorted(bad)
    good_rows = [i for i in range(8) if i not in bad]
    for name in ("entropy", "margin", "true_margin", "grad_norm", "confidence", "mms", "lse"):
        assert torch.isnan(getattr(s, name)[bad_rows]).all(), name
    assert torch.isnan(s.loss[[1, 2, 3, 4]]).all() and s.loss[6].item() == 0.0
    # The other rows are unaffected: same as scoring them alone.
    alone = fastsel.score(logits[good_rows], target[good_rows], head=w, backend=backend)
    for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "mms", "lse", "pred"):
        got_f = getattr(s, name)[good_rows]
        assert not (got_f.is_floating_point() and torch.isnan(got_f).any()), name
        torch.testing.assert_close(got_f, getattr(alone, name), rtol=1e-6, atol=1e-6)


def _rows_with_hidden_invalid_entries(c: int) -> tuple[torch.Tensor, list[int]]:
    """Rows whose NaN / +inf sit where a vectorized kernel could miss them.

    The CPU kernel finds NaN and +inf without a pass of its own (score_row_vectorized in
    csrc/cpu/score_kernel.cpp); these rows put them before and after the maximum, in the
    same vector lane as the maximum (offsets 8, 16, 32 cover 8- and 16-lane vectors),
    in a leading block of -inf, in every column block of wide rows, and next to ties at
    a maximum that a later block supersedes. Returns the rows and the indices of the
    invalid ones.
    """
    g = torch.Generator().manual_seed(c)
    base = torch.randn(c, generator=g, dtype=torch.float64)
    top = int(base.argmax())
    rows, invalid = [], []

    def add(entries, is_invalid=True):
        z = base.clone()
        for j, v in entries:
            z[j % c] = v
        rows.append(z)
        if is_invalid:
            invalid.append(len(rows) - 1)

    block = 4096
    for j in sorted({0, 1, top - 1, top + 1, top + 8, top + 16, top + 32, c // 2, c - 1}):
        add([(j, NAN)])
        add([(top, 50.0), (j if j != top else top + 1, NAN)])  # NaN next to a clear maximum
    for j in range(0, c, block):  # every column block
        add([(j + 5, NAN)])
        add([(j + 3, INF)])
        add([(j + 3, INF), (j + 7, NAN)])
    # A NaN in the lane of a larger element: pass 1 can lose that element.
    add([(top + 16, 60.0), (top + 32, NAN)])
    add([(top + 8, 60.0), (top + 16, NAN), (top + 24, 1.0)])
    # Ties at the maximum (valid) and a NaN among them (invalid).
    add([(top, 70.0), (top + 16, 70.0)], is_invalid=False)
    add([(top, 70.0), (top + 16, 70.0), (top + 32, NAN)])
    if c > block:
        lead = base.clone()
        lead[:block] = -INF
        lead[17] = NAN
        rows.append(lead)  # NaN in a leading block of -inf
        invalid.append(len(rows) - 1)
        tie = base.clone()
        tie[3], tie[9] = 40.0, 40.0  # tied maximum of the first block ...
        tie[c - 2] = 45.0  # ... superseded by a later block (valid)
        rows.append(tie)
        one = base.clone()
        one[3] = 40.0
        one[c - 2] = 45.0
        one[c - 1] = NAN  # a superseded single maximum, NaN in the last block
        rows.append(one)
        invalid.append(len(rows) - 1)
    return torch.stack(rows), invalid


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=lambda d: dtype_ids[d])
@pytest.mark.parametrize("c", [40, 200, 1000, 4096 + 37, 3 * 4096 + 5])
def test_invalid_entries_found_anywhere(backend, dtype, c):
    z, invalid = _rows_with_hidden_invalid_entries(c)
    logits = z.to(dtype)
    target = random_target(z.shape[0], c, seed=c)
    w = torch.randn(c, 3, generator=torch.Generator().manual_seed(1))
    s = score_and_check(logits, target, backend, weight=w, msg=f"hidden NaN/inf C={c}")
    assert s.pred.tolist() == torch.argmax(logits, dim=1).tolist()
    valid = [i for i in range(z.shape[0]) if i not in invalid]
    for name in ("entropy", "margin", "grad_norm", "confidence", "mms", "lse"):
        assert torch.isnan(getattr(s, name)[invalid]).all(), name
        assert not torch.isnan(getattr(s, name)[valid]).any(), name


# --------------------------------------------------------------------------------------
# ignore_index
# --------------------------------------------------------------------------------------

@all_dtypes
@pytest.mark.parametrize("ignore_index", [-100, 3, -1])
def test_ignore_index(backend, dtype, ignore_index):
    n, c = 12, 10
    logits = random_logits(n, c, dtype=dtype, seed=4)
    valid = random_target(n, c, seed=9)
    valid = torch.where(valid == ignore_index, torch.full_like(valid, 4), valid)
    ignored = torch.zeros(n, dtype=torch.bool)
    ignored[[0, 3, 4, 11]] = True
    target = torch.where(ignored, torch.full_like(valid, ignore_index), valid)
    w = torch.randn(c, 6)
    kw = {} if ignore_index == -100 else {"ignore_index": ignore_index}
    s = fastsel.score(logits, target, head=w, backend=backend, **kw)
    assert_scores_close(s, oracle(logits, target, weight=w, ignore_index=ignore_index), dtype, logits=logits)
    assert (s.loss[ignored] == 0).all()
    assert torch.isnan(s.true_margin[ignored]).all() and torch.isnan(s.grad_norm[ignored]).all()
    assert not torch.isnan(s.true_margin[~ignored]).any() and not torch.isnan(s.grad_norm[~ignored]).any()
    # Target-independent scores are the same as with a real target.
    ref = fastsel.score(logits, valid, head=w, backend=backend, **kw)
    for name in ("entropy", "margin", "confidence", "pred", "mms", "lse"):
        torch.testing.assert_close(getattr(s, name), getattr(ref, name), rtol=1e-6, atol=1e-6)
    # As F.cross_entropy(reduction="none", ignore_index=...).
    acc = out_dtype(dtype)
    ce = F.cross_entropy(logits.to(acc), target.long(), reduction="none", ignore_index=ignore_index)
    rtol, atol = tolerances(dtype, 3.0)
    torch.testing.assert_close(s.loss, ce, rtol=rtol, atol=atol)


def test_ignore_index_is_not_ignored_by_default(backend):
    """target == 3 is a real class unless ignore_index=3 is passed."""
    logits = random_logits(4, 10, seed=2)
    target = torch.tensor([3, 3, 1, 3])
    s = fastsel.score(logits, target, backend=backend)
    assert (s.loss > 0).all() and not torch.isnan(s.true_margin).any()
    s3 = fastsel.score(logits, target, ignore_index=3, backend=backend)
    assert s3.loss.tolist()[0] == 0.0 and s3.loss[2] > 0


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------

def _layout(kind, n, c, dtype, seed=0):
    big = random_logits(3 * n + 4, c + 9, dtype=dtype, seed=seed)
    if kind == "contiguous":
        return big[:n, :c].contiguous()
    if kind == "transposed":  # column-major
        x = big[:n, :c].contiguous()
        x = x.t().contiguous().t()
        assert x.stride() == (1, n) or n <= 1
        return x
    if kind == "col_slice":
        return big[:n, 2:2 + c]
    if kind == "row_stride":
        return big[: 2 * n: 2, :c]
    if kind == "both":
        return big[1: 1 + 3 * n: 3, 3: 3 + 2 * c: 2] if 3 + 2 * c <= c + 9 else big[1: 1 + 3 * n: 3, 4: 4 + c]
    if kind == "expanded":  # stride 0 along N
        return big[:1, :c].expand(n, c)
    raise AssertionError(kind)


LAYOUTS = ["transposed", "col_slice", "row_stride", "both", "expanded"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: dtype_ids[d])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("c", [3, 10, 1000])
def test_non_contiguous_logits(backend, dtype, kind, c):
    n = 13
    x = _layout(kind, n, c, dtype, seed=c)
    if kind != "expanded":
        assert not x.is_contiguous()
    target = random_target(n, c, ignore_frac=0.2)
    w = torch.randn(c, 5)
    s = score_and_check(x, target, backend, weight=w, msg=kind)
    # And the same values as the contiguous copy.
    sc = fastsel.score(x.contiguous(), target, head=w, backend=backend)
    for name in ("loss", "entropy", "margin", "pred", "mms", "lse"):
        torch.testing.assert_close(getattr(s, name), getattr(sc, name), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("tkind", ["strided", "int32_strided"])
def test_non_contiguous_target_and_weight(backend, tkind):
    n, c = 11, 7
    logits = random_logits(n, c, seed=1)
    big_t = random_target(2 * n, c, seed=3, ignore_frac=0.2,
                          dtype=torch.int32 if tkind == "int32_strided" else torch.int64)
    target = big_t[::2]
    assert not target.is_contiguous()
    w = torch.randn(c + 2, 8)[1: c + 1, ::2]  # non-contiguous weight
    assert not w.is_contiguous()
    wt = torch.randn(4, c).t()  # transposed weight
    for weight in (w, wt):
        for mms in ("exact", "top2"):
            score_and_check(logits, target, backend, weight=weight, mms=mms, msg=tkind)


# --------------------------------------------------------------------------------------
# Magnitudes and C = 1
# --------------------------------------------------------------------------------------

@all_dtypes
@pytest.mark.parametrize("c", [2, 10, 1000])
def test_large_logits(backend, dtype, c):
    g = torch.Generator().manual_seed(c)
    z = (torch.rand(9, c, generator=g, dtype=torch.float64) * 2 - 1) * 1e4
    z[0, :] = -1e4
    z[0, c - 1] = 1e4
    z[1, :] = 1e4
    z[1, 0] = 1e4 - 1.0
    z[2, :] = -1e4  # all equal and very negative
    z[3, :] = -1e4
    z[3, 1] = -1e4 + 0.5
    logits = z.to(dtype)
    target = random_target(9, c, seed=c)
    target[0] = 0  # loss ~ 2e4
    w = torch.randn(c, 7, generator=g)
    s = score_and_check(logits, target, backend, weight=w, msg=f"|z|<=1e4 C={c}")
    for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "mms", "lse"):
        assert torch.isfinite(getattr(s, name)).all(), name
    zr = logits.double()  # the values after rounding to dtype
    assert s.loss[0].item() == pytest.approx((zr[0, c - 1] - zr[0, 0]).item(), rel=1e-6)
    assert s.loss[0].item() > 1.9e4
    # float32 tolerance scaled by |z| (the torch fallback computes z - lse after rounding
    # lse to float32, which costs up to a few ulp(1e4) ~ 1e-3 in entropy).
    rtol, atol = tolerances(dtype, 1e4)
    assert s.entropy[2].item() == pytest.approx(math.log(c), rel=rtol, abs=atol)
    assert s.lse[2].item() == pytest.approx(zr[2, 0].item() + math.log(c), rel=1e-6)


@all_dtypes
def test_single_class(backend, dtype):
    logits = torch.tensor([[0.0], [3.5], [-7.0], [1e4], [-INF], [NAN], [2.0]], dtype=torch.float64).to(dtype)
    target = torch.tensor([0, 0, 0, 0, 0, 0, -100])
    w = torch.randn(1, 4)
    for mms in ("exact", "top2"):
        s = score_and_check(logits, target, backend, weight=w, mms=mms, msg="C=1")
        finite = [0, 1, 2, 3, 6]
        assert s.pred.tolist() == [0] * 7
        assert s.loss[finite].tolist() == [0.0] * 5
        assert s.entropy[finite].tolist() == [0.0] * 5
        assert s.confidence[finite].tolist() == [1.0] * 5
        assert s.margin[finite].tolist() == [INF] * 5
        assert s.mms[finite].tolist() == [INF] * 5
        assert s.true_margin[:4].tolist() == [INF] * 4
        assert s.grad_norm[:4].tolist() == [0.0] * 4
        assert math.isnan(s.true_margin[6].item()) and math.isnan(s.grad_norm[6].item())
        assert s.lse[finite].tolist() == logits[finite, 0].double().tolist()
        for name in ("entropy", "margin", "true_margin", "grad_norm", "confidence", "mms", "lse", "loss"):
            assert torch.isnan(getattr(s, name)[[4, 5]]).all(), name


# --------------------------------------------------------------------------------------
# MMS
# --------------------------------------------------------------------------------------

def _mms_brute(logits, weight, mode):
    """Minimal margin by direct evaluation of ||w_a - w_j|| (no Gram matrix), float64."""
    z = logits.double()
    w = weight.double()
    a = z.argmax(dim=1)
    diff = z.gather(1, a[:, None]) - z  # [N, C]
    dist = (w[a][:, None, :] - w[None, :, :]).norm(dim=2)  # [N, C]
    ratio = torch.where(diff == 0, torch.zeros_like(diff), diff / dist)
    ratio = ratio.scatter(1, a[:, None], INF)
    if mode == "exact":
        return ratio.min(dim=1).values
    rest = z.scatter(1, a[:, None], -INF)
    b = rest.argmax(dim=1)
    return ratio.gather(1, b[:, None]).squeeze(1)


@pytest.mark.parametrize("mms", ["exact", "top2"])
@pytest.mark.parametrize("c", [2, 10, 1000, 3000])
@pytest.mark.parametrize("d", [1, 3, 64])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: dtype_ids[d])
def test_mms_matches_oracle_and_brute_force(backend, mms, c, d, wdtype):
    n = 33 if c >= 1000 else 50
    logits = random_logits(n, c, seed=c + d)
    target = random_target(n, c, seed=d, ignore_frac=0.1)
    g = torch.Generator().manual_seed(17 * c + d)
    weight = torch.randn(c, d, generator=g).to(wdtype)
    s = score_and_check(logits, target, backend, weight=weight, mms=mms, msg=f"mms {mms} C={c} D={d}")
    brute = _mms_brute(logits, weight, mms)
    torch.testing.assert_close(s.mms.double(), brute, rtol=1e-4, atol=1e-5)
    assert (s.mms >= 0).all()
    if mms == "exact":
        top2 = fastsel.score(logits, target, head=weight, mms="top2", backend=backend).mms
        assert (s.mms <= top2 * (1 + 1e-5)).all()  # the min over all competitors <= runner-up's


def _gram_mms_float32(logits: torch.Tensor, weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The MMS as the CPU kernel computes it for C <= 256, op for op in float32.

    The kernel takes 1 / ||w_a - w_j|| from the Gram form (one ``mm``, ``sub`` with
    alpha 2, ``rsqrt``) and the row's exact MMS as min over j != a of (z_a - z_j) * that,
    or its top-2 MMS as (z_a - z_r) * that for the first runner-up r; 0 on a tie at the
    maximum, +inf without a finite competitor. A weight row holding NaN makes the exact
    MMS NaN on every other row (the rule of fastsel/reference.py); the top-2 MMS takes
    the NaN product of its own pair.
    Only for heads without near-duplicate classes (whose pairs the kernel recomputes
    from the row difference).
    """
    w = weight.float().contiguous()
    gram = torch.mm(w, w.t())
    sq = gram.diagonal()
    sum_sq = sq[:, None] + sq[None, :]
    d2 = torch.sub(sum_sq, gram, alpha=2)
    off_diagonal = ~torch.eye(len(w), dtype=torch.bool)
    assert not ((d2 < sum_sq / 64) & off_diagonal).any(), "a near-duplicate pair: not modelled"
    inv = d2.clamp_min(0).rsqrt()
    z = logits.float()
    top2 = z.topk(min(2, z.shape[1]), dim=1)
    za = top2.values[:, :1]
    a = z.argmax(dim=1)
    prod = (za - z) * inv[a]
    if mode == "exact":
        best = prod.scatter(1, a[:, None], INF).min(dim=1).values
        if not torch.isfinite(w).all():
            best = torch.full_like(best, NAN)
    else:
        runner_up = z.scatter(1, a[:, None], -INF).argmax(dim=1)  # the first one
        best = prod.gather(1, runner_up[:, None]).squeeze(1)
    if z.shape[1] == 1:
        return torch.full_like(best, INF)
    margin = top2.values[:, 0] - top2.values[:, 1]
    best = torch.where(torch.isfinite(margin) & (margin > 0), best, torch.full_like(best, INF))
    return torch.where(margin == 0, torch.zeros_like(best), best)


@requires_extension
@pytest.mark.parametrize("mms", ["exact", "top2"])
@pytest.mark.parametrize("c", [1, 2, 3, 10, 16, 17, 31, 32, 33, 100, 129, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: dtype_ids[d])
def test_gram_mms_bit_exact(c, dtype, mms):
    """C <= 256 and N >= C^2 (the Gram method): the kernel's MMS equals the float32 model
    bit for bit.

    Covers the lane-wise path (C <= 128, 16 rows at a time; the exact MMS with the
    inverse distances in registers up to C = 32, the top-2 MMS by one gather), the
    row-wise path above, a partial last group, ties at the maximum and at the runner-up,
    -inf logits, rows with a single finite class, and a class whose weight row is NaN
    (the exact MMS passes its products over).
    """
    g = torch.Generator().manual_seed(c)
    n = max(37, c * c + 5)  # fewer rows take the per-row distances (test_mms_matches_oracle...)
    logits = (3 * torch.randn(n, c, generator=g)).to(dtype)
    if c >= 2:
        logits[0, 0] = logits[0, 1] = logits[0].max() + 1  # tie at the maximum: 0
        logits[1, : c // 2] = -INF  # -inf entries
        logits[2] = -INF
        logits[2, c - 1] = 1.0  # a single finite class: +inf
    if c >= 3:
        logits[3, 1] = logits[3, 2] = logits[3].max() + 2  # ties at the max again, later
        logits[4, c - 1] = logits[4].max() + 1
        logits[4, 0] = logits[4, c // 2] = logits[4, c - 1] - 0.5  # tied runner-ups
    weight = torch.randn(c, 8, generator=g)
    if c >= 4:
        weight[c // 3] = float("nan")
    target = random_target(n, c, seed=3)
    got = fastsel.score(logits, target, head=weight, mms=mms, backend="cpu").mms
    want = _gram_mms_float32(logits, weight, mms)
    # the top-2 MMS of a row whose prediction or runner-up is the NaN class is NaN
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("c", [10, 40, 200])
def test_gram_mms_recomputes_cancelling_pairs(c):
    """The Gram method (C <= 256, N >= C^2) with rows that share a large component and a
    near-duplicate pair: ||w_a||^2 + ||w_j||^2 - 2 w_a.w_j cancels for every pair (in
    float32 the near-duplicate pair's distance, ~0.008 against norms ~160, would be lost
    entirely), so the kernel recomputes them from the row difference; both orders of the
    near-duplicate pair (as prediction and runner-up) must match brute force."""
    g = torch.Generator().manual_seed(c)
    weight = torch.randn(c, 64, generator=g) + 20.0
    weight[3] = weight[1] + 1e-3 * torch.randn(64, generator=g)
    n = c * c + 5
    logits = 3 * torch.randn(n, c, generator=g)
    for i, (a, r) in enumerate(((1, 3), (3, 1), (1, 2), (3, c - 1))):
        logits[i, a] = logits[i].max() + 1.0
        logits[i, r] = logits[i, a] - 0.25
    target = random_target(n, c, seed=5)
    for mms in ("exact", "top2"):
        got = fastsel.score(logits, target, head=weight, mms=mms, backend="cpu").mms
        torch.testing.assert_close(got.double(), _mms_brute(logits, weight, mms), rtol=1e-4, atol=1e-6)
    # the top-2 MMS of rows 0 and 1 is the near-duplicate pair's, both ways: 0.25 / ~0.008
    assert (got[:2] > 10).all()


def _mms_adversarial_batch(c: int, d: int):
    """Rows and a head that stress how the CPU kernel finds MMS candidates.

    The fused float path lists, while it scores a row, the columns near the top logit
    and takes the runner-up and the candidates from that list; how far down it lists
    adapts from row to row. The rows here defeat it every way: a top logit far above the
    rest (everything listed, more than the list holds), a flat row (every column ties
    with the runner-up), runner-up ties late in the row, near-duplicate class rows (a
    candidate reach far beyond the estimate: the row sweeps itself), classes far from
    the others (candidates other than the runner-up win), and plain random rows between
    them, so that the estimate moves up and down.
    """
    g = torch.Generator().manual_seed(c * 31 + d)
    weight = torch.randn(c, d, generator=g)
    weight[7] = weight[5] + 1e-3 * torch.randn(d, generator=g)  # near-duplicate classes 5 and 7
    weight[c - 1] *= 8.0  # a class far from all others
    rows = [torch.randn(c, generator=g) * 3 for _ in range(40)]
    top_apart = torch.randn(c, generator=g)
    top_apart[c // 2] = 60.0
    flat = torch.zeros(c)
    flat[3] = 1.0
    late_ties = torch.randn(c, generator=g) - 10
    late_ties[1] = 5.0
    late_ties[[c - 3, c - 2]] = 4.0  # the runner-up is the first of two tied, at the end
    near_dup = torch.randn(c, generator=g)
    near_dup[5], near_dup[7] = 9.0, 8.999  # a = 5, r = 7: ||w_5 - w_7|| is tiny
    far_class = torch.randn(c, generator=g)
    far_class[0], far_class[1], far_class[c - 1] = 6.0, 5.5, 5.0
    special = [top_apart, flat, late_ties, near_dup, far_class]
    for k, row in enumerate(special):  # spread among the random rows
        rows.insert(5 + 8 * k, row)
    return torch.stack(rows), weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: dtype_ids[d])
@pytest.mark.parametrize("c", [200, 300, 1000, 4096])
def test_mms_exact_adversarial_rows_and_batch_independence(backend, c, dtype):
    """The exact and top-2 MMS match brute force on rows built to defeat the candidate
    lists, and a row's MMS does not depend on the rows scored with it (bit for bit): the
    lists only change the cost, never which candidates are compared or in which order."""
    logits, weight = _mms_adversarial_batch(c, 64)
    logits = logits.to(dtype)
    n = logits.shape[0]
    target = random_target(n, c)
    for mms in ("exact", "top2"):
        s = score_and_check(logits, target, backend, weight=weight, mms=mms, msg=f"adversarial {mms}")
        torch.testing.assert_close(s.mms.double(), _mms_brute(logits, weight, mms), rtol=1e-4, atol=1e-5)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(c))
        shuffled = fastsel.score(logits[order], target[order], head=weight, mms=mms, backend=backend)
        assert torch.equal(shuffled.mms, s.mms[order]), mms
        for i in (0, 5, 13, 21, 29, 37, n - 1):
            alone = fastsel.score(logits[i:i + 1], target[i:i + 1], head=weight, mms=mms, backend=backend)
            assert torch.equal(alone.mms, s.mms[i:i + 1]), (mms, i)
    exact = fastsel.score(logits, target, head=weight, mms="exact", backend=backend).mms
    top2 = fastsel.score(logits, target, head=weight, mms="top2", backend=backend).mms
    assert (exact < top2).any()  # some row's minimum is not its runner-up: candidates were needed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: dtype_ids[d])
@pytest.mark.parametrize("c", [300, 1000, 5000])
def test_mms_head_changes_no_value(backend, c, dtype):
    """An MmsHead (each class's largest distance, precomputed) only prunes the exact search:
    the MMS is bit for bit the same as with the plain weight, on the rows built to defeat
    the candidate lists (near-duplicate classes, a far class, a top logit far above the
    rest), for rows of one block and wider, and for the top-2 MMS (which ignores it)."""
    logits, weight = _mms_adversarial_batch(c, 64)
    logits = logits.to(dtype)
    target = random_target(logits.shape[0], c)
    head = fastsel.mms_head(weight)
    assert head.max_distance.shape == (c,) and head.max_distance.dtype == torch.float64
    for mms in ("exact", "top2"):
        plain = fastsel.score(logits, target, head=weight, mms=mms, backend=backend).mms
        with_head = fastsel.score(logits, target, head=head, mms=mms, backend=backend).mms
        assert torch.equal(with_head, plain), mms
        torch.testing.assert_close(with_head.double(), _mms_brute(logits, weight, mms), rtol=1e-4, atol=1e-5)


def test_mms_head_max_distance_is_an_upper_bound_and_is_used():
    """max_distance bounds every pair's distance from above (tightly: the maximum itself,
    up to the rounding room), and the CPU kernel really prunes with it: a head whose
    bounds are too small (not one mms_head makes) drops the candidates that beat the
    runner-up, so its exact MMS falls back to the top-2 one."""
    logits, weight = _mms_adversarial_batch(1000, 64)
    target = random_target(logits.shape[0], 1000)
    head = fastsel.mms_head(weight)
    dist = torch.cdist(weight.double(), weight.double())
    assert (dist <= head.max_distance[:, None]).all()
    torch.testing.assert_close(head.max_distance, dist.amax(dim=1), rtol=1e-4, atol=0)
    # more classes than one block of rows (mms_head never holds [C, C]), and C = 1
    wide = torch.randn(5000, 8, generator=torch.Generator().manual_seed(2))
    wide_dist = torch.cdist(wide.double(), wide.double()).amax(dim=1)
    torch.testing.assert_close(fastsel.mms_head(wide).max_distance, wide_dist, rtol=1e-4, atol=0)
    assert fastsel.mms_head(torch.randn(1, 8)).max_distance.shape == (1,)
    exact = fastsel.score(logits, target, head=weight, backend="cpu").mms
    top2 = fastsel.score(logits, target, head=weight, mms="top2", backend="cpu").mms
    assert (exact < top2).any()  # some rows need their candidates
    wrong = fastsel.MmsHead(weight, torch.full((1000,), 1e-6, dtype=torch.float64), head.version)
    assert torch.equal(fastsel.score(logits, target, head=wrong, backend="cpu").mms, top2)


def test_mms_head_bad_input_and_stale_weight():
    weight = torch.randn(50, 8)
    head = fastsel.mms_head(weight)
    logits, target = random_logits(4, 50), random_target(4, 50)
    for bad, err in ((torch.randn(50), ValueError), (torch.zeros(0, 4), ValueError),
                     (torch.ones(5, 4, dtype=torch.int64), TypeError), ([[1.0]], TypeError)):
        with pytest.raises(err, match="weight"):
            fastsel.mms_head(bad)
    with pytest.raises(ValueError, match=r"max_distance must be \[C\] = \[50\]"):
        fastsel.score(logits, target, head=head._replace(max_distance=torch.ones(49, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"head must be the classifier matrix of shape \[C, D\] = \[7"):
        fastsel.score(random_logits(4, 7), random_target(4, 7), head=head)  # a head of another layer
    with pytest.raises(RuntimeError, match="max_distance must be a floating point"):
        torch.ops.fastsel.score_forward(logits, target, -100, weight, 1, torch.ones(50, dtype=torch.int64))
    fastsel.score(logits, target, head=head)  # fine while the weight is unchanged
    with torch.no_grad():
        weight.mul_(2)  # an optimizer step, say
    with pytest.raises(ValueError, match="modified in place after fastsel.mms_head"):
        fastsel.score(logits, target, head=head)
    with torch.inference_mode():  # an inference tensor has no version to check
        w = torch.randn(50, 8)
        fastsel.score(logits, target, head=fastsel.mms_head(w))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: dtype_ids[d])
@pytest.mark.parametrize("mms", ["exact", "top2"])
def test_mms_logit_dtypes_and_empty_batch(backend, dtype, mms):
    for n, c in ((0, 5), (1, 5), (17, 2100)):
        logits = random_logits(n, c, dtype=dtype, seed=n)
        target = random_target(n, c)
        weight = torch.randn(c, 16, generator=torch.Generator().manual_seed(c)).to(torch.float32)
        s = score_and_check(logits, target, backend, weight=weight, mms=mms)
        assert s.mms.shape == (n,)
        if n:
            torch.testing.assert_close(s.mms.double(), _mms_brute(logits, weight, mms), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# Relations that must hold
# --------------------------------------------------------------------------------------

@all_dtypes
def test_confidence_is_exp_neg_loss_when_correct(backend, dtype):
    n, c = 40, 16
    logits = random_logits(n, c, scale=4.0, dtype=dtype, seed=8, distinct=True)
    target = logits.argmax(dim=1)  # pred == target, no ties
    s = fastsel.score(logits, target, backend=backend)
    assert (s.pred == target).all()
    rtol, atol = tolerances(dtype, 4.0)
    torch.testing.assert_close(s.confidence, torch.exp(-s.loss), rtol=rtol, atol=atol)
    # And the true margin is the margin.
    torch.testing.assert_close(s.true_margin, s.margin, rtol=rtol, atol=atol)


@all_dtypes
@pytest.mark.parametrize("c", [2, 10, 1000])
def test_loss_equals_cross_entropy(backend, dtype, c):
    n = 64
    logits = random_logits(n, c, scale=5.0, dtype=dtype, seed=c)
    target = random_target(n, c, seed=1, ignore_frac=0.1)
    s = fastsel.score(logits, target, backend=backend)
    acc = out_dtype(dtype)
    ce = F.cross_entropy(logits.to(acc), target, reduction="none")
    rtol, atol = tolerances(dtype, 5.0)
    torch.testing.assert_close(s.loss, ce, rtol=rtol, atol=atol)
    torch.testing.assert_close(s.lse, torch.logsumexp(logits.to(acc), dim=1), rtol=rtol, atol=atol)


@all_dtypes
@pytest.mark.parametrize("c", [2, 10, 1000])
def test_definitions_against_torch_ops(backend, dtype, c):
    """Entropy, grad_norm, confidence, margins from softmax / topk in float64."""
    n = 48
    logits = random_logits(n, c, scale=3.0, dtype=dtype, seed=c + 1, distinct=(dtype not in NARROW or c <= 10))
    target = random_target(n, c, seed=2)
    s = fastsel.score(logits, target, backend=backend)
    z = logits.double()
    p = torch.softmax(z, dim=1)
    onehot = F.one_hot(target, c).double()
    rtol, atol = tolerances(dtype, 3.0)
    torch.testing.assert_close(s.entropy.double(), -(p * torch.log_softmax(z, 1)).sum(1), rtol=rtol, atol=atol)
    torch.testing.assert_close(s.grad_norm.double(), (p - onehot).norm(dim=1), rtol=rtol, atol=atol)
    torch.testing.assert_close(s.grad_norm.double() ** 2,
                               (p * p).sum(1) - 2 * p.gather(1, target[:, None]).squeeze(1) + 1,
                               rtol=rtol, atol=atol)
    torch.testing.assert_close(s.confidence.double(), p.amax(1), rtol=rtol, atol=atol)
    top = z.topk(2, dim=1).values
    torch.testing.assert_close(s.margin.double(), top[:, 0] - top[:, 1], rtol=rtol, atol=atol)
    others = z.scatter(1, target[:, None], -INF).amax(1)
    torch.testing.assert_close(s.true_margin.double(), z.gather(1, target[:, None]).squeeze(1) - others,
                               rtol=rtol, atol=atol)
    assert s.pred.tolist() == z.argmax(1).tolist()


@all_dtypes
def test_probability_margin_identity(backend, dtype):
    """p_(1) - p_(2) = confidence * (1 - exp(-margin)) (docs/methods.md section 1)."""
    n, c = 50, 12
    logits = random_logits(n, c, scale=2.0, dtype=dtype, seed=21)
    target = random_target(n, c)
    s = fastsel.score(logits, target, backend=backend)
    p = torch.softmax(logits.double(), dim=1).topk(2, dim=1).values
    lhs = p[:, 0] - p[:, 1]
    rhs = s.confidence.double() * (1 - torch.exp(-s.margin.double()))
    rtol, atol = tolerances(dtype, 2.0)
    torch.testing.assert_close(rhs, lhs, rtol=rtol, atol=atol)


def test_inputs_not_mutated(backend):
    n, c = 9, 6
    for dtype in FLOAT_DTYPES:
        logits = random_logits(n, c + 3, dtype=dtype, seed=2)[:, 1: c + 1]
        logits[0, 0] = -INF
        logits[1, 2] = NAN
        target = random_target(2 * n, c, ignore_frac=0.3)[::2]
        weight = torch.randn(c, 4).to(dtype)
        copies = [t.clone() for t in (logits, target, weight)]
        strides = [t.stride() for t in (logits, target, weight)]
        for mms in ("exact", "top2"):
            fastsel.score(logits, target, head=weight, mms=mms, backend=backend)
        leaf = logits.detach().clone().requires_grad_(True)
        fastsel.score(leaf, target, backend=backend).loss.nan_to_num().sum().backward()
        for orig, now, st in zip(copies, (logits, target, weight), strides):
            torch.testing.assert_close(now, orig, rtol=0, atol=0, equal_nan=True)
            assert now.stride() == st


# --------------------------------------------------------------------------------------
# One-pass (online) accumulation: the running maximum moves along the row
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=lambda d: dtype_ids[d])
@pytest.mark.parametrize("c", [7, 33, 1000, 3000])
def test_running_max_moves(backend, dtype, c):
    """Rows whose maximum keeps moving (ascending), jumps late by a lot, or sits first.

    A wrong rescaling of the running sums (d, s1, s2 in docs/methods.md) shows up here.
    """
    ramp = torch.linspace(-20.0, 20.0, c, dtype=torch.float64)
    rows = [
        ramp,  # ascending: the max moves at every element
        ramp.flip(0),  # max first
        torch.cat([torch.full((c - 1,), -50.0, dtype=torch.float64), torch.tensor([60.0], dtype=torch.float64)]),
        torch.cat([torch.tensor([60.0], dtype=torch.float64), torch.full((c - 1,), -50.0, dtype=torch.float64)]),
        torch.where(torch.arange(c) % 2 == 0, ramp, -ramp),  # zigzag
        torch.cat([ramp[: c // 2] - 500.0, ramp[c // 2:] + 500.0]),  # big late jump
        (torch.arange(c, dtype=torch.float64) % 5) * 0.25,  # many exact ties of the max
    ]
    logits = torch.stack(rows).to(dtype)
    n = logits.shape[0]
    target = torch.tensor([0, c - 1, c // 2, 0, 1 % c, c - 2, 4 % c])
    w = torch.randn(c, 6, generator=torch.Generator().manual_seed(c))
    for mms in ("exact", "top2"):
        score_and_check(logits, target, backend, weight=w, mms=mms, msg=f"running max C={c}")
    s = fastsel.score(logits, target, backend=backend)
    assert s.pred.tolist() == logits.argmax(dim=1).tolist()
    assert torch.isfinite(s.entropy).all() and (s.entropy >= -1e-6).all()
    assert n == 7


def test_repeatable_and_thread_count_independent(backend):
    """Same input, same output bits on a second call; 1 thread agrees with the default."""
    logits = random_logits(4097, 1000, seed=12)
    target = random_target(4097, 1000, ignore_frac=0.1)
    w = torch.randn(1000, 16)
    a = fastsel.score(logits, target, head=w, backend=backend)
    b = fastsel.score(logits, target, head=w, backend=backend)
    for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "pred", "mms", "lse"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fastsel.score(logits, target, head=w, backend=backend)
    finally:
        torch.set_num_threads(threads)
    assert_scores_close(one, oracle(logits, target, weight=w), torch.float32, logits=logits)
    for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "pred", "mms", "lse"):
        torch.testing.assert_close(getattr(one, name), getattr(a, name), rtol=1e-6, atol=1e-6, equal_nan=True)


# --------------------------------------------------------------------------------------
# The widest rows the issue asks for (C = 2^18): many column blocks, the maximum moving
# from block to block (rebasing the sums), exact and top-2 MMS without any C x C work.
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: dtype_ids[d])
def test_widest_rows(backend, dtype):
    c = 1 << 18
    logits = random_logits(3, c, dtype=dtype, seed=5)
    # Row 1: an increasing ramp, so every block raises the running maximum.
    logits[1] = torch.linspace(-20, 20, c).to(dtype)
    target = torch.tensor([7, c - 1, -100])
    weight = torch.randn(c, 4, generator=torch.Generator().manual_seed(6))
    for mms in ("exact", "top2"):
        score_and_check(logits, target, backend, weight=weight, mms=mms, msg=f"C=2^18 {mms}")

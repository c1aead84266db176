"""Selection ops: values against the reference, cross-backend identity, edge cases, bad
input, History state, opcheck and torch.compile. (Distributions: test_select_stats.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import fastsel
from fastsel import reference as R
from fastsel_test_helpers import BACKENDS, requires_extension

NAN, INF = math.nan, math.inf
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def stable_topk(scores: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Brute force in Python: sort by (NaN last, value in the direction, index)."""
    vals = scores.double().tolist()
    def key(i):
        v = vals[i]
        if math.isnan(v):
            return (1, 0.0, i)
        return (0, -v if largest else v, i)
    return torch.tensor(sorted(range(len(vals)), key=key)[:k], dtype=torch.long)


# ---- select_topk ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("n", [1, 7, 100, 4097])
def test_topk_matches_brute_force(backend, dtype, largest, n):
    g = torch.Generator().manual_seed(n)
    s = torch.randn(n, generator=g).to(dtype)
    s[::5] = 0.5                     # ties
    s[1::9] = NAN
    s[2::13] = -0.0
    s[3::13] = 0.0                   # -0 and +0 tie
    s[4::17] = INF
    s[5::19] = -INF
    for k in sorted({0, 1, n // 3, n}):
        sel = fastsel.select_topk(s, k, largest, backend=backend)
        assert sel.indices.dtype == torch.int64 and sel.indices.shape == (k,)
        assert torch.equal(sel.indices, stable_topk(s, k, largest)), (k, largest)
        assert torch.equal(sel.weights, torch.ones(k))
        assert sel.scores is s


def test_topk_ties_take_lowest_index_first(backend):
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert fastsel.select_topk(s, 2, backend=backend).indices.tolist() == [1, 2]
    assert fastsel.select_topk(s, 4, largest=False, backend=backend).indices.tolist() == [0, 3, 1, 2]


def test_topk_nan_ranks_last_in_both_directions(backend):
    s = torch.tensor([NAN, 1.0, NAN, -INF, INF])
    assert fastsel.select_topk(s, 5, True, backend=backend).indices.tolist() == [4, 1, 3, 0, 2]
    assert fastsel.select_topk(s, 5, False, backend=backend).indices.tolist() == [3, 1, 4, 0, 2]


def test_topk_non_contiguous_and_empty(backend):
    base = torch.randn(200)
    s = base[::2]
    assert not s.is_contiguous()
    assert torch.equal(fastsel.select_topk(s, 10, backend=backend).indices,
                       fastsel.select_topk(s.contiguous(), 10, backend=backend).indices)
    empty = fastsel.select_topk(torch.empty(0), 0, backend=backend)
    assert empty.indices.shape == (0,) and empty.weights.shape == (0,)


@requires_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_cpu_equals_reference_large(dtype):
    s = torch.randn(300_000).to(dtype)  # low-precision dtypes: many ties
    for k in (1, 30_000, 299_999):
        assert torch.equal(torch.ops.fastsel.select_topk(s, k, True), R.select_topk_reference(s, k, True))


# ---- sample -----------------------------------------------------------------------------

@requires_extension
@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("n", [1, 9, 1000, 70_001])
def test_sample_cpu_and_reference_pick_the_same_indices(replacement, n):
    g = torch.Generator().manual_seed(n)
    w = torch.rand(n, generator=g)
    w[::4] = 0.0
    w[-1] = 0.25
    nonzero = int((w > 0).sum())
    for seed in (0, 12345, R.MAX_SEED):
        for counter in (0, 7, R.MAX_SEED):
            for k in sorted({1, nonzero // 2 + 1, nonzero} | ({3 * n} if replacement else set())):
                a = fastsel.sample(w, k, replacement=replacement, seed=seed, counter=counter, backend="cpu")
                b = fastsel.sample(w, k, replacement=replacement, seed=seed, counter=counter, backend="torch")
                assert torch.equal(a.indices, b.indices), (seed, counter, k)
                torch.testing.assert_close(a.weights, b.weights, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sample_accepts_every_float_dtype(backend, dtype):
    w = torch.rand(50).to(dtype) + 0.1
    sel = fastsel.sample(w, 10, seed=1, backend=backend)
    assert sel.indices.unique().numel() == 10
    want = fastsel.sample(w.float(), 10, seed=1, backend=backend)  # used in float32
    assert torch.equal(sel.indices, want.indices)


def test_sample_without_replacement_distinct_and_in_range(backend):
    w = torch.rand(500) + 0.01
    sel = fastsel.sample(w, 500, seed=3, backend=backend)
    assert sorted(sel.indices.tolist()) == list(range(500))  # k = N is a permutation


def test_sample_weights_are_normalised_inverse_importance(backend):
    w = torch.tensor([1.0, 2.0, 4.0, 0.0, 8.0])
    sel = fastsel.sample(w, 3, seed=5, backend=backend)
    inv = 1.0 / w[sel.indices].double()
    torch.testing.assert_close(sel.weights.double(), inv * 3 / inv.sum(), rtol=1e-6, atol=0)
    assert sel.weights.dtype == torch.float32
    assert abs(float(sel.weights.mean()) - 1.0) < 1e-6


def test_sample_k_zero_and_empty_importance(backend):
    for replacement in (False, True):
        sel = fastsel.sample(torch.rand(5), 0, replacement=replacement, seed=0, backend=backend)
        assert sel.indices.shape == (0,) and sel.weights.shape == (0,)
        sel = fastsel.sample(torch.empty(0), 0, replacement=replacement, seed=0, backend=backend)
        assert sel.indices.shape == (0,)


def test_sample_with_replacement_may_exceed_n(backend):
    sel = fastsel.sample(torch.tensor([1.0, 1.0]), 10, replacement=True, seed=0, backend=backend)
    assert sel.indices.shape == (10,) and set(sel.indices.tolist()) <= {0, 1}


def test_sample_does_not_mutate_input(backend):
    w = torch.rand(100)
    before = w.clone()
    fastsel.sample(w, 10, seed=0, backend=backend)
    fastsel.sample(w, 10, replacement=True, seed=0, backend=backend)
    assert torch.equal(w, before)


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("bad, message", [
    ([1.0, NAN, 2.0], r"importance must not contain NaN; importance\[1\] is NaN"),
    ([1.0, 2.0, -0.5], r"importance must be non-negative; importance\[2\] = -0.5"),
    ([INF, 1.0, 1.0], r"importance must be finite; importance\[0\] = inf"),
    ([0.0, 0.0, 0.0], r"importance is all zero"),
])
def test_sample_rejects_bad_importance(backend, replacement, bad, message):
    with pytest.raises(ValueError, match=message):
        fastsel.sample(torch.tensor(bad), 1, replacement=replacement, seed=0, backend=backend)


def test_sample_rejects_k_above_nonzero_without_replacement(backend):
    with pytest.raises(ValueError, match=r"k = 3 exceeds the number of nonzero importances \(2\)"):
        fastsel.sample(torch.tensor([1.0, 0.0, 2.0]), 3, seed=0, backend=backend)
    with pytest.raises(ValueError, match="k = 4 exceeds N = 3"):
        fastsel.sample(torch.tensor([1.0, 1.0, 2.0]), 4, seed=0, backend=backend)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(k=-1), ValueError, "k must be >= 0"),
    (dict(k=1.5), TypeError, "k must be an int"),
    (dict(k=1, seed=-1), ValueError, r"seed must be in \[0, 2\^63\)"),
    (dict(k=1, seed=2**63), ValueError, r"seed must be in \[0, 2\^63\)"),
    (dict(k=1, counter=-3), ValueError, r"counter must be in \[0, 2\^63\)"),
    (dict(k=1, seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    (dict(k=1, replacement=1), TypeError, "replacement must be a bool"),
    (dict(k=1, backend="gpu"), ValueError, "backend must be one of"),
])
def test_sample_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fastsel.sample(torch.rand(4), **kwargs)


@pytest.mark.parametrize("bad, error, message", [
    (torch.rand(2, 3), ValueError, r"importance must be 1-D \[N\], got shape \(2, 3\)"),
    (torch.arange(4), TypeError, "importance must be float32, float16, bfloat16 or float64"),
    ([1.0, 2.0], TypeError, "importance must be a 1-D floating point torch.Tensor"),
])
def test_sample_rejects_bad_importance_tensor(bad, error, message):
    with pytest.raises(error, match=message):
        fastsel.sample(bad, 1, seed=0)


def test_seed_none_follows_torch_manual_seed(backend):
    w = torch.rand(1000)
    torch.manual_seed(7)
    a = fastsel.sample(w, 20, backend=backend).indices
    torch.manual_seed(7)
    b = fastsel.sample(w, 20, backend=backend).indices
    assert torch.equal(a, b)


# ---- percentile and History -------------------------------------------------------------

def test_percentile_counts_strictly_below(backend):
    h = torch.tensor([1.0, 2.0, 2.0, 3.0, NAN])
    v = torch.tensor([0.5, 1.0, 2.0, 2.5, 3.0, 10.0, NAN, -INF, INF])
    f = fastsel.percentile(v, h, backend=backend)
    want = torch.tensor([0, 0, 0.25, 0.75, 0.75, 1.0, NAN, 0, 1.0])
    torch.testing.assert_close(f, want, equal_nan=True, rtol=0, atol=0)
    assert f.dtype == torch.float32


def test_percentile_empty_history_ranks_everything_at_one(backend):
    v = torch.tensor([1.0, -5.0, NAN])
    for h in (torch.empty(0), torch.tensor([NAN, NAN])):
        torch.testing.assert_close(fastsel.percentile(v, h, backend=backend),
                                   torch.tensor([1.0, 1.0, NAN]), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_percentile_matches_reference(backend, dtype):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1024, generator=g).to(dtype)
    v = torch.randn(5000, generator=g).to(dtype)
    v[::7] = h[:715:1][::1][: len(v[::7])]  # values equal to history entries
    f = fastsel.percentile(v, h, backend=backend)
    assert torch.equal(f, R.percentile_reference(v, h))


def test_percentile_rejects_history_on_another_device(backend):
    with pytest.raises(ValueError, match="history is on meta but values are on cpu"):
        fastsel.percentile(torch.rand(3), torch.rand(4, device="meta"), backend=backend)


def test_history_ring_buffer_keeps_the_last_size_values():
    h = fastsel.History(5)
    assert len(h) == 0 and h.values.numel() == 0
    h.push(torch.tensor([1.0, 2.0, 3.0]))
    assert sorted(h.values.tolist()) == [1, 2, 3]
    h.push(torch.tensor([4.0, 5.0, 6.0, 7.0]))
    assert len(h) == 5 and sorted(h.values.tolist()) == [3, 4, 5, 6, 7]
    h.push(torch.arange(100, 112, dtype=torch.float32))
    assert sorted(h.values.tolist()) == list(range(107, 112))
    h.push(torch.empty(0))
    assert len(h) == 5


def test_history_state_dict_round_trip():
    h = fastsel.History(8)
    h.push(torch.arange(11, dtype=torch.float32))
    restored = fastsel.History(8)
    restored.load_state_dict(h.state_dict())
    for hist in (h, restored):
        hist.push(torch.tensor([100.0, 101.0]))
    assert torch.equal(h.values, restored.values) and len(h) == len(restored)
    with pytest.raises(ValueError, match="size 8, this one has size 4"):
        fastsel.History(4).load_state_dict(h.state_dict())


def test_history_rejects_bad_input():
    with pytest.raises(ValueError, match="size must be a positive int"):
        fastsel.History(0)
    with pytest.raises(ValueError, match="values must be a 1-D tensor"):
        fastsel.History(4).push(torch.rand(2, 2))
    with pytest.raises(ValueError, match="values are on meta but the history is on cpu"):
        fastsel.History(4).push(torch.rand(2, device="meta"))


def test_percentile_accepts_a_history_object(backend):
    h = fastsel.History(4)
    h.push(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))  # keeps 2..5
    torch.testing.assert_close(fastsel.percentile(torch.tensor([3.5]), h, backend=backend),
                               torch.tensor([0.5]))


# ---- select -----------------------------------------------------------------------------

def _batch(n=300, c=10, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g),
            torch.randn(c, d, generator=g))


@pytest.mark.parametrize("by", sorted(fastsel.SCORE_DIRECTIONS))
def test_select_topk_picks_the_documented_direction(backend, by):
    x, y, w = _batch()
    sel = fastsel.select(x, y, 30, by=by, head=w, backend=backend)
    values = getattr(sel.scores, by)
    largest = fastsel.SCORE_DIRECTIONS[by] == "largest"
    assert torch.equal(sel.indices, stable_topk(values, 30, largest))
    flipped = fastsel.select(x, y, 30, by=by, head=w, largest=not largest, backend=backend)
    assert torch.equal(flipped.indices, stable_topk(values, 30, not largest))


def test_select_mms_keeps_the_smallest_margin_samples(backend):
    x, y, w = _batch(n=640, c=10, d=32)
    sel = fastsel.select(x, y, 64, by="mms", head=w, backend=backend)
    mms = sel.scores.mms
    chosen = torch.zeros(640, dtype=torch.bool)
    chosen[sel.indices] = True
    assert float(mms[chosen].max()) <= float(mms[~chosen].min())


def test_select_sample_policy_equals_sample_on_the_score(backend):
    x, y, _ = _batch()
    sel = fastsel.select(x, y, 40, by="loss", policy="sample", seed=9, counter=2, backend=backend)
    want = fastsel.sample(sel.scores.loss.detach(), 40, seed=9, counter=2, backend=backend)
    assert torch.equal(sel.indices, want.indices) and torch.equal(sel.weights, want.weights)


def test_select_percentile_policy_is_selective_backprop(backend):
    x, y, _ = _batch(n=2000)
    h = fastsel.History(1024)
    first = fastsel.select(x, y, by="loss", policy="percentile", history=h, seed=1, backend=backend)
    assert first.indices.numel() == 2000 and len(h) == 1024  # empty history: keep all
    x2, y2, _ = _batch(n=2000, seed=1)
    hist_before = h.values.clone()
    sel = fastsel.select(x2, y2, by="loss", policy="percentile", history=h, seed=1, counter=1, backend=backend)
    f = R.percentile_reference(sel.scores.loss.detach(), hist_before)
    u = R.bernoulli_uniforms(2000, 1, 1)
    want = (u < f.pow(3.0)).nonzero().squeeze(1)
    assert torch.equal(sel.indices, want)
    # keep probability F^3: about a quarter of a same-distribution batch survives
    assert 0.15 < sel.indices.numel() / 2000 < 0.35
    floor = fastsel.select(x2, y2, by="loss", policy="percentile", history=hist_before, s_min=1.0,
                           seed=1, backend=backend)
    assert floor.indices.numel() == 2000


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(k=5, by="pred"), ValueError, "by must be one of"),
    (dict(k=5, policy="greedy"), ValueError, "policy must be one of"),
    (dict(k=5, by="mms"), ValueError, "by='mms' needs the classifier head"),
    (dict(policy="topk"), ValueError, "needs k"),
    (dict(k=5, policy="percentile", history=torch.rand(3)), ValueError, "k must be None with policy='percentile'"),
    (dict(policy="percentile"), ValueError, "needs history="),
    (dict(policy="percentile", history=torch.rand(3), beta=-1.0), ValueError, "beta must be"),
    (dict(policy="percentile", history=torch.rand(3), s_min=2.0), ValueError, r"s_min must be in \[0, 1\]"),
    (dict(k=500), ValueError, "k = 500 exceeds N = 300"),
])
def test_select_rejects_bad_arguments(kwargs, error, message):
    x, y, _ = _batch()
    with pytest.raises(error, match=message):
        fastsel.select(x, y, **kwargs)


def test_select_negative_score_cannot_be_sampled(backend):
    x, y, _ = _batch()
    with pytest.raises(ValueError, match="importance must be non-negative"):
        fastsel.select(x, y, 5, by="true_margin", policy="sample", seed=0, backend=backend)


# ---- op registration --------------------------------------------------------------------

@requires_extension
def test_opcheck_selection_ops():
    w = torch.rand(64) + 0.01
    s = torch.randn(64)
    h = torch.randn(32)
    checks = [
        (torch.ops.fastsel.select_topk.default, (s, 10, True)),
        (torch.ops.fastsel.select_topk.default, (s.double(), 10, False)),
        (torch.ops.fastsel.sample_without_replacement.default, (w, 10, 3, 4)),
        (torch.ops.fastsel.sample_with_replacement.default, (w, 100, 3, 4)),
        (torch.ops.fastsel.percentile.default, (s, h)),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)


@requires_extension
def test_compile_fullgraph_select_and_sample():
    def pick(logits, target, importance):
        a = fastsel.select(logits, target, 8, by="margin", backend="cpu")
        b = fastsel.sample(importance, 8, seed=11, counter=3, backend="cpu")
        return a.indices, b.indices, b.weights

    x, y, _ = _batch()
    w = torch.rand(300) + 0.1
    eager = pick(x, y, w)
    compiled = torch.compile(pick, fullgraph=True)(x, y, w)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@requires_extension
def test_raw_ops_reject_bad_arguments_without_crashing():
    ops = torch.ops.fastsel
    with pytest.raises(ValueError, match="k = 5 exceeds N = 3"):
        ops.select_topk(torch.rand(3), 5, True)
    with pytest.raises(ValueError, match="scores must be 1-D"):
        ops.select_topk(torch.rand(3, 2), 1, True)
    with pytest.raises(ValueError, match="seed must be in"):
        ops.sample_without_replacement(torch.rand(3), 1, -1, 0)
    with pytest.raises(ValueError, match="importance must not contain NaN"):
        ops.sample_with_replacement(torch.tensor([NAN]), 1, 0, 0)
    with pytest.raises(TypeError, match="history must be a floating point tensor"):
        ops.percentile(torch.rand(3), torch.arange(3))


def test_backends_list_is_consistent():
    assert set(BACKENDS) <= set(fastsel.available_backends())


# ---- arguments at their limits ------------------------------------------------------------


def test_importance_beyond_float32_says_why(backend):
    """A finite float64 importance that overflows float32 is not just "inf"."""
    w = torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64)
    for replacement in (False, True):
        with pytest.raises(ValueError, match=r"importance\[1\] = 1e\+300 exceeds float32's largest value"):
            fastsel.sample(w, 1, replacement=replacement, seed=0, backend=backend)


@pytest.mark.parametrize("k", [(1 << 32), (1 << 62)])
def test_sample_k_beyond_the_draw_limit(backend, k):
    with pytest.raises(ValueError, match=r"exceed the limit of 2\^32 - 1"):
        fastsel.sample(torch.rand(10), k, replacement=True, seed=0, backend=backend)


@pytest.mark.parametrize("op", ["select_topk", "sample", "percentile", "importance_weights"])
def test_meta_tensors_are_refused_by_name(op):
    x = torch.empty(6, device="meta")
    call = {"select_topk": lambda: fastsel.select_topk(x, 2),
            "sample": lambda: fastsel.sample(x, 2, seed=0),
            "percentile": lambda: fastsel.percentile(x, torch.rand(4)),
            "importance_weights": lambda: fastsel.importance_weights(x, torch.tensor([0]))}[op]
    with pytest.raises(ValueError, match="on the meta device"):
        call()


def test_importance_weights_of_an_index_that_cannot_be_drawn():
    w = torch.tensor([0.5, 0.0, 2.0, float("nan")])
    torch.testing.assert_close(fastsel.importance_weights(w, torch.tensor([0, 2])), torch.tensor([1.6, 0.4]))
    with pytest.raises(ValueError, match=r"indices\[1\] = 1 has importance 0"):
        fastsel.importance_weights(w, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"indices\[0\] = 3 has importance nan"):
        fastsel.importance_weights(w, torch.tensor([3]))
    with pytest.raises(IndexError, match=r"indices must be in \[0, 4\)"):
        fastsel.importance_weights(w, torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="indices must be a 1-D int64"):
        fastsel.importance_weights(w, torch.tensor([0.0]))


def test_history_size_beyond_the_limit():
    with pytest.raises(ValueError, match=r"size must be at most 2\^32 - 1, got 1099511627776"):
        fastsel.History(1 << 40)


@pytest.mark.parametrize("backend", [b for b in fastsel.available_backends() if b != "triton"])
@pytest.mark.parametrize("replacement", [False, True])
def test_k_zero_still_checks_the_importance(backend, replacement):
    """No draw is asked for, but bad importance values are reported all the same, on every
    backend (the CPU kernel checks them in its pass, the others before the op)."""
    with pytest.raises(ValueError, match="NaN"):
        fastsel.sample(torch.tensor([float("nan"), 1.0]), 0, replacement=replacement, seed=1, backend=backend)
    assert fastsel.sample(torch.tensor([0.5, 1.0]), 0, replacement=replacement, seed=1, backend=backend).indices.numel() == 0

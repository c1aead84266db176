"""Statistical and property tests of the sampling ops (docs/methods.md section 2):
``fastsel.sample`` (with and without replacement), its importance weights,
``select_topk`` and ``percentile``, on every CPU-tensor backend.

Every test is deterministic: the generator is counter-based (Philox keyed by seed,
counter and element index), so the draws of a fixed (seed, counter) are a pure function
and a statistical test with fixed seeds passes or fails identically on every run. The
hypothesis tests are derandomized and do not use the example database.

Statistical tests compare empirical frequencies with the exact law by a chi-square
goodness-of-fit test (cells with expected count < 5 are pooled) and reject below
``P_MIN``. scipy is not installed, so the chi-square survival function is computed here
(``chi2_sf``, the regularized upper incomplete gamma function) and is itself checked
against closed forms, and ``test_chi_square_rejects_wrong_distributions`` shows that the
tests have the power to reject plausible wrong laws at the sample sizes used.

Cheap large samples of the exponential race: the race key of element i depends only on
(seed, counter, i, w_i), so the full race order (k = number of nonzero importances) of
M concatenated copies of a tiny vector w, restricted to each copy, is M independent
Plackett-Luce permutations of w (``race_tuples``). ``test_race_prefix_and_block_consistency``
checks the two facts this relies on against direct calls, and the direct calls (k < nnz,
the partial-selection code path) are tested statistically as well.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsel
from fastsel import reference
from fastsel_test_helpers import BACKENDS

P_MIN = 1e-4  # reject a goodness-of-fit test below this p-value

# The torch reference costs ~1 ms per call (Philox as ~200 small tensor ops), the C++
# kernel ~60 us: tests that need one call per draw use fewer calls on "torch". Its draws
# are also checked to be bit-identical to "cpu" (test_cross_backend_bit_exact).
DIRECT_CALLS = {"cpu": 12000, "torch": 1500}
LARGE_N_CALLS = {"cpu": 8000, "torch": 1200}

two_backends = pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both the 'cpu' and 'torch' backends")



@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: on this small shared machine OpenMP threads spin against other
    processes and make the many small calls here ~5x slower. The multi-threaded code paths
    of the C++ kernels are tested (and must give the same draws) in
    test_thread_count_does_not_change_draws."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


HYPOTHESIS = settings(
    max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ---- chi-square machinery ---------------------------------------------------------------

def _gammaincc(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) = Gamma(a, x) / Gamma(a), a > 0.

    Numerical Recipes (3rd ed.) section 6.2: the power series of P = 1 - Q for
    x < a + 1, the continued fraction of Q (modified Lentz) otherwise. Relative accuracy
    ~1e-14 for the arguments used here (checked in test_chi2_sf_matches_closed_forms).
    """
    if x <= 0.0:
        return 1.0
    log_prefactor = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        ap, term = a, 1.0 / a
        total = term
        for _ in range(100000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-17:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return math.exp(log_prefactor) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square with ``df`` degrees of freedom."""
    return _gammaincc(df / 2.0, x / 2.0)


def chi_square(observed: Counter, probs: dict, n: int):
    """Goodness of fit of ``observed`` (cell -> count, ``n`` draws) to ``probs`` (cell ->
    probability, summing to 1). Cells with expected count < 5 are pooled into one (with
    the next smallest cells until it reaches 5). Returns (statistic, df, p-value).
    Observing a cell that has no probability is an error (asserted)."""
    impossible = {c: m for c, m in observed.items() if m and probs.get(c, 0.0) <= 0.0}
    assert not impossible, f"drew outcomes of probability 0: {dict(list(impossible.items())[:10])}"
    total_p = math.fsum(probs.values())
    assert abs(total_p - 1.0) < 1e-9, f"probabilities sum to {total_p}"
    cells = sorted(((p * n, observed.get(c, 0)) for c, p in probs.items() if p > 0), key=lambda t: t[0])
    pooled_e = pooled_o = 0.0
    rest = []
    for j, (e, o) in enumerate(cells):
        if e < 5.0 or (0 < pooled_e < 5.0):
            pooled_e += e
            pooled_o += o
        else:
            rest = cells[j:]
            break
    groups = rest + ([(pooled_e, pooled_o)] if pooled_e > 0 else [])
    assert len(groups) >= 2, f"too few draws ({n}) for a chi-square test on {len(probs)} cells"
    stat = math.fsum((o - e) ** 2 / e for e, o in groups)
    df = len(groups) - 1
    return stat, df, chi2_sf(stat, df)


def assert_fits(observed: Counter, probs: dict, n: int, what: str) -> None:
    stat, df, p = chi_square(observed, probs, n)
    worst = sorted(probs, key=lambda c: -abs(observed.get(c, 0) - n * probs[c]) / math.sqrt(n * probs[c] + 1e-300))[:4]
    detail = ", ".join(f"{c}: {observed.get(c, 0)} vs {n * probs[c]:.1f}" for c in worst)
    assert p > P_MIN, f"{what}: chi2 = {stat:.1f} on {df} df, p = {p:.2e} < {P_MIN}; worst cells {detail}"


# ---- exact laws ---------------------------------------------------------------------------

def plackett_luce(w, k: int) -> dict:
    """Exact probability of each ordered k-tuple drawn by the exponential race
    (sequential proportional sampling without replacement)."""
    total = math.fsum(w)
    out = {}
    for tup in itertools.permutations([i for i, x in enumerate(w) if x > 0], k):
        p, left = 1.0, total
        for i in tup:
            p *= w[i] / left
            left -= w[i]
        out[tup] = p
    return out


def inclusion_probabilities(tuple_probs: dict, n: int) -> list:
    pi = [0.0] * n
    for tup, p in tuple_probs.items():
        for i in tup:
            pi[i] += p
    return pi


def proportional(w) -> dict:
    total = math.fsum(w)
    return {i: x / total for i, x in enumerate(w) if x > 0}


# ---- drawing helpers ------------------------------------------------------------------------

def race_tuples(w, k: int, backend: str, copies: int, seed: int, counter: int = 0) -> torch.Tensor:
    """[copies, k]: ``copies`` independent ordered k-tuples of the race on ``w`` from ONE
    call: the full race order of ``copies`` concatenated copies of ``w``, restricted to
    each copy (race keys depend only on the element, so the copies are independent
    races; see the module docstring)."""
    n = len(w)
    big = torch.tensor(w, dtype=torch.float32).repeat(copies)
    nnz = sum(1 for x in w if x > 0)
    order = fastsel.sample(big, nnz * copies, seed=seed, counter=counter, backend=backend).indices
    block = order // n
    perm = torch.sort(block, stable=True).indices
    items = (order % n)[perm].view(copies, nnz)
    assert torch.equal(block[perm].view(copies, nnz), torch.arange(copies).unsqueeze(1).expand(copies, nnz))
    return items[:, :k]


def direct_tuples(w, k: int, backend: str, calls: int, seed: int, replacement: bool = False) -> torch.Tensor:
    """[calls, k]: one ``fastsel.sample`` call per counter value 0 .. calls - 1."""
    x = torch.tensor(w, dtype=torch.float32)
    return torch.stack([
        fastsel.sample(x, k, seed=seed, counter=c, replacement=replacement, backend=backend).indices
        for c in range(calls)
    ])


def tuple_counts(rows: torch.Tensor) -> Counter:
    return Counter(tuple(r) for r in rows.tolist())


def index_counts(idx: torch.Tensor) -> Counter:
    return Counter(idx.flatten().tolist())


# ---- tiny N: exact laws -----------------------------------------------------------------------

TINY_VECTORS = [
    [1.0, 2.0, 3.0],                   # N = 3
    [0.0, 1.0, 1.0, 2.0],              # N = 4 with a zero entry and a tie
    [100.0, 1.0, 2.0, 3.0, 0.5],       # N = 5, one dominant entry
    [0.25, 3.0, 0.0, 1.5, 7.0],        # N = 5 with a zero entry
]
TINY_CASES = [(w, k) for w in TINY_VECTORS for k in (1, 2, 3) if k <= sum(x > 0 for x in w)]


def _case_id(case):
    w, k = case
    return f"N{len(w)}-{'-'.join(f'{x:g}' for x in w)}-k{k}"


def test_chi2_sf_matches_closed_forms():
    # Even df: Q(m, x/2) = exp(-x/2) sum_{j<m} (x/2)^j / j!; df = 1: erfc(sqrt(x/2)).
    for df in (2, 4, 10, 40, 100, 400):
        for x in (0.1, 1.0, df * 0.5, df - 1.0, df + 0.5, df * 1.5, df * 3.0):
            h = x / 2.0
            want = math.fsum(math.exp(j * math.log(h) - math.lgamma(j + 1) - h) for j in range(df // 2))
            assert chi2_sf(x, df) == pytest.approx(want, rel=1e-10, abs=1e-300), (df, x)
    for x in (0.01, 0.5, 3.84, 10.0, 30.0):
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2.0)), rel=1e-10)
    assert chi2_sf(0.0, 7) == 1.0
    # Textbook critical values.
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(124.3421134, 100) == pytest.approx(0.05, rel=1e-6)


def test_chi_square_rejects_wrong_distributions():
    """The goodness-of-fit tests below have power at their sample sizes: the sampler's own
    output is rejected against plausible but wrong laws, and accepted against the right one."""
    backend = BACKENDS[0]
    w = [0.25, 3.0, 0.0, 1.5, 7.0]
    tuples = race_tuples(w, 2, backend, copies=50000, seed=11)
    obs = tuple_counts(tuples)
    assert_fits(obs, plackett_luce(w, 2), 50000, "the right law")
    # Wrong law 1: ordered pairs with P proportional to w_i w_j (distinct), i.e. "two
    # proportional draws conditioned on being different".
    wrong = {t: w[t[0]] * w[t[1]] for t in plackett_luce(w, 2)}
    z = math.fsum(wrong.values())
    wrong = {t: p / z for t, p in wrong.items()}
    assert chi_square(obs, wrong, 50000)[2] < 1e-12
    # Wrong law 2: the right law with 3% of the mass of the most likely tuple moved.
    right = plackett_luce(w, 2)
    top, low = max(right, key=right.get), min(right, key=right.get)
    moved = dict(right)
    moved[top] -= 0.03 * right[top]
    moved[low] += 0.03 * right[top]
    assert chi_square(obs, moved, 50000)[2] < 1e-6
    # With replacement: counts against w_i / W with one weight off by 10%.
    draws = fastsel.sample(torch.tensor(w), 200000, replacement=True, seed=3, backend=backend).indices
    counts = index_counts(draws)
    assert_fits(counts, proportional(w), 200000, "the right law (with replacement)")
    off = list(w)
    off[1] *= 1.1
    assert chi_square(counts, proportional(off), 200000)[2] < 1e-12


@pytest.mark.parametrize("case", TINY_CASES, ids=_case_id)
def test_race_ordered_tuples_match_plackett_luce(backend, case):
    w, k = case
    copies = 40000
    tuples = race_tuples(w, k, backend, copies, seed=1234 + k)
    exact = plackett_luce(w, k)
    assert_fits(tuple_counts(tuples), exact, copies, f"ordered {k}-tuples of {w} ({backend})")
    # Marginal inclusion probabilities: each within 4.5 binomial standard errors.
    pi = inclusion_probabilities(exact, len(w))
    incl = torch.bincount(tuples.flatten(), minlength=len(w)).tolist()
    for i, p in enumerate(pi):
        if p == 0.0:
            assert incl[i] == 0, f"item {i} of importance 0 was drawn {incl[i]} times"
            continue
        se = math.sqrt(copies * p * (1 - p)) if p < 1 else 0.0
        assert abs(incl[i] - copies * p) <= 4.5 * se + 1e-9, \
            f"inclusion of item {i}: {incl[i]} vs {copies * p:.1f} (se {se:.1f}), w = {w}, k = {k}"


@pytest.mark.parametrize("case", [([0.0, 1.0, 1.0, 2.0], 2), ([100.0, 1.0, 2.0, 3.0, 0.5], 3),
                                  ([1.0, 2.0, 3.0], 1)], ids=_case_id)
def test_direct_calls_match_plackett_luce(backend, case):
    """One call per counter (k below the number of nonzero importances: the partial
    selection path), chi-square on ordered tuples."""
    w, k = case
    calls = DIRECT_CALLS[backend]
    rows = direct_tuples(w, k, backend, calls, seed=77)
    assert_fits(tuple_counts(rows), plackett_luce(w, k), calls, f"direct ordered {k}-tuples of {w} ({backend})")


@pytest.mark.parametrize("w", TINY_VECTORS, ids=lambda w: "-".join(f"{x:g}" for x in w))
def test_with_replacement_tiny_counts_and_independence(backend, w):
    k = 60000
    draws = fastsel.sample(torch.tensor(w, dtype=torch.float32), k, replacement=True, seed=5,
                           counter=9, backend=backend).indices
    assert draws.dtype == torch.int64 and draws.shape == (k,)
    probs = proportional(w)
    assert_fits(index_counts(draws), probs, k, f"with-replacement counts of {w} ({backend})")
    # Draws are i.i.d.: consecutive pairs follow the product law.
    pairs = draws.view(-1, 2)
    pair_probs = {(i, j): probs[i] * probs[j] for i in probs for j in probs}
    assert_fits(tuple_counts(pairs), pair_probs, k // 2, f"consecutive draw pairs of {w} ({backend})")
    # Different counters: the same law again, and different draws.
    other = fastsel.sample(torch.tensor(w, dtype=torch.float32), 20000, replacement=True, seed=5,
                           counter=10, backend=backend).indices
    assert_fits(index_counts(other), probs, 20000, f"with-replacement counts, counter 10 ({backend})")
    assert not torch.equal(other, draws[:20000])


@pytest.mark.parametrize("w", TINY_VECTORS[1:3], ids=lambda w: "-".join(f"{x:g}" for x in w))
def test_with_replacement_direct_calls(backend, w):
    """Sampling with replacement with k = 1 per call, one counter per call: the first draw
    of every call follows w_i / W."""
    calls = DIRECT_CALLS[backend] // 2
    rows = direct_tuples(w, 1, backend, calls, seed=31, replacement=True)
    assert_fits(index_counts(rows), proportional(w), calls, f"first draws of {w} ({backend})")


def test_race_prefix_and_block_consistency(backend):
    """What race_tuples relies on, checked exactly against direct calls: (a) a sample of k
    is the first k of the full race order (prefix property); (b) an element's key does not
    depend on the other elements, so the race on copy 0 of a concatenation orders copy 0
    exactly like the race on w alone."""
    for w in TINY_VECTORS + [torch.rand(1000, generator=torch.Generator().manual_seed(4)).tolist()]:
        x = torch.tensor(w, dtype=torch.float32)
        nnz = int((x > 0).sum())
        big = x.repeat(7)
        for counter in range(12):
            full = fastsel.sample(x, nnz, seed=99, counter=counter, backend=backend).indices
            for k in sorted({1, 2, min(3, nnz), nnz // 10 or 1, nnz // 2 or 1, nnz - 1 or 1}):
                part = fastsel.sample(x, k, seed=99, counter=counter, backend=backend).indices
                assert torch.equal(part, full[:k]), (len(w), counter, k)
            order = fastsel.sample(big, nnz * 7, seed=99, counter=counter, backend=backend).indices
            assert torch.equal(order[order < len(w)], full), (len(w), counter)


# ---- large N ---------------------------------------------------------------------------------

def _log_uniform(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(n, dtype=torch.float64).uniform_(-2.0, 2.0, generator=g)).to(torch.float32)


def _average_ranks(x: list) -> list:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: list, b: list) -> float:
    ra, rb = _average_ranks(a), _average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = math.fsum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.fsum((x - ma) ** 2 for x in ra)
    vb = math.fsum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb)


def test_large_n_without_replacement(backend):
    """N = 1000, k = 100: the first element of the race is one proportional draw
    (chi-square per item, small cells pooled); marginal inclusion frequencies increase
    with importance (Spearman correlation, and strictly increasing decile means)."""
    n, k = 1000, 100
    w = _log_uniform(n, seed=21)
    w[::97] = 0.0  # a few zero entries
    calls = LARGE_N_CALLS[backend]
    rows = torch.stack([fastsel.sample(w, k, seed=2024, counter=c, backend=backend).indices
                        for c in range(calls)])
    assert rows.shape == (calls, k)
    zero = (w == 0)
    assert not zero[rows].any(), "a zero-importance item was drawn"
    sorted_rows = torch.sort(rows, dim=1).values
    assert (sorted_rows[:, 1:] != sorted_rows[:, :-1]).all(), "repeated index in a sample without replacement"
    wl = w.double().tolist()
    assert_fits(index_counts(rows[:, 0]), proportional(wl), calls, f"first race position, N = {n} ({backend})")
    incl = torch.bincount(rows.flatten(), minlength=n).double() / calls
    nz = (~zero).nonzero().squeeze(1)
    rho = spearman(w[nz].tolist(), incl[nz].tolist())
    assert rho > 0.9, f"inclusion frequency vs importance: Spearman {rho:.3f}"
    by_weight = nz[torch.argsort(w[nz])]
    decile_means = [float(incl[part].mean()) for part in torch.tensor_split(by_weight, 10)]
    assert all(b > a for a, b in zip(decile_means, decile_means[1:])), decile_means
    # Not "k proportional draws": inclusion is below k w_i / W for the heaviest items
    # (the ratio is ~0.92 for the top decile) and above it for the lightest (~1.13).
    naive = k * w.double() / w.double().sum()
    parts = torch.tensor_split(by_weight, 10)
    ratios = [float(incl[p].mean() / naive[p].mean()) for p in (parts[0], parts[-1])]
    assert ratios[0] > 1.05 and ratios[1] < 0.96, ratios


def test_large_n_with_replacement(backend):
    n, k = 1000, 200000
    w = _log_uniform(n, seed=22)
    w[5::101] = 0.0
    for counter in (0, 1):
        draws = fastsel.sample(w, k, replacement=True, seed=8, counter=counter, backend=backend).indices
        assert draws.shape == (k,) and int(draws.min()) >= 0 and int(draws.max()) < n
        assert_fits(index_counts(draws), proportional(w.double().tolist()), k,
                    f"with-replacement counts, N = {n}, counter {counter} ({backend})")


# ---- zero importance ---------------------------------------------------------------------------

def test_zero_importance_never_drawn(backend):
    g = torch.Generator().manual_seed(3)
    for n in (5, 8, 61, 300):  # below, at and off multiples of the 8-wide SIMD path
        w = torch.rand(n, generator=g)
        w[torch.rand(n, generator=g) < 0.5] = 0.0
        w[0] = 0.0
        w[n // 2] = 1.0
        nonzero = set((w > 0).nonzero().squeeze(1).tolist())
        nnz = len(nonzero)
        for counter in range(40):
            for k in {1, max(1, nnz - 1), nnz}:
                idx = fastsel.sample(w, k, seed=counter * 7 + 1, counter=counter, backend=backend).indices.tolist()
                assert set(idx) <= nonzero and len(set(idx)) == k
                if k == nnz:
                    assert set(idx) == nonzero
            idx = fastsel.sample(w, 500, replacement=True, seed=counter * 7 + 1, counter=counter,
                                 backend=backend).indices.tolist()
            assert set(idx) <= nonzero


@pytest.mark.parametrize("tiny", [1e-30, 1e-39, 1e-45], ids=["1e-30", "subnormal-1e-39", "min-subnormal"])
@pytest.mark.parametrize("with_heavy_item", [False, True], ids=["all-tiny", "beside-1.0"])
def test_tiny_importance_beats_zero(backend, tiny, with_heavy_item):
    """Items of tiny importance are drawn before any zero-importance item. All tiny: the
    common scale (race_scale) keeps their keys finite, so the draws stay random. Beside an
    item of importance 1, a scaled subnormal weight underflows and its key is +inf: still
    below the zero key."""
    n = 23
    w = torch.zeros(n, dtype=torch.float32)
    pos = [1, 4, 8, 9, 17, 22]
    w[pos] = tiny
    w[pos[2]] = tiny * 2  # not all equal
    if with_heavy_item:
        w[pos[3]] = 1.0
    keys = reference.race_key_bits(w, 5, 0)
    if with_heavy_item and tiny < 1e-38:
        assert (keys[pos] == 0x7F800000).sum() >= 3, "test meant to exercise overflowing (inf) keys"
    if not with_heavy_item:
        assert (keys[pos] < 0x7F800000).all(), "all-tiny importances must get finite keys"
    assert (keys[pos] < 0xFFFFFFFF).all()
    for counter in range(60):
        exact = fastsel.sample(w, len(pos), seed=5, counter=counter, backend=backend).indices.tolist()
        assert sorted(exact) == pos
        some = fastsel.sample(w, 3, seed=5, counter=counter, backend=backend).indices.tolist()
        assert set(some) <= set(pos) and len(set(some)) == 3
        rep = fastsel.sample(w, 40, replacement=True, seed=5, counter=counter, backend=backend).indices.tolist()
        assert set(rep) <= set(pos)
    if not with_heavy_item:  # finite keys: the draws are random, not just the lowest indices
        firsts = {fastsel.sample(w, 1, seed=5, counter=c, backend=backend).indices.item() for c in range(60)}
        assert len(firsts) >= 3, firsts


def test_float64_importance_that_rounds_to_zero_in_float32(backend):
    w = torch.tensor([1e-50, 1.0, 0.0, 2.0, 1e-60], dtype=torch.float64)
    for counter in range(30):
        assert sorted(fastsel.sample(w, 2, seed=1, counter=counter, backend=backend).indices.tolist()) == [1, 3]
        assert set(fastsel.sample(w, 30, replacement=True, seed=1, counter=counter,
                                  backend=backend).indices.tolist()) <= {1, 3}
    with pytest.raises(ValueError, match="exceeds the number of nonzero importances"):
        fastsel.sample(w, 3, seed=1, backend=backend)


def test_power_of_two_scaling_gives_identical_draws(backend):
    """Multiplying every importance by 2^j scales every race key by exactly 2^-j and every
    quantized weight not at all (while everything stays normal and finite): the draws of
    a (seed, counter) must not change, e.g. for weights around 1e-30."""
    w = _log_uniform(300, seed=6)
    w[::7] = 0.0
    for scale in (2.0 ** -100, 2.0 ** -60, 2.0 ** 60):
        ws = w * scale
        assert torch.equal(ws / scale, w)
        for counter in range(5):
            for replacement, k in ((False, 40), (True, 200)):
                a = fastsel.sample(w, k, seed=3, counter=counter, replacement=replacement, backend=backend).indices
                b = fastsel.sample(ws, k, seed=3, counter=counter, replacement=replacement, backend=backend).indices
                assert torch.equal(a, b), (scale, counter, replacement)


def test_subnormal_uniform_importance_is_sampled_uniformly(backend):
    """Without the common power-of-two scale (race_scale), E / w overflows float32 for
    these weights, every key ties at +inf and the sample is always the first k items."""
    w = torch.full((10,), 1e-45)
    calls = 300
    firsts = index_counts(direct_tuples(w.tolist(), 1, backend, calls, seed=1))
    assert_fits(firsts, {i: 0.1 for i in range(10)}, calls, "first draw of uniform 1e-45 weights")


# ---- determinism ----------------------------------------------------------------------------

def test_same_seed_and_counter_is_repeatable(backend):
    w = _log_uniform(1000, seed=1)
    for replacement, k in ((False, 100), (True, 300)):
        for seed, counter in ((0, 0), (17, 3), (2 ** 63 - 1, 2 ** 63 - 1), (2 ** 40 + 3, 2 ** 33 + 1)):
            a = fastsel.sample(w, k, seed=seed, counter=counter, replacement=replacement, backend=backend)
            b = fastsel.sample(w.clone(), k, seed=seed, counter=counter, replacement=replacement, backend=backend)
            assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)


def test_different_counters_and_seeds_give_different_draws(backend):
    w = _log_uniform(1000, seed=2)
    for replacement, k in ((False, 100), (True, 100)):
        seen = set()
        for seed in (1, 2, 2 ** 32 + 1):  # 2^32 + 1 differs from 1 only in the high key word
            for counter in (0, 1, 2, 3, 2 ** 32, 2 ** 32 + 1):  # high counter word too
                idx = tuple(fastsel.sample(w, k, seed=seed, counter=counter, replacement=replacement,
                                           backend=backend).indices.tolist())
                assert idx not in seen, (replacement, seed, counter)
                seen.add(idx)


@two_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cross_backend_bit_exact(dtype):
    """'cpu' and 'torch' draw the same indices for the same (seed, counter): sizes around
    the 8-wide SIMD blocks and several threads' chunks, seeds and counters with high words."""
    g = torch.Generator().manual_seed(SCORE_DTYPES.index(dtype))
    sizes = (1, 7, 8, 9, 1000, 4099) if dtype == torch.float32 else (9, 1000)
    for n in sizes:
        w = torch.exp(torch.randn(n, generator=g) * 3).to(dtype)
        w[torch.rand(n, generator=g) < 0.2] = 0.0
        if n > 1:
            w[1] = 1e-40 if dtype in (torch.float32, torch.float64) else 0.0  # an inf race key
        w[0] = 1.0
        nnz = int((w.float() > 0).sum())
        for seed, counter in ((0, 0), (1, 5), (2 ** 63 - 1, 2 ** 63 - 1), (2 ** 32 + 7, 2 ** 32 + 9)):
            for replacement, k in ((False, max(1, nnz // 3)), (False, nnz), (True, min(3 * n, 3000))):
                got = [fastsel.sample(w, k, seed=seed, counter=counter, replacement=replacement, backend=b)
                       for b in BACKENDS]
                for b, s in zip(BACKENDS[1:], got[1:]):
                    assert torch.equal(s.indices, got[0].indices), (n, seed, counter, replacement, b)
                    assert torch.equal(s.weights, got[0].weights), (n, seed, counter, replacement, b)


def test_thread_count_does_not_change_draws(backend):
    """Sizes that the C++ kernels split into several threads' chunks (race keys, radix
    histogram, prefix sums): the same draws with 1 and 2 threads, and on every backend."""
    g = torch.Generator().manual_seed(9)
    n = 70001
    w = torch.exp(torch.randn(n, generator=g) * 3)
    w[torch.rand(n, generator=g) < 0.2] = 0.0
    nnz = int((w > 0).sum())
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for replacement, k in ((False, 1000), (False, nnz), (True, 20000)):
            for b in {backend, BACKENDS[0]}:
                results.setdefault((replacement, k), []).append(
                    fastsel.sample(w, k, seed=2 ** 40 + 1, counter=2 ** 35 + 3, replacement=replacement,
                                   backend=b).indices)
    for key, got in results.items():
        assert all(torch.equal(x, got[0]) for x in got[1:]), key
    full = results[(False, nnz)][0]
    assert torch.equal(results[(False, 1000)][0], full[:1000])
    assert sorted(full.tolist()) == (w > 0).nonzero().squeeze(1).tolist()


@two_backends
def test_cross_backend_bit_exact_many_counters():
    """The draws feeding the statistical tests agree between backends (so those tests,
    run with fewer calls on 'torch', test the same numbers)."""
    w = torch.tensor([100.0, 1.0, 2.0, 3.0, 0.5])
    big = _log_uniform(1000, seed=21)
    for counter in range(150):
        for x, k in ((w, 3), (big, 100)):
            got = [fastsel.sample(x, k, seed=77, counter=counter, backend=b).indices for b in BACKENDS]
            assert all(torch.equal(g, got[0]) for g in got[1:]), counter


def test_generator_reproducible_and_advancing(backend):
    w = _log_uniform(500, seed=3)
    for replacement in (False, True):
        g1 = torch.Generator().manual_seed(1234)
        a1 = fastsel.sample(w, 50, replacement=replacement, generator=g1, backend=backend).indices
        a2 = fastsel.sample(w, 50, replacement=replacement, generator=g1, backend=backend).indices
        g2 = torch.Generator().manual_seed(1234)
        b1 = fastsel.sample(w, 50, replacement=replacement, generator=g2, backend=backend).indices
        b2 = fastsel.sample(w, 50, replacement=replacement, generator=g2, backend=backend).indices
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
        assert not torch.equal(a1, a2), "a generator must advance between calls"
        g3 = torch.Generator().manual_seed(1235)
        assert not torch.equal(fastsel.sample(w, 50, replacement=replacement, generator=g3,
                                              backend=backend).indices, a1)
    with pytest.raises(ValueError):
        fastsel.sample(w, 5, seed=1, generator=torch.Generator().manual_seed(0), backend=backend)


def test_seed_none_follows_torch_manual_seed(backend):
    w = _log_uniform(500, seed=4)
    for replacement in (False, True):
        torch.manual_seed(99)
        a1 = fastsel.sample(w, 50, replacement=replacement, backend=backend).indices
        a2 = fastsel.sample(w, 50, replacement=replacement, backend=backend).indices
        torch.manual_seed(99)
        b1 = fastsel.sample(w, 50, replacement=replacement, backend=backend).indices
        b2 = fastsel.sample(w, 50, replacement=replacement, backend=backend).indices
        assert torch.equal(a1, b1) and torch.equal(a2, b2)
        assert not torch.equal(a1, a2)
        torch.manual_seed(100)
        assert not torch.equal(fastsel.sample(w, 50, replacement=replacement, backend=backend).indices, a1)


# ---- importance weights ------------------------------------------------------------------------

def _normalised_inverse(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    inv = 1.0 / w.double()[idx]
    return inv * (idx.numel() / inv.sum())


def test_selection_weights_are_normalised_inverse_importance(backend):
    w = _log_uniform(400, seed=5)
    w[::9] = 0.0
    for replacement, k in ((False, 1), (False, 60), (True, 1), (True, 500)):
        for counter in range(5):
            sel = fastsel.sample(w, k, seed=1, counter=counter, replacement=replacement, backend=backend)
            assert sel.weights.dtype == torch.float32 and sel.weights.shape == (k,)
            torch.testing.assert_close(sel.weights.double(), _normalised_inverse(w, sel.indices),
                                       rtol=2e-7, atol=0)
            assert float(sel.weights.double().mean()) == pytest.approx(1.0, rel=1e-6)
            assert sel.scores is w
    empty = fastsel.sample(w, 0, seed=1, backend=backend)
    assert empty.indices.shape == (0,) and empty.weights.shape == (0,)


def _population(n: int, seed: int):
    """Importances and a function f correlated with them (so a wrong sampler biases the
    estimate)."""
    w = _log_uniform(n, seed=seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    f = w.log() * 2.0 + torch.rand(n, generator=g, dtype=torch.float64)
    return w, f


def test_inverse_probability_weights_are_unbiased(backend):
    """With replacement, 1 / (N P(i)) f(x_i) averages to mean f (Horvitz-Thompson): over
    2e5 i.i.d. draws within 4 standard errors; the unweighted mean (P-weighted) and the
    estimate a uniform sampler would give are many standard errors away, so the test
    would catch a non-proportional sampler."""
    n, k = 200, 200000
    w, f = _population(n, seed=8)
    w32 = w.float()
    w = w32.double()  # the exact float32 importances the sampler uses
    mean_f = float(f.mean())
    idx = fastsel.sample(w32, k, replacement=True, seed=12, backend=backend).indices
    p = w / w.sum()
    terms = f[idx] / (n * p[idx])
    est = float(terms.mean())
    se = float(terms.std()) / math.sqrt(k)
    assert abs(est - mean_f) < 4 * se, f"estimate {est:.5f} vs mean {mean_f:.5f} (se {se:.5f})"
    assert abs(float(f[idx].mean()) - mean_f) > 20 * se
    uniform_sampler_value = float((f / (n * p)).mean())
    assert abs(uniform_sampler_value - mean_f) > 20 * se


def test_normalised_weight_estimator(backend):
    """The estimator sum(Selection.weights * f(x_i)) / k with the *normalised* weights is
    the self-normalised (ratio) importance-sampling estimator: consistent, and for a
    small k its expectation is the exact value enumerated below (it is NOT mean f: the
    normalisation biases it, see the report). For k = 2 with replacement: over 60000
    i.i.d. pairs its mean matches the exact expectation within 4 standard errors; for
    k = 1e5 in one call it is within 4 (delta-method) standard errors of mean f."""
    n = 6
    w32 = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 0.25], dtype=torch.float32)
    w = w32.double()
    f = torch.tensor([3.0, -1.0, 2.0, 0.5, -2.0, 5.0], dtype=torch.float64)
    p = (w / w.sum()).tolist()
    fl, wl = f.tolist(), w.tolist()
    exact = math.fsum(p[i] * p[j] * (fl[i] / wl[i] + fl[j] / wl[j]) / (1 / wl[i] + 1 / wl[j])
                      for i in range(n) for j in range(n))
    pairs = fastsel.sample(w32, 120000, replacement=True, seed=4, backend=backend).indices.view(-1, 2)
    inv = 1.0 / w[pairs]
    weights = inv * (2.0 / inv.sum(dim=1, keepdim=True))
    # Spot check: these are exactly the weights fastsel returns for such a pair.
    for j in range(5):
        torch.testing.assert_close(fastsel.importance_weights(w32, pairs[j]).double(), weights[j],
                                   rtol=2e-7, atol=0)
    per_pair = (weights * f[pairs]).sum(dim=1) / 2.0
    se = float(per_pair.std()) / math.sqrt(per_pair.numel())
    got = float(per_pair.mean())
    assert abs(got - exact) < 4 * se, f"{got:.5f} vs exact expectation {exact:.5f} (se {se:.5f})"
    assert abs(exact - float(f.mean())) > 10 * se  # the bias is real and detectable here

    k = 100000
    sel = fastsel.sample(w32, k, replacement=True, seed=5, backend=backend)
    est = float((sel.weights.double() * f[sel.indices]).sum() / k)
    r = 1.0 / (n * torch.tensor(p, dtype=torch.float64)[sel.indices])
    y = f[sel.indices] * r
    ratio = float(y.mean() / r.mean())
    assert est == pytest.approx(ratio, rel=1e-5, abs=1e-6)
    se_ratio = float((y - ratio * r).std() / r.mean()) / math.sqrt(k)
    assert abs(est - float(f.mean())) < 4 * se_ratio, f"{est:.5f} vs {float(f.mean()):.5f} (se {se_ratio:.5f})"


# ---- hypothesis properties --------------------------------------------------------------------

importance_values = st.one_of(
    st.just(0.0),
    st.floats(min_value=0.0, max_value=1.0000000150474662e30, width=32, allow_subnormal=True),
    st.sampled_from([1e-45, 1e-39, 1e-30, 1.0, 3.0e38]),
)
importance_lists = st.lists(importance_values, min_size=1, max_size=200)
seeds = st.integers(0, 2 ** 63 - 1)


@HYPOTHESIS
@given(data=st.data(), w=importance_lists, seed=seeds, counter=seeds)
def test_property_sample_without_replacement(backend, data, w, seed, counter):
    x = torch.tensor(w, dtype=torch.float32)
    nonzero = set((x > 0).nonzero().squeeze(1).tolist())
    k = data.draw(st.integers(0, len(nonzero)), label="k")
    sel = fastsel.sample(x, k, seed=seed, counter=counter, backend=backend)
    idx = sel.indices.tolist()
    assert sel.indices.dtype == torch.int64 and len(idx) == k
    assert len(set(idx)) == k, "indices are not distinct"
    assert all(0 <= i < len(w) for i in idx)
    assert set(idx) <= nonzero, "drew a zero-importance index"
    if k == len(nonzero):
        assert set(idx) == nonzero
    # Race order: keys (computed by the reference spec) are non-decreasing along the sample.
    keys = reference.race_key_bits(x, seed, counter)[sel.indices].tolist()
    assert keys == sorted(keys)
    if backend != "torch" and "torch" in BACKENDS:
        want = fastsel.sample(x, k, seed=seed, counter=counter, backend="torch").indices
        assert torch.equal(sel.indices, want)


@HYPOTHESIS
@given(data=st.data(), w=importance_lists, seed=seeds, counter=seeds)
def test_property_sample_with_replacement(backend, data, w, seed, counter):
    x = torch.tensor(w, dtype=torch.float32)
    nonzero = set((x > 0).nonzero().squeeze(1).tolist())
    k = data.draw(st.integers(0, 300 if nonzero else 0), label="k")
    sel = fastsel.sample(x, k, replacement=True, seed=seed, counter=counter, backend=backend)
    idx = sel.indices.tolist()
    assert sel.indices.dtype == torch.int64 and len(idx) == k
    assert all(0 <= i < len(w) for i in idx)
    assert set(idx) <= nonzero, "drew a zero-importance index"
    if len(nonzero) == 1 and k:
        assert set(idx) == nonzero
    if backend != "torch" and "torch" in BACKENDS:
        want = fastsel.sample(x, k, replacement=True, seed=seed, counter=counter, backend="torch").indices
        assert torch.equal(sel.indices, want)


SCORE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
score_values = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, 5e-324, 1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-3.0, 3.0),
)


def _expected_topk(values: list, k: int, largest: bool) -> list:
    def key(i):
        v = values[i]
        if math.isnan(v):
            return (1, 0.0, i)
        return (0, -v if largest else v, i)  # -0.0 == +0.0: ties go by index
    return sorted(range(len(values)), key=key)[:k]


@settings(HYPOTHESIS, max_examples=150)
@given(data=st.data(), dtype=st.sampled_from(SCORE_DTYPES), largest=st.booleans(),
       raw=st.lists(score_values, min_size=0, max_size=200))
def test_property_select_topk_is_stable_sort(backend, data, dtype, largest, raw):
    # A small pool re-used at random positions makes exact ties (and -0.0 / +0.0 pairs) common.
    pool = raw[:8] + [0.0, -0.0]
    vals = raw + data.draw(st.lists(st.sampled_from(pool), max_size=40), label="ties")
    vals += [0.0, -0.0] * data.draw(st.integers(0, 3), label="signed zeros")
    vals = data.draw(st.permutations(vals), label="order")
    scores = torch.tensor(vals, dtype=torch.float64).to(dtype)
    k = data.draw(st.integers(0, len(vals)), label="k")
    sel = fastsel.select_topk(scores, k, largest, backend=backend)
    assert sel.indices.dtype == torch.int64
    want = _expected_topk(scores.double().tolist(), k, largest)
    assert sel.indices.tolist() == want
    assert torch.equal(sel.weights, torch.ones(k))


def test_select_topk_signed_zero_and_nan_ties(backend):
    """Deterministic corner cases of the ordering (both widths)."""
    vals = [-0.0, 0.0, math.nan, -0.0, -math.inf, math.inf, 0.0, -math.nan, 1e-45, -1e-45]
    for dtype in (torch.float32, torch.float64):
        s = torch.tensor(vals, dtype=dtype)
        assert fastsel.select_topk(s, 10, True, backend=backend).indices.tolist() == [5, 8, 0, 1, 3, 6, 9, 4, 2, 7]
        assert fastsel.select_topk(s, 10, False, backend=backend).indices.tolist() == [4, 9, 0, 1, 3, 6, 8, 5, 2, 7]
        assert fastsel.select_topk(s, 3, False, backend=backend).indices.tolist() == [4, 9, 0]
    # float64 values that collapse in float32 stay distinct in float64.
    s = torch.tensor([1.0, 1.0 + 2 ** -40, 1.0 - 2 ** -40], dtype=torch.float64)
    assert fastsel.select_topk(s, 3, True, backend=backend).indices.tolist() == [1, 0, 2]
    assert fastsel.select_topk(s.float(), 3, True, backend=backend).indices.tolist() == [0, 1, 2]


def _expected_percentile(values: list, history: list) -> torch.Tensor:
    h = [x for x in history if not math.isnan(x)]
    out = []
    for v in values:
        if math.isnan(v):
            out.append(math.nan)
        elif not h:
            out.append(1.0)
        else:
            count = sum(1 for x in h if x < v)
            # count / len(h) rounded once to float32 (both are exact in float32 here)
            ratio = torch.tensor(float(count), dtype=torch.float32) / torch.tensor(float(len(h)), dtype=torch.float32)
            out.append(float(ratio))
    return torch.tensor(out, dtype=torch.float32)


@HYPOTHESIS
@given(data=st.data(), vdtype=st.sampled_from(SCORE_DTYPES), hdtype=st.sampled_from(SCORE_DTYPES),
       raw_values=st.lists(score_values, max_size=60), raw_history=st.lists(score_values, max_size=120))
def test_property_percentile_is_brute_force_fraction(backend, data, vdtype, hdtype, raw_values, raw_history):
    shared = data.draw(st.lists(st.sampled_from(raw_history or [0.0]), max_size=20), label="shared")
    values = torch.tensor(raw_values + shared, dtype=torch.float64).to(vdtype)
    history = torch.tensor(raw_history, dtype=torch.float64).to(hdtype)
    got = fastsel.percentile(values, history, backend=backend)
    want = _expected_percentile(values.double().tolist(), history.double().tolist())
    assert got.dtype == torch.float32 and got.shape == values.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@HYPOTHESIS
@given(size=st.integers(1, 50), batches=st.lists(st.lists(st.floats(-10, 10, width=32), max_size=70), max_size=8),
       probe=st.lists(st.floats(-11, 11, width=32), min_size=1, max_size=20))
def test_property_history_keeps_last_values(backend, size, batches, probe):
    hist = fastsel.History(size)
    pushed = []
    for b in batches:
        hist.push(torch.tensor(b, dtype=torch.float32))
        pushed += b
    last = pushed[-size:] if pushed else []
    assert len(hist) == len(last)
    assert sorted(hist.values.tolist()) == sorted(last)
    values = torch.tensor(probe, dtype=torch.float32)
    torch.testing.assert_close(fastsel.percentile(values, hist, backend=backend),
                               _expected_percentile(probe, last), rtol=0, atol=0, equal_nan=True)

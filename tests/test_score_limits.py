"""Scores at the limits of floating point, against an mpmath oracle (50 digits): rows
spanning +-1e308, ties at huge magnitudes, very confident rows, more than 2^24 classes,
and gradients there; the MMS rule for a weight holding NaN or +-inf (the same on every
path, batch size and backend), and weights of extreme magnitude.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel_test_helpers import BACKENDS, requires_extension

mpmath.mp.dps = 50
INF, NAN = math.inf, math.nan


def exact_scores(row, y):
    """loss, entropy, grad_norm, confidence, lse of one row (floats) in 50-digit arithmetic,
    relative to the row's maximum m (t_j = z_j - m is exact in 50 digits for every row
    here, where z_j - lse would not be: lse = 1e308 + log 2 needs 330 digits)."""
    m = max(mpmath.mpf(v) for v in row if v != -INF)
    t = [mpmath.mpf(v) - m if v != -INF else None for v in row]
    # log1p: 1 + 1e-304 is 1 in 50 digits
    d_minus_1 = mpmath.fsum(mpmath.exp(tj) for tj in t if tj is not None and tj != 0) + (t.count(0) - 1)
    log_d = mpmath.log1p(d_minus_1)
    p = [mpmath.exp(tj - log_d) if tj is not None else mpmath.mpf(0) for tj in t]
    loss = log_d - t[y] if t[y] is not None else mpmath.inf
    # -sum p log p = log d - sum exp(t) t / d, exactly (p_y log p_y would round p_y to 1)
    entropy = log_d - mpmath.fsum(mpmath.exp(tj) * tj for tj in t if tj is not None) / (1 + d_minus_1)
    one_minus_py = mpmath.fsum(pj for j, pj in enumerate(p) if j != y)
    grad_norm = mpmath.sqrt(one_minus_py ** 2 + mpmath.fsum(pj ** 2 for j, pj in enumerate(p) if j != y))
    return {"loss": float(loss), "entropy": float(entropy), "grad_norm": float(grad_norm),
            "confidence": float(max(p)), "lse": float(m + log_d)}


def assert_relative(got: float, want: float, rtol: float, what: str) -> None:
    if math.isinf(want) or want == 0:
        assert got == want, f"{what}: got {got!r}, want {want!r}"
    else:
        assert abs(got - want) <= rtol * abs(want), f"{what}: got {got!r}, want {want!r}"


EXTREME_ROWS = [
    [1e308, -1e308],
    [-1e308, 1e308, 0.0],
    [1e308, 1e308],
    [1e308, 1e308, -1e308],
    [1.7e308, -1.7e308, 1e308],
    [-1e308, -1e308, -1e308],
    [0.0, -50.0, -60.0],          # loss ~2e-22: 1 - p_y underflows against 1
    [0.0, -700.0, -745.0, -INF],  # loss ~1e-304
    [1e300, 1e300 - 1e285, -INF],
    [5e-324, -5e-324, 0.0],
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", EXTREME_ROWS, ids=lambda r: ",".join(f"{v:g}" for v in r))
def test_float64_extremes_match_exact_arithmetic(backend, row):
    z = torch.tensor([row] * len(row), dtype=torch.float64)
    target = torch.arange(len(row))
    s = fastsel.score(z, target, backend=backend)
    for y in range(len(row)):
        want = exact_scores(row, y)
        for name, value in want.items():
            got = float(getattr(s, name)[y])
            if name == "grad_norm" and backend != "torch" and 0 < value < 1e-150:
                # the kernels' squares underflow there: they give 1 - p_y, within sqrt(2)
                assert value / math.sqrt(2) * (1 - 1e-13) <= got <= value * (1 + 1e-13), (row, y, got, value)
                continue
            assert_relative(got, value, 1e-13, f"{backend} {name} row {row} y={y}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_extremes_loss_is_cross_entropy_where_finite(backend):
    """Where F.cross_entropy gives a finite loss, so does fastsel (it used to give NaN on
    rows spanning +-1e308); the two agree to rounding."""
    z = torch.tensor([[1e308, -1e308], [1.7e308, -1.7e308], [-1e308, 1e308], [1e307, -1e308]],
                     dtype=torch.float64)
    target = torch.tensor([0, 0, 1, 0])
    got = fastsel.score(z, target, backend=backend).loss
    want = F.cross_entropy(z, target, reduction="none")
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_huge_magnitude_count_every_maximum(backend):
    """lse rounds log 2 away at 1e308: the maxima are counted apart, as log_softmax does."""
    for big in (1e308, -1e308, 1e300, 2.0 ** 60):
        z = torch.tensor([[big, big, -INF], [big, big, big]], dtype=torch.float64)
        s = fastsel.score(z, torch.tensor([0, 2]), backend=backend)
        torch.testing.assert_close(s.loss, torch.tensor([math.log(2), math.log(3)], dtype=torch.float64),
                                   rtol=1e-15, atol=0)
        torch.testing.assert_close(s.confidence, torch.tensor([0.5, 1 / 3], dtype=torch.float64),
                                   rtol=1e-15, atol=0)
        torch.testing.assert_close(s.entropy, s.loss, rtol=1e-15, atol=0)
        assert s.margin.tolist() == [0.0, 0.0] and s.pred.tolist() == [0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_at_huge_magnitude(backend):
    """softmax - onehot where exp(z - lse) would round log d away (ties at 1e308, logits
    in the thousands in float32): the CPU backward takes p = exp((z - m) - log d) there."""
    z = torch.tensor([[1e308, 1e308, -1e308], [1e308, -1e308, 0.0]], dtype=torch.float64, requires_grad=True)
    fastsel.score(z, torch.tensor([1, 1]), backend=backend).loss.sum().backward()
    want = torch.tensor([[0.5, -0.5, 0.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(z.grad, want, rtol=1e-15, atol=0)

    torch.manual_seed(3)
    for offset in (3e3, -2.5e4, 1e6):
        x = (torch.randn(16, 40) * 2 + offset).requires_grad_(True)
        t = torch.randint(0, 40, (16,))
        fastsel.score(x, t, backend=backend).loss.sum().backward()
        # the oracle: float64 softmax of the same float32 values
        xd = x.detach().double().requires_grad_(True)
        F.cross_entropy(xd, t, reduction="sum").backward()
        torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=2e-6, msg=f"offset {offset}")


def test_more_than_2_24_classes_keeps_the_sum():
    """A float sum of 2^24 + k ones stays at 2^24: the row's log-sum-exp must not."""
    c = (1 << 24) + 1000
    z = torch.zeros(1, c)
    z[0, 7] = 1.0
    want_lse = math.log(c - 1 + math.e)
    for backend in BACKENDS:
        s = fastsel.score(z, torch.tensor([7]), backend=backend)
        assert abs(float(s.lse[0]) - want_lse) <= 2e-7 * want_lse, backend
        assert abs(float(s.loss[0]) - (want_lse - 1.0)) <= 2e-7 * want_lse, backend
        assert abs(float(s.confidence[0]) - math.e / (c - 1 + math.e)) <= 1e-6 * math.e / c, backend
        assert int(s.pred[0]) == 7


# ---- MMS with a weight holding NaN or +-inf ---------------------------------------------


def _mms_rule(margin: torch.Tensor, bad_rows: torch.Tensor, pred: torch.Tensor, runner_up: torch.Tensor,
              mode: str) -> torch.Tensor:
    """Where the rule puts NaN (True), for valid rows needing a distance."""
    needs = (margin > 0) & (margin < INF)
    if mode == "exact":
        return needs & bad_rows.any()
    return needs & (bad_rows[pred] | bad_rows[runner_up])


def _runner_up(z: torch.Tensor) -> torch.Tensor:
    rest = z.scatter(1, z.argmax(1, keepdim=True), -INF)
    return rest.argmax(1)


@pytest.mark.parametrize("mode", ["exact", "top2"])
@pytest.mark.parametrize("c", [6, 40, 300])
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf", "nan-and-inf"])
def test_mms_nonfinite_weight_rule_every_path_and_batch_size(mode, c, poison):
    torch.manual_seed(c)
    w = torch.randn(c, 12)
    if poison in ("nan", "nan-and-inf"):
        w[2, 5] = NAN
    if poison in ("inf", "nan-and-inf"):
        w[c - 1, 0] = INF
    if poison == "-inf":
        w[1, 3] = -INF
    n = 600
    x = torch.randn(n, c) * 2
    x[0, :] = 1.0                     # all tied: margin 0 -> MMS 0
    x[1, :] = -INF
    x[1, 3] = 0.5                     # one finite class: margin +inf -> MMS +inf
    x[2, 2], x[2, 0] = 50.0, 49.0     # prediction on a poisoned class (nan case)
    x[3, 0] = NAN                     # an invalid row: NaN
    t = torch.randint(0, c, (n,))
    bad_rows = ~torch.isfinite(w).all(dim=1)
    results = {}
    for backend in BACKENDS:
        for size in (1, 7, 64, n):  # the per-row, lane-wise, group and Gram paths
            got = torch.cat([fastsel.score(x[i:i + size], t[i:i + size], head=w, mms=mode,
                                           backend=backend).mms for i in range(0, n, size)])
            results[backend, size] = got
    ref = results["torch", n]
    margin = fastsel.score(x, t, backend="torch").margin
    expect_nan = _mms_rule(margin, bad_rows, x.argmax(1), _runner_up(x), mode) | torch.isnan(margin)
    assert torch.equal(torch.isnan(ref), expect_nan)
    assert ref[0] == 0 and ref[1] == INF and torch.isnan(ref[3])
    for key, got in results.items():
        assert torch.equal(torch.isnan(got), expect_nan), key
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6, equal_nan=True, msg=str(key))


@pytest.mark.parametrize("mode", ["exact", "top2"])
def test_mms_nonfinite_weight_with_head_and_float64(mode):
    torch.manual_seed(0)
    w = torch.randn(400, 16, dtype=torch.float64)
    w[17, 3] = NAN
    x = torch.randn(50, 400, dtype=torch.float64)
    t = torch.randint(0, 400, (50,))
    head = fastsel.mms_head(w)
    got = [fastsel.score(x, t, head=wt, mms=mode, backend=b).mms
           for b in BACKENDS for wt in (w, head)]
    for g in got[1:]:
        assert torch.equal(torch.isnan(g), torch.isnan(got[0]))
        torch.testing.assert_close(g, got[0], rtol=1e-12, atol=0, equal_nan=True)
    if mode == "exact":
        assert torch.isnan(got[0]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["exact", "top2"])
@pytest.mark.parametrize("dtype,factor", [(torch.float32, 1e30), (torch.float32, 1e-30),
                                          (torch.float32, 2.0 ** 100), (torch.float64, 1e300),
                                          (torch.float64, 1e-300)])
def test_mms_of_weights_of_extreme_magnitude(backend, mode, dtype, factor):
    """The MMS of W * f is the MMS of W / f: distances must neither overflow (an MMS of 0)
    nor underflow (+inf) on any path."""
    torch.manual_seed(1)
    for c, n in ((8, 100), (300, 40)):  # Gram and pruned paths
        w = torch.randn(c, 24, dtype=torch.float64)
        x = torch.randn(n, c, dtype=dtype)
        t = torch.randint(0, c, (n,))
        want = fastsel.score(x.double(), t, head=w, mms=mode, backend="torch").mms / factor
        got = fastsel.score(x, t, head=(w * factor).to(dtype), mms=mode, backend=backend).mms
        assert torch.isfinite(got).all() and (got > 0).all()
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=0, msg=f"C = {c}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mms_of_a_zero_head(backend):
    """A zero-initialised head: every distance is 0, so the MMS is +inf (0 for ties)."""
    x = torch.randn(200, 500)
    x[0, :2] = 9.0
    for mode in ("exact", "top2"):
        got = fastsel.score(x, torch.zeros(200, dtype=torch.long), head=torch.zeros(500, 32), mms=mode,
                            backend=backend).mms
        assert got[0] == 0 and (got[1:] == INF).all()


# ---- stale MMS heads -----------------------------------------------------------------------


@requires_extension
def test_stale_head_without_version_counter_is_caught():
    """An inference tensor has no version counter, and ``.data`` updates bump none: the
    CPU kernel, which uses the precomputed distances, compares the weight's bits."""
    torch.manual_seed(0)
    x = torch.randn(64, 300)
    t = torch.randint(0, 300, (64,))
    with torch.inference_mode():
        w_inf = torch.randn(300, 16)
    w_param = torch.nn.Parameter(torch.randn(300, 16))
    for w, update in ((w_inf, lambda w: w.add_(0.5)), (w_param, lambda w: w.data.mul_(-1.0))):
        head = fastsel.mms_head(w)
        before = fastsel.score(x, t, head=head, backend="cpu").mms
        torch.testing.assert_close(before, fastsel.score(x, t, head=w.detach(), backend="cpu").mms,
                                   rtol=0, atol=0)
        with torch.inference_mode():
            update(w)
        with pytest.raises(ValueError, match="modified in place"):
            fastsel.score(x, t, head=head, backend="cpu")
        # the top-2 MMS and the reference do not use the precomputed distances
        fastsel.score(x, t, head=head, mms="top2", backend="cpu")
        fastsel.score(x, t, head=head, backend="torch")
        assert torch.equal(fastsel.score(x, t, head=fastsel.mms_head(w), backend="cpu").mms,
                           fastsel.score(x, t, head=w.detach(), backend="cpu").mms)


@requires_extension
def test_head_of_an_inference_tensor_without_a_copy_is_refused():
    with torch.inference_mode():
        w = torch.randn(300, 8)
    head = fastsel.mms_head(w)._replace(snapshot=None)
    with pytest.raises(ValueError, match="no version counter"):
        fastsel.score(torch.randn(4, 300), torch.zeros(4, dtype=torch.long), head=head, backend="cpu")


@requires_extension
def test_head_with_nan_weight_is_not_stale():
    """NaN entries compare equal bit for bit: an unchanged head of a NaN weight is usable."""
    w = torch.randn(300, 8)
    w[3, 3] = NAN
    head = fastsel.mms_head(w)
    x, t = torch.randn(5, 300), torch.zeros(5, dtype=torch.long)
    s = fastsel.score(x, t, head=head, backend="cpu")  # no "modified in place" error
    plain = fastsel.score(x, t, head=w, backend="cpu")
    assert torch.isnan(s.mms).all() and torch.isnan(plain.mms).all()  # the non-finite weight rule


# ---- arguments at their limits ------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [1 << 63, -(1 << 63) - 1, 1 << 70])
def test_ignore_index_beyond_int64_is_a_clear_error(ignore_index):
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        fastsel.score(torch.randn(2, 3), torch.tensor([0, 1]), ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [(1 << 63) - 1, -(1 << 63)])
def test_ignore_index_at_int64_limits_works(backend, ignore_index):
    t = torch.tensor([0, ignore_index, 2])
    s = fastsel.score(torch.randn(3, 4), t, ignore_index=ignore_index, backend=backend)
    assert s.loss[1] == 0 and torch.isnan(s.grad_norm[1]) and s.loss[0] > 0


def test_meta_tensors_give_meta_outputs():
    x = torch.empty(5, 7, device="meta")
    t = torch.empty(5, dtype=torch.long, device="meta")
    for weight in (None, torch.empty(7, 3, device="meta")):
        s = fastsel.score(x, t, head=weight)
        for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "lse"):
            v = getattr(s, name)
            assert v.device.type == "meta" and v.shape == (5,) and v.dtype == torch.float32, name
        assert s.pred.dtype == torch.int64 and s.pred.device.type == "meta"
        assert (s.mms is None) == (weight is None)


def test_class_distances_device_path_agrees_with_the_host_path():
    """The accelerator path recomputes flagged pairs with cdist under torch.where (no
    nonzero, no host sync); on rows of one magnitude it gives the host path's distances."""
    from fastsel.reference import _recompute_flagged, centred_rows

    torch.manual_seed(0)
    w = torch.randn(40, 16, dtype=torch.float64)
    w[5] = w[4] + 1e-7  # a near-duplicate pair: flagged
    w[9] = w[4]         # an identical one
    c = centred_rows(w)
    both = c.sq_norms[:, None] + c.sq_norms[None, :]
    d2 = (both - 2.0 * (c.rows @ c.rows.T)).clamp_min(0)
    flagged = d2 < both / 16
    assert flagged[4, 5] and flagged[4, 9]
    host = _recompute_flagged(d2.sqrt(), flagged, c.raw, c.raw, on_host=True)
    device = _recompute_flagged(d2.sqrt(), flagged, c.raw, c.raw, on_host=False)
    torch.testing.assert_close(device, host, rtol=1e-12, atol=1e-18)
    exact = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(fastsel.reference.class_distances(w), exact, rtol=1e-12, atol=1e-15)

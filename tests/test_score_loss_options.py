"""``score(..., weight=, label_smoothing=)``: ``F.cross_entropy``'s class weights and label
smoothing, on every backend, against ``F.cross_entropy`` in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fastsel
from fastsel_test_helpers import FLOAT_DTYPES, assert_scores_close, requires_extension

SMOOTHING = (0.0, 0.1, 0.5, 1.0)


def _want(logits, target, weight, eps, ignore_index=-100):
    """F.cross_entropy on the float64 upcast of the (rounded) logits."""
    w = None if weight is None else weight.double()
    return F.cross_entropy(logits.detach().double(), target.long(), weight=w, ignore_index=ignore_index,
                           reduction="none", label_smoothing=eps)


def _tol(dtype):
    # The scores are float32 for every narrower dtype (float64 for float64): the inputs'
    # rounding is in _want too, so only float32 arithmetic separates the two.
    return (1e-12, 1e-12) if dtype == torch.float64 else (2e-5, 2e-5)


def _case(n, c, *, seed, dtype=torch.float32, scale=3.0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if ignore and n > 2:
        target[1] = -100
    weight = torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.1
    return logits, target, weight


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("c", [1, 2, 7, 300])
@pytest.mark.parametrize("eps", SMOOTHING)
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_equals_cross_entropy(backend, dtype, c, eps, weighted):
    logits, target, weight = _case(33, c, seed=c, dtype=dtype)
    w = weight.to(torch.float32) if weighted else None
    got = fastsel.score(logits, target, weight=w, label_smoothing=eps, backend=backend)
    want = _want(logits, target, w, eps)
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(got.loss.double(), want, rtol=rtol, atol=atol)
    assert got.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.loss[1].item() == 0.0  # the ignored row


def test_other_scores_are_the_hard_targets(backend):
    """Weights and smoothing change the loss only: every other field is the plain call's."""
    logits, target, weight = _case(40, 9, seed=3)
    head = torch.randn(9, 4)
    plain = fastsel.score(logits, target, head=head, backend=backend)
    opt = fastsel.score(logits, target, head=head, weight=weight.float(), label_smoothing=0.2, backend=backend)
    for f in plain._fields:
        if f != "loss":
            torch.testing.assert_close(getattr(opt, f), getattr(plain, f), rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(opt.loss, plain.loss)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_weight_dtype_and_strides(backend, eps):
    """float64 or bfloat16 class weights, transposed logits, int32 targets, custom ignore_index."""
    logits, target, weight = _case(17, 6, seed=5)
    strided = logits.t().contiguous().t()
    t32 = target.clone().to(torch.int32)
    t32[1] = 0
    t32[4] = 3
    for w in (weight, weight.to(torch.bfloat16)):
        got = fastsel.score(strided, t32, weight=w, label_smoothing=eps, ignore_index=3, backend=backend)
        want = _want(logits, t32, w.to(torch.float32), eps, ignore_index=3)
        torch.testing.assert_close(got.loss.double(), want, rtol=2e-5, atol=2e-5)
        assert (got.loss[t32 == 3] == 0).all()


@pytest.mark.parametrize("eps", SMOOTHING)
def test_extremes(backend, eps):
    """-inf logits (classes of zero probability), a -inf true class, very confident rows,
    |z| = 1e4, zero and huge class weights: the value F.cross_entropy gives, infinities
    included."""
    logits = torch.tensor([
        [0.0, float("-inf"), 1.0, 2.0],       # a class of zero probability
        [float("-inf"), 0.0, 1.0, 2.0],       # the true class has zero probability: inf
        [60.0, -60.0, -60.0, -60.0],          # very confident, right
        [1e4, -1e4, 3e3, 0.0],
        [5.0, 5.0, 5.0, 5.0],                 # equal logits
    ], dtype=torch.float64)
    target = torch.tensor([2, 0, 0, 1, 3])
    for weight in (None, torch.tensor([1.0, 0.0, 2.0, 1e6], dtype=torch.float64)):
        got = fastsel.score(logits, target, weight=weight, label_smoothing=eps, backend=backend).loss
        want = _want(logits, target, weight, eps)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("case", [
    ("equal 1e30", torch.tensor([[1e30, 1e30]]), [0], None),
    ("equal 1e30, weight 1e10", torch.tensor([[1e30, 1e30]]), [0], [1e10, 1.0]),
    ("near float32's max", torch.tensor([[3e38, 3e38, 0.0]]), [0], None),
    ("float64's max", torch.tensor([[1e308, 1e308]], dtype=torch.float64), [0], None),
    ("1e6 + O(1)", 1e6 + torch.tensor([[0.3, -1.2, 2.0, 0.5], [1.1, 0.0, -0.7, 0.2]]), [0, 3], None),
    ("infinite class weight", torch.tensor([[0.0, 1.0], [float("-inf"), 1.0]]), [0, 1], [1.0, float("inf")]),
    ("bfloat16 |z| ~ 1e3", (torch.randn(5, 9, generator=torch.Generator().manual_seed(3)) * 300).bfloat16(),
     [0, 1, 2, 3, 4], [0.5, 1.0, 2.0, 0.1, 1.0, 1.0, 3.0, 0.2, 1.0]),
], ids=lambda c: c[0])
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_huge_logits_neither_cancel_nor_overflow(backend, case, eps):
    """The smoothing term sums -log p_j = (lse - m) + (m - z_j), never W lse - sum w_j z_j:
    at 1e30 the latter cancels to garbage, near float32's maximum it overflows."""
    _, logits, target, weight = case
    target = torch.tensor(target)
    weight = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    got = fastsel.score(logits, target, weight=weight, label_smoothing=eps, backend=backend).loss
    want = _want(logits, target, weight, eps)
    torch.testing.assert_close(got.double(), want, rtol=1e-6 if logits.dtype != torch.float64 else 1e-12,
                               atol=0, equal_nan=True)


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_gradients_match_cross_entropy(backend, eps):
    """First and second derivatives (float64 gradcheck, and against F.cross_entropy's)."""
    logits, target, weight = _case(6, 5, seed=11, dtype=torch.float64, scale=1.0)
    x = logits.clone().requires_grad_(True)

    def f(z):
        return fastsel.score(z, target, weight=weight, label_smoothing=eps, backend=backend).loss

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    g = torch.randn(6, dtype=torch.float64)
    got, = torch.autograd.grad(f(x), x, g, create_graph=True)
    want, = torch.autograd.grad(F.cross_entropy(x, target, weight=weight, reduction="none",
                                                label_smoothing=eps), x, g, create_graph=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    v = torch.randn_like(x)
    gg, = torch.autograd.grad((got * v).sum(), x)
    wg, = torch.autograd.grad((want * v).sum(), x)
    torch.testing.assert_close(gg, wg, rtol=1e-10, atol=1e-12)
    assert (got[1] == 0).all()  # the ignored row has no gradient


def test_empty_batch_and_meta(backend):
    w = torch.ones(4)
    s = fastsel.score(torch.empty(0, 4), torch.empty(0, dtype=torch.long), weight=w, label_smoothing=0.1,
                      backend=backend)
    assert s.loss.shape == (0,)
    m = fastsel.score(torch.empty(3, 4, device="meta"), torch.zeros(3, dtype=torch.long, device="meta"),
                      weight=torch.ones(4, device="meta"), label_smoothing=0.1)
    assert m.loss.shape == (3,) and m.loss.device.type == "meta" and m.loss.dtype == torch.float32


def test_inputs_not_mutated(backend):
    logits, target, weight = _case(9, 5, seed=2)
    copies = [t.clone() for t in (logits, target, weight)]
    fastsel.score(logits, target, weight=weight, label_smoothing=0.4, backend=backend)
    for t, c in zip((logits, target, weight), copies):
        assert torch.equal(t, c)


def test_head_accepts_the_layer_the_weight_and_an_mms_head(backend):
    """head= is the one name for the MMS classifier: a layer, its weight, or an MmsHead."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(8, 6)
    x = torch.randn(20, 8)
    logits = fc(x).detach()
    target = torch.randint(0, 6, (20,))
    by_weight = fastsel.score(logits, target, head=fc.weight.detach(), backend=backend)
    by_layer = fastsel.score(logits, target, head=fc, backend=backend)
    by_head = fastsel.score(logits, target, head=fastsel.mms_head(fc.weight.detach()), backend=backend)
    assert_scores_close(by_layer, by_weight, torch.float32)
    assert_scores_close(by_head, by_weight, torch.float32)
    assert by_layer.mms is not None and torch.isfinite(by_layer.mms).all()


def test_select_passes_the_options_through(backend):
    logits, target, weight = _case(30, 5, seed=8, ignore=False)
    sel = fastsel.select(logits, target, 5, by="loss", weight=weight.float(), label_smoothing=0.1,
                         backend=backend)
    want = _want(logits, target, weight.float(), 0.1)
    assert set(sel.indices.tolist()) == set(want.topk(5).indices.tolist())
    with pytest.raises(ValueError, match="head="):
        fastsel.select(logits, target, 5, by="mms", backend=backend)


@requires_extension
def test_compiles_fullgraph():
    logits, target, weight = _case(12, 7, seed=4)
    w = weight.float()

    def f(z, t, w):
        return fastsel.score(z, t, weight=w, label_smoothing=0.1, backend="cpu").loss

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, target, w)
    torch.testing.assert_close(got.double(), _want(logits, target, w, 0.1), rtol=2e-5, atol=2e-5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 12), c=st.integers(1, 9), eps=st.floats(0, 1), weighted=st.booleans(),
       scale=st.sampled_from([0.1, 3.0, 40.0]), seed=st.integers(0, 2**16))
def test_property_float64(n, c, eps, weighted, scale, seed):
    logits, target, weight = _case(n, c, seed=seed, dtype=torch.float64, scale=scale)
    w = weight if weighted else None
    for backend in fastsel.available_backends():
        if backend in ("cpu", "torch"):
            got = fastsel.score(logits, target, weight=w, label_smoothing=eps, backend=backend).loss
            torch.testing.assert_close(got, _want(logits, target, w, eps), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_class_weights_may_require_grad(backend, eps):
    """F.cross_entropy refuses a weight that requires grad; score gives its gradient (the
    explicit formula with log_softmax is the oracle), and uses no in-place op that would
    break it."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    t = torch.tensor([0, 1, 2, 3, -100, 1])
    w = (torch.rand(4, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    lp = F.log_softmax(z, 1)
    y = t.clamp(min=0)
    want = (1 - eps) * w[y] * -lp.gather(1, y[:, None]).squeeze(1) + eps / 4 * -(lp * w).sum(1)
    want = torch.where(t != -100, want, torch.zeros_like(want))
    got = fastsel.score(z, t, weight=w, label_smoothing=eps, backend=backend).loss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (z, w)), torch.autograd.grad(want.sum(), (z, w))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

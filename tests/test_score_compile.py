"""The compiled ops under ``torch.library.opcheck`` and ``torch.compile``.

Everything here needs the C++ extension ``fastsel._C`` (``torch.ops.fastsel.*``).
"""

from __future__ import annotations

import functools

import pytest
import torch

import fastsel
from fastsel_test_helpers import assert_scores_close, oracle, random_logits, random_target, requires_extension

pytestmark = requires_extension  # skip the whole module without fastsel._C

dtype_ids = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}


def _forward_samples():
    """(id, args) for torch.ops.fastsel.score_forward: (logits, target, ignore_index, weight, mode)."""
    out = []
    for dtype in (torch.float32, torch.float64):
        for mode in (0, 1, 2):
            for requires_grad in (False, True):
                n, c = 6, 7
                x = random_logits(n, c, dtype=dtype, seed=mode).requires_grad_(requires_grad)
                t = random_target(n, c, seed=mode)
                t[2] = -100
                w = None if mode == 0 else torch.randn(c, 3, dtype=dtype)
                out.append(pytest.param(
                    (x, t, -100, w, mode),
                    id=f"{dtype_ids[dtype]}-mode{mode}-{'grad' if requires_grad else 'nograd'}",
                ))
    # Custom ignore_index, int32 target, mixed weight dtype, non-contiguous logits, C = 1.
    x = random_logits(5, 9, seed=1).t().contiguous().t().requires_grad_(True)
    t = torch.tensor([0, 3, 8, 3, 1], dtype=torch.int32)
    out.append(pytest.param((x, t, 3, torch.randn(9, 4, dtype=torch.float64), 1), id="strided-int32-ignore3"))
    out.append(pytest.param((torch.randn(4, 1, requires_grad=True), torch.tensor([0, 0, -100, 0]), -100,
                             torch.randn(1, 2), 2), id="C1"))
    out.append(pytest.param((torch.randn(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long), -100,
                             None, 0), id="N0"))
    out.append(pytest.param((random_logits(3, 2500, seed=2, dtype=torch.bfloat16), random_target(3, 2500),
                             -100, torch.randn(2500, 8), 1), id="bf16-C2500-exact"))
    w = torch.randn(300, 8)  # with an MmsHead's max_distance (the sixth, optional argument)
    out.append(pytest.param((random_logits(5, 300, seed=3).requires_grad_(True), random_target(5, 300), -100,
                             w, 1, fastsel.mms_head(w).max_distance), id="C300-exact-max_distance"))
    return out


def _opcheck(op, args):
    """``torch.library.opcheck`` that tolerates NaN outputs.

    opcheck's ``test_aot_dispatch_dynamic`` compares eager and AOT outputs with
    ``torch.testing.assert_close`` WITHOUT ``equal_nan``, so any sample with an ignored row
    (NaN ``true_margin`` / ``grad_norm`` by design) would fail it spuriously. For those
    samples run the other opcheck utils, then the same AOTAutograd check with
    ``equal_nan=True`` (same internal helper opcheck uses).
    """
    with torch.no_grad():
        outs = op(*args)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    has_nan = any(o.is_floating_point() and bool(torch.isnan(o).any()) for o in outs)
    if not has_nan:
        torch.library.opcheck(op, args)
        return
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    from torch.testing._internal.optests.aot_autograd import aot_autograd_check
    from torch.utils import _pytree as pytree

    def func(*a):
        a = pytree.tree_map_only(torch.Tensor, torch.clone, a)
        return op(*a)

    aot_autograd_check(func, args, {}, True, check_gradients="auto",
                       assert_equals_fn=functools.partial(torch.testing.assert_close, equal_nan=True))


@pytest.mark.parametrize("args", _forward_samples())
def test_opcheck_score_forward(args):
    _opcheck(torch.ops.fastsel.score_forward.default, args)


@pytest.mark.parametrize("args", _forward_samples()[:6])
def test_score_forward_op_matches_oracle(args):
    """The raw op returns the 9 outputs in order, mms empty [0] for mode 0."""
    x, t, ignore_index, w, mode = args
    out = torch.ops.fastsel.score_forward(x, t, ignore_index, w, mode)
    assert len(out) == 9
    if mode == 0:
        assert out[7].shape == (0,)
    mms = {0: "exact", 1: "exact", 2: "top2"}[mode]
    got = fastsel.Scores(*out[:7], out[7] if mode else None, out[8])
    assert_scores_close(got, oracle(x, t, weight=w if mode else None, mms=mms, ignore_index=ignore_index),
                        x.dtype, logits=x)


def _backward_samples():
    out = []
    for dtype in (torch.float32, torch.float64):
        n, c = 5, 8
        x = random_logits(n, c, dtype=dtype, seed=3)
        t = random_target(n, c, seed=4)
        t[1] = -100
        lse = torch.logsumexp(x, dim=1)
        g = torch.randn(n, dtype=dtype)
        out.append(pytest.param((g, x, t, lse, -100), id=dtype_ids[dtype]))
    x = random_logits(4, 6, seed=5)[:, :5]  # non-contiguous logits
    t = torch.tensor([0, 2, 4, 2], dtype=torch.int32)
    out.append(pytest.param((torch.randn(4), x, t, torch.logsumexp(x, 1), 2), id="strided-int32-ignore2"))
    return out


@pytest.mark.parametrize("args", _backward_samples())
def test_opcheck_score_backward(args):
    _opcheck(torch.ops.fastsel.score_backward.default, args)


@pytest.mark.parametrize("args", _backward_samples())
def test_score_backward_op_values(args):
    g, x, t, lse, ignore_index = args
    got = torch.ops.fastsel.score_backward(g, x, t, lse, ignore_index)
    assert got.shape == x.shape and got.dtype == x.dtype
    tt = t.long()
    ignored = tt == ignore_index
    y = torch.where(ignored, torch.zeros_like(tt), tt)
    p = torch.softmax(x.double(), dim=1)
    want = (p - torch.nn.functional.one_hot(y, x.shape[1]).double()) * torch.where(
        ignored, torch.zeros_like(g), g).double()[:, None]
    tol = 1e-12 if x.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), want, rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("bad", ["logits_1d", "mode_3", "mode_1_without_weight", "target_short", "target_range"])
def test_raw_op_rejects_bad_input(bad):
    """The kernel checks its inputs itself (it is reachable without fastsel.score)."""
    x, t, w = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), torch.randn(5, 2)
    args = {
        "logits_1d": (torch.randn(5), t, -100, None, 0),
        "mode_3": (x, t, -100, w, 3),
        "mode_1_without_weight": (x, t, -100, None, 1),
        "target_short": (x, t[:3], -100, None, 0),
        "target_range": (x, torch.tensor([0, 1, 2, 5]), -100, None, 0),
    }[bad]
    with pytest.raises((RuntimeError, ValueError, IndexError, TypeError)):
        torch.ops.fastsel.score_forward(*args)


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------

def _fn(x, t):
    s = fastsel.score(x, t)
    return s.loss.mean() + s.entropy.sum()


def _fn_weight(x, t, w):
    s = fastsel.score(x, t, head=w, mms="top2")
    return s.loss.mean() + s.entropy.sum() + s.mms.sum() + s.pred.sum()


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_forward_and_backward():
    n, c = 16, 10
    x = random_logits(n, c, seed=1)
    t = random_target(n, c, ignore_frac=0.2)
    compiled = torch.compile(_fn, fullgraph=True)

    xe = x.clone().requires_grad_(True)
    eager = _fn(xe, t)
    eager.backward()
    xc = x.clone().requires_grad_(True)
    got = compiled(xc, t)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
    # The eager gradient is the cross-entropy gradient / N (entropy carries none).
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(xr, t, reduction="none").mean().backward()
    torch.testing.assert_close(xe.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_with_weight():
    n, c = 12, 9
    x = random_logits(n, c, seed=2)
    t = random_target(n, c)
    w = torch.randn(c, 4)
    compiled = torch.compile(_fn_weight, fullgraph=True)
    torch.testing.assert_close(compiled(x, t, w), _fn_weight(x, t, w), rtol=1e-5, atol=1e-4)


def test_compile_dynamic_two_batch_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_fn, fullgraph=True, dynamic=True, backend=counter)
    c = 7
    frames = []
    for n in (5, 11):
        x = random_logits(n, c, seed=n)
        t = random_target(n, c, seed=n)
        xe = x.clone().requires_grad_(True)
        eager = _fn(xe, t)
        eager.backward()
        xc = x.clone().requires_grad_(True)
        got = compiled(xc, t)
        got.backward()
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
    # The first call may compile twice: with a cold inductor cache dynamo restarts its first
    # analysis once to specialize a float (label_smoothing's default). The second batch
    # size must compile nothing.
    assert frames[0] >= 1 and frames[1] == frames[0], f"recompiled for a new batch size: frames {frames}"


def test_compile_fullgraph_with_mms_head():
    """An MmsHead traces too (its in-place-update check is skipped while compiling) and
    gives the plain weight's MMS."""
    weight = torch.randn(300, 16, generator=torch.Generator().manual_seed(4))
    head = fastsel.mms_head(weight)
    logits, target = random_logits(64, 300, seed=4), random_target(64, 300)
    compiled = torch.compile(lambda x, y: fastsel.score(x, y, head=head, backend="cpu").mms, fullgraph=True)
    assert torch.equal(compiled(logits, target), fastsel.score(logits, target, head=weight, backend="cpu").mms)

"""fastsel.score(backend="triton") end to end: dispatch, custom op, autograd (interpreter)."""

import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel.reference import score_reference


def test_score_triton_backend_matches_reference_and_grad():
    torch.manual_seed(0)
    logits = (torch.randn(9, 37) * 3).requires_grad_()
    target = torch.randint(0, 37, (9,))
    target[4] = -100
    weight = torch.randn(37, 5)
    s = fastsel.score(logits, target, head=weight, backend="triton")
    want = score_reference(logits.detach().double(), target, -100, weight.double(), "exact")
    for name in ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "mms", "lse"):
        torch.testing.assert_close(getattr(s, name).double(), getattr(want, name),
                                   rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
    assert torch.equal(s.pred, want.pred)
    assert not s.entropy.requires_grad
    (s.loss * torch.arange(9.0)).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    (F.cross_entropy(logits, target, reduction="none") * torch.arange(9.0)).sum().backward()
    torch.testing.assert_close(grad, logits.grad, rtol=1e-5, atol=1e-6)


def test_score_triton_backend_opcheck():
    torch.manual_seed(1)

    logits = torch.randn(5, 12, requires_grad=True)
    target = torch.randint(0, 12, (5,))
    torch.library.opcheck(torch.ops.fastsel.triton_score_forward.default,
                          (logits, target, -100, None, 0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_score_triton_backend_rejects_bad_target():
    with pytest.raises(IndexError, match="target"):
        fastsel.score(torch.randn(3, 4), torch.tensor([0, 4, 1]), backend="triton")


def test_score_triton_backend_double_backward():
    """Gradient penalties and gradgradcheck through the Triton ops (the backward op has
    its own autograd formula)."""
    torch.manual_seed(2)
    target = torch.tensor([0, 3, -100, 1, 4])
    x = (torch.randn(5, 6, dtype=torch.float64) * 2).requires_grad_()
    u = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda z, w: fastsel.score(z, target, backend="triton").loss * w, (x, u), eps=1e-6, atol=1e-7, rtol=1e-5)

    def penalty(fn, z):
        z = z.detach().requires_grad_()
        g, = torch.autograd.grad(fn(z).sum(), z, create_graph=True)
        h, = torch.autograd.grad(g.norm(), z)
        return h

    x32 = torch.randn(5, 6) * 3
    got = penalty(lambda z: fastsel.score(z, target, backend="triton").loss, x32)
    want = penalty(lambda z: F.cross_entropy(z, target, reduction="none"), x32)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


def test_triton_backward_op_refuses_lse_that_requires_grad():

    x = torch.randn(3, 4)
    lse = torch.logsumexp(x, dim=1).requires_grad_()
    with pytest.raises(RuntimeError, match="lse must not require grad"):
        torch.ops.fastsel.triton_score_backward(torch.ones(3), x, torch.tensor([0, 1, 2]), lse, -100)


@pytest.mark.parametrize("mms", [None, "exact", "top2"])
@pytest.mark.parametrize("n,c", [(0, 5), (6, 5), (37, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_returns_the_contracts_outputs(mms, n, c, dtype):
    """The output-by-output check of tests/test_contract.py on the Triton backend."""
    from test_contract import check_outputs_follow_contract

    check_outputs_follow_contract("triton", mms, n, c, dtype)

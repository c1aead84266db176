"""The GPU backends on a CUDA device (skipped without one; ``make gpu-check`` runs them):
``cuda`` and ``triton`` against the float64 reference on CUDA tensors, their gradients,
and the selection ops picking the same samples as the CPU for one seed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastsel
from fastsel_test_helpers import assert_scores_close, oracle, random_logits, random_target

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in fastsel.available_backends()]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not GPU_BACKENDS,
                                reason="GPU-only: needs a CUDA device and a GPU backend (cuda or triton)")


@pytest.fixture(params=GPU_BACKENDS or ["none"])
def gpu_backend(request):
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (256, 1000), (4096, 32000)])
@pytest.mark.parametrize("mms", [None, "exact", "top2"])
def test_scores_match_the_reference(gpu_backend, dtype, shape, mms):
    n, c = shape
    logits = random_logits(n, c, dtype=dtype, seed=n + c).cuda()
    target = random_target(n, c, seed=c).cuda()
    head = None if mms is None else torch.randn(c, 64, generator=torch.Generator().manual_seed(c)).cuda()
    got = fastsel.score(logits, target, head=head, mms=mms or "exact", backend=gpu_backend)
    want = oracle(logits.cpu(), target.cpu(), weight=None if head is None else head.cpu(), mms=mms or "exact")
    assert_scores_close(type(got)(*(None if t is None else t.cpu() for t in got)), want, dtype, logits=logits.cpu())


def test_gradient_and_loss_options(gpu_backend):
    logits = random_logits(64, 50, seed=3).cuda().requires_grad_(True)
    target = random_target(64, 50, seed=4).cuda()
    w = torch.rand(50, device="cuda") + 0.5
    got = fastsel.score(logits, target, weight=w, label_smoothing=0.1, backend=gpu_backend).loss
    want = F.cross_entropy(logits.double(), target, weight=w.double(), reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    g, = torch.autograd.grad(got.sum(), logits)
    gw, = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g.double(), gw, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("op", ["topk", "sample", "sample_replacement"])
def test_selection_picks_what_the_cpu_picks(gpu_backend, op):
    values = torch.rand(100_000, generator=torch.Generator().manual_seed(5))
    cpu = "cpu" if "cpu" in fastsel.available_backends() else "torch"

    def pick(x, backend):
        if op == "topk":
            return fastsel.select_topk(x, 1000, backend=backend).indices
        return fastsel.sample(x, 1000, replacement=op == "sample_replacement", seed=7, counter=3,
                              backend=backend).indices

    assert torch.equal(pick(values.cuda(), gpu_backend).cpu(), pick(values, cpu))

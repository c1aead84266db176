"""Triton backend of fastsel against the specification ``fastsel.reference``.

Runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, see conftest.py);
the interpreter pays per program and per tl operation, so shapes are small and a small
``block_c`` makes the kernels' online column loop run on them. The oracle is the
reference evaluated in float64 on the same (possibly fp16/bf16-rounded) input, so every
dtype gets float32-like tolerances (float64: tight ones). GPU-only tests at vocabulary
sizes run when CUDA is available.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from fastsel.reference import Scores, score_backward_reference, score_reference  # noqa: E402
from fastsel.triton import (  # noqa: E402
    TRITON_AVAILABLE,
    mms_exact,
    score_backward_triton,
    score_forward_triton,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MMS_MODE = {None: 0, "exact": 1, "top2": 2}
NEG_INF, POS_INF, NAN = float("-inf"), float("inf"), float("nan")


# ---- helpers ------------------------------------------------------------------------------

def triton_scores(logits, target, *, ignore_index=-100, weight=None, mms=None, **tiles) -> Scores:
    """score_forward_triton as a ``Scores`` (mms None when not requested)."""
    mode = MMS_MODE[mms if weight is not None else None]
    out = score_forward_triton(logits, target, ignore_index, weight, mode, **tiles)
    assert len(out) == 9
    if mode == 0:
        assert out[7].shape == (0,), "mms must be an empty [0] tensor when mms_mode == 0"
    return Scores(*out[:7], out[7] if mode else None, out[8])


def oracle(logits, target, *, ignore_index=-100, weight=None, mms=None) -> Scores:
    """The reference in float64 on exactly the values the kernel saw."""
    w = None if weight is None else weight.double()
    return score_reference(logits.double(), target, ignore_index, w, mms or "exact")


def assert_matches(got: Scores, want: Scores, dtype: torch.dtype, msg: str = "") -> None:
    """Field by field: dtype, shape, NaN / inf positions, values within tolerance, pred exact."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    finite_lse = want.lse[torch.isfinite(want.lse)]
    scale = max(1.0, float(finite_lse.abs().max())) if finite_lse.numel() else 1.0
    rtol, atol = (1e-9, 1e-11 * scale) if dtype == torch.float64 else (1e-4, 1e-5 * scale)
    n = want.lse.shape[0]
    for name in Scores._fields:
        g, w = getattr(got, name), getattr(want, name)
        where = f"{msg} field {name!r} ({dtype})"
        if w is None:
            assert g is None, where
            continue
        assert g.shape == (n,), f"{where}: shape {tuple(g.shape)}"
        if name == "pred":
            assert g.dtype == torch.int64, where
            assert torch.equal(g, w), f"{where}: {g.tolist()} != {w.tolist()}"
            continue
        assert g.dtype == acc, f"{where}: dtype {g.dtype} != {acc}"
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{where}: {m}")


def check(logits, target, *, ignore_index=-100, weight=None, mms=None, msg="", **tiles) -> Scores:
    got = triton_scores(logits, target, ignore_index=ignore_index, weight=weight, mms=mms, **tiles)
    want = oracle(logits, target, ignore_index=ignore_index, weight=weight, mms=mms)
    assert_matches(got, want, logits.dtype, msg)
    return got


def random_logits(n, c, *, dtype=torch.float32, scale=3.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.float64 if dtype == torch.float64 else torch.float32
    return (torch.randn(n, c, generator=g, dtype=base) * scale).to(dtype)


def random_target(n, c, *, seed=1, dtype=torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c, (n,), generator=g).to(dtype)


def random_weight(c, d=6, *, seed=2, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c, d, generator=g).to(dtype)


# ---- values on ordinary inputs ------------------------------------------------------------

def test_triton_available():
    assert TRITON_AVAILABLE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,block_c", [
    ((1, 1), None),     # C = 1: no competitor, margins +inf
    ((5, 1), None),
    ((1, 7), None),     # N = 1, C not a power of two
    ((13, 37), None),   # one column block, padded
    ((13, 37), 8),      # several blocks, the last one partial
    ((6, 300), 32),     # many blocks
])
def test_matches_reference(dtype, shape, block_c):
    n, c = shape
    logits = random_logits(n, c, dtype=dtype, seed=n * 1000 + c)
    target = random_target(n, c, seed=c)
    check(logits, target, block_c=block_c, msg=f"shape {shape}, block_c {block_c}")


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int64], ids=str)
def test_target_dtypes(target_dtype):
    logits = random_logits(9, 20, seed=3)
    target = random_target(9, 20, seed=4, dtype=target_dtype)
    target[2] = -100
    check(logits, target, block_c=8)


def test_single_row_packing_and_tiles():
    """Results do not depend on how rows and columns are tiled."""
    logits = random_logits(11, 45, seed=5)
    target = random_target(11, 45, seed=6)
    want = oracle(logits, target)
    for block_n, block_c in [(1, 4), (2, 16), (4, 64), (16, 8)]:
        got = triton_scores(logits, target, block_n=block_n, block_c=block_c)
        assert_matches(got, want, logits.dtype, f"tiles ({block_n}, {block_c})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_tiles_wide_rows(dtype):
    """Default tile choice on rows wider than one 4096-column block; the exact MMS takes
    its chunked path (C above MMS_DENSE_MAX_CLASSES) with the default chunk size."""
    n, c = 3, 5000
    assert c > mms_exact.MMS_DENSE_MAX_CLASSES
    logits = random_logits(n, c, dtype=dtype, seed=40)
    logits[1, 4500] = 40.0  # the maximum in the second block
    logits[2, 17] = NEG_INF
    target = random_target(n, c, seed=41)
    weight = random_weight(c, d=4, seed=42)
    check(logits, target, weight=weight, mms="exact")
    check(logits, target, weight=weight, mms="top2")


def test_tile_sizes_must_be_powers_of_two():
    logits, target = random_logits(2, 10), random_target(2, 10)
    with pytest.raises(ValueError, match="power of two"):
        score_forward_triton(logits, target, -100, None, 0, block_c=12)
    with pytest.raises(ValueError, match="power of two"):
        score_backward_triton(torch.ones(2), logits, target, torch.zeros(2), -100, block_n=3)


def test_empty_batch():
    logits = torch.empty(0, 10)
    target = torch.empty(0, dtype=torch.int64)
    for weight, mms in [(None, None), (random_weight(10), "exact"), (random_weight(10), "top2")]:
        out = score_forward_triton(logits, target, -100, weight, MMS_MODE[mms])
        assert all(t.shape == (0,) for t in out)
        assert out[6].dtype == torch.int64 and out[0].dtype == torch.float32
    grad = score_backward_triton(torch.empty(0), logits, target, torch.empty(0), -100)
    assert grad.shape == (0, 10)


def test_large_logits_and_offsets():
    """Logits far from 0 (entropy / loss must not cancel) and a shifted copy agree."""
    logits = random_logits(8, 50, seed=7) + 1000.0
    target = random_target(8, 50, seed=8)
    check(logits, target, block_c=16)


def test_confident_rows_keep_relative_accuracy():
    """p_(1) rounds to 1 in float32; loss, 1 - p_y and entropy must still be accurate
    (the state keeps d - 1 exact, docs/methods.md section 1)."""
    c, gap = 10, 30.0
    logits = torch.zeros(2, c)
    logits[:, 3] = gap
    target = torch.tensor([3, 0])
    got = triton_scores(logits, target, block_c=4)
    k = (c - 1) * math.exp(-gap)            # d - 1
    loss_hit = math.log1p(k)
    p_rest = math.exp(-gap) / (1 + k)
    grad_hit = math.sqrt((k / (1 + k)) ** 2 + (c - 1) * p_rest ** 2)
    entropy = math.log1p(k) + gap * k / (1 + k)
    def close(value, rel):  # pytest.approx's default abs=1e-12 would accept 0 here
        return pytest.approx(value, rel=rel, abs=0)

    assert got.loss[0].item() == close(loss_hit, 1e-5)
    assert got.loss[1].item() == close(gap + loss_hit, 1e-6)
    assert got.grad_norm[0].item() == close(grad_hit, 1e-5)
    assert got.entropy[0].item() == close(entropy, 1e-5)
    assert got.confidence[0].item() == close(1 / (1 + k), 1e-6)


# ---- conventions ----------------------------------------------------------------------------

def test_ties_lowest_index_wins():
    """Maxima and runner-ups tied within and across column blocks (block_c = 4)."""
    rows = [
        [1, 5, 5, 2, 5, 0, 0, 0, 0, 0],   # max tied 3x: pred 1, margin 0
        [0, 3, 0, 0, 7, 3, 0, 3, 0, 0],   # runner-up 3 tied across blocks: i2 = 1
        [2, 2, 2, 2, 2, 2, 2, 2, 2, 2],   # all equal
        [0, 0, 0, 0, 0, 0, 0, 0, 4, 4],   # tied max in the last block
        [9, 1, 1, 1, 9, 1, 1, 1, 1, 1],   # max in block 0 and block 1
        [1, 1, 1, 1, 1, 1, 1, 8, 1, 8],
    ]
    logits = torch.tensor(rows, dtype=torch.float32)
    target = torch.tensor([2, 5, 4, 9, 4, 0])
    weight = random_weight(10, seed=9)
    got = check(logits, target, weight=weight, mms="top2", block_c=4)
    assert got.pred.tolist() == [1, 4, 0, 8, 0, 7]
    assert got.margin[[0, 2, 3, 4]].tolist() == [0, 0, 0, 0]
    check(logits, target, weight=weight, mms="exact", block_c=4)
    check(logits.to(torch.bfloat16), target, weight=weight, mms="top2", block_c=4)


def test_ties_fuzz():
    """Rows from a small set of values (many ties, -inf) across blocks, every mms mode."""
    values = torch.tensor([NEG_INF, -1.0, 0.0, 1.0, 2.0, 2.5])
    g = torch.Generator().manual_seed(10)
    for seed, c in enumerate([1, 2, 3, 5, 9, 17, 33]):
        idx = torch.randint(0, len(values), (12, c), generator=g)
        logits = values[idx]
        logits[0] = NEG_INF  # an all -inf row
        logits[1, 0] = 2.5   # ... and a row whose only finite value may be one element
        logits[1, 1:] = NEG_INF
        target = torch.randint(0, c, (12,), generator=g)
        target[3] = -100
        weight = random_weight(c, seed=seed)
        for mms in ("exact", "top2"):
            check(logits, target, weight=weight, mms=mms, block_c=4, msg=f"C {c}, {mms}")


@pytest.mark.parametrize("ignore_index", [-100, -1, 3], ids=lambda v: f"ignore{v}")
def test_ignore_index(ignore_index):
    logits = random_logits(10, 12, seed=11)
    target = random_target(10, 12, seed=12)
    target[[1, 4, 9]] = ignore_index
    got = check(logits, target, ignore_index=ignore_index, block_c=8)
    ignored = target == ignore_index
    assert (got.loss[ignored] == 0).all()
    assert got.true_margin[ignored].isnan().all() and got.grad_norm[ignored].isnan().all()
    assert not got.entropy[ignored].isnan().any()


def test_negative_infinity_entries():
    c = 10
    logits = random_logits(6, c, seed=13)
    logits[0, [0, 3, 9]] = NEG_INF      # some zero-probability classes
    logits[1] = NEG_INF                 # only -inf: invalid row, pred 0
    logits[2, :] = NEG_INF
    logits[2, 6] = 1.5                  # a single finite value: margin +inf
    logits[3, 4] = NEG_INF              # -inf at the target: loss +inf
    logits[4, :5] = NEG_INF             # a whole -inf block (block_c = 4) before the max
    target = torch.tensor([3, 1, 6, 4, 7, 0])
    weight = random_weight(c, seed=14)
    for mms in ("exact", "top2"):
        got = check(logits, target, weight=weight, mms=mms, block_c=4)
    assert got.loss[3].item() == POS_INF and got.true_margin[3].item() == NEG_INF
    assert got.margin[2].item() == POS_INF and got.loss[2].item() == 0.0
    assert got.lse[1].isnan() and got.pred[1].item() == 0


def test_invalid_rows_nan_and_inf():
    c = 12
    logits = random_logits(8, c, seed=15)
    logits[0, 5] = NAN
    logits[1, 10] = POS_INF
    logits[2, 2] = POS_INF
    logits[2, 9] = NAN                  # +inf before a NaN: pred is the NaN
    logits[3, [4, 7]] = POS_INF         # two +inf: pred is the first
    logits[4, [1, 11]] = NAN
    logits[5, 3] = NAN
    logits[6, :] = NEG_INF
    logits[6, 8] = NAN                  # NaN among -inf
    target = torch.tensor([5, 0, 2, 4, 1, 3, 8, 2])
    target[5] = -100                    # ignored invalid row: loss 0
    weight = random_weight(c, seed=16)
    for dtype in DTYPES:
        for mms in ("exact", "top2"):
            got = check(logits.to(dtype), target, weight=weight, mms=mms, block_c=4, msg=mms)
    assert got.pred[:7].tolist() == [5, 10, 9, 4, 1, 3, 8]
    assert got.loss[5].item() == 0.0 and got.loss[:5].isnan().all()
    assert got.mms[:7].isnan().all() and not got.mms[7].isnan()


def test_non_contiguous_inputs():
    base = random_logits(40, 24, seed=17)
    target = random_target(80, 19, seed=18)[::2]  # strided; classes valid for every C >= 19
    # transposed storage (column stride > 1), a row step, a column slice, both strides
    for logits in (base.t().contiguous().t(), base[::3], base[:, 2:21], base.t()[:, ::2].t()):
        tgt = target[: logits.shape[0]]
        assert not tgt.is_contiguous() and not logits.is_contiguous()
        check(logits, tgt, block_c=8, msg=f"strides {logits.stride()}")
        check(logits, tgt, weight=random_weight(logits.shape[1]), mms="exact", block_c=8)


# ---- Minimal Margin Score -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mms", ["exact", "top2"])
def test_mms_matches_reference(dtype, mms):
    logits = random_logits(9, 21, dtype=dtype, seed=19)
    target = random_target(9, 21, seed=20)
    weight = random_weight(21, d=5, seed=21, dtype=dtype)
    check(logits, target, weight=weight, mms=mms, block_c=8)


def test_mms_single_class_is_inf():
    logits = random_logits(4, 1, seed=22)
    target = torch.zeros(4, dtype=torch.int64)
    for mms in ("exact", "top2"):
        got = check(logits, target, weight=random_weight(1), mms=mms)
        assert (got.mms == POS_INF).all()


def test_mms_ties_and_identical_weight_rows():
    """A tie contributes 0 whatever the distance; identical rows (distance 0) give +inf."""
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [1.0, 0.0]])
    logits = torch.tensor([
        [4.0, 1.0, 2.0, 3.0, 0.0],   # w_0 == w_1 == w_4: those terms are +inf
        [4.0, 4.0, 2.0, 3.0, 0.0],   # tie with an identical row: 0
        [1.0, 0.0, 5.0, 5.0, 2.0],   # tie with a distinct row: 0
        [1.0, 0.0, 2.0, 3.0, 2.0],
    ])
    target = torch.tensor([0, 1, 2, 3])
    got = check(logits, target, weight=weight, mms="exact", block_c=2)
    assert got.mms[1:3].tolist() == [0.0, 0.0]
    check(logits, target, weight=weight, mms="top2", block_c=2)


def test_mms_exact_chunked_path(monkeypatch):
    """Above the dense threshold, inverse distances are built per chunk of rows."""
    monkeypatch.setattr(mms_exact, "MMS_DENSE_MAX_CLASSES", 16)
    monkeypatch.setattr(mms_exact, "MMS_CHUNK_ELEMENTS", 3 * 40)  # 3 rows per chunk
    logits = random_logits(10, 40, seed=23)
    logits[4, 7] = NAN  # an invalid row inside a chunk
    target = random_target(10, 40, seed=24)
    weight = random_weight(40, seed=25)
    check(logits, target, weight=weight, mms="exact", block_c=16)
    check(logits.to(torch.float64), target, weight=weight, mms="exact", block_c=16)
    check(logits.t().contiguous().t(), target, weight=weight, mms="exact", block_c=16)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "chunked"])
def test_mms_exact_near_duplicate_classes(monkeypatch, dense):
    """Classes 1 and 3 are 1e-3 apart relative to their norm: the Gram form of their
    distance cancels in float32 (~10% off). The MMS must match the difference of the rows."""
    if not dense:
        monkeypatch.setattr(mms_exact, "MMS_DENSE_MAX_CLASSES", 4)
        monkeypatch.setattr(mms_exact, "MMS_CHUNK_ELEMENTS", 2 * 12)
    g = torch.Generator().manual_seed(29)
    weight = torch.randn(12, 16, generator=g) * 4
    weight[3] = weight[1] + 1e-3 * torch.randn(16, generator=g)
    logits = random_logits(6, 12, seed=30)
    logits[:, 1], logits[:, 3] = 9.0, 8.99  # prediction 1, runner-up 3
    target = random_target(6, 12, seed=31)
    got = check(logits, target, weight=weight, mms="exact", block_c=4)
    w = weight.double()
    gap = 9.0 - logits.double()
    dist = (w[1] - w).norm(dim=1)
    ratio = (gap / dist).index_fill(1, torch.tensor([1]), POS_INF)
    torch.testing.assert_close(got.mms.double(), ratio.min(dim=1).values, rtol=1e-4, atol=0)


def test_mms_weight_dtype_differs_from_logits():
    logits = random_logits(6, 14, seed=26)
    target = random_target(6, 14, seed=27)
    weight = random_weight(14, seed=28, dtype=torch.float16)
    for mms in ("exact", "top2"):
        check(logits, target, weight=weight, mms=mms, block_c=8)


# ---- backward -------------------------------------------------------------------------------

def assert_backward_matches(logits, target, grad_loss, *, ignore_index=-100, **tiles):
    lse = score_reference(logits.double(), target, ignore_index).lse
    got = score_backward_triton(grad_loss, logits, target, lse, ignore_index, **tiles)
    want = score_backward_reference(grad_loss.double(), logits.double(), target, lse, ignore_index)
    assert got.dtype == logits.dtype and got.shape == logits.shape and got.is_contiguous()
    if logits.dtype in (torch.float16, torch.bfloat16):  # the result is rounded to the dtype
        eps = torch.finfo(logits.dtype).eps
        rtol, atol = eps, eps * float(grad_loss.abs().max())
    elif logits.dtype == torch.float32:
        rtol, atol = 1e-5, 1e-6
    else:
        rtol, atol = 1e-12, 1e-14
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(dtype):
    logits = random_logits(7, 37, dtype=dtype, seed=29)
    target = random_target(7, 37, seed=30, dtype=torch.int32)
    target[2] = -100
    grad_loss = torch.randn(7, generator=torch.Generator().manual_seed(31))
    grad_loss = grad_loss.to(torch.float64 if dtype == torch.float64 else torch.float32)
    got = assert_backward_matches(logits, target, grad_loss, block_c=8)
    assert (got[2] == 0).all()
    assert_backward_matches(logits, target, grad_loss)  # default tiles


def test_backward_special_rows_and_strides():
    c = 16
    base = random_logits(12, c, seed=32)
    base[0, [1, 5]] = NEG_INF    # zero-probability classes: gradient exactly 0 there
    base[4, 2] = NAN             # invalid row (row 2 of the slice): NaN gradient
    logits = base[::2]           # row stride 2 * C
    target = torch.arange(6) * 2 % c
    target[4] = 5                # custom ignore_index
    grad_loss = torch.linspace(-1, 2, 12)[::2]  # strided grad_loss
    got = assert_backward_matches(logits, target, grad_loss, ignore_index=5, block_c=4)
    assert got[0, [1, 5]].tolist() == [0.0, 0.0]
    assert (got[4] == 0).all()


def test_backward_zero_on_ignored_invalid_rows():
    """An ignored row has a constant loss: zero gradient even when its lse is NaN
    (the reference computes NaN * 0 = NaN there; the CPU kernel also gives 0)."""
    logits = random_logits(3, 6, seed=33)
    logits[1, 2] = NAN
    target = torch.tensor([0, -100, 3])
    lse = score_reference(logits.double(), target).lse
    got = score_backward_triton(torch.ones(3), logits, target, lse.float(), -100)
    assert (got[1] == 0).all() and torch.isfinite(got[[0, 2]]).all()


def test_forward_lse_feeds_backward():
    """The kernel's own lse gives the autograd gradient of sum(g * cross_entropy)."""
    logits = random_logits(5, 30, seed=34)
    target = random_target(5, 30, seed=35)
    out = score_forward_triton(logits, target, -100, None, 0, block_c=8)
    g = torch.randn(5, generator=torch.Generator().manual_seed(36))
    got = score_backward_triton(g, logits, target, out[8], -100, block_c=8)
    z = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(z, target, reduction="none").mul(g).sum().backward()
    torch.testing.assert_close(got, z.grad, rtol=1e-5, atol=1e-6)


# ---- GPU, vocabulary sizes ------------------------------------------------------------------

def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU-only test: needs a CUDA device (torch.cuda.is_available() is False)",
)


@requires_cuda
@pytest.mark.parametrize("c", [32000, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_vocabulary_sizes(c, dtype):
    n = 8  # few rows: under TRITON_INTERPRET the interpreter still runs these kernels
    logits = random_logits(n, c, dtype=dtype, seed=c).cuda()
    logits[1, 5] = NAN
    logits[2, c - 1] = 50.0
    target = random_target(n, c, seed=37).cuda()
    target[3] = -100
    weight = random_weight(c, d=16, seed=38).cuda()
    for mms in ("exact", "top2"):
        got = triton_scores(logits, target, weight=weight, mms=mms)
        want = oracle(logits, target, weight=weight, mms=mms)
        assert_matches(got, want, dtype, f"C {c} {mms}")
    grad_loss = torch.randn(n, device="cuda")
    lse = oracle(logits, target).lse
    grad = score_backward_triton(grad_loss, logits, target, lse.float(), -100)
    want = score_backward_reference(grad_loss.double(), logits.double(), target, lse)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    torch.testing.assert_close(grad.double(), want, rtol=eps, atol=eps * float(grad_loss.abs().max()),
                               equal_nan=True)


@pytest.mark.skipif(_interpreting(), reason="the interpreter copies tensors to the host (a sync)")
@requires_cuda
def test_gpu_launchers_do_not_sync():
    """No host synchronisation in the launchers (torch raises in sync debug mode 'error')."""
    c = 3000  # above the dense MMS threshold: the chunked path must not sync either
    logits = random_logits(16, c, dtype=torch.bfloat16, seed=43).cuda()
    target = random_target(16, c, seed=44).cuda()
    weight = random_weight(c, seed=45).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in (0, 1, 2):
            out = score_forward_triton(logits, target, -100, weight, mode)
        score_backward_triton(torch.ones(16, device="cuda"), logits, target, out[8], -100)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- the limits of floating point and non-finite weights ---------------------------------

def test_float64_rows_spanning_the_range():
    """z_j - m overflows to -inf for z_j = -1e308 against m = 1e308: a class of zero
    probability, not a NaN entropy; ties at 1e308 keep their log 2."""
    rows = [[1e308, -1e308], [-1e308, 1e308, 0.0], [1e308, 1e308, -1e308], [0.0, -50.0, -60.0]]
    for r in rows:
        z = torch.tensor([r] * len(r), dtype=torch.float64)
        t = torch.arange(len(r))
        got = triton_scores(z, t, block_c=2)
        want = score_reference(z, t)
        for name in ("loss", "entropy", "grad_norm", "confidence", "lse", "margin"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-13, atol=0,
                                       equal_nan=False, msg=f"{r} {name}")


@pytest.mark.parametrize("mms", ["exact", "top2"])
def test_mms_nonfinite_weight_rule(mms):
    torch.manual_seed(5)
    w = torch.randn(12, 5)
    w[3, 1] = NAN
    w[7, 0] = POS_INF
    x = torch.randn(40, 12)
    x[0, :] = 1.0  # a tie: 0 whatever the weight
    t = torch.randint(0, 12, (40,))
    got = triton_scores(x, t, weight=w, mms=mms, block_c=4).mms
    want = score_reference(x, t, -100, w, mms).mms
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and got[0] == 0
    if mms == "exact":
        assert torch.isnan(got[1:]).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)

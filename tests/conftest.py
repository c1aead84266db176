"""Shared helpers for the fastsel test suite.

* ``oracle``: the pure-PyTorch reference evaluated in float64 (the specification).
* ``assert_scores_close``: field-by-field comparison of two ``Scores`` with tolerances
  that depend on the dtype of the logits that were scored.
* ``backend`` fixture: every backend usable in this process (``"cpu"`` joins
  ``"torch"`` automatically once the C++ extension ``fastsel._C`` is built).
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import pytest
import torch

import fastsel
from fastsel.reference import score_reference

# Backends that run on CPU tensors (every test here builds CPU tensors). GPU backends
# ("cuda", "triton") appear in available_backends() only with a CUDA device and need
# device-aware tests (tests/triton/ covers Triton through its interpreter).
CPU_TENSOR_BACKENDS = ("cpu", "torch")
BACKENDS = [b for b in fastsel.available_backends() if b in CPU_TENSOR_BACKENDS]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FIELDS = ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "pred", "mms", "lse")

# Test modules import these helpers as ``from fastsel_test_helpers import ...``: every
# conftest.py is imported under the module name "conftest", so a nested conftest (for
# instance tests/triton/conftest.py) would shadow this one for a plain ``import conftest``.
sys.modules.setdefault("fastsel_test_helpers", sys.modules[__name__])

requires_extension = pytest.mark.skipif(
    not fastsel.CPU_EXTENSION_AVAILABLE,
    reason="needs the compiled extension fastsel._C (torch.ops.fastsel.*), which is not built",
)


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic global RNG for every test (tests also use their own generators)."""
    torch.manual_seed(0)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each CPU-tensor backend that ``fastsel.available_backends()`` reports."""
    return request.param


def oracle(logits: torch.Tensor, target: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
           mms: str = "exact", ignore_index: int = -100) -> fastsel.Scores:
    """The float64 reference scores of ``logits`` (converted exactly to float64).

    Rows are independent, so large inputs are evaluated in row chunks (same values, far
    less memory and time than materialising several float64 [N, C] temporaries).
    """
    n, c = logits.shape
    w = None if weight is None else weight.detach().double()
    rows = max(1, (1 << 22) // max(c, 1))
    if n <= rows:
        return score_reference(logits.detach().double(), target, ignore_index, w, mms)
    parts = [
        score_reference(logits[i:i + rows].detach().double(), target[i:i + rows], ignore_index, w, mms)
        for i in range(0, n, rows)
    ]
    return fastsel.Scores(*[
        None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])
        for f in fastsel.Scores._fields
    ])


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the float score fields for logits of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logit_scale(want: fastsel.Scores, logits: Optional[torch.Tensor] = None) -> float:
    """Magnitude of the logits (max |finite z|, at least 1) that absolute errors scale with."""
    z = (logits if logits is not None else want.lse).detach()
    if z.numel() == 0:
        return 1.0
    z = z.abs().masked_fill(~torch.isfinite(z), 0)
    return max(1.0, float(z.max()))


def tolerances(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(rtol, atol) for scores of logits of ``dtype`` whose magnitude is ``scale``.

    fp16 / bf16 logits are converted exactly to float32 by every backend and the oracle is
    evaluated on the same rounded values, so they get float32 tolerances.
    """
    if dtype == torch.float64:
        return 1e-9, 1e-11 * scale
    return 1e-4, 1e-5 * scale


def assert_scores_close(got: fastsel.Scores, want: fastsel.Scores, dtype: torch.dtype, *,
                        scale: Optional[float] = None, logits: Optional[torch.Tensor] = None,
                        fields=FIELDS, check_pred: bool = True, msg: str = "") -> None:
    """Compare every field of ``got`` against the (float64) oracle ``want``.

    ``dtype`` is the dtype of the logits given to ``fastsel.score``. Float fields must have
    dtype ``out_dtype(dtype)``, shape [N], NaN and +-inf at exactly the same positions as
    the oracle and agree within ``tolerances(dtype, scale)``; ``pred`` is int64 and equal.
    ``scale`` defaults to the magnitude of ``logits`` (or of the oracle's lse).
    """
    assert isinstance(got, fastsel.Scores), f"expected fastsel.Scores, got {type(got)}"
    if scale is None:
        scale = logit_scale(want, logits)
    rtol, atol = tolerances(dtype, scale)
    n = want.lse.shape[0]
    for name in fields:
        g = getattr(got, name)
        w = getattr(want, name)
        where = f"{msg} field {name!r}"
        if w is None:
            assert g is None, f"{where}: expected None, got {g!r}"
            continue
        assert g is not None, f"{where}: expected a tensor, got None"
        assert g.shape == (n,), f"{where}: shape {tuple(g.shape)} != ({n},)"
        assert g.device == w.device, f"{where}: device {g.device} != {w.device}"
        if name == "pred":
            assert g.dtype == torch.int64, f"{where}: dtype {g.dtype} != int64"
            if check_pred:
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{where}: {m}")
            continue
        assert g.dtype == out_dtype(dtype), f"{where}: dtype {g.dtype} != {out_dtype(dtype)}"
        torch.testing.assert_close(
            g.detach().double(), w.detach().double(), rtol=rtol, atol=atol, equal_nan=True,
            msg=lambda m: f"{where} (dtype {dtype}, rtol {rtol:g}, atol {atol:g}): {m}",
        )


def score_and_check(logits: torch.Tensor, target: torch.Tensor, backend: str, *,
                    weight: Optional[torch.Tensor] = None, mms: str = "exact",
                    ignore_index: int = -100, msg: str = "", **kw) -> fastsel.Scores:
    """Score with ``backend``, compare with the oracle on the same (rounded) input, return it."""
    got = fastsel.score(logits, target, head=weight, mms=mms, ignore_index=ignore_index,
                        backend=backend)
    want = oracle(logits, target, weight=weight, mms=mms, ignore_index=ignore_index)
    assert_scores_close(got, want, logits.dtype, logits=logits, msg=msg, **kw)
    return got


def random_logits(n: int, c: int, *, scale: float = 3.0, dtype=torch.float32, seed: int = 0,
                  distinct: bool = False) -> torch.Tensor:
    """Random logits ``scale * N(0, 1)`` rounded to ``dtype``.

    With ``distinct`` each row is a random permutation of an evenly spaced grid on
    [-scale, scale] (spacing 2*scale/(C-1), chosen by the caller to be representable), so
    the row has no ties and no near-ties. Rounding to fp16/bf16 may create exact ties in
    the plain random case; the oracle then sees the same ties, which is fine.
    """
    g = torch.Generator().manual_seed(seed)
    if not distinct or c == 1:
        gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return (torch.randn(n, c, generator=g, dtype=gen_dtype) * scale).to(dtype)
    base = torch.linspace(-scale, scale, c, dtype=torch.float64)
    perm = torch.argsort(torch.rand(n, c, generator=g), dim=1)
    z = base[perm].to(dtype)
    assert all(len(set(row.tolist())) == c for row in z), "grid not representable in dtype"
    return z


def random_target(n: int, c: int, *, seed: int = 1, ignore_index: int = -100,
                  ignore_frac: float = 0.0, dtype=torch.int64) -> torch.Tensor:
    """Uniform class indices in [0, C) with a fraction of rows set to ``ignore_index``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, c, (n,), generator=g)
    if ignore_frac > 0 and n > 0:
        mask = torch.rand(n, generator=g) < ignore_frac
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t.to(dtype)


def python_scores(z, y, *, ignore_index=-100, weight=None, mms="exact") -> dict:
    """Scores of ONE row ``z`` (list of floats) written directly from docs/methods.md section 1 and
    the conventions of ``fastsel.reference`` in plain Python (math module), independent of
    the torch reference. ``weight`` is a list of C rows (lists of floats) or None.
    """
    inf, nan = math.inf, math.nan
    c = len(z)
    ignored = y == ignore_index
    # pred follows torch.argmax: the first NaN if any, else the lowest index of the maximum.
    nans = [j for j, v in enumerate(z) if math.isnan(v)]
    pred = nans[0] if nans else max(range(c), key=lambda j: (z[j], -j))
    out = {"pred": pred}
    invalid = bool(nans) or any(v == inf for v in z) or all(v == -inf for v in z)
    if invalid:
        out.update(loss=0.0 if ignored else nan, entropy=nan, margin=nan, true_margin=nan,
                   grad_norm=nan, confidence=nan, lse=nan,
                   mms=None if weight is None else nan)
        return out
    m = max(z)
    d = math.fsum(math.exp(v - m) for v in z)
    lse = m + math.log(d)
    p = [math.exp(v - lse) for v in z]
    entropy = -math.fsum(pj * (v - lse) for pj, v in zip(p, z) if pj > 0)
    rest = [j for j in range(c) if j != pred]
    runner = max(rest, key=lambda j: (z[j], -j)) if rest else None
    margin = z[pred] - z[runner] if rest else inf
    if ignored:
        loss, true_margin, grad_norm = 0.0, nan, nan
    else:
        loss = lse - z[y]
        others = [z[j] for j in range(c) if j != y]
        true_margin = z[y] - max(others) if others else inf
        grad_norm = math.sqrt((1 - p[y]) ** 2 + math.fsum(p[j] ** 2 for j in range(c) if j != y))
    out.update(loss=loss, entropy=entropy, margin=margin, true_margin=true_margin,
               grad_norm=grad_norm, confidence=math.exp(z[pred] - lse), lse=lse)
    if weight is None:
        out["mms"] = None
        return out

    def dist(a, b):
        return math.sqrt(math.fsum((wa - wb) ** 2 for wa, wb in zip(weight[a], weight[b])))

    def ratio(a, j):
        diff = z[a] - z[j]
        if diff == 0:
            return 0.0
        dd = dist(a, j)
        return diff / dd if dd > 0 else inf

    if c == 1:
        out["mms"] = inf
    elif mms == "top2":
        out["mms"] = ratio(pred, runner)
    else:
        out["mms"] = min(ratio(pred, j) for j in rest)
    return out


def python_oracle(logits: torch.Tensor, target: torch.Tensor, *, weight=None, mms="exact",
                  ignore_index=-100) -> fastsel.Scores:
    """``python_scores`` over a batch, returned as float64 ``Scores`` (slow: small inputs)."""
    z = logits.detach().double().tolist()
    w = None if weight is None else weight.detach().double().tolist()
    rows = [python_scores(r, int(t), ignore_index=ignore_index, weight=w, mms=mms)
            for r, t in zip(z, target.tolist())]
    n = len(rows)

    def col(name, dtype=torch.float64):
        return torch.tensor([r[name] for r in rows], dtype=dtype).reshape(n)

    return fastsel.Scores(
        col("loss"), col("entropy"), col("margin"), col("true_margin"), col("grad_norm"),
        col("confidence"), col("pred", torch.int64), None if weight is None else col("mms"),
        col("lse"),
    )

"""Fuzzing of the public API: hypothesis over shapes, dtypes, extreme values and layouts,
checked against a 50-digit ``mpmath`` oracle (or an exact invariant). Sections:

1. ``score`` without weight: every field against mpmath, by families of extreme rows,
   on the "cpu" and "torch" backends; the two backends against each other (pred, NaN /
   inf placement); independence of layout and batch; C up to 5000 and 2^24 + 3; N = 0,
   C = 1; targets and ignore_index at the int32 / int64 limits.
2. ``score`` with a classifier weight (MMS): extreme and non-finite weights against
   mpmath and the documented rule, with and without ``mms_head``; batch size and backend
   independence.
3. Gradients: gradcheck / gradgradcheck, gradient penalties against F.cross_entropy,
   d loss / d z at the extremes against mpmath, ignored rows.
4. Selection ops: select_topk, sample (with and without replacement), importance_weights,
   percentile, select; bad arguments.
5. Regressions: the minimal cases found by the above, one test each.

(States of samplers and selectors: ``test_fuzz_states.py``.)

Unlike ``test_score_properties.py`` (a small grid of exactly representable logits), the
logits here reach the ends of every dtype's range: ±1e308 and subnormals in float64,
values next to the maximum of float32 / bfloat16 / float16, rows so confident that
1 - p_y is far below the unit roundoff, exact ties at huge magnitudes, rows whose
differences overflow, ±inf / NaN anywhere, C up to 5000 (and one row of 2^24 + 3).

The oracle (``row_oracle``) evaluates the definitions of ``fastsel/reference.py`` in
mpmath with 50 significant digits, from EXACT differences z_j - z_(1) (2300-bit
arithmetic: the difference of any two float64 values is exact at that precision), so it
has no cancellation, overflow or underflow of its own:

    d_j = z_j - m (exact), S = sum_j exp(d_j), T = S - 1 (= the sum without the max)
    lse = m + log1p(T), loss = -d_y + log1p(T), confidence = 1 / S,
    entropy = log1p(T) + sum_j p_j (-d_j), grad_norm = sqrt((T_y / S)^2 + sum_{j!=y} p_j^2)

with T_y = sum_{j != y} exp(d_j) (so 1 - p_y = T_y / S never cancels).

Tolerances (``allowed``): u = 2^-53 for float64 logits, 2^-24 otherwise (scores are
computed in float32 for narrower logits). A correctly implemented algorithm in
precision u evaluates the definitions on the differences d_j rounded to precision u
(relative error u |d_j| each), with exp / log1p accurate to a few ulps and sums of at
most C positive terms (relative error <= (C - 1) u). Propagating those errors through
the formulas above (first order) bounds the absolute error of each score by u times:

    lse:        |m| + L + A + C' T / S         (L = log1p(T), A = sum_j p_j |d_j|)
    loss:       |d_y| + L + A + C' T / S
    entropy:    L + C' T / S + A (2 + C') + B  (B = sum_j p_j d_j^2)
    confidence: (1 + C' T / S + A) / S
    grad_norm:  G (2 + C' + max |d_j|)         (max over the d_j whose exp does not underflow)

with C' = C + 4 (a few ulps for exp), times a safety factor 8 (and never below 2^13 u
relative, i.e. ~1e-12 in float64 and 4.9e-4 in float32), plus the smallest normal
number of the output dtype (results below it have few significant bits left, and a
careful algorithm may flush them). Every term is a RELATIVE error of the score's own
ingredients, so a very confident row (loss 1e-300) must come out with ~1e-13 relative
accuracy, not 0: the kernels are designed for exactly that (row_scores.h keeps the
maxima apart so that d - 1 is exact). ``margin`` and ``true_margin`` are one difference
of two logits: they must be the correctly rounded exact difference, bit for bit (an
exact difference that overflows must be inf).
"""

from __future__ import annotations

import bisect
import functools
import math
from fractions import Fraction
from typing import Optional

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import fastsel
from fastsel_test_helpers import BACKENDS

INF, NAN = math.inf, math.nan
MAX64 = 1.7976931348623157e308
TINY64 = 2.2250738585072014e-308  # smallest normal float64
SUB64 = 5e-324
MAX32 = float(torch.finfo(torch.float32).max)
TINY32 = float(torch.finfo(torch.float32).tiny)
SUB32 = 2.0 ** -149
MAXBF16 = float(torch.finfo(torch.bfloat16).max)
MAX16 = float(torch.finfo(torch.float16).max)
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
FLOAT_FIELDS = ("loss", "entropy", "margin", "true_margin", "grad_norm", "confidence", "lse")


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ==== the mpmath oracle =====================================================================

DPS = 50
EXACT_PREC = 2300      # bits: z_i - z_j is exact for any two float64 values
NEG_CUTOFF = -100000   # exp(d) < e^-100000 counts as 0 (no float result depends on it)


def exact_sub(a: float, b: float) -> mpmath.mpf:
    with mpmath.workprec(EXACT_PREC):
        return mpmath.mpf(a) - mpmath.mpf(b)


def to_fraction(x: mpmath.mpf) -> Fraction:
    sign, man, exp, _ = x._mpf_
    if man == 0:
        return Fraction(0)
    v = Fraction(man) * Fraction(2) ** exp
    return -v if sign else v


def round64(x) -> float:
    """The exact value x (mpf or float) correctly rounded to float64 (overflow -> inf)."""
    if isinstance(x, float):
        return x
    if mpmath.isnan(x):
        return NAN
    if mpmath.isinf(x):
        return INF if x > 0 else -INF
    f = to_fraction(x)
    try:
        return float(f)  # Fraction -> float is correctly rounded
    except OverflowError:
        return INF if f > 0 else -INF


def round32(x) -> float:
    """The exact value x correctly rounded to float32 (no double rounding through float64)."""
    if isinstance(x, float):
        x = mpmath.mpf(x)
    if mpmath.isnan(x):
        return NAN
    if mpmath.isinf(x):
        return INF if x > 0 else -INF
    f = to_fraction(x)
    if abs(f) >= Fraction(2) ** 128 - Fraction(2) ** 103:  # max + half an ulp
        return INF if f > 0 else -INF
    c = np.float32(float(f))
    best = None
    with np.errstate(over="ignore"):
        cands = (np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf)))
    for cand in cands:
        if not np.isfinite(cand):
            continue
        key = (abs(Fraction(float(cand)) - f), int(np.float32(cand).view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, float(cand))
    return best[1]


def row_oracle(z: list, y: Optional[int]) -> dict:
    if len(z) > 600:  # wide rows: not worth the cache's memory
        return _row_oracle.__wrapped__(tuple(z), y)
    return _row_oracle(tuple(z), y)


@functools.lru_cache(maxsize=8192)  # the two backends' tests score the same rows
def _row_oracle(z: tuple, y: Optional[int]) -> dict:
    """Every score of one row ``z`` (floats: the exact values scored) against target ``y``
    (None: the row's target is ignore_index), from the definitions, in mpmath."""
    c = len(z)
    nans = [j for j, v in enumerate(z) if math.isnan(v)]
    pred = nans[0] if nans else max(range(c), key=lambda j: (z[j], -j))
    invalid = bool(nans) or INF in z or all(v == -INF for v in z)
    out = {"pred": pred, "valid": not invalid, "C": c}
    if invalid:
        out.update(loss=(0.0 if y is None else NAN), entropy=NAN, margin=NAN, true_margin=NAN,
                   grad_norm=NAN, confidence=NAN, lse=NAN)
        return out
    with mpmath.workdps(DPS):
        m = z[pred]
        d = [None if v == -INF else exact_sub(v, m) for v in z]
        e = [mpmath.mpf(0) if (dj is None or dj < NEG_CUTOFF) else mpmath.exp(dj) for dj in d]
        T = mpmath.fsum(e[j] for j in range(c) if j != pred)
        S = 1 + T
        L = mpmath.log1p(T)
        p = [ej / S for ej in e]
        A = mpmath.fsum(p[j] * -d[j] for j in range(c) if e[j] != 0)
        B = mpmath.fsum(p[j] * d[j] ** 2 for j in range(c) if e[j] != 0)
        out.update(lse=mpmath.mpf(m) + L, entropy=L + A, confidence=1 / S)
        rest = [j for j in range(c) if j != pred]
        runner = max(rest, key=lambda j: (z[j], -j)) if rest else None
        out["runner"] = runner
        out["margin"] = INF if runner is None or z[runner] == -INF else exact_sub(m, z[runner])
        if y is None:
            out.update(loss=0.0, true_margin=NAN, grad_norm=NAN)
        else:
            out["loss"] = INF if d[y] is None else -d[y] + L
            best_other = max([z[j] for j in range(c) if j != y], default=-INF)
            if best_other == -INF:
                out["true_margin"] = INF
            elif z[y] == -INF:
                out["true_margin"] = -INF
            else:
                out["true_margin"] = exact_sub(z[y], best_other)
            t_y = mpmath.fsum(e[j] for j in range(c) if j != y)
            out["grad_norm"] = mpmath.sqrt((t_y / S) ** 2 + mpmath.fsum(p[j] ** 2 for j in range(c) if j != y))
        out.update(S=S, T=T, L=L, A=A, B=B, m=m, d_y=None if y is None else d[y],
                   neg_d=[None if dj is None else -dj for dj in d])
    return out


K_SAFETY = 8
REL_FLOOR = 2 ** 13


def allowed(want: dict, field: str, f64: bool) -> mpmath.mpf:
    """The absolute error a correct implementation may make on ``field`` (module doc)."""
    u = mpmath.mpf(2) ** (-53 if f64 else -24)
    cutoff = 746 if f64 else 104  # exp(-d) underflows to 0 beyond
    floor = mpmath.mpf(2) ** (-1022 if f64 else -126)
    ceff = want["C"] + 4
    S, T, L, A, B = want["S"], want["T"], want["L"], want["A"], want["B"]
    if field == "lse":
        scale = abs(mpmath.mpf(want["m"])) + L + A + ceff * T / S
    elif field == "loss":
        scale = abs(want["d_y"]) + L + A + ceff * T / S
    elif field == "entropy":
        scale = L + ceff * T / S + A * (2 + ceff) + B
    elif field == "confidence":
        scale = (1 + ceff * T / S + A) / S
    elif field == "grad_norm":
        dmax = max([v for v in want["neg_d"] if v is not None and v <= cutoff] or [0])
        scale = want["grad_norm"] * (2 + ceff + dmax)
    else:
        raise KeyError(field)
    # never below the brief's ~1e-12 relative in float64 (2^13 u; 4.9e-4 in float32)
    return max(K_SAFETY * u * scale, REL_FLOOR * u * abs(want[field])) + floor


def check_row(got: dict, want: dict, f64: bool, fields, where: str = "") -> list:
    """Messages for every field of ``got`` (Python floats) that the oracle rejects."""
    rnd = round64 if f64 else round32
    errs = []
    for f in fields:
        if f == "pred":
            if got["pred"] != want["pred"]:
                errs.append(f"{where}pred: got {got['pred']}, want {want['pred']}")
            continue
        g, w = got[f], want[f]
        wr = rnd(w)
        wtxt = w if isinstance(w, float) else mpmath.nstr(w, 17)
        if math.isnan(wr):
            if not math.isnan(g):
                errs.append(f"{where}{f}: got {g!r}, want nan")
            continue
        if math.isnan(g):
            errs.append(f"{where}{f}: got nan, want {wr!r} (exact {wtxt})")
            continue
        if f in ("margin", "true_margin") or isinstance(w, float):  # exact, or inf by definition
            if g != wr:
                errs.append(f"{where}{f}: got {g!r}, want exactly {wr!r} (exact {wtxt})")
            continue
        if math.isinf(wr) or math.isinf(g):
            if g != wr:
                errs.append(f"{where}{f}: got {g!r}, want {wr!r} (exact {wtxt})")
            continue
        tol = allowed(want, f, f64)
        err = abs(mpmath.mpf(g) - w)
        if err > tol:
            rel = err / abs(w) if w != 0 else mpmath.inf
            errs.append(f"{where}{f}: got {g!r}, want {wr!r} (exact {wtxt}): error "
                        f"{mpmath.nstr(err, 3)} (relative {mpmath.nstr(rel, 3)}) > allowed {mpmath.nstr(tol, 3)}")
    return errs


# ==== building the inputs ===================================================================

def make_logits(rows: list, c: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """[N, C] logits of ``dtype`` holding ``rows`` (already representable) in ``layout``."""
    n = len(rows)
    x = torch.tensor(rows, dtype=torch.float64).reshape(n, c).to(dtype)
    if layout == "contiguous":
        return x
    if layout == "transposed":  # column-major: stride (1, N)
        return x.t().contiguous().t()
    if layout == "sliced":  # every other row and every third column of a larger tensor
        big = torch.full((2 * n + 1, 3 * c + 2), 7.0, dtype=dtype)
        view = big[1::2, 2::3]
        view.copy_(x)
        return view
    if layout == "offset":  # unit column stride, row stride C + 5, storage offset
        big = torch.full((n + 1, c + 5), -3.0, dtype=dtype)
        view = big[1:, 3:3 + c]
        view.copy_(x)
        return view
    raise ValueError(layout)


LAYOUTS = ("contiguous", "transposed", "sliced", "offset")
IGNORE_INDEXES = [-100, -1, 0, 1, 2 ** 31 - 1, -2 ** 31, 2 ** 63 - 1, -2 ** 63, 2 ** 32, 2 ** 32 + 1]


@st.composite
def targets_for(draw, n: int, c: int) -> dict:
    """Targets (lists of ints), their dtype and an ignore_index, some rows ignored."""
    tdtype = draw(st.sampled_from(["int64", "int32"]))
    ignore_index = draw(st.sampled_from(IGNORE_INDEXES))
    fits = tdtype == "int64" or -2 ** 31 <= ignore_index < 2 ** 31
    classes = st.integers(0, c - 1)
    choice = st.one_of(classes, st.just(ignore_index)) if fits else classes
    target = draw(st.lists(choice, min_size=n, max_size=n))
    return {"target": target, "tdtype": tdtype, "ignore_index": ignore_index}


def wild64(limit: float) -> st.SearchStrategy:
    """float64 values of magnitude <= limit: hypothesis' nasty floats (subnormals, powers of
    two, boundaries) and hand-picked extremes."""
    specials = [v for v in (0.0, -0.0, SUB64, -SUB64, TINY64, -TINY64, 1e-300, 1.0, -1.0, 1e16, -1e16,
                            2.0 ** 53 + 2, 1e300, -1e300, 4e307, -4e307, 1e308, -1e308, MAX64, -MAX64)
                if abs(v) <= limit]
    return st.one_of(st.sampled_from(specials), st.floats(-limit, limit, allow_nan=False),
                     st.floats(-1e3, 1e3, allow_nan=False))


GAPS64 = [36.8, 46.05, 100.5, 230.25, 500.0, 690.75, 700.0, 708.5, 709.75, 720.0, 740.0, 744.25, 745.0,
          745.25, 746.0, 800.0, 1e4, 1e100, 1e300]


@st.composite
def confident_row(draw, c: int, gaps, base_limit: float) -> list:
    """A row whose maximum leads every other logit by a large gap: p_(1) rounds to 1 and
    the loss of the top class is ~exp(-gap) (1e-20, 1e-300, subnormal, 0)."""
    base = draw(st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]), st.floats(-base_limit, base_limit)))
    top = draw(st.integers(0, c - 1))
    row = []
    for j in range(c):
        if j == top:
            row.append(base)
        else:
            gap = draw(st.sampled_from(gaps)) + draw(st.sampled_from([0.0, 0.125, 1.0, 3.5]))
            row.append(-INF if draw(st.integers(0, 9)) == 0 else base - gap)
    return row, top


@st.composite
def tie_row(draw, c: int, values, low: float) -> list:
    """A row with several entries exactly equal to a huge (or tiny) value v, the others
    in [low, v] or -inf: ties at the maximum (or elsewhere)."""
    v = draw(st.sampled_from(values))
    k = draw(st.integers(1, c))
    where = draw(st.permutations(range(c)))[:k]
    row = []
    for j in range(c):
        if j in where:
            row.append(v)
        elif draw(st.integers(0, 5)) == 0:
            row.append(-INF)
        else:
            lo, hi = min(low, v), max(low, v)
            row.append(draw(st.one_of(st.floats(lo, hi, allow_nan=False), st.just(v), st.just(low))))
    return row


def poison(draw, rows: list, c: int) -> list:
    """Put NaN / +inf / -inf anywhere, sometimes a whole row of -inf."""
    rows = [list(r) for r in rows]
    if rows and draw(st.integers(0, 3)) == 0:
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(rows) - 1))
            kind = draw(st.sampled_from(["nan", "inf", "-inf", "-inf row", "nan+inf"]))
            j = draw(st.integers(0, c - 1))
            if kind == "nan":
                rows[i][j] = NAN
            elif kind == "inf":
                rows[i][j] = INF
            elif kind == "-inf":
                rows[i][j] = -INF
            elif kind == "-inf row":
                rows[i] = [-INF] * c
            else:
                rows[i][j] = NAN
                rows[i][draw(st.integers(0, c - 1))] = INF
    return rows


@st.composite
def f64_batch(draw, family: str, max_n: int = 6, max_c: int = 24) -> dict:
    n = draw(st.integers(0 if family == "bounded" else 1, max_n))
    c = draw(st.integers(1, max_c))
    if family == "bounded":  # differences never overflow (|z| <= 4e307)
        rows = [draw(st.lists(st.one_of(wild64(4e307), st.just(-INF)), min_size=c, max_size=c))
                for _ in range(n)]
    elif family == "scaled":  # a random row times 10^k, k anywhere in float64's range
        rows = []
        for _ in range(n):
            k = draw(st.integers(-323, 307))
            row = draw(st.lists(st.floats(-9.99, 9.99), min_size=c, max_size=c))
            rows.append([float(mpmath.mpf(v) * mpmath.mpf(10) ** k) for v in row])
    elif family == "confident":
        rows, tops = zip(*[draw(confident_row(c, GAPS64, 1e6)) for _ in range(n)])
    elif family == "huge_ties":
        rows = [draw(tie_row(c, [1e308, -1e308, MAX64, -MAX64, 1e300, -1e300, 1e200, 1e17, -1e17,
                                 2.0 ** 60, SUB64, -SUB64, TINY64], -1e290)) for _ in range(n)]
    elif family == "spanning":  # differences overflow: z_i - z_j = ±inf in float64
        big = [1e308, -1e308, MAX64, -MAX64, 1.5e308, -1.5e308, 9e307, -9e307, 1e300, -1e300, 0.0, 1.0]
        rows = [draw(st.lists(st.sampled_from(big), min_size=c, max_size=c)) for _ in range(n)]
    else:
        raise ValueError(family)
    rows = poison(draw, rows, c)
    targets = draw(targets_for(n, c))
    if family == "confident":  # mostly the top class: the loss is then exp(-gap)
        targets["target"] = [t if draw(st.integers(0, 3)) == 0 else top for t, top in zip(targets["target"], tops)]
    return {"rows": rows, "c": c, "dtype": "float64", "layout": draw(st.sampled_from(LAYOUTS)), **targets}


def narrow_values(dtype: str) -> list:
    top = {"float32": MAX32, "bfloat16": MAXBF16, "float16": MAX16}[dtype]
    tiny = {"float32": TINY32, "bfloat16": TINY32, "float16": 2.0 ** -14}[dtype]
    sub = {"float32": SUB32, "bfloat16": 2.0 ** -133, "float16": 2.0 ** -24}[dtype]
    return [top, -top, top / 2, -top / 2, top / 3, tiny, -tiny, sub, -sub, 0.0, -0.0, 1.0, -1.0]


GAPS32 = [8.0, 17.0, 30.0, 46.0, 60.0, 87.5, 88.75, 100.0, 103.0, 103.875, 104.0, 110.0, 1e30]


@st.composite
def narrow_batch(draw, family: str, max_n: int = 6, max_c: int = 24) -> dict:
    """float32 / bfloat16 / float16 logits near the ends of their range."""
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    vals = narrow_values(dtype)
    top = vals[0]
    if family == "near_max":
        elem = st.one_of(st.sampled_from(vals), st.floats(-top, top, width=32), st.floats(-50, 50, width=32),
                         st.just(-INF))
        rows = [draw(st.lists(elem, min_size=c, max_size=c)) for _ in range(n)]
    elif family == "confident":
        gaps = [g for g in GAPS32 if g < top]
        rows, tops = zip(*[draw(confident_row(c, gaps, 100.0)) for _ in range(n)])
    elif family == "huge_ties":
        rows = [draw(tie_row(c, vals[:5] + [vals[7]], -top / 4)) for _ in range(n)]
    else:
        raise ValueError(family)
    rows = poison(draw, rows, c)
    # round to the dtype now: the oracle scores exactly the values the backends see
    rows = torch.tensor(rows, dtype=torch.float64).reshape(n, c).to(DTYPES[dtype]).double().tolist()
    targets = draw(targets_for(n, c))
    if family == "confident":
        targets["target"] = [t if draw(st.integers(0, 3)) == 0 else top for t, top in zip(targets["target"], tops)]
    return {"rows": rows, "c": c, "dtype": dtype, "layout": draw(st.sampled_from(LAYOUTS)), **targets}


def build(case: dict):
    dtype = DTYPES[case["dtype"]]
    x = make_logits(case["rows"], case["c"], dtype, case["layout"])
    t = torch.tensor(case["target"], dtype=torch.int64).reshape(len(case["rows"])).to(getattr(torch, case["tdtype"]))
    if case["layout"] != "contiguous":  # a strided target too
        t = torch.stack([t, torch.zeros_like(t)], dim=1)[:, 0]
    return x, t


def score_case(case: dict, backend: str, **kw) -> fastsel.Scores:
    x, t = build(case)
    return fastsel.score(x, t, ignore_index=case["ignore_index"], backend=backend, **kw)


def check_against_mpmath(case: dict, s: fastsel.Scores) -> dict:
    """Every error of ``s`` against the mpmath oracle, by field group (all rows)."""
    n = len(case["rows"])
    f64 = case["dtype"] == "float64"
    out_dtype = torch.float64 if f64 else torch.float32
    errs = {g: [] for g in FIELD_IDS}
    for name in FLOAT_FIELDS:
        v = getattr(s, name)
        if v.shape != (n,) or v.dtype != out_dtype:
            errs["pred"].append(f"{name}: shape {tuple(v.shape)} dtype {v.dtype}, want ({n},) {out_dtype}")
    if s.pred.shape != (n,) or s.pred.dtype != torch.int64:
        errs["pred"].append(f"pred: shape {tuple(s.pred.shape)} dtype {s.pred.dtype}")
    if errs["pred"]:
        return errs
    cols = {name: getattr(s, name).tolist() for name in FLOAT_FIELDS}
    preds = s.pred.tolist()
    for i, (row, y) in enumerate(zip(case["rows"], case["target"])):
        want = row_oracle(row, None if y == case["ignore_index"] else y)
        got = {name: cols[name][i] for name in FLOAT_FIELDS}
        got["pred"] = preds[i]
        for gid, fields in zip(FIELD_IDS, FIELD_GROUPS):
            errs[gid] += check_row(got, want, f64, fields, where=f"row {i}: ")
    return errs


def compact(rows: list) -> str:
    """rows, with runs of one value written [v] * k when long (wide rows)."""
    def one(row):
        if len(row) <= 30:
            return repr(row)
        parts, i = [], 0
        while i < len(row):
            j = i
            while j < len(row) and (row[j] == row[i] or (math.isnan(row[j]) and math.isnan(row[i]))):
                j += 1
            parts.append(f"[{row[i]!r}] * {j - i}" if j - i > 1 else f"[{row[i]!r}]")
            i = j
        return " + ".join(parts) if len(parts) <= 40 else repr(row[:30])[:-1] + ", ...]"
    return "[" + ", ".join(one(r) for r in rows) + "]"


def report(case: dict, errs: list, backend: str) -> str:
    head = (f"backend={backend!r} dtype={case['dtype']} layout={case['layout']} target {case['tdtype']} "
            f"ignore_index={case['ignore_index']}\nrows={compact(case['rows'])}\ntarget={case['target']!r}\n")
    return head + "\n".join(errs[:12]) + (f"\n... {len(errs) - 12} more" if len(errs) > 12 else "")


FIELD_GROUPS = [("pred",), ("loss",), ("lse",), ("entropy",), ("confidence",), ("grad_norm",),
                ("margin", "true_margin")]
FIELD_IDS = ["pred", "loss", "lse", "entropy", "confidence", "grad_norm", "margins"]


# One function per field group, each raising from its own line: hypothesis tells failures
# apart by where they are raised, so a test reports (and shrinks) a wrong loss and a wrong
# grad_norm as two bugs instead of letting the first one hide the second.
def _fail_pred(msg): raise AssertionError(msg)  # noqa: E704
def _fail_loss(msg): raise AssertionError(msg)  # noqa: E704
def _fail_lse(msg): raise AssertionError(msg)  # noqa: E704
def _fail_entropy(msg): raise AssertionError(msg)  # noqa: E704
def _fail_confidence(msg): raise AssertionError(msg)  # noqa: E704
def _fail_grad_norm(msg): raise AssertionError(msg)  # noqa: E704
def _fail_margins(msg): raise AssertionError(msg)  # noqa: E704


FAILERS = {"pred": _fail_pred, "loss": _fail_loss, "lse": _fail_lse, "entropy": _fail_entropy,
           "confidence": _fail_confidence, "grad_norm": _fail_grad_norm, "margins": _fail_margins}


def assert_matches_mpmath(case: dict, s: fastsel.Scores, backend: str) -> None:
    errs = check_against_mpmath(case, s)
    for gid in FIELD_IDS:
        if errs[gid]:
            FAILERS[gid](f"{gid} wrong\n" + report(case, errs[gid], backend))


# ==== 1. score: extreme float64 logits against mpmath ========================================

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["bounded", "scaled", "confident", "huge_ties", "spanning"])
def test_score_float64_extremes_match_mpmath(family, backend):
    @fuzz_settings(50)
    @given(case=f64_batch(family))
    def run(case):
        assert_matches_mpmath(case, score_case(case, backend), backend)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["near_max", "confident", "huge_ties"])
def test_score_narrow_dtypes_near_their_max_match_mpmath(family, backend):
    @fuzz_settings(50)
    @given(case=narrow_batch(family))
    def run(case):
        assert_matches_mpmath(case, score_case(case, backend), backend)

    run()


@st.composite
def medium_batch(draw) -> dict:
    """Up to 40 rows of 129..700 (or 4096) columns: the CPU kernel's row-group path for
    float32 / bfloat16 / float16, where pass 1 of the next row runs inside pass 2 of the
    current one; extremes, -inf and NaN sprinkled, rows that repeat."""
    dtype = draw(st.sampled_from(["float32", "bfloat16", "float16", "float64"]))
    n = draw(st.integers(1, 24))
    c = draw(st.one_of(st.integers(129, 500), st.sampled_from([129, 4096])))
    top = {"float64": 1e300, "float32": MAX32, "bfloat16": MAXBF16, "float16": MAX16}[dtype]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * draw(st.sampled_from([1.0, 10.0, 100.0]))
    for _ in range(draw(st.integers(0, 6))):
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, c - 1))
        x[i, j] = draw(st.sampled_from([top, -top, INF, -INF, NAN, 0.0, float(x[i].max()) + 40, float(x[i].max())]))
    if n > 1 and draw(st.booleans()):
        x[draw(st.integers(0, n - 1))] = x[0]
    rows = x.to(DTYPES[dtype]).double().tolist()
    return {"rows": rows, "c": c, "dtype": dtype, "layout": draw(st.sampled_from(LAYOUTS)),
            **draw(targets_for(n, c))}


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(12)
@given(case=medium_batch())
def test_score_row_group_batches_match_mpmath(backend, case):
    assert_matches_mpmath(case, score_case(case, backend), backend)


ALL_FAMILIES = st.one_of([f64_batch(f) for f in ("bounded", "scaled", "confident", "huge_ties", "spanning")]
                         + [narrow_batch(f) for f in ("near_max", "confident", "huge_ties")])


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ backend")
@fuzz_settings(150)
@given(case=ALL_FAMILIES)
def test_score_backends_agree_on_pred_and_nonfinite_placement(case):
    """"cpu" and "torch" give the same pred and NaN / +inf / -inf at the same places, for
    every field (an exact invariant: no tolerance)."""
    a, b = score_case(case, "cpu"), score_case(case, "torch")
    errs = []
    if a.pred.tolist() != b.pred.tolist():
        errs.append(f"pred: cpu {a.pred.tolist()} torch {b.pred.tolist()}")
    for name in FLOAT_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        for what, f in (("NaN", torch.isnan), ("+inf", lambda t: t == INF), ("-inf", lambda t: t == -INF)):
            if not torch.equal(f(x), f(y)):
                errs.append(f"{name}: {what} at {f(x).nonzero().flatten().tolist()} (cpu) vs "
                            f"{f(y).nonzero().flatten().tolist()} (torch); cpu {x.tolist()} torch {y.tolist()}")
    assert not errs, report(case, errs, "cpu vs torch")


def _close_or_same(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    a, b = a.double(), b.double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    return bool((same | ((a - b).abs() <= rtol * torch.maximum(a.abs(), b.abs()))).all())


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(60)
@given(case=st.one_of(ALL_FAMILIES, medium_batch()), split=st.integers(1, 17))
def test_score_does_not_depend_on_layout_or_on_the_other_rows(backend, case, split):
    """The scores of a row are the same (to 4 ulps) whatever the strides of the logits
    and whichever rows are scored with it: every layout against the contiguous tensor,
    and the batch against its rows scored in chunks of ``split``."""
    x, t = build(case)
    ii = case["ignore_index"]
    whole = fastsel.score(x, t, ignore_index=ii, backend=backend)
    dense = fastsel.score(x.contiguous(), t, ignore_index=ii, backend=backend)
    n = x.shape[0]
    parts = [fastsel.score(x[i:i + split], t[i:i + split], ignore_index=ii, backend=backend)
             for i in range(0, n, split)]
    rtol = 4 * (2.0 ** -52 if x.dtype == torch.float64 else 2.0 ** -23)
    errs = []
    for name in FLOAT_FIELDS + ("pred",):
        w = getattr(whole, name)
        for label, other in (("contiguous copy", getattr(dense, name)),
                             (f"chunks of {split}", torch.cat([getattr(p, name) for p in parts]) if parts else w)):
            if not _close_or_same(w, other, rtol):
                errs.append(f"{name}: {w.tolist()} ({case['layout']} batch) vs {other.tolist()} ({label})")
    assert not errs, report(case, errs, backend)


# ---- large C --------------------------------------------------------------------------------

@st.composite
def wide_batch(draw) -> dict:
    """C up to 5000 (both sides of the 128-class lane-wise path and of the 4096-column
    block), with the maximum, ties, -inf runs, a NaN or a far-away block placed anywhere."""
    dtype = draw(st.sampled_from(["float32", "float64", "bfloat16", "float16", "float32"]))
    c = draw(st.one_of(st.sampled_from([127, 128, 129, 255, 256, 257, 4095, 4096, 4097, 4113, 4500, 5000]),
                       st.integers(1, 5000), st.integers(4097, 5000)))
    n = draw(st.integers(1, 2))
    top = {"float64": 1e300, "float32": MAX32, "bfloat16": MAXBF16, "float16": MAX16}[dtype]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    rows = []
    for _ in range(n):
        row = torch.randn(c, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.0, 1.0, 30.0]))
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["max", "ties", "-inf run", "nan", "far block", "huge", "span"]))
            j = draw(st.integers(0, c - 1))
            k = draw(st.integers(1, max(1, c - j)))
            if kind == "max":
                row[j] = float(row.max()) + draw(st.sampled_from([0.0, 1.0, 50.0, 200.0, 800.0]))
            elif kind == "ties":
                row[j:j + k] = float(row.max())
            elif kind == "-inf run":
                row[j:j + k] = -INF
            elif kind == "nan":
                row[j] = NAN
            elif kind == "far block":  # the running maximum jumps by a lot after 4096 columns
                row[j:j + k] -= draw(st.sampled_from([100.0, 1e4, 1e30]))
            elif kind == "huge":
                row[j:j + k] = draw(st.sampled_from([top, -top, top / 2]))
            else:  # whole blocks at one end of the range, then a larger maximum later in the row
                j = draw(st.sampled_from([j, 4096, 4097, 4100, 4200]))
                row[:j] = draw(st.sampled_from([-top, -top / 2, -1e37 if dtype != "float16" else -60000.0]))
                if j < c:
                    row[j:j + k] = draw(st.sampled_from([top / 2, 0.0, 1.0]))
        if c > 1 and draw(st.integers(0, 2)) == 0:
            # whole blocks far below a maximum that comes later in the row: the running
            # maximum jumps by ~the dtype's range (the sums so far are rescaled by exp(-jump))
            j = draw(st.sampled_from([min(c - 1, 4096), min(c - 1, 4097), c - 1, c // 2]))
            low = draw(st.sampled_from([-top, -top / 2, -top / 1000]))
            row[:j] = low
            row[j:] = row[j:] + draw(st.sampled_from([0.0, top / 2, -top / 4]))
        rows.append(row.to(DTYPES[dtype]).double().tolist())
    return {"rows": rows, "c": c, "dtype": dtype, "layout": draw(st.sampled_from(["contiguous", "offset"])),
            **draw(targets_for(n, c))}


# found by this test: a float32 row of C > 4096 whose first 4096-column block lies ~FLT_MAX
# below the maximum of a later block (the jump times the count overflows in the rescale)
WIDE_EXAMPLE = {"rows": [[-MAX32] * 4096 + [0.0]], "c": 4097, "dtype": "float32", "layout": "contiguous",
                "target": [4096], "tdtype": "int64", "ignore_index": -100}


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(30)
@example(case=WIDE_EXAMPLE)
@given(case=wide_batch())
def test_score_wide_rows_match_mpmath(backend, case):
    assert_matches_mpmath(case, score_case(case, backend), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_more_than_2_24_equal_logits_and_an_index_beyond_2_24(backend):
    """C = 2^24 + 3 (one row of 67 MB): every logit equal, so the loss and entropy are
    log(C), the confidence 1 / C, grad_norm sqrt(1 - 1/C); a float32 sum of C ones stops
    at 2^24, and a float32 column index cannot hold 2^24 + 1."""
    c = 2 ** 24 + 3
    x = torch.zeros(2, c)
    x[1, 2 ** 24 + 1] = 1.0  # the maximum at an index a float32 cannot represent
    t = torch.tensor([2 ** 24 + 2, 2 ** 24 + 1])
    s = fastsel.score(x, t, backend=backend)
    logc = math.log(c)
    tol = 16 * 2.0 ** -24
    assert abs(s.loss[0].item() - logc) <= tol * logc, (s.loss[0].item(), logc)
    assert abs(s.entropy[0].item() - logc) <= tol * logc, (s.entropy[0].item(), logc)
    assert abs(s.lse[0].item() - logc) <= tol * logc, (s.lse[0].item(), logc)
    assert abs(s.confidence[0].item() * c - 1) <= tol, s.confidence[0].item() * c
    assert abs(s.grad_norm[0].item() - math.sqrt(1 - 1 / c)) <= tol, s.grad_norm[0].item()
    assert s.pred.tolist() == [0, 2 ** 24 + 1]
    assert s.margin[0].item() == 0.0 and s.margin[1].item() == 1.0
    assert s.true_margin[0].item() == 0.0 and s.true_margin[1].item() == 1.0
    # row 1: one logit 1, the other C - 1 zero: loss = log(e + C - 1) - 1
    want = math.log(math.e + c - 1) - 1
    assert abs(s.loss[1].item() - want) <= tol * want, (s.loss[1].item(), want)


# ---- empty batches, one class, int32 targets, extreme ignore_index -------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_score_empty_batch_and_single_class(backend, dtype):
    out = torch.float64 if dtype == torch.float64 else torch.float32
    for c in (1, 7):
        for weight in (None, torch.randn(c, 3)):
            s = fastsel.score(torch.empty(0, c, dtype=dtype), torch.empty(0, dtype=torch.int32),
                              head=weight, backend=backend)
            for name in FLOAT_FIELDS + (("mms",) if weight is not None else ()):
                v = getattr(s, name)
                assert v.shape == (0,) and v.dtype == out, (name, v.shape, v.dtype)
            assert s.pred.shape == (0,) and s.pred.dtype == torch.int64
            assert (s.mms is None) == (weight is None)
    # C = 1: loss 0, entropy 0, confidence 1, grad_norm 0, margins and MMS +inf, lse = z
    z = torch.tensor([[-1e308], [5e-324], [-INF], [NAN], [INF], [3.0]], dtype=torch.float64).to(dtype)
    t = torch.tensor([0, 0, 0, 0, -100, -100], dtype=torch.int32)
    s = fastsel.score(z, t, head=torch.ones(1, 2), backend=backend)
    zz = z.double().flatten().tolist()
    valid = [i for i, v in enumerate(zz) if math.isfinite(v)]  # -1e308 is -inf in float32
    for i in range(6):
        if i in valid:
            ign = t[i].item() == -100
            assert s.loss[i].item() == 0.0 and s.entropy[i].item() == 0.0 and s.confidence[i].item() == 1.0
            assert s.margin[i].item() == INF and s.mms[i].item() == INF
            assert s.lse[i].item() == (zz[i] if dtype == torch.float64 else float(torch.tensor(zz[i]).float()))
            if ign:
                assert math.isnan(s.true_margin[i].item()) and math.isnan(s.grad_norm[i].item())
            else:
                assert s.true_margin[i].item() == INF and s.grad_norm[i].item() == 0.0
        else:
            for name in ("entropy", "margin", "true_margin", "grad_norm", "confidence", "lse", "mms"):
                assert math.isnan(getattr(s, name)[i].item()), (i, name)
            assert s.loss[i].item() == 0.0 if t[i].item() == -100 else math.isnan(s.loss[i].item())
    assert s.pred.tolist() == [0] * 6


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(60)
@given(data=st.data())
def test_score_bad_targets_and_ignore_index_raise_clear_errors(backend, data):
    """A target outside [0, C) that is not ignore_index is an IndexError naming it; an
    ignore_index that no int64 can hold is either harmless (no row ignored) or a
    ValueError / TypeError naming ignore_index, never an internal error."""
    c = data.draw(st.integers(1, 6))
    n = data.draw(st.integers(1, 5))
    tdtype = data.draw(st.sampled_from([torch.int64, torch.int32]))
    lim = 2 ** 63 if tdtype == torch.int64 else 2 ** 31
    bad = data.draw(st.sampled_from([-lim, lim - 1, c, c + 1, -1, -2, -101, 2 ** 31 - 1, -2 ** 31]))
    assume(bad < 0 or bad >= c)
    # the last two: ignore_index equal to the bad target modulo 2^32 (an int32 comparison
    # with the scalar wrapped to int32 would take the bad target for ignore_index)
    ignore_index = data.draw(st.sampled_from([-100, -1, 0, 2 ** 63 - 1, -2 ** 63, bad + 2 ** 32, bad - 2 ** 32]))
    assume(bad != ignore_index and -2 ** 63 <= ignore_index < 2 ** 63)
    target = data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    where = data.draw(st.integers(0, n - 1))
    target[where] = bad
    x = torch.randn(n, c, dtype=torch.float64)
    with pytest.raises(IndexError, match="target"):
        fastsel.score(x, torch.tensor(target, dtype=tdtype), ignore_index=ignore_index, backend=backend)
    # ignore_index beyond int64
    huge = data.draw(st.sampled_from([2 ** 63, -2 ** 63 - 1, 2 ** 64, -(2 ** 64), 10 ** 30]))
    good = torch.tensor([data.draw(st.integers(0, c - 1)) for _ in range(n)], dtype=tdtype)
    try:
        s = fastsel.score(x, good, ignore_index=huge, backend=backend)
    except (ValueError, TypeError) as e:
        assert "ignore_index" in str(e), f"message does not name ignore_index: {e}"
    else:
        ref = fastsel.score(x, good, backend=backend)
        assert torch.equal(s.loss, ref.loss) and torch.equal(s.grad_norm, ref.grad_norm)


# ==== 2. score with a classifier weight: MMS ==================================================
#
# The rule (fastsel.score's docstring, reference.py): mms = min_{j != a} (z_a - z_j) /
# ||w_a - w_j|| (a = pred), 0 for a tie at the top (margin 0), +inf without a finite
# competitor (margin +inf: C = 1 or every other logit -inf); a weight with a NaN or +-inf
# entry has no distances: NaN wherever one is needed ("exact": anywhere in the weight;
# "top2": in the predicted or runner-up class); invalid rows NaN. "top2" uses the
# runner-up only. The oracle takes the weight's exact values (as given, in its own dtype).

def mp_distance(wa: list, wb: list) -> mpmath.mpf:
    with mpmath.workdps(DPS):
        return mpmath.sqrt(mpmath.fsum((mpmath.mpf(x) - mpmath.mpf(y)) ** 2 for x, y in zip(wa, wb)))


def mms_oracle(z: list, weight: list, mode: str, f64: bool):
    """(lo, hi) bounds of a correct MMS of row z (exact value +- the error a correct
    implementation may make), or a float (NaN / 0 / +-inf) that must be matched exactly."""
    want = row_oracle(z, None)
    if not want["valid"]:
        return NAN
    a, r = want["pred"], want["runner"]
    if want["margin"] == INF:
        return INF
    if want["margin"] == 0:
        return 0.0
    finite_row = [all(math.isfinite(v) for v in row) for row in weight]
    if mode == "top2":
        if not (finite_row[a] and finite_row[r]):
            return NAN
        competitors = [r]
    else:
        if not all(finite_row):
            return NAN
        competitors = [j for j in range(len(z)) if j != a]
    u = mpmath.mpf(2) ** (-53 if f64 else -24)
    d_cols = len(weight[0])
    lo = hi = mpmath.inf
    with mpmath.workdps(DPS):
        for j in competitors:
            if z[j] == z[a]:
                return 0.0
            if z[j] == -INF:
                continue
            dist = mp_distance(weight[a], weight[j])
            diff = exact_sub(z[a], z[j])
            if dist == 0:
                lo_j = hi_j = mpmath.inf
            else:
                ratio = diff / dist
                norms = mp_distance(weight[a], [0] * d_cols) + mp_distance(weight[j], [0] * d_cols)
                # diff and the quotient rounded, the distance from D squares (or the Gram
                # form, whose cancelling pairs the kernels recompute below 1/64 of the
                # squares: <= 64 u), the weight rounded to the accumulation dtype
                e = K_SAFETY * u * (4 + d_cols + 64 + norms / dist)
                lo_j, hi_j = ratio * max(0, 1 - e), ratio * (1 + e)
            lo, hi = min(lo, lo_j), min(hi, hi_j)
    return (lo, hi)


def check_mms(got: list, rows: list, weight: list, mode: str, f64: bool) -> list:
    rnd = round64 if f64 else round32
    floor = mpmath.mpf(2) ** (-1022 if f64 else -126)
    errs = []
    for i, row in enumerate(rows):
        g = got[i]
        want = mms_oracle(row, weight, mode, f64)
        if isinstance(want, float):
            if not (g == want or (math.isnan(g) and math.isnan(want))):
                errs.append(f"row {i}: mms got {g!r}, want {want!r}")
            continue
        lo, hi = want
        if math.isnan(g):
            errs.append(f"row {i}: mms got nan, want in [{mpmath.nstr(lo, 8)}, {mpmath.nstr(hi, 8)}]")
            continue
        if rnd(lo) == INF:  # the exact value overflows
            if g != INF:
                errs.append(f"row {i}: mms got {g!r}, want inf (exact >= {mpmath.nstr(lo, 8)})")
            continue
        if g == INF and rnd(hi) != INF:
            errs.append(f"row {i}: mms got inf, want in [{mpmath.nstr(lo, 8)}, {mpmath.nstr(hi, 8)}]")
            continue
        if g != INF and not (lo - floor <= g <= hi + floor):
            errs.append(f"row {i}: mms got {g!r}, want in [{mpmath.nstr(lo, 12)}, {mpmath.nstr(hi, 12)}]")
    return errs


WEIGHT_SCALES = {  # magnitudes of the weight entries, within each dtype's range
    "float64": [1e-320, 1e-300, 1e-200, 1e-160, 2.0 ** -600, 1e-40, 1e-20, 1.0, 1e20, 1e40, 1e160, 2.0 ** 600,
                1e200, 1e300],
    "float32": [1e-44, 1e-40, 1e-37, 1e-30, 1e-23, 1e-20, 1e-10, 1.0, 1e10, 1e19, 1e20, 1e30, 1e37],
    "bfloat16": [1e-40, 1e-37, 1e-20, 1.0, 1e20, 1e37],
}


@st.composite
def mms_case(draw) -> dict:
    dtype = draw(st.sampled_from(["float32", "float64", "bfloat16"]))
    wdtype = draw(st.sampled_from(["float32", "float64", "bfloat16"]))
    n = draw(st.integers(1, 8))
    c = draw(st.integers(1, 9))
    d = draw(st.integers(1, 5))
    zelem = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 2.5, 40.0, -INF]), st.floats(-100, 100))
    rows = [draw(st.lists(zelem, min_size=c, max_size=c)) for _ in range(n)]
    scale = draw(st.sampled_from(WEIGHT_SCALES[wdtype]))
    welem = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]), st.floats(-4, 4))
    weight = [[v * scale for v in draw(st.lists(welem, min_size=d, max_size=d))] for _ in range(c)]
    if c > 1 and draw(st.integers(0, 3)) == 0:  # two rows nearly coincide
        i, j = draw(st.integers(0, c - 1)), draw(st.integers(0, c - 1))
        k = draw(st.integers(0, d - 1))
        weight[j] = list(weight[i])
        weight[j][k] = weight[i][k] * (1 + draw(st.sampled_from([2.0 ** -20, 2.0 ** -40, 1e-3])))
    if draw(st.integers(0, 3)) == 0:  # NaN / +-inf somewhere in the weight
        for _ in range(draw(st.integers(1, 2))):
            weight[draw(st.integers(0, c - 1))][draw(st.integers(0, d - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    rows = poison(draw, rows, c)
    rows = torch.tensor(rows, dtype=torch.float64).reshape(n, c).to(DTYPES[dtype]).double().tolist()
    weight = torch.tensor(weight, dtype=torch.float64).to(DTYPES[wdtype]).double().tolist()
    return {"rows": rows, "c": c, "dtype": dtype, "wdtype": wdtype, "weight": weight,
            "mode": draw(st.sampled_from(["exact", "top2"])), "head": draw(st.booleans()),
            "layout": "contiguous", "target": [0] * n, "tdtype": "int64", "ignore_index": -100}


def mms_of(case: dict, backend: str, rows: Optional[list] = None) -> list:
    rows = case["rows"] if rows is None else rows
    x = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), case["c"]).to(DTYPES[case["dtype"]])
    w = torch.tensor(case["weight"], dtype=torch.float64).to(DTYPES[case["wdtype"]])
    weight = fastsel.mms_head(w) if case["head"] else w
    s = fastsel.score(x, torch.zeros(len(rows), dtype=torch.int64), head=weight, mms=case["mode"],
                      backend=backend)
    return s.mms.tolist()


def mms_report(case: dict, errs: list, backend: str) -> str:
    return (f"backend={backend!r} logits {case['dtype']} weight {case['wdtype']} mms={case['mode']!r} "
            f"head={case['head']}\nrows={case['rows']!r}\nweight={case['weight']!r}\n" + "\n".join(errs[:10]))


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(100)
@given(case=mms_case())
def test_mms_matches_mpmath_for_extreme_and_nonfinite_weights(backend, case):
    got = mms_of(case, backend)
    errs = check_mms(got, case["rows"], case["weight"], case["mode"], case["dtype"] == "float64")
    assert not errs, mms_report(case, errs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(80)
@given(case=mms_case(), split=st.integers(1, 4), repeat=st.sampled_from([1, 8, 40]))
def test_mms_does_not_depend_on_the_batch(backend, case, split, repeat):
    """The same rows scored in one batch, one at a time, in chunks, and in a batch
    repeated ``repeat`` times (which moves the CPU kernel from per-row distances to the
    [C, C] matrix): NaN / inf at the same places, values equal to rounding."""
    rows = case["rows"]
    whole = mms_of(case, backend)
    single = [mms_of(case, backend, [r])[0] for r in rows]
    chunks = sum((mms_of(case, backend, rows[i:i + split]) for i in range(0, len(rows), split)), [])
    big = mms_of(case, backend, rows * repeat)[:len(rows)]
    rtol = 4 * (2.0 ** -52 if case["dtype"] == "float64" else 2.0 ** -23) * (64 + len(case["weight"][0]))
    errs = []
    for label, other in (("one at a time", single), (f"chunks of {split}", chunks), (f"x{repeat}", big)):
        a, b = torch.tensor(whole, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)
        if not _close_or_same(a, b, rtol):
            errs.append(f"whole batch {whole} vs {label} {other}")
    assert not errs, mms_report(case, errs, backend)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the C++ backend")
@fuzz_settings(80)
@given(case=mms_case())
def test_mms_backends_agree_on_nonfinite_placement(case):
    a = torch.tensor(mms_of(case, "cpu"), dtype=torch.float64)
    b = torch.tensor(mms_of(case, "torch"), dtype=torch.float64)
    errs = []
    for what, f in (("NaN", torch.isnan), ("+inf", lambda t: t == INF), ("zero", lambda t: t == 0)):
        if not torch.equal(f(a), f(b)):
            errs.append(f"{what}: cpu {a.tolist()} torch {b.tolist()}")
    assert not errs, mms_report(case, errs, "cpu vs torch")


# ==== 3. gradients ================================================================================

@st.composite
def grad_case(draw, max_n: int = 4, max_c: int = 6) -> dict:
    """Moderate logits with -inf entries (never at the target, never a whole row),
    ignored rows, C = 1, int32 targets: where the loss and its derivatives are finite."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    ignore_index = draw(st.sampled_from([-100, -1, 2 ** 63 - 1, -2 ** 63, 1]))
    tdtype = draw(st.sampled_from(["int64", "int32"]))
    fits = tdtype == "int64" or -2 ** 31 <= ignore_index < 2 ** 31
    rows, target = [], []
    for _ in range(n):
        y = draw(st.integers(0, c - 1))
        row = [draw(st.one_of(st.floats(-8, 8), st.just(-INF), st.sampled_from([0.0, 2.0]))) for _ in range(c)]
        row[y] = draw(st.floats(-8, 8))
        rows.append(row)
        target.append(ignore_index if fits and draw(st.integers(0, 3)) == 0 else y)
    return {"rows": rows, "c": c, "dtype": "float64", "layout": draw(st.sampled_from(LAYOUTS)),
            "target": target, "tdtype": tdtype, "ignore_index": ignore_index}


def _loss_fn(case: dict, backend: str):
    _, t = build(case)
    ii = case["ignore_index"]
    return lambda x: fastsel.score(x, t, ignore_index=ii, backend=backend).loss


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(25)
@given(case=grad_case())
def test_loss_gradcheck_and_gradgradcheck_float64(backend, case):
    x, _ = build(case)
    x = x.detach().clone().requires_grad_(True)  # keeps the layout's strides
    fn = _loss_fn(case, backend)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6), report(case, [], backend)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-5), report(case, [], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(60)
@given(case=grad_case(max_n=8, max_c=40), dtype=st.sampled_from(["float64", "float32"]),
       upstream=st.sampled_from([None, "random"]))
def test_gradient_penalty_matches_cross_entropy(backend, case, dtype, upstream):
    """g = d(sum_i u_i loss_i)/dx with create_graph=True, then backward of ||g||: the
    same as through F.cross_entropy(reduction="none") in float64."""
    case = dict(case, dtype=dtype)
    x0, t = build(case)
    u = None
    if upstream:
        u = torch.linspace(-2, 3, x0.shape[0], dtype=torch.float64)
    results = []
    for kind in ("fastsel", "reference"):
        x = (x0 if kind == "fastsel" else x0.double()).detach().clone().requires_grad_(True)
        if kind == "fastsel":
            loss = fastsel.score(x, t, ignore_index=case["ignore_index"], backend=backend).loss
        else:
            # F.cross_entropy has no int64-range ignore_index: mask the ignored rows ourselves
            ignored = t.long() == case["ignore_index"]
            ce = F.cross_entropy(x, torch.where(ignored, 0, t.long()), reduction="none")
            loss = torch.where(ignored, 0.0, ce)
        w = torch.ones_like(loss) if u is None else u.to(loss.dtype)
        (g,) = torch.autograd.grad((loss * w).sum(), x, create_graph=True)
        pen = g.norm()
        pen.backward()
        results.append((g.detach().double(), x.grad.double(), pen.item()))
    (g1, h1, p1), (g2, h2, p2) = results
    tol = 1e-10 if dtype == "float64" else 2e-5
    errs = []
    if not torch.allclose(g1, g2, rtol=tol, atol=tol):
        errs.append(f"first derivative: {g1.tolist()} vs {g2.tolist()}")
    if p2 > 1e-6 and not torch.allclose(h1, h2, rtol=tol * 10, atol=tol * 10 * max(1.0, h2.abs().max().item())):
        errs.append(f"d||g||/dx: {h1.tolist()} vs {h2.tolist()}")
    if not torch.isfinite(h1).all():
        errs.append(f"non-finite penalty gradient {h1.tolist()}")
    assert not errs, report(case, errs, backend)


def softmax_oracle(row: list, y: Optional[int]) -> tuple:
    """(p_j - [j == y] for each j, and the allowed absolute error of each) in mpmath."""
    want = row_oracle(row, y)
    c = len(row)
    with mpmath.workdps(DPS):
        m = want["m"]
        S, L = want["S"], want["L"]
        out = []
        for j, v in enumerate(row):
            if y is None:
                out.append((mpmath.mpf(0), 0))
                continue
            if v == -INF:
                p, dj = mpmath.mpf(0), 0
            else:
                d = exact_sub(v, m)
                p = (mpmath.exp(d) if d > NEG_CUTOFF else mpmath.mpf(0)) / S
                dj = abs(d) if p > 0 else 0
            out.append((p - (1 if j == y else 0), (p, dj, L, c)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["bounded", "confident", "huge_ties", "spanning", "narrow"])
def test_loss_gradient_at_extremes_matches_mpmath_softmax(family, backend):
    """d loss_i / d z_ij = p_ij - [j = y_i] (0 on ignored rows) at the extremes of each
    dtype, against mpmath; allowed absolute error 8 u (p_j (|d_j| + log d + C + 4) + [j = y])
    in the accumulation precision, plus the rounding of the gradient to the logits' dtype
    and the smallest normal number."""
    strategy = narrow_batch("near_max") if family == "narrow" else f64_batch(family)

    @fuzz_settings(30)
    @given(case=strategy)
    def run(case):
        # rows where the loss is finite and valid (the gradient of a NaN / inf loss is not checked)
        keep = [i for i, (r, y) in enumerate(zip(case["rows"], case["target"]))
                if row_oracle(r, None)["valid"] and (y == case["ignore_index"] or r[y] != -INF)]
        assume(keep)
        case = dict(case, rows=[case["rows"][i] for i in keep], target=[case["target"][i] for i in keep])
        x, t = build(case)
        x = x.detach().clone().requires_grad_(True)
        fastsel.score(x, t, ignore_index=case["ignore_index"], backend=backend).loss.sum().backward()
        f64 = case["dtype"] == "float64"
        u = mpmath.mpf(2) ** (-53 if f64 else -24)
        u_out = mpmath.mpf(torch.finfo(x.dtype).eps) / 2
        floor = mpmath.mpf(torch.finfo(x.dtype).tiny)
        errs = []
        grad = x.grad.double().tolist()
        for i, (row, y) in enumerate(zip(case["rows"], case["target"])):
            for j, (want, parts) in enumerate(softmax_oracle(row, None if y == case["ignore_index"] else y)):
                g = grad[i][j]
                if parts == 0:
                    ok = g == 0
                    tol = 0
                else:
                    p, dj, L, c = parts
                    tol = K_SAFETY * u * (p * (dj + L + c + 4) + (1 if j == y else 0)) + u_out * abs(want) + floor
                    ok = math.isfinite(g) and abs(mpmath.mpf(g) - want) <= tol
                if not ok:
                    errs.append(f"grad[{i}][{j}] = {g!r}, want {mpmath.nstr(want, 17)} (allowed error {mpmath.nstr(tol, 3)})")
        assert not errs, report(case, errs, backend)

    run()


# ==== 4. selection ops ============================================================================

SEL_DTYPES = ["float32", "float64", "float16", "bfloat16"]


def _wild_vector(dtype: str) -> st.SearchStrategy:
    top = {"float64": MAX64, "float32": MAX32, "bfloat16": MAXBF16, "float16": MAX16}[dtype]
    sub = {"float64": SUB64, "float32": SUB32, "bfloat16": 2.0 ** -133, "float16": 2.0 ** -24}[dtype]
    return st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, top, -top, sub, -sub, INF, -INF, NAN]),
                     st.floats(-top, top, allow_nan=False, width=64 if dtype == "float64" else 32))


@st.composite
def score_vector(draw) -> dict:
    dtype = draw(st.sampled_from(SEL_DTYPES))
    n = draw(st.one_of(st.integers(0, 40), st.sampled_from([97, 600, 4096, 5000])))
    if n > 40:  # long vectors: random values with ties, without drawing them one by one
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
        v = torch.randn(n, generator=g, dtype=torch.float64).round(decimals=draw(st.sampled_from([0, 2, 6])))
        v[torch.rand(n, generator=g) < 0.01] = NAN
        values = v.tolist()
    else:
        values = draw(st.lists(_wild_vector(dtype), min_size=n, max_size=n))
    values = torch.tensor(values, dtype=torch.float64).to(DTYPES[dtype]).double().tolist()
    return {"values": values, "dtype": dtype, "step": draw(st.sampled_from([1, 1, 2, 3]))}


def as_vector(values: list, dtype: str, step: int) -> torch.Tensor:
    """The values as a 1-D tensor of ``dtype`` with stride ``step`` (a strided view)."""
    base = torch.full((max(1, len(values) * step),), 123.0, dtype=DTYPES[dtype])
    view = base[::step][:len(values)]
    view.copy_(torch.tensor(values, dtype=torch.float64).to(DTYPES[dtype]))
    return view


def topk_oracle(values: list, k: int, largest: bool) -> list:
    """Indices sorted by (NaN last, value in the direction, index): -0 == +0 in Python."""
    def key(i):
        v = values[i]
        return (1, 0.0, i) if math.isnan(v) else (0, -v if largest else v, i)
    return sorted(range(len(values)), key=key)[:k]


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(150)
@given(case=score_vector(), data=st.data())
def test_select_topk_matches_sorted_oracle(backend, case, data):
    values = case["values"]
    n = len(values)
    k = data.draw(st.one_of(st.just(0), st.just(n), st.integers(0, n)))
    largest = data.draw(st.booleans())
    x = as_vector(values, case["dtype"], case["step"])
    sel = fastsel.select_topk(x, k, largest, backend=backend)
    want = topk_oracle(values, k, largest)
    assert sel.indices.dtype == torch.int64 and sel.indices.shape == (k,)
    assert sel.indices.tolist() == want, (f"{case['dtype']} k={k} largest={largest} values={values!r}\n"
                                          f"got {sel.indices.tolist()}\nwant {want}")
    assert sel.weights.dtype == torch.float32 and torch.equal(sel.weights, torch.ones(k))
    assert sel.scores is x


@st.composite
def importance_vector(draw, positive_min: int = 0) -> dict:
    """Non-negative importances spanning float32's range (subnormals, values near its
    maximum), float64 ones below float32's smallest subnormal (zero in float32), many
    zeros; strided views."""
    dtype = draw(st.sampled_from(SEL_DTYPES))
    n = draw(st.one_of(st.integers(1, 40), st.integers(1, 3000)))
    pools = {
        "float32": [0.0, SUB32, 2 * SUB32, 1e-40, TINY32, 1e-30, 1.0, 3.0, 1e30, 1e38, MAX32 / 2, MAX32],
        "float64": [0.0, SUB64, 1e-320, 1e-50, SUB32, 1e-40, TINY32, 1.0, 1e30, MAX32 / 2, MAX32],
        "float16": [0.0, 2.0 ** -24, 6e-5, 1.0, 3.0, 1000.0, MAX16],
        "bfloat16": [0.0, 2.0 ** -133, 1e-38, 1.0, 1e30, MAXBF16],
    }[dtype]
    if n > 40:
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
        pick = torch.randint(0, len(pools), (n,), generator=g)
        scale = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
        values = (torch.tensor(pools, dtype=torch.float64)[pick] * torch.where(pick > 0, scale, 1.0))
        values = values.clamp(max=pools[-1]).tolist()
    else:
        values = draw(st.lists(st.one_of(st.sampled_from(pools), st.floats(0, pools[-1], width=32)),
                               min_size=n, max_size=n))
    values = torch.tensor(values, dtype=torch.float64).to(DTYPES[dtype]).double().tolist()
    w32 = torch.tensor(values, dtype=torch.float64).float()
    positive = int((w32 > 0).sum())
    assume(positive >= max(positive_min, 1))
    return {"values": values, "dtype": dtype, "step": draw(st.sampled_from([1, 2])), "positive": positive}


def check_weights(importance_f32: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> list:
    """importance_weights: 1 / P(i) normalised to mean 1, in float32 (float64 oracle)."""
    errs = []
    if weights.dtype != torch.float32 or weights.shape != idx.shape:
        return [f"weights dtype {weights.dtype} shape {tuple(weights.shape)}"]
    if idx.numel() == 0:
        return []
    inv = [1 / Fraction(float(importance_f32[i])) for i in idx.tolist()]
    total = sum(inv)
    want = [round32(mpmath.mpf(v.numerator) / v.denominator * len(inv) / (mpmath.mpf(total.numerator) / total.denominator))
            for v in inv]
    got = weights.tolist()
    for j, (g, w) in enumerate(zip(got, want)):
        if not (math.isfinite(g) and g >= 0):
            errs.append(f"weights[{j}] = {g!r} for index {idx[j].item()} (importance {float(importance_f32[idx[j]])!r})")
        elif abs(g - w) > 4e-7 * abs(w) + TINY32:
            errs.append(f"weights[{j}] = {g!r}, want {w!r}")
    return errs


@pytest.mark.parametrize("replacement", [False, True], ids=["without", "with"])
@fuzz_settings(120)
@given(case=importance_vector(), data=st.data())
def test_sample_invariants_and_backends_agree(replacement, case, data):
    """Distinct (without replacement) in-range indices of positive float32 importance,
    k up to the number of positive importances (any k with replacement), the importance
    weights of fastsel.importance_weights, and the same indices on "cpu" and "torch"."""
    positive = case["positive"]
    n = len(case["values"])
    k = data.draw(st.one_of(st.just(positive), st.just(1), st.integers(0, positive))) if not replacement \
        else data.draw(st.one_of(st.integers(0, 2 * n + 3), st.just(1)))
    seed = data.draw(st.one_of(st.integers(0, 2 ** 63 - 1), st.sampled_from([0, 2 ** 63 - 1])))
    counter = data.draw(st.one_of(st.integers(0, 2 ** 63 - 1), st.sampled_from([0, 2 ** 32, 2 ** 63 - 1])))
    x = as_vector(case["values"], case["dtype"], case["step"])
    w32 = x.float()
    results = {}
    for backend in BACKENDS:
        sel = fastsel.sample(x, k, replacement=replacement, seed=seed, counter=counter, backend=backend)
        idx = sel.indices
        errs = []
        if idx.dtype != torch.int64 or idx.shape != (k,):
            errs.append(f"indices dtype {idx.dtype} shape {tuple(idx.shape)}, want int64 ({k},)")
        else:
            if k and (idx.min() < 0 or idx.max() >= n):
                errs.append(f"index out of range: {idx.tolist()}")
            elif k and not (w32[idx] > 0).all():
                errs.append(f"zero-importance index drawn: {[i for i in idx.tolist() if w32[i] == 0]}")
            if not replacement and len(set(idx.tolist())) != k:
                errs.append(f"repeated index without replacement: {idx.tolist()}")
            if not errs:
                errs += check_weights(w32, idx, sel.weights)
        assert not errs, (f"backend={backend} {case['dtype']} k={k} seed={seed} counter={counter} "
                          f"values={case['values']!r}\n" + "\n".join(errs[:8]))
        results[backend] = idx.tolist()
    assert len({tuple(v) for v in results.values()}) == 1, f"backends disagree: {results}"


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(60)
@given(case=importance_vector())
def test_sample_rejects_k_beyond_the_positive_importances(backend, case):
    x = as_vector(case["values"], case["dtype"], case["step"])
    with pytest.raises(ValueError, match="k"):
        fastsel.sample(x, case["positive"] + 1, seed=0, backend=backend)
    zero = torch.zeros(len(case["values"]), dtype=DTYPES[case["dtype"]])
    for replacement in (False, True):
        with pytest.raises(ValueError, match="zero"):
            fastsel.sample(zero, 1, replacement=replacement, seed=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(40)
@given(case=importance_vector(), data=st.data())
def test_sample_float64_importance_beyond_float32_is_a_clear_error(backend, case, data):
    """Importance is used in float32: a finite float64 importance above float32's largest
    value cannot be used as it is; a ValueError naming importance (not a silent inf)."""
    values = list(case["values"])
    values[data.draw(st.integers(0, len(values) - 1))] = data.draw(st.sampled_from([1e39, 3.5e38, 1e300, MAX64]))
    x = torch.tensor(values, dtype=torch.float64)
    for replacement in (False, True):
        with pytest.raises(ValueError, match="importance"):
            fastsel.sample(x, 1, replacement=replacement, seed=0, backend=backend)


@fuzz_settings(60)
@given(case=importance_vector(), data=st.data())
def test_importance_weights_of_any_index(case, data):
    """Finite, positive and correct for every drawable (positive in float32) index; a
    ValueError naming the index for an index that cannot be drawn (zero importance)."""
    x = as_vector(case["values"], case["dtype"], case["step"])
    w32 = x.float()
    drawable = (w32 > 0).nonzero().flatten().tolist()
    k = data.draw(st.integers(1, 12))
    idx = torch.tensor([data.draw(st.sampled_from(drawable)) for _ in range(k)])
    errs = check_weights(w32, idx, fastsel.importance_weights(x, idx))
    assert not errs, f"{case['dtype']} indices={idx.tolist()} values={case['values']!r}\n" + "\n".join(errs)
    zeros = (w32 == 0).nonzero().flatten().tolist()
    if zeros:
        bad = torch.tensor(idx.tolist() + [data.draw(st.sampled_from(zeros))])
        with pytest.raises(ValueError, match="indices"):
            fastsel.importance_weights(x, bad)


@functools.lru_cache(maxsize=None)
def _count_fraction(count: int, total: int) -> float:
    return round32(mpmath.mpf(count) / total)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(150)
@given(values=score_vector(), history=score_vector())
def test_percentile_matches_a_direct_count(backend, values, history):
    """F_R(v) = #{h : h < v} / #h over the non-NaN history (exact comparison of the
    values as given, whatever the two dtypes), the quotient rounded to float32; NaN for
    a NaN value; 1 for an empty history."""
    v = as_vector(values["values"], values["dtype"], values["step"])
    h = as_vector(history["values"], history["dtype"], history["step"])
    got = fastsel.percentile(v, h, backend=backend)
    hs = sorted(x for x in history["values"] if not math.isnan(x))
    errs = []
    if got.dtype != torch.float32 or got.shape != v.shape:
        errs.append(f"dtype {got.dtype} shape {tuple(got.shape)}")
    else:
        for i, (x, g) in enumerate(zip(values["values"], got.tolist())):
            if math.isnan(x):
                want = NAN
            elif not hs:
                want = 1.0
            else:
                want = _count_fraction(bisect.bisect_left(hs, x), len(hs))  # #{h < x}, exactly
            if not (g == want or (math.isnan(g) and math.isnan(want))):
                errs.append(f"value[{i}] = {x!r}: got {g!r}, want {want!r}")
    assert not errs, (f"values {values['dtype']} {values['values'][:50]!r}\nhistory {history['dtype']} "
                      f"{history['values'][:50]!r}\n" + "\n".join(errs[:10]))


# ---- bad arguments: a clear exception naming the argument, never a crash -------------------

BAD_K = [-1, -2 ** 63, 2 ** 62, 2 ** 64, True, False, 1.0, 2.5, "3", None, torch.tensor(2), np.int64(2)]


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(120)
@given(op=st.sampled_from(["topk", "sample", "sample_rep", "percentile"]), data=st.data())
def test_selection_ops_reject_bad_arguments_clearly(backend, op, data):
    n = data.draw(st.integers(0, 6))
    good = torch.rand(n) + 0.1
    kinds = {"topk": ["k", "dtype", "shape", "meta", "flag"],
             "sample": ["k", "dtype", "shape", "meta", "seed", "counter", "flag"],
             "sample_rep": ["k", "dtype", "shape", "meta", "seed", "counter", "flag"],
             "percentile": ["dtype", "shape", "meta", "device_mix"]}[op]
    kind = data.draw(st.sampled_from(kinds))
    args = {"k": min(n, 1)}
    x = good
    expect = (TypeError, ValueError, IndexError)
    name = None
    if kind == "k":
        bad = data.draw(st.sampled_from(BAD_K + [n + 1]))
        if op == "sample_rep" and isinstance(bad, int) and not isinstance(bad, bool) and 0 <= bad < 2 ** 32:
            bad = -1
        args["k"], name = bad, "k"
    elif kind == "dtype":
        x = data.draw(st.sampled_from([torch.arange(n), torch.zeros(n, dtype=torch.bool),
                                       torch.zeros(n, dtype=torch.complex64), torch.zeros(n, dtype=torch.int32)]))
        name = {"topk": "scores", "sample": "importance", "sample_rep": "importance", "percentile": "values"}[op]
    elif kind == "shape":
        x = data.draw(st.sampled_from([torch.rand(2, 3), torch.tensor(1.0), torch.rand(1, 1, 1)]))
        name = {"topk": "scores", "sample": "importance", "sample_rep": "importance", "percentile": "values"}[op]
    elif kind == "meta":
        x = torch.rand(n, device="meta")
        name = {"topk": "scores", "sample": "importance", "sample_rep": "importance", "percentile": "values"}[op]
    elif kind == "seed":
        args["seed"], name = data.draw(st.sampled_from([-1, 2 ** 63, 2 ** 64, True, 1.5, "0"])), "seed"
    elif kind == "counter":
        args["counter"], name = data.draw(st.sampled_from([-1, 2 ** 63, True, 0.0])), "counter"
    elif kind == "flag":
        flag = data.draw(st.sampled_from([1, 0, None, "yes", np.bool_(True)]))
        if op == "topk":
            args["largest"], name = flag, "largest"
        else:
            args["replacement"], name = flag, "replacement"
    else:  # percentile: the history on the meta device
        name = "history"
    try:
        if op == "topk":
            fastsel.select_topk(x, args["k"], args.get("largest", True), backend=backend)
        elif op in ("sample", "sample_rep"):
            fastsel.sample(x, args["k"], replacement=args.get("replacement", op == "sample_rep"),
                           seed=args.get("seed", 0), counter=args.get("counter", 0), backend=backend)
        else:
            hist = torch.rand(3, device="meta") if kind == "device_mix" else torch.rand(3)
            fastsel.percentile(x, hist, backend=backend)
    except expect as e:
        assert name in str(e), f"{op} with bad {kind}: message does not name {name!r}: {e}"
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{op} with bad {kind} ({args}): {type(e).__name__}: {e}")
    pytest.fail(f"{op} with bad {kind} ({args}) was accepted")


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(60)
@given(case=f64_batch("bounded", max_n=12, max_c=8), by=st.sampled_from(sorted(fastsel.SCORE_DIRECTIONS)),
       data=st.data())
def test_select_equals_score_then_select_topk(backend, case, by, data):
    """fastsel.select(..., policy="topk") is score() then select_topk() of the score
    ``by`` in its documented direction (or ``largest`` given)."""
    x, t = build(case)
    n = x.shape[0]
    k = data.draw(st.integers(0, n))
    largest = data.draw(st.sampled_from([None, True, False]))
    w = torch.linspace(-1, 1, case["c"] * 2, dtype=torch.float64).reshape(case["c"], 2) if by == "mms" else None
    sel = fastsel.select(x, t, k, by=by, largest=largest, head=w, ignore_index=case["ignore_index"],
                         backend=backend)
    s = fastsel.score(x, t, head=w, ignore_index=case["ignore_index"], backend=backend)
    direction = fastsel.SCORE_DIRECTIONS[by] == "largest" if largest is None else largest
    want = topk_oracle(getattr(s, by).double().tolist(), k, direction)
    assert sel.indices.tolist() == want, report(case, [f"by={by} k={k}: {sel.indices.tolist()} != {want}"], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(60)
@given(case=st.one_of(f64_batch("bounded"), f64_batch("spanning"), narrow_batch("near_max")),
       data=st.data())
def test_ignored_rows_get_exactly_zero_gradient_whatever_they_hold(backend, case, data):
    """Rows whose target is ignore_index have loss 0 and gradient 0
    (``score_backward_reference``: "0 on ignored rows"), also when the row holds NaN,
    +-inf or only -inf: a padded row of garbage must not turn the update into NaN. The
    other (valid) rows keep their gradient."""
    n, c = len(case["rows"]), case["c"]
    assume(n > 0)
    rows = [list(r) for r in case["rows"]]
    i = data.draw(st.integers(0, n - 1))
    rows[i][data.draw(st.integers(0, c - 1))] = data.draw(st.sampled_from([NAN, INF, -INF]))
    if data.draw(st.booleans()):
        rows[i] = [data.draw(st.sampled_from([NAN, -INF]))] * c
    ii = -100
    target = [ii if r == i or data.draw(st.booleans()) else t % c for r, t in enumerate(range(n))]
    case = dict(case, rows=rows, target=target, ignore_index=ii, tdtype="int64")
    x, t = build(case)
    x = x.detach().clone().requires_grad_(True)
    s = fastsel.score(x, t, ignore_index=ii, backend=backend)
    s.loss.sum().backward()
    ignored = [r for r in range(n) if target[r] == ii]
    errs = [f"row {r}: loss {s.loss[r].item()!r}, gradient {x.grad[r].tolist()}" for r in ignored
            if s.loss[r].item() != 0 or not (x.grad[r] == 0).all()]
    assert not errs, report(case, errs, backend)


# ==== regressions: the minimal cases the fuzzers above found, one test each =====================
# (Expected values from the definitions, checked in mpmath; each is a single failure of its
# own, so a bug fixed in one place does not hide another behind the same hypothesis test.)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,row", [("float64", [0.0, -360.0]), ("float64", [0.0, -500.0]),
                                       ("float64", [0.0, -690.75]), ("float64", [7.0, -700.0, -710.0]),
                                       ("float32", [0.0, -46.0]), ("float32", [0.0, -60.0]),
                                       ("bfloat16", [0.0, -60.0])])
def test_regression_grad_norm_of_very_confident_rows(backend, dtype, row):
    """grad_norm = ||p - onehot(y)|| ~ sqrt(2) exp(-gap): representable (1e-217, 1e-300 in
    float64; 1e-26 in float32), but (1 - p_y)^2 and p_j^2 underflow: squaring them
    loses the value (0) or the p_j^2 term (a factor sqrt(2) too small)."""
    case = {"rows": [row], "c": len(row), "dtype": dtype, "layout": "contiguous", "target": [0],
            "tdtype": "int64", "ignore_index": -100}
    errs = check_against_mpmath(case, score_case(case, backend))["grad_norm"]
    assert not errs, report(case, errs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first,later,c", [(-MAX32, 0.0, 4097), (-MAX32 / 2, MAX32 / 2, 5000), (-1e37, 1.0, 4200)])
def test_regression_float32_row_whose_maximum_jumps_after_the_first_block(backend, first, later, c):
    """A float32 row of C > 4096 whose first 4096 columns lie ~FLT_MAX below a later
    maximum: the entropy must be that of the later columns (here log of their count),
    not NaN (rescaling the first block's sums multiplies the jump by their count)."""
    x = torch.full((1, c), first)
    x[0, 4096:] = later
    s = fastsel.score(x, torch.tensor([c - 1]), backend=backend)
    want = math.log(c - 4096)
    assert abs(s.entropy.item() - want) <= 1e-5 * max(1.0, want), (s.entropy.item(), want)
    assert abs(s.loss.item() - want) <= 1e-5 * max(1.0, want), (s.loss.item(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,ignore_index", [(-1, 2 ** 32 - 1), (5, 2 ** 32 + 5), (-7, -2 ** 32 - 7)])
def test_regression_int32_target_equal_to_ignore_index_modulo_2_32(backend, bad, ignore_index):
    """An int32 target that is not ignore_index but equals it modulo 2^32 is out of range:
    an IndexError naming it (an int32 comparison with the scalar wrapped to 32 bits takes
    it for ignore_index and lets it through to a gather)."""
    t = torch.tensor([bad, 1], dtype=torch.int32)
    with pytest.raises(IndexError, match=r"target\[0\]"):
        fastsel.score(torch.randn(2, 3), t, ignore_index=ignore_index, backend=backend)


def _mms(z, w, backend, mms="exact", head=False):
    weight = fastsel.mms_head(w) if head else w
    return fastsel.score(z, torch.zeros(z.shape[0], dtype=torch.int64), head=weight, mms=mms,
                         backend=backend).mms.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mms", ["exact", "top2"])
def test_regression_mms_of_subnormal_float32_weights(backend, mms):
    """Float32 weights below 2^-126 (subnormal): a tie is 0, and 0.5 / 1e-40 overflows
    float32 to inf, on every path (one row, or a batch large enough for the [C, C] matrix)."""
    w = torch.tensor([[0.0], [0.0], [1e-40]])
    assert _mms(torch.zeros(1, 3), w, backend, mms) == [0.0]
    assert _mms(torch.zeros(8, 3), w, backend, mms) == [0.0] * 8
    w2 = torch.tensor([[0.0, 0.0], [0.0, 1e-40], [1e-40, 0.0]])
    assert _mms(torch.tensor([[1.0, 0.0, 0.5]]), w2, backend, mms) == [INF]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mms", ["exact", "top2"])
def test_regression_mms_of_float64_weights_beyond_float32_with_float32_logits(backend, mms):
    """A finite float64 weight whose distances exceed float32's range, float32 logits: the
    weight holds no NaN / inf, so the rule for non-finite weights does not apply; a tie
    is 0, a competitor at -inf or with a zero distance is +inf (never inf / inf = NaN)."""
    w = torch.tensor([[0.0], [1e40], [0.0]], dtype=torch.float64)
    assert _mms(torch.tensor([[0.0, -INF, 0.0]]), w, backend, mms) == [0.0]
    if mms == "exact":
        assert _mms(torch.tensor([[1.0, -INF, 0.0]]), w, backend, mms) == [INF]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mms", ["exact", "top2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_regression_mms_of_subnormal_float64_weights(backend, mms, dtype):
    """Weights below 2^-1022: 1 / 1e-310 = 1e310 overflows to inf (a power-of-two rescale
    by 2^1029 overflows itself and gives NaN)."""
    w = torch.tensor([[0.0], [1e-310]], dtype=torch.float64)
    assert _mms(torch.tensor([[0.0, 1.0]], dtype=dtype), w, backend, mms) == [INF]
    assert _mms(torch.tensor([[0.0, 0.0]], dtype=dtype), w, backend, mms) == [0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_mms_with_weight_rows_of_very_different_magnitudes(backend):
    """Rows 3.4e-295, 1e-20 and 0: the MMS 1 / 3.4e-295 = 2.94e294 is representable, but a
    single rescaling by the largest entry makes the small pair's squares underflow
    (distance 0, MMS inf)."""
    z = torch.tensor([[0.0, -INF, 1.0]], dtype=torch.float64)
    w = torch.tensor([[3.4e-295], [1e-20], [0.0]], dtype=torch.float64)
    got = _mms(z, w, backend)[0]
    want = 1 / 3.4e-295
    assert abs(got - want) <= 1e-12 * want, (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-160])
def test_regression_mms_head_of_tiny_weights(backend, scale):
    """mms_head of a weight whose squares underflow (cdist of 1e-300 rows is 0): its
    max_distance must still bound the distances, so the exact MMS with the head equals
    the one without (here 1 / scale)."""
    z = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    w = torch.zeros(3, 3, dtype=torch.float64)
    w[2, 2] = scale
    plain, headed = _mms(z, w, backend)[0], _mms(z, w, backend, head=True)[0]
    assert abs(plain - 1 / scale) <= 1e-12 / scale and headed == plain, (plain, headed, 1 / scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-2 ** 63, 2 ** 32, 2 ** 33])
def test_regression_second_derivative_with_int32_targets_and_a_wide_ignore_index(backend, ignore_index):
    """int32 target 0 with an ignore_index whose low 32 bits are 0: the row is not ignored,
    so d||dL/dz||/dz is that of F.cross_entropy (+-1/(2 sqrt 2)), not 0."""
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    loss = fastsel.score(x, torch.tensor([0], dtype=torch.int32), ignore_index=ignore_index, backend=backend).loss
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    g.norm().backward()
    want = 1 / (2 * math.sqrt(2))
    assert g.tolist() == [[-0.5, 0.5]]
    torch.testing.assert_close(x.grad, torch.tensor([[-want, want]], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [[0.0, NAN, 1.0], [INF, 0.0, 1.0], [-INF, -INF, -INF], [NAN, NAN, NAN]])
def test_regression_ignored_row_with_nonfinite_logits_has_zero_gradient(backend, bad):
    x = torch.tensor([bad, [0.0, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    fastsel.score(x, torch.tensor([-100, 1]), backend=backend).loss.sum().backward()
    assert x.grad[0].tolist() == [0.0, 0.0, 0.0], x.grad.tolist()
    torch.testing.assert_close(x.grad[1], torch.softmax(x[1].detach(), 0) - torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))

"""Selection ops (docs/methods.md section 2): top-k, proportional sampling, the percentile
rule, and score-and-select in one call.

Every op exists on every backend (``torch`` reference, ``cpu`` C++, ``triton``, ``cuda``)
and a seed selects the same samples on all of them: the randomness is Philox4x32-10
keyed by ``(seed, counter, element index)`` and every float operation on the way to a
decision is one IEEE-rounded operation in a fixed order (see
``csrc/include/fastsel/selection_keys.h``). ``counter`` is the call number: pass the
training step (or any number that changes between calls) to get fresh draws from one
seed, and the same ``(seed, counter)`` to get the same draws again, e.g. after a resume.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import torch

from fastsel import _checks, reference
from fastsel._checks import MAX_INDEX, check_k, check_real
from fastsel.backends import FLOAT_DTYPES, check_backend_name, resolve_backend
from fastsel.contract import SELECTION_SCHEMAS, Scores
from fastsel.ops import score
from fastsel.registration import selection as _registration  # noqa: F401  (the ops exist once this is imported)

__all__ = [
    "Selection", "History", "select_topk", "sample", "percentile", "select", "importance_weights",
    "SCORE_DIRECTIONS", "POLICIES",
]

# The direction in which each score marks a sample as worth training on: a small
# margin or MMS is close to the decision boundary, a large loss is hard.
SCORE_DIRECTIONS = {
    "loss": "largest",
    "entropy": "largest",
    "grad_norm": "largest",
    "margin": "smallest",
    "true_margin": "smallest",
    "mms": "smallest",
    "confidence": "smallest",
}
POLICIES = ("topk", "sample", "percentile")


class Selection(NamedTuple):
    """The chosen samples of one selection.

    ``indices`` [k] int64 into the batch (best first for top-k, in race order for
    sampling without replacement, in draw order with replacement); ``weights`` [k]
    float32: for sampling, the importance weights ``1 / (N P(i))`` normalised to mean 1
    over the selection (``importance_weights``), ones otherwise; ``scores``: the full ``Scores`` for ``select``, the input
    tensor for the other ops.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    scores: Any


class History:
    """Ring buffer of the most recent values (Selective-Backprop's last R losses), kept on
    the device of the scores so that ``percentile`` never copies it.

    ``push`` appends (keeping the last ``size``); ``values`` is the filled part. Positions
    are tracked on the host, so nothing here synchronises with the device.
    """

    def __init__(self, size: int = 1024, *, device: Union[str, torch.device, None] = None,
                 dtype: torch.dtype = torch.float32):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if size > MAX_INDEX:  # percentile works on histories of at most 2^32 - 1 values
            raise ValueError(f"size must be at most 2^32 - 1, got {size}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
        self.size = size
        self._buffer = torch.full((size,), float("nan"), dtype=dtype, device=device)
        self._pos = 0
        self._count = 0

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def values(self) -> torch.Tensor:
        """The stored values (at most ``size``; order not meaningful)."""
        return self._buffer[: self._count]

    def __len__(self) -> int:
        return self._count

    def push(self, values: torch.Tensor) -> None:
        """Appends ``values`` (1-D), overwriting the oldest entries once full."""
        if not isinstance(values, torch.Tensor) or values.dim() != 1:
            raise ValueError(f"values must be a 1-D tensor, got {_describe(values)}")
        if values.device != self.device:
            raise ValueError(f"values are on {values.device} but the history is on {self.device}")
        v = values.detach().to(self._buffer.dtype)
        n = v.numel()
        if n >= self.size:
            self._buffer.copy_(v[n - self.size:])
            self._pos, self._count = 0, self.size
            return
        first = min(n, self.size - self._pos)
        self._buffer[self._pos:self._pos + first] = v[:first]
        self._buffer[: n - first] = v[first:]
        self._pos = (self._pos + n) % self.size
        self._count = min(self.size, self._count + n)

    def state_dict(self) -> dict:
        return {"size": self.size, "buffer": self._buffer.clone(), "pos": self._pos,
                "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        """Loads a ``state_dict()``, checked whole first: on error nothing has changed."""
        from fastsel._state import check_history

        buffer, pos, count = check_history("state", state, self.size,
                                           f"the state is of a History of size {{size}}, this one has size {self.size}")
        self._buffer.copy_(buffer.to(self.device))
        self._pos, self._count = pos, count

    def __repr__(self) -> str:
        return f"History(size={self.size}, filled={self._count}, device={self.device})"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _check_vector(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D floating point torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.numel() > MAX_INDEX:
        raise ValueError(f"{name} has {x.numel()} entries; at most 2^32 - 1 are supported")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values: selection decides "
                         "from the values, so pass a tensor on a real device")


def _resolve_seed(seed: Optional[int], counter: int, generator: Optional[torch.Generator]) -> tuple[int, int]:
    """(seed, counter) as ints in [0, 2^63). Without a seed one is drawn from ``generator``
    or from torch's global generator (so ``torch.manual_seed`` makes runs repeatable)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        seed = int(torch.randint(0, reference.MAX_SEED, (), generator=generator, device=generator.device))
    elif seed is None:
        seed = int(torch.randint(0, reference.MAX_SEED, ()))
    for name, v in (("seed", seed), ("counter", counter)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if not 0 <= v <= reference.MAX_SEED:
            raise ValueError(f"{name} must be in [0, 2^63), got {v}")
    return seed, counter


def _selection_op(name: str, backend: str, device: torch.device):
    """The op ``name`` of the backend a call on ``device`` runs on: every backend's has the
    schema of ``fastsel.contract.SELECTION_SCHEMAS[name]``."""
    check_backend_name(backend)
    return _OPS[resolve_backend(backend, device)](name)


_REFERENCE = {
    "select_topk": reference.select_topk_reference,
    "sample_without_replacement": reference.sample_without_replacement_reference,
    "sample_with_replacement": reference.sample_with_replacement_reference,
    "percentile": reference.percentile_reference,
}
assert _REFERENCE.keys() == SELECTION_SCHEMAS.keys()
_OPS = {  # backend: the op of a name
    "cpu": lambda name: getattr(torch.ops.fastsel, name),
    "cuda": lambda name: getattr(torch.ops.fastsel, name),
    "triton": lambda name: getattr(torch.ops.fastsel, f"triton_{name}"),
    "torch": _REFERENCE.__getitem__,
}


def _check_importance_values(w: torch.Tensor, k: int, replacement: bool) -> None:
    """The importance errors of the CPU kernel, for the backends that do not check in-kernel:
    raised on CPU tensors, asserted asynchronously on accelerators (no host sync)."""
    w32 = w.to(torch.float32)
    nan, negative, inf = torch.isnan(w32), w32 < 0, torch.isinf(w32) & (w32 > 0)
    if not _checks.checks_on_host(w32):
        torch._assert_async(~nan.any(), "importance must not contain NaN")
        torch._assert_async(~negative.any(), "importance must be non-negative")
        torch._assert_async(~inf.any(), "importance must be finite")
        if k > 0:
            count = (w32 > 0).sum()
            torch._assert_async(count > 0, "importance is all zero (in float32): nothing can be drawn")
            if not replacement:
                torch._assert_async(count >= k, "k exceeds the number of nonzero importances")
        return
    if bool(nan.any()):
        i = int(nan.nonzero()[0, 0])
        raise ValueError(f"importance must not contain NaN; importance[{i}] is NaN")
    if bool(negative.any()):
        i = int(negative.nonzero()[0, 0])
        raise ValueError(f"importance must be non-negative; importance[{i}] = {float(w[i]):g}")
    if bool(inf.any()):
        i = int(inf.nonzero()[0, 0])
        value = float(w[i])
        if value != float("inf"):  # finite in float64, beyond float32's range
            raise ValueError(f"importance must be finite in float32, in which it is used: importance[{i}] = "
                             f"{value:g} exceeds float32's largest value {torch.finfo(torch.float32).max:g}; "
                             "rescale the importances (only their ratios matter), e.g. divide by their maximum")
        raise ValueError(f"importance must be finite; importance[{i}] = inf")
    if k == 0:
        return
    positive = int((w32 > 0).sum())
    if positive == 0:
        raise ValueError("importance is all zero (in float32): nothing can be drawn")
    if not replacement and k > positive:
        raise ValueError(f"k = {k} exceeds the number of nonzero importances ({positive}) "
                         "for sampling without replacement")


def select_topk(scores: torch.Tensor, k: int, largest: bool = True, *, backend: str = "auto") -> Selection:
    """The ``k`` best of ``scores`` [N]: largest (or smallest) first, ties broken by the
    lowest index, NaN ranked after every number. Weights are ones."""
    _check_vector(scores, "scores")
    check_k(k, scores.numel())
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {largest!r}")
    idx = _selection_op("select_topk", backend, scores.device)(scores, k, largest)
    ones = torch.ones(k, dtype=torch.float32, device=scores.device)
    return Selection(idx, ones, scores)


def importance_weights(importance: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``1 / (N P(i))`` for the selected ``indices``, P ∝ importance, normalised to mean 1
    over the selection (N and the sum of importances cancel): float32 [k].

    Before normalisation, ``mean_j f(x_j) / (N P(j))`` over draws with replacement is an
    unbiased estimate of the population mean of f. Normalising makes it the
    self-normalised estimator: consistent and scale-free (a weighted loss keeps the
    magnitude of an unweighted one), but biased by O(1/k) (for k = 1 every weight is 1).
    Without replacement, 1 / (N P(i)) is the usual approximation of the inverse inclusion
    probability, close to it when k is small against N."""
    _check_vector(importance, "importance")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be a 1-D int64 (or int32) tensor of indices into importance, got {_describe(indices)}")
    if indices.device != importance.device:
        raise ValueError(f"indices are on {indices.device} but importance is on {importance.device}")
    if indices.numel() == 0:
        return torch.ones(0, dtype=torch.float32, device=importance.device)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _checks.check_index_range(indices, importance.numel(), "indices")
    picked = importance.detach()[indices].to(torch.float32)  # gather k, then convert
    # 1 / (N P(i)) is undefined for an index that cannot be drawn: a zero (or negative,
    # NaN, infinite) importance would turn every weight into NaN
    drawable = (picked > 0) & torch.isfinite(picked)
    if compiling:
        pass
    elif _checks.checks_on_host(picked):
        if not bool(drawable.all()):
            j = int((~drawable).nonzero()[0, 0])
            raise ValueError(f"importance_weights: indices[{j}] = {int(indices[j])} has importance "
                             f"{float(picked[j]):g} (in float32); only indices with a finite positive "
                             "importance can be drawn and weighted")
    else:
        torch._assert_async(drawable.all(), "importance_weights: an index with importance <= 0 or not finite")
    return _normalised_inverse(picked, indices.numel())


def _normalised_inverse(picked: torch.Tensor, k: int) -> torch.Tensor:
    """1 / picked normalised to mean 1 (float32 [k]): importance_weights without its checks,
    for ``sample``, whose indices are drawn from positive importances by construction."""
    inv = 1.0 / picked.to(torch.float64)
    return (inv * (k / inv.sum())).to(torch.float32)


def sample(
    importance: torch.Tensor,
    k: int,
    *,
    replacement: bool = False,
    seed: Optional[int] = None,
    counter: int = 0,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
) -> Selection:
    """``k`` indices drawn with probability proportional to ``importance`` [N] (the CDF
    sampling of Knutsson et al. 2023).

    Without replacement: the exponential race (Efraimidis & Spirakis 2006): item i
    finishes at E_i / w_i with E_i ~ Exp(1); the first k form the sample, in finishing
    order. With replacement: k independent draws by inverting the cumulative sum (of
    integer-quantized importances, so every backend finds the same index).

    ``importance`` must be non-negative and finite, with a nonzero entry (at least ``k``
    without replacement); it is used in float32. Zero-importance items are never drawn.
    ``seed``/``counter`` (or a ``torch.Generator``, consumed for a seed) fix the draws;
    the weights are ``importance_weights``.
    """
    _check_vector(importance, "importance")
    if not isinstance(replacement, bool):
        raise TypeError(f"replacement must be a bool, got {replacement!r}")
    check_k(k, importance.numel(), allow_above_n=replacement)
    seed, counter = _resolve_seed(seed, counter, generator)
    check_backend_name(backend)
    in_kernel = resolve_backend(backend, importance.device) == "cpu"  # the C++ kernel checks in its pass
    if not in_kernel and not torch.compiler.is_compiling():
        _check_importance_values(importance, k, replacement)
    if k == 0 and not in_kernel:  # the C++ op checks the values for k = 0 too
        idx = torch.empty(0, dtype=torch.int64, device=importance.device)
    else:
        name = "sample_with_replacement" if replacement else "sample_without_replacement"
        idx = _selection_op(name, backend, importance.device)(importance, k, seed, counter)
    if idx.numel() == 0:
        return Selection(idx, torch.ones(0, dtype=torch.float32, device=importance.device), importance)
    return Selection(idx, _normalised_inverse(importance.detach()[idx].to(torch.float32), idx.numel()), importance)


def percentile(values: torch.Tensor, history: Union[torch.Tensor, History], *,
               backend: str = "auto") -> torch.Tensor:
    """F_R(v) for each value [N]: the fraction of ``history`` (a tensor of recent losses or
    a ``History``) strictly below v, float32. NaN history entries are ignored; an empty
    history ranks every value at 1; a NaN value gives NaN."""
    _check_vector(values, "values")
    h = history.values if isinstance(history, History) else history
    if isinstance(h, torch.Tensor) and h.device != values.device:
        raise ValueError(f"history is on {h.device} but values are on {values.device}")
    _check_vector(h, "history")
    return _selection_op("percentile", backend, values.device)(values, h)


def select(
    logits: torch.Tensor,
    target: torch.Tensor,
    k: Optional[int] = None,
    *,
    by: str = "loss",
    policy: str = "topk",
    largest: Optional[bool] = None,
    head: Optional[torch.Tensor] = None,
    mms: str = "exact",
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    replacement: bool = False,
    seed: Optional[int] = None,
    counter: int = 0,
    generator: Optional[torch.Generator] = None,
    history: Union[torch.Tensor, History, None] = None,
    beta: float = 3.0,
    s_min: float = 0.0,
    backend: str = "auto",
) -> Selection:
    """Scores ``logits`` against ``target`` (``fastsel.score``) and selects by score ``by``.

    Policies:
      * ``"topk"``: the ``k`` best by ``by`` in the direction of ``SCORE_DIRECTIONS``
        (smallest ``mms``/``margin``/``true_margin``/``confidence``, largest
        ``loss``/``entropy``/``grad_norm``) unless ``largest`` says otherwise.
      * ``"sample"``: ``k`` draws with P ∝ the score (``fastsel.sample``; the score is
        the importance as it is, so it must be non-negative).
      * ``"percentile"``: Selective-Backprop (Jiang et al. 2019): keep sample i with
        probability max(s_min, F_R(s_i)^beta), F_R from ``history``; ``k`` must be None
        (the number kept is random). A ``History`` then receives this batch's scores.

    ``head``, ``mms``, ``weight``, ``label_smoothing`` and ``ignore_index`` are
    ``fastsel.score``'s. Returns a ``Selection`` whose ``scores`` is the full ``Scores``.
    """
    if by not in SCORE_DIRECTIONS:
        raise ValueError(f"by must be one of {sorted(SCORE_DIRECTIONS)}, got {by!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if by == "mms" and head is None:
        raise ValueError("by='mms' needs the classifier head: pass head=model.fc (or its weight [C, D])")
    if policy == "percentile":
        if k is not None:
            raise ValueError("k must be None with policy='percentile': the rule keeps a random number of samples")
        if history is None:
            raise ValueError("policy='percentile' needs history= (a History or a tensor of recent scores)")
    elif k is None:
        raise ValueError(f"policy={policy!r} needs k, the number of samples to select")
    scores: Scores = score(logits, target, head=head, mms=mms, weight=weight, label_smoothing=label_smoothing,
                           ignore_index=ignore_index, backend=backend)
    values = getattr(scores, by).detach()
    if policy == "topk":
        direction = SCORE_DIRECTIONS[by] == "largest" if largest is None else largest
        sel = select_topk(values, k, direction, backend=backend)
        return Selection(sel.indices, sel.weights, scores)
    if policy == "sample":
        sel = sample(values, k, replacement=replacement, seed=seed, counter=counter,
                     generator=generator, backend=backend)
        return Selection(sel.indices, sel.weights, scores)
    check_percentile_rule(beta, s_min)
    seed, counter = _resolve_seed(seed, counter, generator)
    idx = percentile_keep(values, history, beta=beta, s_min=s_min, seed=seed, counter=counter,
                          backend=backend)
    return Selection(idx, torch.ones(idx.numel(), dtype=torch.float32, device=values.device), scores)


def check_percentile_rule(beta, s_min) -> None:
    """The knobs of the percentile rule: beta >= 0, s_min in [0, 1]."""
    check_real("beta", beta, low=0)
    check_real("s_min", s_min, low=0, high=1)


def keep_probability(f: torch.Tensor, beta: float, s_min: float) -> torch.Tensor:
    """Selective-Backprop's P(keep) = max(s_min, F^beta) for percentiles F."""
    return torch.clamp_min(f.pow(float(beta)), float(s_min))


def percentile_keep(values: torch.Tensor, history: Union[torch.Tensor, History], *, beta: float,
                    s_min: float, seed: int, counter: int, backend: str = "auto") -> torch.Tensor:
    """Indices kept by the percentile rule: a Bernoulli draw per value with P(keep) =
    max(s_min, F_R(v)^beta), uniforms from (seed, counter). A ``History`` then receives
    the values (after the percentiles are taken)."""
    p = keep_probability(percentile(values, history, backend=backend), beta, s_min)
    u = reference.bernoulli_uniforms(values.numel(), seed, counter, device=values.device)
    idx = (u < p).nonzero().squeeze(1)
    if isinstance(history, History):
        history.push(values)
    return idx

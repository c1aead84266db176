"""Public scoring op: input validation, backend dispatch and the MMS head.

Every backend's scoring op has the signature and the outputs of
``torch.ops.fastsel.score_forward`` (``fastsel.contract``: ``loss``, ``entropy``, ...,
``pred``, ``mms``, ``lse``; ``mms`` is an empty tensor when no classifier weight is
given), and ``score`` picks one from a table (``_FORWARD``). Only ``loss`` is
differentiable: its backward recomputes ``softmax(z) - onehot(y)`` from the saved per-row
log-sum-exp, so nothing of size [N, C] is kept between forward and backward. The ops'
registrations (fakes, autograd, the Triton ops) are in ``fastsel/registration/``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from fastsel import _checks, contract, reference
from fastsel._extension import CPU_EXTENSION_AVAILABLE
from fastsel.backends import BACKENDS, FLOAT_DTYPES, available_backends, check_backend_name, resolve_backend
from fastsel.contract import MMS_MODES, Scores, scores_from_outputs
from fastsel.registration import score as _registration  # noqa: F401  (the ops exist once this is imported)

if CPU_EXTENSION_AVAILABLE:
    from fastsel import _C

__all__ = ["score", "Scores", "MmsHead", "mms_head", "available_backends", "BACKENDS", "MMS_MODES"]

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


class MmsHead(NamedTuple):
    """A classifier weight with what the exact MMS search needs of it precomputed
    (``mms_head``); pass it as ``score(..., head=mms_head(w))`` for as long as the weight is
    unchanged."""

    weight: torch.Tensor
    max_distance: torch.Tensor  # [C] float64, >= max_j ||w_a - w_j|| as the kernels compute it
    version: Optional[int]  # weight._version when computed (None: an inference tensor has none)
    snapshot: Optional[torch.Tensor] = None  # a copy of the weight's bits when computed


def mms_head(weight: torch.Tensor) -> MmsHead:
    """Precomputes, for a fixed classifier weight [C, D], each class's largest distance to
    another class, max_j ||w_a - w_j|| (C^2 D multiply-adds once, in float64, by blocks
    of rows so that no [C, C] matrix is held).

    With it the CPU kernel's exact MMS search prunes with that maximum instead of the
    triangle-inequality bound through the mean row, a tighter bound that leaves far fewer
    candidate distances to compute per row; the MMS values are the same, bit for bit.
    Worth it when many rows are scored with one unchanged head (a whole data set with a
    trained model; bench/README.md has the measured cost). A weight updated in place
    after this (an optimizer step) makes ``score`` raise: compute the head again. Where
    the precomputed distances are used (the CPU kernel's pruned exact search), the weight
    is also compared byte for byte with a copy taken here, so an update that bumps no
    version counter (``weight.data.copy_``, an inference tensor) raises as well; the copy
    doubles the head's memory, and the comparison is one memcmp a call (not made under
    ``torch.compile``). Other backends take ``head.weight`` as is.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape [C, D], got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be a classifier matrix of shape [C, D] with C, D >= 1, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating point tensor, got {weight.dtype}")
    with torch.no_grad():
        # in float64, rows rescaled by a power of two so that their largest entry is near 1:
        # no square overflows or underflows (cdist of 1e-300 rows would give 0)
        w, e = reference.unit_rows(weight.detach())
        rows = max(1, (1 << 22) // w.shape[0])  # [rows, C] float64 blocks of <= 32 MiB
        # the largest distances have no cancellation to fear in cdist's Gram form
        farthest = torch.cat([torch.cdist(w[i:i + rows], w).amax(dim=1) for i in range(0, w.shape[0], rows)])
        # Room for the kernels' float32 rounding of the rows (<= 2^-24 of each norm) and of
        # the distance itself; the search's own 1e-4 slack is on top of this.
        norm_max = w.norm(dim=1).amax()
        farthest = (farthest + norm_max * 2.0 ** -21) * (1 + 1e-5)
        farthest = torch.nan_to_num(reference.times_power_of_two(farthest, -e), nan=float("inf"))  # back from w 2^e
    return MmsHead(weight, farthest, _version_of(weight), weight.detach().clone())


def _version_of(t: torch.Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version


def _unpack_head(head: MmsHead, backend: str, mms: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, max_distance) of a head, checked for staleness: its version counter on
    every backend, and its bytes (a memcmp with the head's copy) where the precomputed
    distances are used: the CPU kernel's exact MMS on its pruned
    path (not the [C, C] matrix of small C against many rows), for a call of n rows."""
    weight, max_distance = head.weight, head.max_distance
    if not isinstance(weight, torch.Tensor) or not isinstance(max_distance, torch.Tensor):
        raise TypeError("head: an MmsHead must hold tensors (weight, max_distance): build it with "
                        "fastsel.mms_head(weight)")
    stale = ValueError("head: the MmsHead's weight was modified in place after fastsel.mms_head() "
                       "(e.g. by an optimizer step); compute the head again")
    if max_distance.shape != (weight.shape[0],) or max_distance.device != weight.device:
        raise ValueError(f"head: the MmsHead's max_distance must be [C] = [{weight.shape[0]}] "
                         f"on {weight.device}, got {tuple(max_distance.shape)} on {max_distance.device}")
    if torch.compiler.is_compiling():
        return weight, max_distance
    if _version_of(weight) != head.version:
        raise stale
    if backend == "cpu" and mms == "exact" and _C.mms_uses_max_distance(n, weight.shape[0]):
        snapshot = head.snapshot
        if snapshot is None:
            if head.version is None:  # nothing to check against: an inference tensor has no version
                raise ValueError("head: this MmsHead holds no copy of its weight and the weight has no "
                                 "version counter (an inference tensor), so an in-place update could not be "
                                 "detected; build the head with fastsel.mms_head(weight)")
        elif snapshot.device != weight.device or not _C.same_bits(weight.detach(), snapshot):
            raise stale
    return weight, max_distance


def _head_weight(head) -> Optional[torch.Tensor]:
    """The classifier weight [C, D] of ``head`` (a tensor, an ``MmsHead`` or a layer)."""
    if head is None or isinstance(head, torch.Tensor):
        return head
    if isinstance(head, MmsHead):
        return head.weight
    if isinstance(head, torch.nn.Module):
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.detach()
        raise TypeError(f"head: the module {type(head).__name__} has no .weight tensor; pass the classifier "
                        "layer (e.g. model.fc) or its weight [C, D]")
    raise TypeError(f"head must be the classifier weight [C, D], the classifier layer (e.g. model.fc) or an "
                    f"MmsHead, got {type(head).__name__}")


def _check_loss_options(weight, label_smoothing, logits) -> None:
    """``F.cross_entropy``'s class weights and label smoothing (metadata only: no sync)."""
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be the class weights, a tensor of shape [C], got {type(weight).__name__}")
        c = logits.shape[1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
        if weight.dim() != 1 or (c is not None and weight.shape[0] != c):
            hint = (" (the classifier matrix for the MMS is passed as head=, e.g. head=model.fc)"
                    if weight.dim() == 2 else "")
            raise ValueError(f"weight must be the class weights of shape [C]"
                             f"{'' if c is None else f' = [{c}]'} as in F.cross_entropy, got "
                             f"{tuple(weight.shape)}{hint}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weight (class weights) must be a floating point tensor, got {weight.dtype}")
        if isinstance(logits, torch.Tensor) and weight.device != logits.device:
            raise ValueError(f"weight (class weights) is on {weight.device} but logits are on {logits.device}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1] as in F.cross_entropy, got {label_smoothing!r}")


def _validate(logits, target, weight, mms, ignore_index, backend) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape [N, C], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}"
        )
    n, c = logits.shape
    if c == 0:
        raise ValueError("logits must have at least one class (C >= 1), got C = 0")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of shape [N], got {type(target).__name__}")
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(
            f"target must have shape [N] = [{n}] to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32 class indices, got {target.dtype}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 [-2^63, 2^63 - 1] (targets are int64 or int32), "
                         f"got {ignore_index}")
    if mms not in MMS_MODES:
        raise ValueError(f"mms must be one of {sorted(MMS_MODES)}, got {mms!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"head must be a torch.Tensor of shape [C, D], got {type(weight).__name__}")
        if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] == 0:
            raise ValueError(
                f"head must be the classifier matrix of shape [C, D] = [{c}, D] with D >= 1, "
                f"got {tuple(weight.shape)}"
            )
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"head must be a floating point tensor, got {weight.dtype}")
        if weight.device != logits.device:
            raise ValueError(f"head is on {weight.device} but logits are on {logits.device}")
    check_backend_name(backend)


def _check_target_range(target: torch.Tensor, c: int, ignore_index: int) -> None:
    """Target values must be class indices or ignore_index (the kernels check in-kernel)."""
    target = target.long()  # an int32 target compared with a wider ignore_index would wrap it
    bad = ((target < 0) | (target >= c)) & (target != ignore_index)
    if _checks.checks_on_host(target):
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(
                f"target[{i}] = {int(target[i])} is outside [0, {c}) and is not "
                f"ignore_index ({ignore_index})"
            )
    else:  # no host sync on accelerators: fail asynchronously instead
        torch._assert_async(~bad.any(), "fastsel.score: target outside [0, C) and not ignore_index")


def score(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    head: Optional[Union[torch.Tensor, MmsHead, torch.nn.Module]] = None,
    mms: str = "exact",
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> Scores:
    """Every per-sample score of ``logits`` [N, C] against ``target`` [N] in one pass.

    Args:
        logits: float32, float16, bfloat16 or float64, any strides.
        target: int64 or int32 class indices in [0, C), or ``ignore_index``.
        head: the classifier layer producing the logits: its weight [C, D] (e.g.
            ``model.fc.weight``), the layer itself (``model.fc``: its ``.weight`` is
            used), or an ``MmsHead`` of the weight (``mms_head``), which makes the exact
            MMS cheaper on the CPU at C > 256. Adds ``mms``, the Minimal Margin Score of
            Weinstein, Fine & Hel-Or. A weight row holding NaN or +-inf has no distance
            to the others: the MMS is then NaN wherever a distance is needed
            (``"exact"``: every row but ties (0) and rows without a finite competitor
            (+inf); ``"top2"``: the rows whose prediction or runner-up is such a class),
            on every backend and batch size.
        mms: ``"exact"`` (minimum over every competing class) or ``"top2"`` (the runner-up
            only, the approximation of the original MMS code).
        weight: class weights [C] for the loss, as ``F.cross_entropy``'s ``weight``
            (any float dtype, on the logits' device).
        label_smoothing: in [0, 1], as ``F.cross_entropy``'s. ``weight`` and
            ``label_smoothing`` change ``loss`` only (it stays the training loss); every
            other score describes the prediction against the hard target.
        ignore_index: rows with this target get loss 0 and NaN target-dependent scores.
        backend: ``"auto"`` (Triton, then CUDA for GPU tensors; the C++ kernel for CPU
            tensors; pure PyTorch when nothing compiled fits), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"torch"``.

    Returns:
        ``Scores`` of [N] tensors, float32 (float64 for float64 logits), ``pred`` int64.
        ``scores.loss`` equals ``F.cross_entropy(logits, target, weight=weight,
        ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)``
        and is differentiable with respect to ``logits`` (second and higher derivatives
        included); nothing else carries a gradient. Meta tensors give meta outputs of
        the right shapes and dtypes.
    """
    _check_loss_options(weight, label_smoothing, logits)
    scores = _score(logits, target, head, mms, ignore_index, backend)
    if weight is None and label_smoothing == 0:
        return scores
    return scores._replace(loss=reference.cross_entropy_options(
        logits, target, scores, ignore_index, weight, label_smoothing))


def _score(logits, target, head, mms, ignore_index, backend) -> Scores:
    """The plain scores (loss = cross_entropy = lse - z_y) from the backend's op."""
    weight = _head_weight(head)
    head = head if isinstance(head, MmsHead) else None
    _validate(logits, target, weight, mms, ignore_index, backend)
    resolved = resolve_backend(backend, logits.device)
    mode = contract.MMS_NONE if weight is None else MMS_MODES[mms]
    max_distance = None
    if head is not None:
        weight, max_distance = _unpack_head(head, resolved, mms, logits.shape[0])
        if mode != contract.MMS_EXACT:  # it prunes the exact search only
            max_distance = None
    if logits.device.type == "meta":  # no values: the outputs' metadata only, as any torch op
        out = contract.empty_outputs(logits, mode)
    else:
        out = _FORWARD[resolved](logits, target, ignore_index, weight, mode, max_distance)
    return scores_from_outputs(out, weight is not None, cross_entropy=out[0])


# ---- the backends' scoring ops, all with the signature and outputs of the contract --------


def _compiled_forward(logits, target, ignore_index, weight, mode, max_distance):
    return torch.ops.fastsel.score_forward(logits, target, ignore_index, weight, mode, max_distance)


def _cuda_forward(logits, target, ignore_index, weight, mode, max_distance):
    """The compiled op on CUDA tensors, with the weight as its MMS needs it.

    The CUDA kernel sums squares of weight differences in the score dtype: the rows,
    times a power of two 2^e that puts their largest entry near 1 (exact), cannot
    overflow or underflow there (the MMS is scaled back by 2^e below). It takes a
    distance to a row holding NaN or +-inf as it comes out (inf - x = inf: an MMS of 0):
    for the top-2 MMS such rows become rows of NaN (NaN distances, the rule of
    reference.py); the exact MMS gets the rule for the whole call afterwards."""
    if weight is None:
        return _compiled_forward(logits, target, ignore_index, weight, mode, max_distance)
    finite_rows = torch.isfinite(weight).all(dim=1, keepdim=True)
    weight, scale = reference.unit_rows(weight)
    weight = weight.to(logits.dtype if logits.dtype == torch.float64 else torch.float32)
    if mode == contract.MMS_TOP2:
        weight = torch.where(finite_rows, weight, float("nan"))
    out = dict(zip(contract.OUTPUT_NAMES, _compiled_forward(logits, target, ignore_index, weight, mode, None)))
    mms = reference.times_power_of_two(out["mms"].double(), scale).to(out["mms"].dtype)  # MMS(w 2^e) = 2^-e MMS(w)
    if mode == contract.MMS_EXACT:
        mms = reference.mms_for_nonfinite_weight(mms, out["margin"], all_finite=finite_rows.all())
    out["mms"] = mms
    return tuple(out.values())


def _target_range_checked(forward):
    """``forward`` after the target check that the compiled kernels make in-kernel."""
    def checked(logits, target, ignore_index, weight, mode, max_distance):
        if not torch.compiler.is_compiling():
            _check_target_range(target, logits.shape[1], ignore_index)
        return forward(logits, target, ignore_index, weight, mode, max_distance)

    return checked


def _triton_forward(*args):
    return torch.ops.fastsel.triton_score_forward(*args)


_FORWARD = {
    "cpu": _compiled_forward,
    "cuda": _cuda_forward,
    "triton": _target_range_checked(_triton_forward),
    "torch": _target_range_checked(reference.score_forward_reference),
}
assert set(_FORWARD) == set(BACKENDS) - {"auto"}

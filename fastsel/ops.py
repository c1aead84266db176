"""Public scoring op: input validation, backend dispatch and fake impls (the autograd of
the compiled op is in ``csrc/score_autograd.cpp``).

``torch.ops.fastsel.score_forward`` (schema in ``csrc/ops.cpp``) returns, for every row,
``(loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms, lse)``;
``mms`` is an empty tensor when no classifier weight is given. Only ``loss`` is
differentiable: its backward, ``torch.ops.fastsel.score_backward``, recomputes
``softmax(z) - onehot(y)`` from the saved per-row log-sum-exp, so nothing of size
[N, C] is kept between forward and backward.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch

from fastsel import _checks, reference
from fastsel._autograd import score_backward_fake, score_forward_fake
from fastsel._extension import CPU_EXTENSION_AVAILABLE, CUDA_EXTENSION_AVAILABLE
from fastsel.reference import Scores

__all__ = ["score", "Scores", "MmsHead", "mms_head", "available_backends", "BACKENDS", "MMS_MODES"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
MMS_MODES = {"exact": 1, "top2": 2}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _triton_importable() -> bool:
    """Whether Triton can be imported, without importing it (see fastsel/_triton_ops.py)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """Backends usable in this process, in the order ``auto`` prefers them."""
    names = []
    if torch.cuda.is_available():
        if _triton_importable():
            names.append("triton")
        if CUDA_EXTENSION_AVAILABLE:
            names.append("cuda")
    if CPU_EXTENSION_AVAILABLE:
        names.append("cpu")
    names.append("torch")
    return names


class MmsHead(NamedTuple):
    """A classifier weight with what the exact MMS search needs of it precomputed
    (``mms_head``); pass it as ``score(..., weight=head)`` for as long as the weight is
    unchanged."""

    weight: torch.Tensor
    max_distance: torch.Tensor  # [C] float64, >= max_j ||w_a - w_j|| as the kernels compute it
    version: Optional[int]  # weight._version when computed (None: an inference tensor has none)


def mms_head(weight: torch.Tensor) -> MmsHead:
    """Precomputes, for a fixed classifier weight [C, D], each class's largest distance to
    another class, max_j ||w_a - w_j|| (C^2 D multiply-adds once, in float64, by blocks
    of rows so that no [C, C] matrix is held: 14-25 ms at 1000 x 512 on this project's
    2-core machine).

    With it the CPU kernel's exact MMS search prunes with that maximum instead of the
    triangle-inequality bound through the mean row, which in a simulation of random
    1000 x 512 heads left ~0.16 candidate distances a row instead of ~1.1; the MMS values
    are the same, bit for bit. Worth it when many rows are scored with one unchanged head
    (a whole data set with a trained model): at 65536 x 1000 the exact MMS then added
    +31% to +45% over the call without weight (the top-2 MMS +34% to +36%, the plain
    weight +67% to +72%). A weight updated in place after this (an optimizer step) makes
    ``score`` raise: compute the head again. Other backends take ``head.weight`` as is.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape [C, D], got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be a classifier matrix of shape [C, D] with C, D >= 1, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating point tensor, got {weight.dtype}")
    with torch.no_grad():
        w = weight.detach().to(torch.float64)
        rows = max(1, (1 << 22) // w.shape[0])  # [rows, C] float64 blocks of <= 32 MiB
        # the largest distances have no cancellation to fear in cdist's Gram form
        farthest = torch.cat([torch.cdist(w[i:i + rows], w).amax(dim=1) for i in range(0, w.shape[0], rows)])
        # Room for the kernels' float32 rounding of the rows (<= 2^-24 of each norm) and of
        # the distance itself; the search's own 1e-4 slack is on top of this.
        norm_max = w.norm(dim=1).amax()
        farthest = (farthest + norm_max * 2.0 ** -21) * (1 + 1e-5)
        farthest = torch.nan_to_num(farthest, nan=float("inf"))
    return MmsHead(weight, farthest, _version_of(weight))


def _version_of(t: torch.Tensor) -> Optional[int]:
    return None if t.is_inference() else t._version


def _validate(logits, target, weight, mms, ignore_index, backend) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape [N, C], got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if logits.dtype not in _FLOAT_DTYPES:
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
    if mms not in MMS_MODES:
        raise ValueError(f"mms must be one of {sorted(MMS_MODES)}, got {mms!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor of shape [C, D], got {type(weight).__name__}")
        if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] == 0:
            raise ValueError(
                f"weight must be the classifier matrix of shape [C, D] = [{c}, D] with D >= 1, "
                f"got {tuple(weight.shape)}"
            )
        if weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"weight must be a floating point tensor, got {weight.dtype}")
        if weight.device != logits.device:
            raise ValueError(f"weight is on {weight.device} but logits are on {logits.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if CPU_EXTENSION_AVAILABLE else "torch"
        if device.type == "cuda":
            if _triton_importable():
                return "triton"
            if CUDA_EXTENSION_AVAILABLE:
                return "cuda"
        return "torch"
    compiled = {  # backend: (built?, device it runs on, how to get it built)
        "cpu": (CPU_EXTENSION_AVAILABLE, "cpu",
                "the compiled extension fastsel._C, which is not built; run "
                "`pip install --no-build-isolation -e .` or use backend='torch'"),
        "cuda": (CUDA_EXTENSION_AVAILABLE, "cuda",
                 "fastsel._C built with CUDA (a CUDA toolkit and a CUDA build of torch at "
                 "build time; FASTSEL_BUILD_CUDA=1 to insist)"),
    }
    if backend in compiled:
        built, runs_on, needs = compiled[backend]
        if not built:
            raise RuntimeError(f"backend={backend!r} needs {needs}")
        if device.type != runs_on:
            raise ValueError(f"backend={backend!r} runs on {runs_on.upper()} tensors, got tensors on {device}")
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' runs on CUDA tensors (or on the CPU under "
                f"TRITON_INTERPRET=1), got tensors on {device}"
            )
    return backend


def _check_target_range(target: torch.Tensor, c: int, ignore_index: int) -> None:
    """Target values must be class indices or ignore_index (the kernels check in-kernel)."""
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
    weight: Optional[Union[torch.Tensor, MmsHead]] = None,
    mms: str = "exact",
    ignore_index: int = -100,
    backend: str = "auto",
) -> Scores:
    """Every per-sample score of ``logits`` [N, C] against ``target`` [N] in one pass.

    Args:
        logits: float32, float16, bfloat16 or float64, any strides.
        target: int64 or int32 class indices in [0, C), or ``ignore_index``.
        weight: the last layer's weight [C, D] (e.g. ``model.fc.weight``); adds ``mms``,
            the Minimal Margin Score of Weinstein, Fine & Hel-Or. Or an ``MmsHead`` of it
            (``mms_head``), which makes the exact MMS cheaper on the CPU at C > 256.
        mms: ``"exact"`` (minimum over every competing class) or ``"top2"`` (the runner-up
            only, the approximation of the original MMS code).
        ignore_index: rows with this target get loss 0 and NaN target-dependent scores.
        backend: ``"auto"`` (Triton, then CUDA for GPU tensors; the C++ kernel for CPU
            tensors; pure PyTorch when nothing compiled fits), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"torch"``.

    Returns:
        ``Scores`` of [N] tensors, float32 (float64 for float64 logits), ``pred`` int64.
        ``scores.loss`` equals ``F.cross_entropy(logits, target, reduction="none")`` and
        is differentiable with respect to ``logits``; nothing else carries a gradient.
    """
    max_distance = None
    if isinstance(weight, MmsHead):
        if not torch.compiler.is_compiling() and _version_of(weight.weight) != weight.version:
            raise ValueError(
                "weight: the MmsHead's weight was modified in place after fastsel.mms_head() "
                "(e.g. by an optimizer step); compute the head again"
            )
        weight, max_distance = weight.weight, weight.max_distance
        if max_distance.shape != (weight.shape[0],) or max_distance.device != weight.device:
            raise ValueError(f"weight: the MmsHead's max_distance must be [C] = [{weight.shape[0]}] "
                             f"on {weight.device}, got {tuple(max_distance.shape)} on {max_distance.device}")
    _validate(logits, target, weight, mms, ignore_index, backend)
    resolved = _resolve_backend(backend, logits.device)
    if resolved == "torch":
        if not torch.compiler.is_compiling():
            _check_target_range(target, logits.shape[1], ignore_index)
        return reference.score_reference(logits, target, ignore_index, weight, mms)
    mode = 0 if weight is None else MMS_MODES[mms]
    if resolved == "triton":
        if not torch.compiler.is_compiling():
            _check_target_range(target, logits.shape[1], ignore_index)
        from fastsel import _triton_ops  # noqa: F401  (registers the ops on first use)

        op = torch.ops.fastsel.triton_score_forward
    else:  # "cpu" and "cuda": the compiled op, dispatched on the tensors' device
        op = torch.ops.fastsel.score_forward
    if resolved == "triton" or max_distance is None or mode != MMS_MODES["exact"]:
        out = op(logits, target, ignore_index, weight, mode)
    else:
        out = op(logits, target, ignore_index, weight, mode, max_distance)
    loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms_out, lse = out
    return Scores(loss, entropy, margin, true_margin, grad_norm, confidence, pred,
                  mms_out if weight is not None else None, lse)


# Fake implementations of the compiled ops (the schemas live in csrc/ops.cpp; their
# autograd is registered in C++, csrc/score_autograd.cpp).
if CPU_EXTENSION_AVAILABLE:
    torch.library.register_fake("fastsel::score_forward")(score_forward_fake)
    torch.library.register_fake("fastsel::score_backward")(score_backward_fake)

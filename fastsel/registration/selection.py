"""Registration of the selection ops: their fake implementations, and the Triton ops.

* ``torch.ops.fastsel.select_topk`` / ``sample_without_replacement`` /
  ``sample_with_replacement`` / ``percentile``: defined in C++ (``csrc/ops.cpp``) when the
  extension is built; their fakes are registered here.
* ``torch.ops.fastsel.triton_<name>``: defined here under the same schemas
  (``fastsel.contract.SELECTION_SCHEMAS``) and implemented by
  ``fastsel/triton/selection_ops.py`` (imported at the first call), with the same fakes.

No autograd: the outputs are indices, or a non-differentiable rank. The public API
checks k <= N before any op runs; below it, a larger k raises in the compiled ops and
selects all N in the Triton ones, which the fakes' ``min(k, N)`` covers.
"""

from __future__ import annotations

import torch

from fastsel import contract
from fastsel._extension import CPU_EXTENSION_AVAILABLE

__all__ = ["FAKES"]


def _select_topk_fake(scores, k, largest):
    return scores.new_empty(torch.sym_min(k, scores.shape[0]), dtype=torch.int64)


def _sample_without_replacement_fake(importance, k, seed, counter):
    return importance.new_empty(torch.sym_min(k, importance.shape[0]), dtype=torch.int64)


def _sample_with_replacement_fake(importance, k, seed, counter):
    return importance.new_empty(0 if importance.shape[0] == 0 else k, dtype=torch.int64)


def _percentile_fake(values, history):
    return values.new_empty(values.shape[0], dtype=torch.float32)


FAKES = {
    "select_topk": _select_topk_fake,
    "sample_without_replacement": _sample_without_replacement_fake,
    "sample_with_replacement": _sample_with_replacement_fake,
    "percentile": _percentile_fake,
}
assert FAKES.keys() == contract.SELECTION_SCHEMAS.keys()


def _triton_impl(name: str):
    def impl(*args):
        from fastsel.triton import selection_ops

        return getattr(selection_ops, name)(*args)

    impl.__name__ = f"triton_{name}"
    return impl


if CPU_EXTENSION_AVAILABLE:  # the compiled ops (defined by loading fastsel._C)
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"fastsel::{_name}")(_fake)

_LIBRARY = torch.library.Library("fastsel", "FRAGMENT")  # kept alive: it owns the registrations
for _name, _signature in contract.SELECTION_SCHEMAS.items():
    _LIBRARY.define(f"triton_{_name}{_signature}")
    _LIBRARY.impl(f"triton_{_name}", _triton_impl(_name), "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastsel::triton_{_name}", lib=_LIBRARY)(FAKES[_name])

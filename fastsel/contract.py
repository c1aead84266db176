"""The contract of the scoring op, defined once: its outputs, its schemas and ``Scores``.

Every producer of scores follows this module: the C++ buffers, output pointers and
per-row results (``csrc/include/fastsel/score_contract.h``, generated from here), the
schemas of ``torch.ops.fastsel.score_forward`` / ``score_backward`` and of the Triton
ops that share them, the fake implementations, the Triton launcher's buffers and the
``Scores`` tuple users get. Adding a score is one entry in ``SCORE_OUTPUTS`` (the build
regenerates the header; ``python csrc/write_contract_header.py`` does it alone) plus its
math in each kernel and in ``fastsel/reference.py``: docs/design.md, "Adding a score".

Kinds of output, each a tensor of shape [N] for logits [N, C]:

* ``row``: a float of the row, float32 (float64 for float64 logits), computed by every
  kernel from the row's one-pass state (the fields of ``RowScores`` in C++); NaN on an
  invalid row (no finite maximum, or a NaN logit) unless its math says otherwise;
* ``index``: an int64 class index of the row (``pred``);
* ``mms``: a float of the row when an MMS mode is asked for, else an empty [0] tensor
  (``Scores.mms`` is then None).

Only the outputs marked ``differentiable`` carry a gradient (d loss / d logits from the
saved ``lse``, the output marked ``saved``); autograd marks the others
non-differentiable, so a backward through them raises.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["Output", "SCORE_OUTPUTS", "OUTPUT_NAMES", "SAVED_OUTPUT", "MMS_MODES", "MMS_NONE", "MMS_EXACT",
           "MMS_TOP2", "Scores", "score_forward_schema", "score_backward_schema", "SELECTION_SCHEMAS",
           "empty_outputs", "scores_from_outputs", "accumulate_dtype", "cpp_header"]


class Output(NamedTuple):
    name: str
    kind: str  # "row", "index" or "mms" (module docstring)
    doc: str
    differentiable: bool = False
    saved: bool = False  # saved for the backward of the differentiable outputs


SCORE_OUTPUTS: tuple[Output, ...] = (
    Output("loss", "row", "cross entropy lse - z_y (0 on rows whose target is ignore_index)",
           differentiable=True),
    Output("entropy", "row", "entropy of softmax(z), in nats"),
    Output("margin", "row", "z_(1) - z_(2), the top logit minus the runner-up (+inf for C = 1)"),
    Output("true_margin", "row", "z_y - max_(j != y) z_j (NaN on ignored rows)"),
    Output("grad_norm", "row", "||softmax(z) - onehot(y)||_2, the norm of d loss / d z (NaN on ignored rows)"),
    Output("confidence", "row", "max_j softmax(z)_j"),
    Output("pred", "index", "argmax_j z_j (lowest index on ties; a NaN logit is the argmax, as torch.argmax)"),
    Output("mms", "mms", "Minimal Margin Score: min over competitors j of (z_a - z_j) / ||w_a - w_j||"),
    Output("lse", "row", "logsumexp(z), saved for the backward", saved=True),
)
OUTPUT_NAMES: tuple[str, ...] = tuple(o.name for o in SCORE_OUTPUTS)
MMS_OUTPUT: int = OUTPUT_NAMES.index("mms")
KINDS = ("row", "index", "mms")
SAVED_OUTPUT: int = next(i for i, o in enumerate(SCORE_OUTPUTS) if o.saved)
DIFFERENTIABLE_OUTPUTS: tuple[int, ...] = tuple(i for i, o in enumerate(SCORE_OUTPUTS) if o.differentiable)
assert DIFFERENTIABLE_OUTPUTS == (0,), "the backward op computes the gradient of output 0 only"
assert all(o.kind in KINDS for o in SCORE_OUTPUTS) and len(set(OUTPUT_NAMES)) == len(OUTPUT_NAMES)
assert [o.name for o in SCORE_OUTPUTS if o.kind != "row"] == ["pred", "mms"], "the kernels write these by name"
assert sum(o.saved for o in SCORE_OUTPUTS) == 1 and SCORE_OUTPUTS[SAVED_OUTPUT].kind == "row"

# mms_mode of the scoring op: no MMS (the mms output is [0]), the exact one, the top-2 one.
MMS_NONE, MMS_EXACT, MMS_TOP2 = 0, 1, 2
MMS_MODES = {"exact": MMS_EXACT, "top2": MMS_TOP2}  # fastsel.score's mms= names

_FORWARD_ARGS = ("Tensor logits, Tensor target, int ignore_index, Tensor? weight, int mms_mode, "
                 "Tensor? max_distance=None")


def score_forward_schema(name: str = "score_forward") -> str:
    """The schema of a scoring op (the compiled op's, and the Triton op's under its name)."""
    returns = ", ".join(f"Tensor {o.name}" for o in SCORE_OUTPUTS)
    return f"{name}({_FORWARD_ARGS}) -> ({returns})"


def score_backward_schema(name: str = "score_backward", outputs: tuple[Output, ...] = SCORE_OUTPUTS) -> str:
    """grad_logits = grad_loss[:, None] * (softmax(logits) - onehot(target)), 0 on ignored rows."""
    saved = next(o.name for o in outputs if o.saved)
    return f"{name}(Tensor grad_loss, Tensor logits, Tensor target, Tensor {saved}, int ignore_index) -> Tensor"


# The selection ops' schemas, name: arguments and return (docs/methods.md section 2; the
# Triton ops have them under the name triton_<name>).
SELECTION_SCHEMAS = {
    "select_topk": "(Tensor scores, int k, bool largest) -> Tensor",
    "sample_without_replacement": "(Tensor importance, int k, int seed, int counter) -> Tensor",
    "sample_with_replacement": "(Tensor importance, int k, int seed, int counter) -> Tensor",
    "percentile": "(Tensor values, Tensor history) -> Tensor",
}


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores are float64 for float64 logits and float32 for every narrower float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_outputs(logits: torch.Tensor, mms_mode: int) -> tuple[torch.Tensor, ...]:
    """Uninitialised outputs of a scoring op for ``logits`` [N, C], in schema order, on the
    logits' device (the fake implementation, and the buffers a launcher fills)."""
    n = logits.shape[0]
    acc = accumulate_dtype(logits.dtype)
    shapes = {"row": ((n,), acc), "index": ((n,), torch.int64), "mms": ((n if mms_mode != 0 else 0,), acc)}
    return tuple(logits.new_empty(shapes[o.kind][0], dtype=shapes[o.kind][1]) for o in SCORE_OUTPUTS)


# A namedtuple itself (not a subclass of one), which torch.compile builds in a graph on
# every supported torch version.
Scores = collections.namedtuple("Scores", OUTPUT_NAMES + ("cross_entropy",), defaults=(None,), module=__name__)
Scores.__doc__ = """Per-sample scores of one batch of logits; every field is a tensor of shape [N], in
the order of ``fastsel.contract.SCORE_OUTPUTS`` (whose ``doc`` says what each is).

Float fields are float32 (float64 for float64 logits); ``pred`` is int64.
``loss`` is differentiable with respect to the logits; the others carry no gradient.
``mms`` is None unless a classifier ``head`` was given. ``cross_entropy`` is
lse - z_y, the loss without class weights or label smoothing (``fastsel.score``
fills it; None in a ``Scores`` built without it means ``loss`` is that).
"""


def _plain_loss(self) -> torch.Tensor:
    """lse - z_y: ``cross_entropy`` if set, else ``loss``."""
    return self.loss if self.cross_entropy is None else self.cross_entropy


Scores.plain_loss = _plain_loss




def scores_from_outputs(outputs, with_mms: bool, cross_entropy=None) -> Scores:
    """``Scores`` of a scoring op's outputs (schema order); ``mms`` None without a head.
    (On every ``fastsel.score`` call: written for a small per-call cost.)"""
    outputs = tuple(outputs)
    if len(outputs) != len(SCORE_OUTPUTS):
        raise ValueError(f"a scoring op returns {len(SCORE_OUTPUTS)} outputs {OUTPUT_NAMES}, got {len(outputs)}")
    if with_mms:
        return Scores(*outputs, cross_entropy)
    return Scores(*outputs[:MMS_OUTPUT], None, *outputs[MMS_OUTPUT + 1:], cross_entropy)


# ---- the C++ header ----------------------------------------------------------------------

HEADER = Path("csrc/include/fastsel/score_contract.h")  # relative to the repository root


def cpp_header(outputs: tuple[Output, ...] = SCORE_OUTPUTS) -> str:
    """The text of ``csrc/include/fastsel/score_contract.h`` for these outputs."""
    saved = next(i for i, o in enumerate(outputs) if o.saved)
    differentiable = next(i for i, o in enumerate(outputs) if o.differentiable)
    forward = score_forward_schema().split(" -> ")[0] + " -> (" + ", ".join(f"Tensor {o.name}" for o in outputs) + ")"
    selection = "".join(f'#define FASTSEL_{name.upper()}_SCHEMA "{name}{sig}"\n'
                        for name, sig in SELECTION_SCHEMAS.items())
    rows = " \\\n  ".join(f"X({o.name})" for o in outputs if o.kind == "row")
    every = " \\\n  ".join(f"X({o.name}, k{o.kind.capitalize()}Output)" for o in outputs)
    return f"""\
// The outputs and schemas of the fastsel ops: GENERATED from fastsel/contract.py by
// csrc/write_contract_header.py (which every build runs). Edit that file, not this one
// (tests/test_contract.py fails when they differ). Included by every kernel.
#pragma once

// X(name): the per-row float outputs (kind "row"), in schema order: the fields of
// RowScores, each a buffer of the forward that every kernel fills for every row.
#define FASTSEL_ROW_OUTPUTS(X) \\
  {rows}

// X(name, kind): every output of score_forward, in schema order; kind is kRowOutput,
// kIndexOutput or kMmsOutput (fastsel/contract.py). The one output of kind "index" is
// named pred and the one of kind "mms" mms (the contract asserts it), which the kernels
// write by name.
#define FASTSEL_SCORE_OUTPUTS(X) \\
  {every}

#define FASTSEL_SCORE_OUTPUT_COUNT {len(outputs)}
// The output the backward reads (saved by autograd), and the only differentiable one.
#define FASTSEL_SCORE_SAVED_OUTPUT {saved}
#define FASTSEL_SCORE_DIFFERENTIABLE_OUTPUT {differentiable}

#include <cstdint>

namespace fastsel {{
// mms_mode of score_forward
enum MmsMode : int64_t {{ kMmsNone = {MMS_NONE}, kMmsExact = {MMS_EXACT}, kMmsTop2 = {MMS_TOP2} }};
}}  // namespace fastsel

#define FASTSEL_SCORE_FORWARD_SCHEMA \\
  "{forward}"
#define FASTSEL_SCORE_BACKWARD_SCHEMA \\
  "{score_backward_schema(outputs=outputs)}"

// The selection ops' schemas (the Triton ops have them under the name triton_<name>).
{selection}
"""

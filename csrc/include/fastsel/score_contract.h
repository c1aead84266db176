// The outputs and schemas of the fastsel ops: GENERATED from fastsel/contract.py by
// csrc/write_contract_header.py (which every build runs). Edit that file, not this one
// (tests/test_contract.py fails when they differ). Included by every kernel.
#pragma once

// X(name): the per-row float outputs (kind "row"), in schema order: the fields of
// RowScores, each a buffer of the forward that every kernel fills for every row.
#define FASTSEL_ROW_OUTPUTS(X) \
  X(loss) \
  X(entropy) \
  X(margin) \
  X(true_margin) \
  X(grad_norm) \
  X(confidence) \
  X(lse)

// X(name, kind): every output of score_forward, in schema order; kind is kRowOutput,
// kIndexOutput or kMmsOutput (fastsel/contract.py). The one output of kind "index" is
// named pred and the one of kind "mms" mms (the contract asserts it), which the kernels
// write by name.
#define FASTSEL_SCORE_OUTPUTS(X) \
  X(loss, kRowOutput) \
  X(entropy, kRowOutput) \
  X(margin, kRowOutput) \
  X(true_margin, kRowOutput) \
  X(grad_norm, kRowOutput) \
  X(confidence, kRowOutput) \
  X(pred, kIndexOutput) \
  X(mms, kMmsOutput) \
  X(lse, kRowOutput)

#define FASTSEL_SCORE_OUTPUT_COUNT 9
// The output the backward reads (saved by autograd), and the only differentiable one.
#define FASTSEL_SCORE_SAVED_OUTPUT 8
#define FASTSEL_SCORE_DIFFERENTIABLE_OUTPUT 0

#include <cstdint>

namespace fastsel {
// mms_mode of score_forward
enum MmsMode : int64_t { kMmsNone = 0, kMmsExact = 1, kMmsTop2 = 2 };
}  // namespace fastsel

#define FASTSEL_SCORE_FORWARD_SCHEMA \
  "score_forward(Tensor logits, Tensor target, int ignore_index, Tensor? weight, int mms_mode, Tensor? max_distance=None) -> (Tensor loss, Tensor entropy, Tensor margin, Tensor true_margin, Tensor grad_norm, Tensor confidence, Tensor pred, Tensor mms, Tensor lse)"
#define FASTSEL_SCORE_BACKWARD_SCHEMA \
  "score_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, int ignore_index) -> Tensor"

// The selection ops' schemas (the Triton ops have them under the name triton_<name>).
#define FASTSEL_SELECT_TOPK_SCHEMA "select_topk(Tensor scores, int k, bool largest) -> Tensor"
#define FASTSEL_SAMPLE_WITHOUT_REPLACEMENT_SCHEMA "sample_without_replacement(Tensor importance, int k, int seed, int counter) -> Tensor"
#define FASTSEL_SAMPLE_WITH_REPLACEMENT_SCHEMA "sample_with_replacement(Tensor importance, int k, int seed, int counter) -> Tensor"
#define FASTSEL_PERCENTILE_SCHEMA "percentile(Tensor values, Tensor history) -> Tensor"


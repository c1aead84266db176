// Operator schemas of fastsel and the CPU implementations behind them.
//
// torch.ops.fastsel.score_forward(logits, target, ignore_index, weight, mms_mode, max_distance=None)
//   -> (loss, entropy, margin, true_margin, grad_norm, confidence, pred, mms, lse)
//   mms_mode: 0 none (mms is an empty tensor), 1 exact, 2 top2. max_distance: optional [C]
//   upper bounds of max_j ||w_a - w_j|| (fastsel.mms_head); they only prune the exact MMS
//   search (its values are the same with or without them).
// torch.ops.fastsel.score_backward(grad_loss, logits, target, lse, ignore_index)
//   -> grad_logits = grad_loss[:, None] * (softmax(logits) - onehot(target)), 0 on ignored rows.
//
// Selection ops (docs/methods.md section 2; per-element math in fastsel/selection_keys.h,
// specification in fastsel/reference.py). All take 1-D inputs and return int64 indices:
// torch.ops.fastsel.select_topk(scores, k, largest) -> [k], best first; ties: lowest
//   index first; NaN ranks last.
// torch.ops.fastsel.sample_without_replacement(importance, k, seed, counter) -> [k],
//   distinct, P ∝ importance (exponential race), in race order.
// torch.ops.fastsel.sample_with_replacement(importance, k, seed, counter) -> [k], i.i.d.
//   draws with P ∝ importance (integer-quantized prefix sums), in draw order.
// torch.ops.fastsel.percentile(values, history) -> [N] float32, the fraction of the
//   (non-NaN) history strictly below each value; 1 for an empty history, NaN for NaN.
// Fake implementations and autograd are registered from Python (fastsel/ops.py). The CPU
// implementations are the dispatch functions of csrc/cpu/dispatch.cpp, which run the
// kernels compiled for the instruction set picked at import (fastsel/_extension.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(fastsel, m) {
  m.def(
      "score_forward(Tensor logits, Tensor target, int ignore_index, Tensor? weight, int mms_mode, "
      "Tensor? max_distance=None) "
      "-> (Tensor loss, Tensor entropy, Tensor margin, Tensor true_margin, Tensor grad_norm, "
      "Tensor confidence, Tensor pred, Tensor mms, Tensor lse)");
  m.def(
      "score_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, int ignore_index) "
      "-> Tensor");
  m.def("select_topk(Tensor scores, int k, bool largest) -> Tensor");
  m.def("sample_without_replacement(Tensor importance, int k, int seed, int counter) -> Tensor");
  m.def("sample_with_replacement(Tensor importance, int k, int seed, int counter) -> Tensor");
  m.def("percentile(Tensor values, Tensor history) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastsel, CPU, m) {
  m.impl("score_forward", &fastsel::cpu::dispatch::score_forward);
  m.impl("score_backward", &fastsel::cpu::dispatch::score_backward);
  m.impl("select_topk", &fastsel::cpu::dispatch::select_topk);
  m.impl("sample_without_replacement", &fastsel::cpu::dispatch::sample_without_replacement);
  m.impl("sample_with_replacement", &fastsel::cpu::dispatch::sample_with_replacement);
  m.impl("percentile", &fastsel::cpu::dispatch::percentile);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastsel C++ kernels; the operators live in torch.ops.fastsel";
  m.def("same_bits", &fastsel::cpu::dispatch::same_bits,
        "Whether two CPU tensors of one shape and dtype hold the same bytes (a stale MmsHead check)");
  m.def("mms_uses_max_distance", &fastsel::cpu::dispatch::mms_uses_max_distance,
        "Whether the CPU exact MMS of N rows and C classes takes a precomputed max_distance into account");
  m.def("compiled_isas", &fastsel::cpu::compiled_isas,
        "Vector instruction sets the CPU kernels were compiled for, widest first ('none': portable)");
  m.def("active_isa", &fastsel::cpu::active_isa, "The instruction set the CPU kernels run on");
  m.def("set_active_isa", &fastsel::cpu::set_active_isa,
        "Runs the CPU kernels compiled for this instruction set (the caller checks that the CPU has it)");
  m.def("build_cuda", [] {
#ifdef FASTSEL_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in");
  m.def("build_openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether the extension was compiled with OpenMP (at::parallel_for threads)");
}

// Operator schemas of fastsel and the CPU implementations behind them.
//
// torch.ops.fastsel.score_forward(logits, target, ignore_index, weight, mms_mode, max_distance=None)
//   -> the outputs of the contract, fastsel/contract.py (loss, entropy, ..., pred, mms, lse),
//   whose schema string this file takes from the generated fastsel/score_contract.h.
//   mms_mode: 0 none (mms is an empty tensor), 1 exact, 2 top2. max_distance: optional [C]
//   upper bounds of max_j ||w_a - w_j|| (fastsel.mms_head); they only prune the exact MMS
//   search (its values are the same with or without them).
// torch.ops.fastsel.score_backward(grad_loss, logits, target, lse, ignore_index)
//   -> grad_logits = grad_loss[:, None] * (softmax(logits) - onehot(target)), 0 on ignored rows.
//
// Selection ops (docs/methods.md section 2; per-element math in fastsel/selection_keys.h,
// specification in fastsel/reference.py; schemas, like the scoring ops', from
// fastsel/contract.py). All take 1-D inputs and return int64 indices:
// torch.ops.fastsel.select_topk(scores, k, largest) -> [k], best first; ties: lowest
//   index first; NaN ranks last.
// torch.ops.fastsel.sample_without_replacement(importance, k, seed, counter) -> [k],
//   distinct, P ∝ importance (exponential race), in race order.
// torch.ops.fastsel.sample_with_replacement(importance, k, seed, counter) -> [k], i.i.d.
//   draws with P ∝ importance (integer-quantized prefix sums), in draw order.
// torch.ops.fastsel.percentile(values, history) -> [N] float32, the fraction of the
//   (non-NaN) history strictly below each value; 1 for an empty history, NaN for NaN.
// Fake implementations are registered from Python (fastsel/registration/), the autograd of
// the scoring ops in csrc/score_autograd.cpp. The CPU
// implementations are the dispatch functions of csrc/cpu/dispatch.cpp, which run the
// kernels compiled for the instruction set picked at import (fastsel/_extension.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "fastsel/score_contract.h"

TORCH_LIBRARY(fastsel, m) {
  m.def(FASTSEL_SCORE_FORWARD_SCHEMA);  // fastsel/score_contract.h, from fastsel/contract.py
  m.def(FASTSEL_SCORE_BACKWARD_SCHEMA);
  m.def(FASTSEL_SELECT_TOPK_SCHEMA);
  m.def(FASTSEL_SAMPLE_WITHOUT_REPLACEMENT_SCHEMA);
  m.def(FASTSEL_SAMPLE_WITH_REPLACEMENT_SCHEMA);
  m.def(FASTSEL_PERCENTILE_SCHEMA);
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
  m.def("runnable_isas", &fastsel::cpu::runnable_isas,
        "Of the compiled instruction sets, those this CPU runs (CPUID and XGETBV), widest first");
  m.def("active_isa", &fastsel::cpu::active_isa, "The instruction set the CPU kernels run on");
  m.def("set_active_isa", &fastsel::cpu::set_active_isa,
        "Runs the CPU kernels compiled for this instruction set (one of runnable_isas())");
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

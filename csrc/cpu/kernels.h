// CPU kernel entry points of fastsel.
//
// Each is compiled once per vector ISA (csrc/cpu/isa/), in fastsel::cpu::avx512,
// fastsel::cpu::avx2 and fastsel::cpu::portable (see fastsel/isa_namespace.h); the
// dispatch functions of fastsel::cpu::dispatch call the ISA picked at run time and are
// what csrc/ops.cpp registers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "fastsel/op_contract.h"

// The entry points, declared in each ISA's namespace.
#define FASTSEL_CPU_KERNEL_DECLARATIONS                                                              \
  ScoreOutputs score_forward(const at::Tensor& logits, const at::Tensor& target,                   \
                             int64_t ignore_index, const std::optional<at::Tensor>& weight,         \
                             int64_t mms_mode, const std::optional<at::Tensor>& max_distance);      \
  at::Tensor score_backward(const at::Tensor& grad_loss, const at::Tensor& logits,                 \
                            const at::Tensor& target, const at::Tensor& lse, int64_t ignore_index); \
  bool same_bits(const at::Tensor& a, const at::Tensor& b);                                        \
  bool mms_uses_max_distance(int64_t N, int64_t C);                                                \
  at::Tensor select_topk(const at::Tensor& scores, int64_t k, bool largest);                       \
  at::Tensor sample_without_replacement(const at::Tensor& importance, int64_t k, int64_t seed,     \
                                        int64_t counter);                                           \
  at::Tensor sample_with_replacement(const at::Tensor& importance, int64_t k, int64_t seed,        \
                                     int64_t counter);                                              \
  at::Tensor percentile(const at::Tensor& values, const at::Tensor& history);

namespace fastsel::cpu {
inline namespace portable { FASTSEL_CPU_KERNEL_DECLARATIONS }
inline namespace avx2 { FASTSEL_CPU_KERNEL_DECLARATIONS }
inline namespace avx512 { FASTSEL_CPU_KERNEL_DECLARATIONS }

// The ISA the kernels run on, by name ("avx512", "avx2", "none" for the portable code).
std::vector<std::string> compiled_isas();   // built into this extension, widest first
std::string active_isa();
std::vector<std::string> runnable_isas();   // compiled and run by this CPU (CPUID), widest first
void set_active_isa(const std::string& isa);  // one of runnable_isas()

namespace dispatch {
// Host helpers of fastsel.ops (pybind, not operators): whether two CPU tensors hold the
// same bytes (memcmp; the MmsHead staleness check), and whether the exact MMS of an
// [N, C] call uses max_distance (the pruned search, not the Gram matrix).
FASTSEL_CPU_KERNEL_DECLARATIONS
}  // namespace dispatch
}  // namespace fastsel::cpu

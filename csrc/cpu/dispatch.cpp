// Runtime ISA dispatch of the CPU kernels: the entry points of kernels.h forward to the
// copy compiled for the ISA set with set_active_isa (fastsel/_extension.py sets the
// widest the running CPU supports, or the one FASTSEL_CPU_ISA names; until then the
// portable copy runs). Compiled without any vector ISA flag, like the rest of the
// extension outside csrc/cpu/isa/.
#include <atomic>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include <c10/util/Exception.h>

#include "kernels.h"

namespace fastsel::cpu {
namespace {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

std::atomic<int> g_isa{kPortable};

const char* isa_name(int isa) {
  switch (isa) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "none";
  }
}

bool compiled(int isa) {
  switch (isa) {
#if defined(FASTSEL_WITH_AVX512)
    case kAvx512: return true;
#endif
#if defined(FASTSEL_WITH_AVX2)
    case kAvx2: return true;
#endif
    case kPortable: return true;
    default: return false;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// F16C from CPUID leaf 1 (ECX bit 29): __builtin_cpu_supports knows it only from GCC 11
// and clang 18. Its registers are the AVX ones, whose OS support the "avx2" check covers.
bool has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & (1u << 29)) != 0;
}
#endif

// Whether this CPU, under this OS, runs code built for the ISA: CPUID and XGETBV as this
// process sees them (__builtin_cpu_supports, which also checks that the OS saves the AVX
// and AVX-512 registers). Not /proc/cpuinfo: an emulator or a container may show another
// CPU's flags there (under qemu-user, the host's AVX-512 while the emulated CPU has none).
bool runs(int isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
  switch (isa) {
    case kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case kAvx2: return avx2;
    default: return true;
  }
#else
  return isa == kPortable;
#endif
}

}  // namespace

std::vector<std::string> runnable_isas() {
  std::vector<std::string> out;
  for (int isa : {kAvx512, kAvx2, kPortable}) {
    if (compiled(isa) && runs(isa)) out.emplace_back(isa_name(isa));
  }
  return out;
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (int isa : {kAvx512, kAvx2, kPortable}) {
    if (compiled(isa)) out.emplace_back(isa_name(isa));
  }
  return out;
}

std::string active_isa() { return isa_name(g_isa.load(std::memory_order_relaxed)); }

void set_active_isa(const std::string& name) {
  for (int isa : {kAvx512, kAvx2, kPortable}) {
    if (name == isa_name(isa) && compiled(isa)) {
      TORCH_CHECK(runs(isa), "fastsel: this CPU cannot run the kernels compiled for ISA '", name, "'");
      g_isa.store(isa, std::memory_order_relaxed);
      return;
    }
  }
  TORCH_CHECK(false, "fastsel: the CPU kernels were not compiled for ISA '", name, "'");
}

namespace dispatch {

#if defined(FASTSEL_WITH_AVX512)
#define FASTSEL_CASE_AVX512(fn, ...) case kAvx512: return avx512::fn(__VA_ARGS__);
#else
#define FASTSEL_CASE_AVX512(fn, ...)
#endif
#if defined(FASTSEL_WITH_AVX2)
#define FASTSEL_CASE_AVX2(fn, ...) case kAvx2: return avx2::fn(__VA_ARGS__);
#else
#define FASTSEL_CASE_AVX2(fn, ...)
#endif
#define FASTSEL_DISPATCH(fn, ...)                           \
  switch (g_isa.load(std::memory_order_relaxed)) {          \
    FASTSEL_CASE_AVX512(fn, __VA_ARGS__)                    \
    FASTSEL_CASE_AVX2(fn, __VA_ARGS__)                      \
    default: return portable::fn(__VA_ARGS__);              \
  }

ScoreOutputs score_forward(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                           const std::optional<at::Tensor>& weight, int64_t mms_mode,
                           const std::optional<at::Tensor>& max_distance) {
  FASTSEL_DISPATCH(score_forward, logits, target, ignore_index, weight, mms_mode, max_distance)
}

at::Tensor score_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                          const at::Tensor& lse, int64_t ignore_index) {
  FASTSEL_DISPATCH(score_backward, grad_loss, logits, target, lse, ignore_index)
}

bool same_bits(const at::Tensor& a, const at::Tensor& b) { FASTSEL_DISPATCH(same_bits, a, b) }

bool mms_uses_max_distance(int64_t N, int64_t C) { FASTSEL_DISPATCH(mms_uses_max_distance, N, C) }

at::Tensor select_topk(const at::Tensor& scores, int64_t k, bool largest) {
  FASTSEL_DISPATCH(select_topk, scores, k, largest)
}

at::Tensor sample_without_replacement(const at::Tensor& importance, int64_t k, int64_t seed, int64_t counter) {
  FASTSEL_DISPATCH(sample_without_replacement, importance, k, seed, counter)
}

at::Tensor sample_with_replacement(const at::Tensor& importance, int64_t k, int64_t seed, int64_t counter) {
  FASTSEL_DISPATCH(sample_with_replacement, importance, k, seed, counter)
}

at::Tensor percentile(const at::Tensor& values, const at::Tensor& history) {
  FASTSEL_DISPATCH(percentile, values, history)
}

}  // namespace dispatch
}  // namespace fastsel::cpu

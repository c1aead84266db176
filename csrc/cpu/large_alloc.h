// Output buffers for the [N, C] gradient, backed by transparent huge pages when large.
//
// The backward writes a fresh N*C gradient on every step (262 MB at 65536 x 1000 float32).
// From the default allocator each call gets newly mapped 4 KiB pages, and the first write
// to each page faults into the kernel: about 64k faults, which took longer than computing
// the gradient itself on the development machine. Asking for 2 MiB pages with
// madvise(MADV_HUGEPAGE) cuts the faults 512-fold. This is what PyTorch does for every
// allocation under THP_MEM_ALLOC_ENABLE=1; here it applies to this output only, so the
// user's process is otherwise untouched. Where THP is disabled the advice is a no-op.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastsel::cpu {

// Below this size the 4 KiB faults are cheap and a 2 MiB-aligned block would waste memory.
constexpr size_t kHugePageMinBytes = size_t(8) << 20;
constexpr size_t kHugePageBytes = size_t(2) << 20;

inline at::Tensor empty_for_streaming_write(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  size_t nbytes = options.dtype().itemsize();
  for (const int64_t s : sizes) nbytes *= static_cast<size_t>(s);
  if (nbytes >= kHugePageMinBytes) {
    const size_t rounded = (nbytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    void* ptr = std::aligned_alloc(kHugePageBytes, rounded);
    if (ptr != nullptr) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advice only: failure leaves 4 KiB pages
      return at::from_blob(ptr, sizes, [](void* p) { std::free(p); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace fastsel::cpu

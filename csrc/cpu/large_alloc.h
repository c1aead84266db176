// Output buffers for the [N, C] gradient of the backward.
//
// The backward writes a fresh N*C gradient on every step (262 MB at 65536 x 1000 float32).
// From the default allocator each call gets newly mapped pages, and the first write to
// each page faults into the kernel, which zeroes it: a page fault per 4 KiB can cost
// more than computing the gradient itself. So the most recent large gradient block is kept when its tensor dies and handed to the
// next backward that fits it: in a training loop the logits' gradient of step t is freed
// in step t's backward of the layer below, so step t + 1 writes into pages that are
// already mapped. At most one block is held (the size of one gradient);
// FASTSEL_GRADIENT_CACHE=0 turns this off.
//
// Transparent huge pages (madvise MADV_HUGEPAGE on the block, what PyTorch does under
// THP_MEM_ALLOC_ENABLE=1) are not used: where a freed huge page goes back to the
// hypervisor, touching a new one costs more than the 4 KiB faults it saves, and the time
// per call becomes erratic. The cache avoids faults altogether in a loop.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "fastsel/isa_namespace.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN

// Below this size the faults are cheap, and PyTorch's allocator serves the tensor.
constexpr size_t kLargeBlockMinBytes = size_t(8) << 20;
constexpr size_t kBlockAlignment = 4096;  // page-aligned: full vector loads and stores, no split lines

class LargeBlockCache {
 public:
  // A block of at least `bytes` (a cached one if it is not more than twice as large).
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block_ != nullptr && block_bytes_ >= bytes && block_bytes_ <= 2 * bytes) {
        void* p = block_;
        block_ = nullptr;
        return p;
      }
    }
    return std::aligned_alloc(kBlockAlignment, bytes);
  }

  // Keeps the block for the next take() (the larger of it and the one held).
  void give(void* p, size_t bytes) {
    void* to_free = p;
    if (enabled()) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block_ == nullptr || bytes >= block_bytes_) {
        to_free = block_;
        block_ = p;
        block_bytes_ = bytes;
      }
    }
    std::free(to_free);
  }

  static LargeBlockCache& instance() {
    static LargeBlockCache* cache = new LargeBlockCache();  // never destroyed: outlives tensors at exit
    return *cache;
  }

 private:
  static bool enabled() {
    static const bool on = [] {
      const char* v = std::getenv("FASTSEL_GRADIENT_CACHE");
      return v == nullptr || std::string(v) != "0";
    }();
    return on;
  }

  std::mutex mutex_;
  void* block_ = nullptr;
  size_t block_bytes_ = 0;
};

// An uninitialised tensor for a buffer that is about to be written in full.
inline at::Tensor empty_for_streaming_write(at::IntArrayRef sizes, const at::TensorOptions& options) {
  size_t nbytes = options.dtype().itemsize();
  for (const int64_t s : sizes) nbytes *= static_cast<size_t>(s);
  if (nbytes < kLargeBlockMinBytes) return at::empty(sizes, options);
  const size_t rounded = (nbytes + kBlockAlignment - 1) / kBlockAlignment * kBlockAlignment;
  void* ptr = LargeBlockCache::instance().take(rounded);
  if (ptr == nullptr) return at::empty(sizes, options);
  return at::from_blob(ptr, sizes, [rounded](void* p) { LargeBlockCache::instance().give(p, rounded); },
                       options);
}

FASTSEL_ISA_END
}  // namespace fastsel::cpu

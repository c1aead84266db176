// Device building blocks of the fastsel CUDA kernels: a group of threads owns one row,
// sweeps it with 16-byte loads and combines per-thread partial results.
//
// Thread layout. A block holds kRowsPerBlock groups of kGroupThreads threads; group g of
// block b handles rows b * kRowsPerBlock + g + k * gridDim.x * kRowsPerBlock.
//   kGroupThreads <= 32: one row per warp, or several rows per warp for small C; the
//                         reductions are shuffles within the group's lanes only, so
//                         groups sharing a warp may loop and branch independently.
//   kGroupThreads  > 32: one row per block (kRowsPerBlock == 1); warps reduce by
//                         shuffles, then the per-warp results meet in shared memory
//                         behind __syncthreads, so every decision that leads to a
//                         reduction must be uniform over the block (it is: the row
//                         loop is per block and decisions derive from reduced values).
// Every reduction hands the same result to every thread of the group, so the group's
// later decisions (valid row? which MMS path?) agree and its threads meet at the next
// reduction together.
//
// The per-element math is not here: it is row_scores.h (SoftmaxState, Top2), shared
// with the CPU kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "fastsel/row_scores.h"

namespace fastsel::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
// "No NaN seen" for the lowest-NaN-index reduction (a min-reduction needs a neutral value).
constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

// ---- shuffles -------------------------------------------------------------------------
// `mask` names the lanes of the calling group only (see group_lane_mask), so that groups
// sharing a warp may take different branches: each group's decisions are uniform within
// the group, not across the warp.

__device__ __forceinline__ float shuffle_down(float v, unsigned mask, int delta, int width) {
  return __shfl_down_sync(mask, v, delta, width);
}
__device__ __forceinline__ double shuffle_down(double v, unsigned mask, int delta, int width) {
  return __shfl_down_sync(mask, v, delta, width);
}
__device__ __forceinline__ int64_t shuffle_down(int64_t v, unsigned mask, int delta, int width) {
  return static_cast<int64_t>(__shfl_down_sync(mask, static_cast<long long>(v), delta, width));
}
// Value of lane 0 of the caller's width-lane segment.
__device__ __forceinline__ float shuffle_from_first(float v, unsigned mask, int width) {
  return __shfl_sync(mask, v, 0, width);
}
__device__ __forceinline__ double shuffle_from_first(double v, unsigned mask, int width) {
  return __shfl_sync(mask, v, 0, width);
}
__device__ __forceinline__ int64_t shuffle_from_first(int64_t v, unsigned mask, int width) {
  return static_cast<int64_t>(__shfl_sync(mask, static_cast<long long>(v), 0, width));
}

// Lanes of the warp that belong to the calling thread's group (all 32 for groups of a
// warp or more).
template <int kGroupThreads>
__device__ __forceinline__ unsigned group_lane_mask() {
  if constexpr (kGroupThreads >= kWarpSize) {
    return kFullWarpMask;
  } else {
    const unsigned first_lane = (threadIdx.x % kWarpSize) & ~unsigned(kGroupThreads - 1);
    return ((1u << kGroupThreads) - 1u) << first_lane;
  }
}

// ---- the one-pass state of a row ------------------------------------------------------

// Everything one thread learns from its share of a row: the online softmax sums and the
// top-2 of row_scores.h, plus the lowest index holding a NaN (torch.argmax reports the
// first NaN, which Top2's ordering cannot express).
template <typename acc_t>
struct RowPartial {
  SoftmaxState<acc_t> softmax;
  Top2<acc_t> top;
  int64_t first_nan = kNoIndex;

  __device__ __forceinline__ void push(acc_t x, int64_t j) {
    if (x != x && j < first_nan) first_nan = j;
    softmax.push(x);
    top.push(x, j);
  }

  // Combines two disjoint parts of a row. Both merges of row_scores.h are symmetric up
  // to floating-point rounding; the reductions below still broadcast one result so that
  // every thread sees bit-identical state (its decisions must agree across the group).
  __device__ __forceinline__ void merge(const RowPartial& o) {
    softmax.merge(o.softmax);
    top.merge(o.top);
    if (o.first_nan < first_nan) first_nan = o.first_nan;
  }
};

template <typename acc_t>
__device__ __forceinline__ RowPartial<acc_t> shuffle_down(const RowPartial<acc_t>& p, unsigned mask, int delta,
                                                       int width) {
  RowPartial<acc_t> o;
  o.softmax.m = shuffle_down(p.softmax.m, mask, delta, width);
  o.softmax.n_eq = shuffle_down(p.softmax.n_eq, mask, delta, width);
  o.softmax.d_sub = shuffle_down(p.softmax.d_sub, mask, delta, width);
  o.softmax.s1 = shuffle_down(p.softmax.s1, mask, delta, width);
  o.softmax.s2 = shuffle_down(p.softmax.s2, mask, delta, width);
  o.top.v1 = shuffle_down(p.top.v1, mask, delta, width);
  o.top.v2 = shuffle_down(p.top.v2, mask, delta, width);
  o.top.i1 = shuffle_down(p.top.i1, mask, delta, width);
  o.top.i2 = shuffle_down(p.top.i2, mask, delta, width);
  o.first_nan = shuffle_down(p.first_nan, mask, delta, width);
  return o;
}

template <typename acc_t>
__device__ __forceinline__ RowPartial<acc_t> shuffle_from_first(const RowPartial<acc_t>& p, unsigned mask,
                                                             int width) {
  RowPartial<acc_t> o;
  o.softmax.m = shuffle_from_first(p.softmax.m, mask, width);
  o.softmax.n_eq = shuffle_from_first(p.softmax.n_eq, mask, width);
  o.softmax.d_sub = shuffle_from_first(p.softmax.d_sub, mask, width);
  o.softmax.s1 = shuffle_from_first(p.softmax.s1, mask, width);
  o.softmax.s2 = shuffle_from_first(p.softmax.s2, mask, width);
  o.top.v1 = shuffle_from_first(p.top.v1, mask, width);
  o.top.v2 = shuffle_from_first(p.top.v2, mask, width);
  o.top.i1 = shuffle_from_first(p.top.i1, mask, width);
  o.top.i2 = shuffle_from_first(p.top.i2, mask, width);
  o.first_nan = shuffle_from_first(p.first_nan, mask, width);
  return o;
}

// ---- group reduction ------------------------------------------------------------------

// Bytes of shared scratch that group_allreduce needs per block for values of type T.
template <int kGroupThreads, typename T>
constexpr int group_scratch_bytes() {
  return kGroupThreads > kWarpSize ? (kGroupThreads / kWarpSize) * static_cast<int>(sizeof(T)) : 1;
}

// Combines `value` over the kGroupThreads threads of a group with `combine` (associative
// and commutative up to rounding) and returns the SAME result to every thread of the
// group. Must be reached by every thread of the block (see the layout note on top).
// `scratch`: group_scratch_bytes<kGroupThreads, T>() bytes of shared memory, 16-aligned.
template <int kGroupThreads, typename T, typename Combine>
__device__ __forceinline__ T group_allreduce(T value, Combine combine, unsigned char* scratch) {
  static_assert(kGroupThreads >= 1 && (kGroupThreads & (kGroupThreads - 1)) == 0,
                "threads per row must be a power of two");
  constexpr int kWidth = kGroupThreads < kWarpSize ? kGroupThreads : kWarpSize;
  const unsigned mask = group_lane_mask<kGroupThreads>();
  // Tree reduction towards the first lane of each kWidth-lane segment.
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    combine(value, shuffle_down(value, mask, offset, kWidth));
  }
  if constexpr (kGroupThreads <= kWarpSize) {
    (void)scratch;
    return shuffle_from_first(value, mask, kWidth);
  } else {
    // One row per block: warp w's result goes to slot w, then every thread merges the
    // slots in the same order, so all threads obtain identical values without a third
    // barrier or a broadcast.
    constexpr int kWarps = kGroupThreads / kWarpSize;
    T* slots = reinterpret_cast<T*>(scratch);
    const int lane = threadIdx.x % kWarpSize;
    const int warp = threadIdx.x / kWarpSize;
    __syncthreads();  // the slots may still be read by the previous reduction
    if (lane == 0) slots[warp] = value;
    __syncthreads();
    T total = slots[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) combine(total, slots[w]);
    return total;
  }
}

// ---- row sweeps -----------------------------------------------------------------------

// 16 bytes of scalar_t: one vector load (4 float, 8 half/bfloat16, 2 double).
template <typename scalar_t>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(scalar_t));
  scalar_t v[kSize];
};

// Number of leading elements of `p` to handle one by one so that p + head is 16-byte
// aligned (clamped to n). A pointer not even aligned to its element type (impossible for
// a tensor, but cheap to guard) is never vectorized: head = n.
template <typename scalar_t>
__device__ __forceinline__ int64_t unaligned_head(const scalar_t* p, int64_t n) {
  constexpr int64_t kVec = Pack16<scalar_t>::kSize;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(scalar_t) != 0) return n;
  const int64_t misaligned = static_cast<int64_t>((addr % 16) / sizeof(scalar_t));
  const int64_t head = misaligned == 0 ? 0 : kVec - misaligned;
  return head < n ? head : n;
}

// Calls f(value, column) for the columns of row[0, n) owned by thread `tid` of a group
// of kGroupThreads. Rows have arbitrary alignment (any row stride), so the row is split
// into an unaligned head, a body of 16-byte vector loads (two in flight per thread per
// iteration) and a tail. Within one thread columns are visited in increasing order.
template <int kGroupThreads, typename scalar_t, typename F>
__device__ __forceinline__ void for_each_in_row(const scalar_t* __restrict__ row, int64_t n, int tid, F&& f) {
  using Pack = Pack16<scalar_t>;
  constexpr int64_t kVec = Pack::kSize;
  const int64_t head = unaligned_head(row, n);
  for (int64_t j = tid; j < head; j += kGroupThreads) f(row[j], j);

  const int64_t n_vec = (n - head) / kVec;
  const Pack* __restrict__ packs = reinterpret_cast<const Pack*>(row + head);
  int64_t v = tid;
  for (; v + kGroupThreads < n_vec; v += 2 * kGroupThreads) {
    const Pack a = packs[v];
    const Pack b = packs[v + kGroupThreads];
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(a.v[k], head + v * kVec + k);
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(b.v[k], head + (v + kGroupThreads) * kVec + k);
  }
  if (v < n_vec) {
    const Pack a = packs[v];
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(a.v[k], head + v * kVec + k);
  }
  // The two-per-iteration loop gives thread tid vectors tid, tid + G, tid + 2G, ... in
  // increasing order, the same set as a plain stride-G loop.

  for (int64_t j = head + n_vec * kVec + tid; j < n; j += kGroupThreads) f(row[j], j);
}

}  // namespace fastsel::cuda

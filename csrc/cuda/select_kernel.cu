// Selection ops on CUDA tensors: top-k of scores, sampling without and with replacement,
// and the percentile of values in a history (schemas and semantics in csrc/ops.cpp).
//
// Same results as fastsel/reference.py and the CPU kernels, bit for bit: the per-element
// math is fastsel/selection_keys.h, shared with the CPU (its float operations go through
// FASTSEL_MUL/ADD/DIV/DMUL, i.e. __fmul_rn & co. on the device, so nvcc's FMA contraction
// cannot change a rounding), and every selection is "the k smallest (key, index) pairs",
// which has a single answer whatever the order the GPU computes things in:
//   * keys of at most 32 bits (float32/half/bf16 scores, race keys) are packed with their
//     index into one int64, pack_key_index_signed(key, i) = (key ^ 2^31) << 32 | i, whose
//     signed order is (key, index) order. The packed values are all distinct, so
//     at::topk(packed, k, largest=false, sorted=true) has exactly one correct output and
//     its indices are the selection, ties broken by the lowest index;
//   * float64 scores have 64-bit keys, which leave no room for the index; they are sorted
//     with a stable sort instead (see select_topk);
//   * sampling with replacement finds each draw in integer prefix sums, which are exact
//     whatever order at::cumsum adds in;
//   * percentile sorts the history as integer rank keys (NaN last whatever its sign, see
//     SortableRankKey) and counts the entries below each value by binary search.
//
// Everything is asynchronous: no .item(), no host synchronisation. Quantities that depend
// on the data (the largest importance, which sets the race keys' power-of-two scale and the
// integer weights' shift, the total weight, the number of non-NaN history entries) stay on
// the device and are read by the kernels.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "fastsel/selection_keys.h"
#include "kernels.h"

namespace fastsel::cuda {
namespace {

// Every kernel here is element-wise (one thread per item or per draw, grid-strided).
constexpr int kSelectBlockThreads = 256;
constexpr int64_t kSelectMaxBlocks = int64_t(1) << 16;
// pack_key_index_signed keeps the index in the low 32 bits.
constexpr int64_t kMaxPackedItems = int64_t(1) << 32;

unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::min(kSelectMaxBlocks, (n + kSelectBlockThreads - 1) / kSelectBlockThreads));
}

// One op's launches: the device of its tensors made current, its current stream, and
// grid-stride kernels over n elements (blocks_for(n) blocks of kSelectBlockThreads), each
// launch checked.
class Launcher {
 public:
  explicit Launcher(const at::Tensor& on) : guard_(on.device()), stream_(c10::cuda::getCurrentCUDAStream()) {}

  template <typename... Params, typename... Args>
  void grid_stride(void (*kernel)(Params...), int64_t n, Args&&... args) const {
    kernel<<<blocks_for(n), kSelectBlockThreads, 0, stream_>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  c10::cuda::CUDAGuard guard_;
  cudaStream_t stream_;
};

// Grid-stride loop over [0, n) with int64 indices.
#define FASTSEL_FOR_EACH_ELEMENT(i, n)                                                     \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// float32, half and bfloat16 (the dtypes whose rank key is rank_key_bits of the value
// converted to float32, which is exact).
#define FASTSEL_DISPATCH_FLOAT32_OR_NARROWER(TYPE, NAME, ...)   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// ---- keys in a signed integer type with the order of the rank key ---------------------

// rank_key_bits of a value, as a signed integer of the same width and the same order (the
// top bit flipped), for at::sort and the binary searches below. Values are compared in
// float32 for float32/half/bf16 (exact conversions) and in float64 for float64, so the
// order of the keys is the order of the values with -0 == +0, and NaN (any sign, any
// payload) gets the largest key of the type, after +inf. at::sort of the floats themselves
// would not do: beyond its small-input bitonic path, CUDA's torch.sort is a radix sort of
// the raw bits that puts a NaN with the sign bit set (x86's default NaN, e.g. from 0/0 on
// the CPU) before -inf (pytorch/pytorch#190781).
template <typename scalar_t>
struct SortableRankKey {
  using compare_t = float;
  using key_t = int32_t;
  static constexpr key_t kNaN = std::numeric_limits<int32_t>::max();
  __device__ __forceinline__ static key_t of(scalar_t x, bool largest) {
    return static_cast<key_t>(rank_key_bits(static_cast<float>(x), largest) ^ 0x80000000u);
  }
};

template <>
struct SortableRankKey<double> {
  using compare_t = double;
  using key_t = int64_t;
  static constexpr key_t kNaN = std::numeric_limits<int64_t>::max();
  __device__ __forceinline__ static key_t of(double x, bool largest) {
    return static_cast<key_t>(rank_key_bits64(x, largest) ^ (uint64_t(1) << 63));
  }
};

// ---- binary searches ---------------------------------------------------------------------

// First i in [0, n) with sorted[i] >= x (n if none): the number of entries below x.
template <typename T>
__device__ __forceinline__ int64_t lower_bound(const T* __restrict__ sorted, int64_t n, T x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// First i in [0, n) with sorted[i] > x (n if none): the number of entries at most x.
template <typename T>
__device__ __forceinline__ int64_t upper_bound(const T* __restrict__ sorted, int64_t n, T x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] > x) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// ---- kernels -------------------------------------------------------------------------------

// packed[i] = (rank key of scores[i], i) as one int64 (float32, half, bf16 scores).
template <typename scalar_t>
__global__ void packed_rank_keys_kernel(const scalar_t* __restrict__ scores, int64_t stride, int64_t n,
                                        bool largest, int64_t* __restrict__ packed) {
  FASTSEL_FOR_EACH_ELEMENT(i, n) {
    const uint32_t key = rank_key_bits(static_cast<float>(scores[i * stride]), largest);
    packed[i] = pack_key_index_signed(key, static_cast<uint64_t>(i));
  }
}

// keys[i] = the sortable rank key of x[i] (int32 for float32/half/bf16, int64 for float64).
template <typename scalar_t>
__global__ void sortable_rank_keys_kernel(const scalar_t* __restrict__ x, int64_t stride, int64_t n,
                                          bool largest,
                                          typename SortableRankKey<scalar_t>::key_t* __restrict__ keys) {
  FASTSEL_FOR_EACH_ELEMENT(i, n) {
    keys[i] = SortableRankKey<scalar_t>::of(x[i * stride], largest);
  }
}

// packed[i] = (race key of item i, i): race_key_bits is the float32 bits of
// E_i / ((w_i 2^a) 2^b) with E_i = -log(u_i) from Philox word kWordRaceTime of element i and
// (2^a, 2^b) = race_scale(max importance), the power of two that keeps E / w from
// overflowing for tiny importances; importance is used in float32 (the reference's
// importance.to(float32); double -> float rounds to nearest). Every thread derives the
// (same) scale from the device-resident maximum, as replacement_weights_kernel does.
template <typename scalar_t>
__global__ void packed_race_keys_kernel(const scalar_t* __restrict__ importance, int64_t stride, int64_t n,
                                        const scalar_t* __restrict__ max_importance, uint64_t seed,
                                        uint64_t counter, int64_t* __restrict__ packed) {
  const RaceScale scale = race_scale(static_cast<float>(*max_importance));
  FASTSEL_FOR_EACH_ELEMENT(i, n) {
    const float w = static_cast<float>(importance[i * stride]);
    const uint32_t key = race_key_bits(w, scale, seed, counter, static_cast<uint64_t>(i));
    packed[i] = pack_key_index_signed(key, static_cast<uint64_t>(i));
  }
}

// weights[i] = trunc(w_i 2^shift) as int64, 0 for w_i <= 0; w_i in float32. Every thread
// derives the (same) scale from the device-resident maximum, so no host round trip and no
// extra launch are needed.
template <typename scalar_t>
__global__ void replacement_weights_kernel(const scalar_t* __restrict__ importance, int64_t stride, int64_t n,
                                           const scalar_t* __restrict__ max_importance, int weight_bits,
                                           int64_t* __restrict__ weights) {
  const double scale = replacement_scale(static_cast<float>(*max_importance), weight_bits);
  FASTSEL_FOR_EACH_ELEMENT(i, n) {
    weights[i] = quantized_importance(static_cast<float>(importance[i * stride]), scale);
  }
}

// Draw j: t_j uniform in [0, total) from Philox words 0 and 1 of element j, then the first
// item whose inclusive prefix sum exceeds t_j (torch.searchsorted(cum, t, right=True)), so
// item i is drawn with probability weights[i] / total.
__global__ void replacement_draws_kernel(const int64_t* __restrict__ prefix_sums, int64_t n, int64_t k,
                                         uint64_t seed, uint64_t counter, int64_t* __restrict__ out) {
  const int64_t total = prefix_sums[n - 1];
  FASTSEL_FOR_EACH_ELEMENT(j, k) {
    const int64_t target = replacement_target(seed, counter, static_cast<uint64_t>(j), total);
    const int64_t item = upper_bound(prefix_sums, n, target);
    // item < n whenever the prefix sums are non-decreasing (finite importance); the clamp
    // only keeps an out-of-domain input (inf/NaN importance overflowing the weights) from
    // producing an out-of-range index.
    out[j] = item < n ? item : n - 1;
  }
}

// out[i] = #{history entries < values[i]} / #{non-NaN history entries} as float32; NaN for
// a NaN value, 1 for an empty (or all-NaN) history. sorted_history holds the sortable rank
// keys of the history in ascending order, so NaNs (the largest key) are at the end and the
// number of non-NaN entries m is the position of the first NaN key. Each thread finds m
// with one more binary search (the same addresses in every thread: cached broadcasts),
// rather than a separate counting pass.
template <typename scalar_t>
__global__ void percentile_kernel(const scalar_t* __restrict__ values, int64_t stride, int64_t n,
                                  const typename SortableRankKey<scalar_t>::key_t* __restrict__ sorted_history,
                                  int64_t history_size, float* __restrict__ out) {
  using Key = SortableRankKey<scalar_t>;
  const int64_t m = lower_bound(sorted_history, history_size, Key::kNaN);
  const float m_f = static_cast<float>(m);  // as the reference: float32(m), rounded to nearest
  FASTSEL_FOR_EACH_ELEMENT(i, n) {
    const scalar_t v = values[i * stride];
    const auto v_c = static_cast<typename Key::compare_t>(v);
    float fraction;
    if (v_c != v_c) {
      fraction = std::numeric_limits<float>::quiet_NaN();
    } else if (m == 0) {
      fraction = 1.0f;
    } else {
      // Keys order as the values (-0 == +0), so entries with a smaller key are the entries
      // strictly below v; NaN keys are beyond m and never counted.
      const int64_t below = lower_bound(sorted_history, m, Key::of(v, /*largest=*/false));
      fraction = __fdiv_rn(static_cast<float>(below), m_f);
    }
    out[i] = fraction;
  }
}

// ---- argument checks ------------------------------------------------------------------------

// The checks of the CPU kernels (csrc/cpu/select_kernel.cpp), with the same exception
// types (ValueError / TypeError from Python). The values themselves (NaN, negative or
// infinite importance, all zero) are validated by the public API: checking them here would
// need a host synchronisation. Out-of-domain values never make a kernel read or write out
// of bounds.

void check_cuda_vector(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": the CUDA kernel needs a CUDA ", name, ", got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D [N], got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating point tensor, got ", t.scalar_type());
}

// k distinct items out of n (top-k, sampling without replacement).
void check_k_at_most_n(int64_t k, int64_t n, const char* op, const char* name) {
  TORCH_CHECK_VALUE(k >= 0 && k <= n, op, ": k must be in [0, N] with N = ", name, ".numel() = ", n,
                    ", got ", k);
}

void check_seed_counter(int64_t seed, int64_t counter, const char* op) {
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK_VALUE(counter >= 0, op, ": counter must be in [0, 2^63), got ", counter);
}

void check_packable(int64_t n, const char* op, const char* name) {
  TORCH_CHECK_VALUE(n <= kMaxPackedItems, op, ": ", name, " has ", n,
                    " entries; the CUDA kernel packs indices in 32 bits (at most 2^32 entries)");
}

at::Tensor empty_indices(int64_t k, const at::Tensor& like) {
  return at::empty({k}, like.options().dtype(at::kLong));
}

// Indices of the k smallest packed (key, index) values, in ascending order. The values are
// distinct, so the order is total and at::topk's answer is unique (its indices equal
// packed & 0xFFFFFFFF).
at::Tensor k_smallest_packed(const at::Tensor& packed, int64_t k) {
  return std::get<1>(at::topk(packed, k, /*dim=*/0, /*largest=*/false, /*sorted=*/true));
}

}  // namespace

at::Tensor select_topk(const at::Tensor& scores, int64_t k, bool largest) {
  constexpr const char* op = "fastsel.select_topk";
  check_cuda_vector(scores, op, "scores");
  const int64_t n = scores.size(0);
  check_k_at_most_n(k, n, op, "scores");
  if (n == 0 || k == 0) return empty_indices(k, scores);

  const Launcher launch(scores);
  if (scores.scalar_type() == at::kDouble) {
    // A float64 rank key takes all 64 bits: no room to pack the index, and at::topk does not
    // order equal values by index. A stable sort does: equal keys keep index order, which is
    // the reference's tie rule (k_smallest is a stable sort too). The cost is a full radix
    // sort of N int64 keys instead of a selection.
    using Key = SortableRankKey<double>;
    at::Tensor keys = at::empty({n}, scores.options().dtype(at::kLong));
    launch.grid_stride(sortable_rank_keys_kernel<double>, n,
        scores.const_data_ptr<double>(), scores.stride(0), n, largest, keys.mutable_data_ptr<Key::key_t>());
    const at::Tensor order = std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false));
    // A copy of the first k, so that the N-element order is freed.
    return k < n ? order.narrow(0, 0, k).clone() : order;
  }

  check_packable(n, op, "scores");
  at::Tensor packed = at::empty({n}, scores.options().dtype(at::kLong));
  FASTSEL_DISPATCH_FLOAT32_OR_NARROWER(scores.scalar_type(), "fastsel_select_topk_cuda", [&] {
    launch.grid_stride(packed_rank_keys_kernel<scalar_t>, n,
        scores.const_data_ptr<scalar_t>(), scores.stride(0), n, largest, packed.mutable_data_ptr<int64_t>());
  });
  return k_smallest_packed(packed, k);
}

at::Tensor sample_without_replacement(const at::Tensor& importance, int64_t k, int64_t seed, int64_t counter) {
  constexpr const char* op = "fastsel.sample_without_replacement";
  check_cuda_vector(importance, op, "importance");
  const int64_t n = importance.size(0);
  check_k_at_most_n(k, n, op, "importance");
  check_seed_counter(seed, counter, op);
  if (n == 0 || k == 0) return empty_indices(k, importance);
  check_packable(n, op, "importance");

  const Launcher launch(importance);
  // The maximum stays on the device (a 0-d tensor, as in sample_with_replacement); max of
  // the stored dtype converted to float32 equals max of the float32 values (the reference's
  // race_scale(importance.to(float32))), rounding to nearest being monotonic; a NaN
  // propagates as in torch.max and gives the unit scale in both.
  const at::Tensor max_importance = at::max(importance);
  at::Tensor packed = at::empty({n}, importance.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, importance.scalar_type(),
                                  "fastsel_sample_without_replacement_cuda", [&] {
    launch.grid_stride(packed_race_keys_kernel<scalar_t>, n,
        importance.const_data_ptr<scalar_t>(), importance.stride(0), n,
        max_importance.const_data_ptr<scalar_t>(), static_cast<uint64_t>(seed),
        static_cast<uint64_t>(counter), packed.mutable_data_ptr<int64_t>());
  });
  return k_smallest_packed(packed, k);
}

at::Tensor sample_with_replacement(const at::Tensor& importance, int64_t k, int64_t seed, int64_t counter) {
  constexpr const char* op = "fastsel.sample_with_replacement";
  check_cuda_vector(importance, op, "importance");
  const int64_t n = importance.size(0);
  // Draws are independent: any k >= 0 (as the CPU kernel), from at least one item.
  TORCH_CHECK_VALUE(k >= 0, op, ": k must be >= 0, got ", k);
  check_seed_counter(seed, counter, op);
  if (k == 0) return empty_indices(k, importance);
  TORCH_CHECK_VALUE(n > 0, op, ": cannot draw k = ", k, " samples from an empty importance");

  const Launcher launch(importance);
  const int weight_bits = replacement_weight_bits(n);

  // The maximum stays on the device (a 0-d tensor); max of the stored dtype converted to
  // float32 equals max of the float32 values, rounding to nearest being monotonic.
  const at::Tensor max_importance = at::max(importance);
  at::Tensor weights = at::empty({n}, importance.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, importance.scalar_type(),
                                  "fastsel_sample_with_replacement_cuda", [&] {
    launch.grid_stride(replacement_weights_kernel<scalar_t>, n,
        importance.const_data_ptr<scalar_t>(), importance.stride(0), n,
        max_importance.const_data_ptr<scalar_t>(), weight_bits, weights.mutable_data_ptr<int64_t>());
  });
  // Integer prefix sums: exact (total < 2^52), hence the same in any summation order.
  const at::Tensor prefix_sums = at::cumsum(weights, /*dim=*/0);
  at::Tensor out = empty_indices(k, importance);
  launch.grid_stride(replacement_draws_kernel, k,
      prefix_sums.const_data_ptr<int64_t>(), n, k, static_cast<uint64_t>(seed), static_cast<uint64_t>(counter),
      out.mutable_data_ptr<int64_t>());
  return out;
}

at::Tensor percentile(const at::Tensor& values_in, const at::Tensor& history_in) {
  constexpr const char* op = "fastsel.percentile";
  check_cuda_vector(values_in, op, "values");
  check_cuda_vector(history_in, op, "history");
  TORCH_CHECK_VALUE(history_in.device() == values_in.device(), op, ": history is on ",
                    history_in.device(), " but values are on ", values_in.device());
  const int64_t n = values_in.size(0), history_size = history_in.size(0);
  at::Tensor out = at::empty({n}, values_in.options().dtype(at::kFloat));
  if (n == 0) return out;

  const Launcher launch(values_in);
  // Compare in the promoted dtype (float32 for any mix of float32/half/bf16, float64 as soon
  // as one side is float64): every conversion into it is exact, so the comparisons are
  // those of the reference's float64 ones.
  const at::ScalarType compare_type = c10::promoteTypes(values_in.scalar_type(), history_in.scalar_type());
  const at::Tensor values = values_in.to(compare_type);
  const at::Tensor history = history_in.to(compare_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, compare_type, "fastsel_percentile_cuda", [&] {
    using Key = SortableRankKey<scalar_t>;
    // The history as ascending sortable keys: its non-NaN entries in order, then its NaNs.
    // The reference drops the NaNs before sorting; here they sort last and the kernel counts
    // the entries before the first NaN key, on the device.
    at::Tensor sorted_history;  // undefined for an empty history: the kernel reads nothing
    if (history_size > 0) {
      constexpr at::ScalarType key_dtype = c10::CppTypeToScalarType<typename Key::key_t>::value;
      at::Tensor keys = at::empty({history_size}, history.options().dtype(key_dtype));
      launch.grid_stride(sortable_rank_keys_kernel<scalar_t>, history_size,
          history.const_data_ptr<scalar_t>(), history.stride(0), history_size, /*largest=*/false,
          keys.mutable_data_ptr<typename Key::key_t>());
      // Integer keys: equal keys are indistinguishable, so any sort gives the same array.
      sorted_history = std::get<0>(at::sort(keys, /*stable=*/false, /*dim=*/0, /*descending=*/false));
    }
    launch.grid_stride(percentile_kernel<scalar_t>, n,
        values.const_data_ptr<scalar_t>(), values.stride(0), n,
        history_size > 0 ? sorted_history.const_data_ptr<typename Key::key_t>() : nullptr, history_size,
        out.mutable_data_ptr<float>());
  });
  return out;
}

}  // namespace fastsel::cuda

#undef FASTSEL_FOR_EACH_ELEMENT
#undef FASTSEL_DISPATCH_FLOAT32_OR_NARROWER

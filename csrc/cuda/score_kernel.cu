// Fused one-pass scoring of logits [N, C] on CUDA GPUs, and its backward.
//
// Semantics are exactly those of the CPU kernel (csrc/cpu/score_kernel.cpp) and of
// fastsel/reference.py, and so is the math: every thread feeds each of its elements to
// SoftmaxState::push and Top2::push of row_scores.h, the per-thread states are combined
// with their merge() (row_group.cuh) and finalize_row turns the row's state into its
// scores. push and finalize_row are the CPU kernel's scalar path (covered by the CPU
// tests); the merges, which only the GPU uses, are checked on the host by
// tests/test_cuda_build.py with the same thread partition and reduction tree.
//
// Work decomposition: a group of kGroupThreads threads owns a row (8 threads for
// C <= 128, a warp up to C = 2048, a block of 256 threads beyond; see threads_per_row).
// The row is read once with 16-byte loads; accumulation is float32 (float64 for float64
// logits), whatever the storage type.
//
// Minimal Margin Score (Weinstein, Fine & Hel-Or): for a linear head z = W h + b and
// prediction a, min_{j != a} (z_a - z_j) / ||w_a - w_j||. The inverse distances come from
// the Gram form ||w_a - w_j||^2 = ||w_a||^2 + ||w_j||^2 - 2 w_a.w_j of centred rows,
// computed in float64 with at::mm (cuBLAS; see inverse_distances):
//   * C <= kMmsDenseMaxClasses: the [C, C] matrix is built once per call and the
//     multiply-min sweep is fused into the scoring kernel (the row is still in L1/L2);
//   * larger C: after scoring, chunks of rows get their [rows, C] matrix W[pred] @ W^T
//     and a second kernel does the sweep.
//   mms="top2" divides the margin by ||w_(1) - w_(2)||, computed from the difference.
//
// No host synchronisation anywhere: a target outside [0, C) that is not ignore_index is
// reported by a device-side assertion (the convention of PyTorch's own CUDA losses); the
// row is never read out of bounds and, should assertions be compiled out, its
// target-dependent scores are NaN rather than silently wrong.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "fastsel/row_scores.h"
#include "kernels.h"
#include "row_group.cuh"

// Device-side report of a target outside [0, C) (the kernel then stops; the CUDA context
// reports "device-side assert triggered" at the next synchronisation).
#if defined(CUDA_KERNEL_ASSERT_PRINTF)
#define FASTSEL_ASSERT_TARGET_IN_RANGE(cond, row, value, num_classes)                        \
  CUDA_KERNEL_ASSERT_PRINTF(cond,                                                            \
                            "fastsel: target[%lld] = %lld is outside [0, %lld) and is not " \
                            "ignore_index",                                                  \
                            static_cast<long long>(row), static_cast<long long>(value),     \
                            static_cast<long long>(num_classes))
#else
#define FASTSEL_ASSERT_TARGET_IN_RANGE(cond, row, value, num_classes) CUDA_KERNEL_ASSERT(cond)
#endif

namespace fastsel::cuda {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Threads per block of every kernel; a block holds kBlockThreads / threads_per_row(C) rows.
constexpr int kBlockThreads = 256;
// Upper bound of blocks per launch; the row loops are grid-strided beyond it.
constexpr int64_t kMaxBlocks = int64_t(1) << 16;
// Elements of one [rows, C] inverse-distance chunk of the large-C exact MMS (16 MiB in
// float, as the reference and the CPU kernel bound their temporaries).
constexpr int64_t kMmsChunkElements = int64_t(1) << 22;

// ---- targets ----------------------------------------------------------------------------

// Target column of int32 or int64 targets with any stride (one kernel serves both).
struct TargetView {
  const void* data;
  int64_t stride;
  bool is_int64;

  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is_int64 ? static_cast<const int64_t*>(data)[i * stride]
                    : static_cast<int64_t>(static_cast<const int32_t*>(data)[i * stride]);
  }
};

struct RowTarget {
  int64_t raw;        // the stored value
  int64_t y;          // the class to score against, or -1 (ignored or out of range)
  bool ignored;       // raw == ignore_index
  bool out_of_range;  // not ignored and outside [0, C): an input error
};

__device__ __forceinline__ RowTarget resolve_target(const TargetView& target, int64_t i, int64_t C,
                                                    int64_t ignore_index) {
  RowTarget t;
  t.raw = target[i];
  t.ignored = t.raw == ignore_index;
  t.out_of_range = !t.ignored && (t.raw < 0 || t.raw >= C);
  t.y = (t.ignored || t.out_of_range) ? -1 : t.raw;
  return t;
}

// ---- reduction operators ------------------------------------------------------------------

struct MergePartials {
  template <typename acc_t>
  __device__ __forceinline__ void operator()(RowPartial<acc_t>& a, const RowPartial<acc_t>& b) const {
    a.merge(b);
  }
};

struct SumOp {
  template <typename acc_t>
  __device__ __forceinline__ void operator()(acc_t& a, acc_t b) const { a += b; }
};

// Minimum that ignores a NaN operand (as std::min(best, term) in the CPU's scalar sweep).
struct MinOp {
  template <typename acc_t>
  __device__ __forceinline__ void operator()(acc_t& a, acc_t b) const {
    if (b < a) a = b;
  }
};

// ---- Minimal Margin Score of one row --------------------------------------------------------

// min_{j != a} mms_term(z_a - z_j, inv_dist_row[j]) over the row, reduced over the group.
template <int kGroupThreads, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t exact_mms_of_row(const scalar_t* row, int64_t C, int64_t a, acc_t z_a,
                                                  const acc_t* __restrict__ inv_dist_row, int tid,
                                                  unsigned char* scratch) {
  acc_t best = pos_inf<acc_t>();  // C = 1: no competitor, +inf
  for_each_in_row<kGroupThreads>(row, C, tid, [&](scalar_t v, int64_t j) {
    if (j == a) return;
    const acc_t term = mms_term(z_a - static_cast<acc_t>(v), inv_dist_row[j]);
    if (term < best) best = term;
  });
  return group_allreduce<kGroupThreads>(best, MinOp{}, scratch);
}

// (z_(1) - z_(2)) / ||w_(1) - w_(2)||, the runner-up only. The distance is taken from the
// difference of the two weight rows (exact, as the CPU's pair_distance).
template <int kGroupThreads, typename acc_t>
__device__ __forceinline__ acc_t top2_mms_of_row(const Top2<acc_t>& top, acc_t margin,
                                                 const acc_t* __restrict__ w, int64_t D, int tid,
                                                 unsigned char* scratch) {
  if (top.v2 == neg_inf<acc_t>()) return pos_inf<acc_t>();  // no finite runner-up (e.g. C = 1)
  if (margin == acc_t(0)) return acc_t(0);                  // a tie is on the boundary
  const acc_t* wa = w + top.i1 * D;
  const acc_t* wb = w + top.i2 * D;
  acc_t sq = 0;
  for (int64_t k = tid; k < D; k += kGroupThreads) {
    const acc_t d = wa[k] - wb[k];
    sq += d * d;
  }
  sq = group_allreduce<kGroupThreads>(sq, SumOp{}, scratch);
  return margin / sqrt_(sq);  // identical rows: margin / 0 = inf
}

// ---- forward ----------------------------------------------------------------------------------

// A pointer per "row" output of the contract (fastsel/contract.py), pred, mms and the
// validity of each row.
template <typename acc_t>
struct ScoreOutputPointers {
#define FASTSEL_ROW_POINTER(name) acc_t* name;
  FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_POINTER)
#undef FASTSEL_ROW_POINTER
  acc_t* mms;      // [N]; written here in the fused modes (top2, dense exact)
  int64_t* pred;
  bool* valid;     // [N] or nullptr; needed by the chunked exact MMS

  static ScoreOutputPointers of(const ScoreBuffers& b, bool* valid) {
    ScoreOutputPointers p;
#define FASTSEL_ROW_POINTER(name) p.name = b.name.mutable_data_ptr<acc_t>();
    FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_POINTER)
#undef FASTSEL_ROW_POINTER
    p.mms = b.mms.numel() ? b.mms.mutable_data_ptr<acc_t>() : nullptr;
    p.pred = b.pred.mutable_data_ptr<int64_t>();
    p.valid = valid;
    return p;
  }

  __device__ __forceinline__ void write(int64_t i, const RowScores<acc_t>& r) const {
#define FASTSEL_ROW_WRITE(name) name[i] = r.name;
    FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_WRITE)
#undef FASTSEL_ROW_WRITE
    pred[i] = r.pred;
    if (valid != nullptr) valid[i] = r.valid;
  }
};

template <typename scalar_t, typename acc_t>
struct ScoreArgs {
  const scalar_t* logits;  // [N, C], unit column stride
  int64_t N, C, row_stride;
  TargetView target;
  int64_t ignore_index;
  int64_t mms_mode;        // MmsMode
  bool mms_fused;          // top2, or exact with the dense [C, C] inverse distances
  const acc_t* weight;     // [C, D] contiguous (top2)
  int64_t D;
  const acc_t* inv_dist;   // [C, C] contiguous (dense exact)
  ScoreOutputPointers<acc_t> out;
};

template <typename scalar_t, typename acc_t, int kGroupThreads>
__global__ void __launch_bounds__(kBlockThreads) score_rows_kernel(const ScoreArgs<scalar_t, acc_t> args) {
  constexpr int kRowsPerBlock = kBlockThreads / kGroupThreads;
  static_assert(kGroupThreads <= kWarpSize || kRowsPerBlock == 1,
                "groups larger than a warp own the whole block");
  __shared__ alignas(16) unsigned char scratch[group_scratch_bytes<kGroupThreads, RowPartial<acc_t>>()];
  const int tid = threadIdx.x % kGroupThreads;
  const int group = threadIdx.x / kGroupThreads;
  const int64_t C = args.C;

  for (int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + group; i < args.N;
       i += int64_t(gridDim.x) * kRowsPerBlock) {
    const scalar_t* row = args.logits + i * args.row_stride;

    // One read of the row: online softmax sums, top-2 and the first NaN.
    RowPartial<acc_t> part;
    for_each_in_row<kGroupThreads>(row, C, tid, [&](scalar_t v, int64_t j) {
      part.push(static_cast<acc_t>(v), j);
    });
    part = group_allreduce<kGroupThreads>(part, MergePartials{}, scratch);

    // Every thread of the group finalizes the (identical) state: the MMS below needs the
    // validity and the prediction in all of them. Only thread 0 writes.
    const RowTarget t = resolve_target(args.target, i, C, args.ignore_index);
    if (tid == 0) {
      FASTSEL_ASSERT_TARGET_IN_RANGE(!t.out_of_range, i, t.raw, C);
    }
    const acc_t z_y = t.y >= 0 ? static_cast<acc_t>(row[t.y]) : acc_t(0);
    RowScores<acc_t> r = finalize_row(part.softmax, part.top, z_y, t.y);
    if (part.first_nan != kNoIndex) r.pred = part.first_nan;  // torch.argmax ranks NaN first
    if (t.out_of_range) r.loss = r.true_margin = r.grad_norm = quiet_nan<acc_t>();
    if (tid == 0) args.out.write(i, r);

    if (!args.mms_fused) continue;
    acc_t mms = quiet_nan<acc_t>();  // invalid rows
    if (r.valid) {                   // uniform over the group: r derives from reduced state
      if (args.mms_mode == kMmsTop2) {
        mms = top2_mms_of_row<kGroupThreads>(part.top, r.margin, args.weight, args.D, tid, scratch);
      } else {
        // Second sweep of the row, now in cache; z_a = v1 for a valid row.
        mms = exact_mms_of_row<kGroupThreads>(row, C, r.pred, part.top.v1, args.inv_dist + r.pred * C,
                                              tid, scratch);
      }
    }
    if (tid == 0) args.out.mms[i] = mms;
  }
}

// Exact MMS of rows [row_begin, row_end) for large C, after score_rows_kernel wrote pred
// and valid. inv_dist: [row_end - row_begin, C], row k for the prediction of row_begin + k.
template <typename scalar_t, typename acc_t, int kGroupThreads>
__global__ void __launch_bounds__(kBlockThreads)
mms_exact_rows_kernel(const scalar_t* logits, int64_t row_stride, int64_t C, int64_t row_begin,
                      int64_t row_end, const int64_t* __restrict__ pred, const bool* __restrict__ valid,
                      const acc_t* __restrict__ inv_dist, acc_t* __restrict__ mms) {
  constexpr int kRowsPerBlock = kBlockThreads / kGroupThreads;
  __shared__ alignas(16) unsigned char scratch[group_scratch_bytes<kGroupThreads, acc_t>()];
  const int tid = threadIdx.x % kGroupThreads;
  const int group = threadIdx.x / kGroupThreads;
  for (int64_t i = row_begin + int64_t(blockIdx.x) * kRowsPerBlock + group; i < row_end;
       i += int64_t(gridDim.x) * kRowsPerBlock) {
    acc_t result = quiet_nan<acc_t>();
    if (valid[i]) {  // uniform over the group
      const scalar_t* row = logits + i * row_stride;
      const int64_t a = pred[i];
      result = exact_mms_of_row<kGroupThreads>(row, C, a, static_cast<acc_t>(row[a]),
                                               inv_dist + (i - row_begin) * C, tid, scratch);
    }
    if (tid == 0) mms[i] = result;
  }
}

// ---- backward ---------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* logits;  // [N, C], unit column stride
  int64_t N, C, row_stride;
  TargetView target;
  int64_t ignore_index;
  const acc_t* grad_loss;
  int64_t grad_loss_stride;
  const acc_t* lse;
  int64_t lse_stride;
  scalar_t* grad;          // [N, C] contiguous
};

// f(in[j], j, out[j]) for the columns of a row owned by thread tid of a group of
// group_threads, with 16-byte stores (the output row's alignment decides the split) and
// 16-byte loads when the input row happens to share that alignment. kReadInput = false
// skips the loads (f then receives 0). No reductions here, so the group size is a
// runtime value: one instantiation serves every row layout.
template <bool kReadInput, typename scalar_t, typename F>
__device__ __forceinline__ void transform_row(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                              int64_t n, int tid, int group_threads, F&& f) {
  using Pack = Pack16<scalar_t>;
  constexpr int64_t kVec = Pack::kSize;
  const int64_t head = unaligned_head(out, n);
  for (int64_t j = tid; j < head; j += group_threads) f(kReadInput ? in[j] : scalar_t(0), j, out[j]);
  const int64_t n_vec = (n - head) / kVec;
  const bool in_aligned = reinterpret_cast<uintptr_t>(in + head) % 16 == 0;
  const Pack* in_packs = reinterpret_cast<const Pack*>(in + head);
  Pack* out_packs = reinterpret_cast<Pack*>(out + head);
  for (int64_t v = tid; v < n_vec; v += group_threads) {
    const int64_t j0 = head + v * kVec;
    Pack x;
    if constexpr (kReadInput) {
      if (in_aligned) {
        x = in_packs[v];
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) x.v[k] = in[j0 + k];
      }
    }
    Pack y;
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(kReadInput ? x.v[k] : scalar_t(0), j0 + k, y.v[k]);
    out_packs[v] = y;
  }
  for (int64_t j = head + n_vec * kVec + tid; j < n; j += group_threads) {
    f(kReadInput ? in[j] : scalar_t(0), j, out[j]);
  }
}

// grad[i, j] = g_i exp(z_ij - lse_i) - g_i [j == y_i]: the gradient of g_i * loss_i,
// recomputed from the saved log-sum-exp; 0 on ignored rows.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
score_backward_kernel(const BackwardArgs<scalar_t, acc_t> args, int group_threads) {
  const int rows_per_block = kBlockThreads / group_threads;
  const int tid = threadIdx.x % group_threads;
  const int group = threadIdx.x / group_threads;
  const int64_t C = args.C;
  for (int64_t i = int64_t(blockIdx.x) * rows_per_block + group; i < args.N;
       i += int64_t(gridDim.x) * rows_per_block) {
    const scalar_t* row = args.logits + i * args.row_stride;
    scalar_t* grad_row = args.grad + i * C;
    const RowTarget t = resolve_target(args.target, i, C, args.ignore_index);
    if (t.y < 0) {  // ignored (or out of range, after the report): zero gradient
      if (tid == 0) {
        FASTSEL_ASSERT_TARGET_IN_RANGE(!t.out_of_range, i, t.raw, C);
      }
      transform_row<false>(row, grad_row, C, tid, group_threads,
                           [](scalar_t, int64_t, scalar_t& out) { out = scalar_t(0); });
      continue;
    }
    const acc_t g = args.grad_loss[i * args.grad_loss_stride];
    const acc_t lse = args.lse[i * args.lse_stride];
    const int64_t y = t.y;
    transform_row<true>(row, grad_row, C, tid, group_threads, [&](scalar_t z, int64_t j, scalar_t& out) {
      acc_t value = exp_(static_cast<acc_t>(z) - lse) * g;
      if (j == y) value -= g;
      out = static_cast<scalar_t>(value);
    });
  }
}

// ---- launch helpers ---------------------------------------------------------------------------

template <int V>
using IntConstant = std::integral_constant<int, V>;

// Threads that share a row of C classes: 8 for small rows (a warp scores 4 rows at once;
// with a warp per row, C = 10 would keep 4 of 32 lanes busy), a warp up to C = 2048, the
// whole block beyond.
int threads_per_row(int64_t C) {
  return C <= 128 ? 8 : (C <= 2048 ? kWarpSize : kBlockThreads);
}

// Calls launch(IntConstant<threads_per_row(C)>) (kernels with reductions need the group
// size at compile time).
template <typename Launch>
void with_row_layout(int64_t C, Launch&& launch) {
  switch (threads_per_row(C)) {
    case 8: launch(IntConstant<8>{}); break;
    case kWarpSize: launch(IntConstant<kWarpSize>{}); break;
    default: launch(IntConstant<kBlockThreads>{}); break;
  }
}

unsigned int grid_for_rows(int64_t rows, int group_threads) {
  const int64_t rows_per_block = kBlockThreads / group_threads;
  return static_cast<unsigned int>(std::min(kMaxBlocks, (rows + rows_per_block - 1) / rows_per_block));
}

// 1 / ||w_a - w_j|| for the rows c_rows (squared norms sq_rows) of the centred rows c of W
// (squared norms sq) against every row of c, [rows, C], in dtype: ||w_a - w_j||^2 =
// ||c_a||^2 + ||c_j||^2 - 2 c_a.c_j, clamped at 0 against rounding; rsqrt(0) = inf for
// identical rows. c is W minus its mean row in float64, computed once per call, as in
// fastsel.reference.class_distances: in float32 the form cancels for near-duplicate
// classes (rows 1e-3 apart relative to their norm came out ~10% off). Unlike the
// reference and the CPU kernel, the pairs that still cancel in float64 (rows ~1e-8 apart
// relative to their norm) are not recomputed from the row difference here.
at::Tensor inverse_distances(const at::Tensor& c_rows, const at::Tensor& sq_rows, const at::Tensor& c,
                             const at::Tensor& sq, at::ScalarType dtype) {
  const at::Tensor d2 = sq_rows.unsqueeze(1).add(sq.unsqueeze(0)).sub(c_rows.mm(c.t()), /*alpha=*/2);
  return d2.clamp_min(0).rsqrt().to(dtype).contiguous();
}

}  // namespace

// max_distance (the CPU search's pruning bounds) is checked and not needed here: the
// exact MMS on CUDA takes its distances from a Gram product.
ScoreOutputs score_forward(const at::Tensor& logits_in, const at::Tensor& target,
                           int64_t ignore_index, const std::optional<at::Tensor>& weight,
                           int64_t mms_mode, const std::optional<at::Tensor>& max_distance) {
  check_score_forward_args(logits_in, target, weight, mms_mode, max_distance);
  TORCH_CHECK(logits_in.is_cuda(), "fastsel.score: the CUDA kernel needs CUDA logits, got ",
              logits_in.device());
  const int64_t N = logits_in.size(0), C = logits_in.size(1);

  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  // Rows may have any stride; columns must be unit-stride for vector loads.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const auto acc_dtype = accumulate_type(logits.scalar_type());
  const auto opts = logits.options().dtype(acc_dtype);

  const ScoreBuffers outs(N, opts, mms_mode);
  const at::Tensor &pred = outs.pred, &mms = outs.mms;

  at::Tensor w;
  if (mms_mode != kMmsNone) {
    w = weight->to(acc_dtype).contiguous();
  }
  if (N == 0) return outs.outputs();

  const bool dense_exact = mms_mode == kMmsExact && C <= kMmsDenseMaxClasses;
  const bool chunked_exact = mms_mode == kMmsExact && !dense_exact;
  at::Tensor centred, sq, inv_dist, valid;
  if (mms_mode == kMmsExact) {
    const at::Tensor w64 = w.to(at::kDouble);
    centred = w64.sub(w64.mean(0, /*keepdim=*/true));
    sq = centred.mul(centred).sum(1);
  }
  if (dense_exact) inv_dist = inverse_distances(centred, sq, centred, sq, w.scalar_type());
  if (chunked_exact) valid = at::empty({N}, opts.dtype(at::kBool));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastsel_score_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    ScoreArgs<scalar_t, acc_t> args;
    args.logits = logits.const_data_ptr<scalar_t>();
    args.N = N;
    args.C = C;
    args.row_stride = logits.stride(0);
    args.target = TargetView{target.const_data_ptr(), target.stride(0), target.scalar_type() == at::kLong};
    args.ignore_index = ignore_index;
    args.mms_mode = mms_mode;
    args.mms_fused = mms_mode == kMmsTop2 || dense_exact;
    args.weight = mms_mode == kMmsTop2 ? w.const_data_ptr<acc_t>() : nullptr;
    args.D = mms_mode == kMmsTop2 ? w.size(1) : 0;
    args.inv_dist = dense_exact ? inv_dist.const_data_ptr<acc_t>() : nullptr;
    args.out = ScoreOutputPointers<acc_t>::of(outs, chunked_exact ? valid.mutable_data_ptr<bool>() : nullptr);

    with_row_layout(C, [&](auto group_threads) {
      constexpr int kG = decltype(group_threads)::value;
      score_rows_kernel<scalar_t, acc_t, kG><<<grid_for_rows(N, kG), kBlockThreads, 0, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    if (chunked_exact) {
      // [C, C] would not fit: W[pred] @ W^T for a bounded chunk of rows at a time. Each
      // chunk's matrix is freed to the stream-ordered caching allocator once its kernel
      // is queued, so the loop needs no synchronisation.
      const int64_t rows_per_chunk = std::max<int64_t>(1, kMmsChunkElements / C);
      for (int64_t r0 = 0; r0 < N; r0 += rows_per_chunk) {
        const int64_t r1 = std::min(N, r0 + rows_per_chunk);
        const at::Tensor classes = pred.slice(0, r0, r1);
        const at::Tensor q = inverse_distances(centred.index_select(0, classes), sq.index_select(0, classes),
                                               centred, sq, w.scalar_type());
        // Rows wider than kMmsDenseMaxClasses: the block-per-row layout.
        mms_exact_rows_kernel<scalar_t, acc_t, kBlockThreads>
            <<<grid_for_rows(r1 - r0, kBlockThreads), kBlockThreads, 0, stream>>>(
                args.logits, args.row_stride, C, r0, r1, pred.const_data_ptr<int64_t>(),
                valid.const_data_ptr<bool>(), q.const_data_ptr<acc_t>(), mms.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return outs.outputs();
}

at::Tensor score_backward(const at::Tensor& grad_loss, const at::Tensor& logits_in,
                          const at::Tensor& target, const at::Tensor& lse_in,
                          int64_t ignore_index) {
  check_score_backward_args(grad_loss, logits_in, target, lse_in);
  TORCH_CHECK(logits_in.is_cuda(), "fastsel.score_backward: the CUDA kernel needs CUDA logits, got ",
              logits_in.device());
  const int64_t N = logits_in.size(0), C = logits_in.size(1);

  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const auto acc_dtype = accumulate_type(logits.scalar_type());
  const at::Tensor g = grad_loss.to(acc_dtype);
  const at::Tensor lse = lse_in.to(acc_dtype);
  at::Tensor grad = at::empty({N, C}, logits.options());
  if (N == 0 || C == 0) return grad;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fastsel_score_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    BackwardArgs<scalar_t, acc_t> args;
    args.logits = logits.const_data_ptr<scalar_t>();
    args.N = N;
    args.C = C;
    args.row_stride = logits.stride(0);
    args.target = TargetView{target.const_data_ptr(), target.stride(0), target.scalar_type() == at::kLong};
    args.ignore_index = ignore_index;
    args.grad_loss = g.const_data_ptr<acc_t>();
    args.grad_loss_stride = g.stride(0);
    args.lse = lse.const_data_ptr<acc_t>();
    args.lse_stride = lse.stride(0);
    args.grad = grad.mutable_data_ptr<scalar_t>();
    const int group_threads = threads_per_row(C);
    score_backward_kernel<scalar_t, acc_t>
        <<<grid_for_rows(N, group_threads), kBlockThreads, 0, stream>>>(args, group_threads);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace fastsel::cuda

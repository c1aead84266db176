// The forward driver of the scoring kernel: rows, lanes of rows and groups of rows
// (RowJob), their outputs and MMS, spread over threads.
#pragma once

#include "row_pass.h"
#include "../mms_prep.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN
namespace {

// ---- the driver -----------------------------------------------------------------------

// Where the outputs go: a pointer per "row" output of the contract, pred, and mms (null
// without an MMS mode).
template <typename acc_t>
struct OutputPointers {
#define FASTSEL_ROW_POINTER(name) acc_t* name;
  FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_POINTER)
#undef FASTSEL_ROW_POINTER
  int64_t* pred;
  acc_t* mms;

  static OutputPointers of(const ScoreBuffers& b) {
    OutputPointers p;
#define FASTSEL_ROW_POINTER(name) p.name = b.name.data_ptr<acc_t>();
    FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_POINTER)
#undef FASTSEL_ROW_POINTER
    p.pred = b.pred.data_ptr<int64_t>();
    p.mms = b.mms.numel() ? b.mms.data_ptr<acc_t>() : nullptr;
    return p;
  }

  void write(int64_t i, const RowScores<acc_t>& r) const {
#define FASTSEL_ROW_WRITE(name) name[i] = r.name;
    FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_WRITE)
#undef FASTSEL_ROW_WRITE
    pred[i] = r.pred;
  }
};

struct MmsInputs {
  int64_t mode = kMmsNone;
  MmsWeights weights;
};

// Runner-up index of a row: the vector path leaves it unset and finds it on demand.
template <typename scalar_t, typename acc_t>
int64_t runner_up_index(const scalar_t* row, int64_t C, const Top2<acc_t>& top, float* buf) {
  if (top.i2 >= 0 || top.v2 == neg_inf<acc_t>()) return top.i2;
  if constexpr (std::is_same_v<acc_t, float>) return find_in_row(row, C, top.v2, top.i1, buf);
  return -1;  // unreachable: the scalar (float64) path tracks i2
}

// Everything a row needs besides its index; shared by the row-wise and lane-wise paths.
template <typename scalar_t>
struct RowJob {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* base;
  int64_t row_stride, C;
  const MmsInputs* mms;
  const OutputPointers<acc_t>* out;

  // The row as acc_t blocks: visit_block(x, j0, n) with x[j - j0] = z_j.
  template <typename VisitBlock>
  void row_blocks(const scalar_t* row, float* buf, VisitBlock&& visit_block) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      visit_block(row, 0, C);
    } else {
      for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
        const int64_t n = std::min(kBlock, C - j0);
        to_float(row + j0, buf, n);
        visit_block(buf, j0, n);
      }
    }
  }

  // Every column j other than a and r with z_j >= threshold, by a sweep of the row.
  template <typename Visit>
  void sweep_candidates(const scalar_t* row, acc_t threshold, int64_t a, int64_t r, float* buf,
                        Visit&& visit) const {
    row_blocks(row, buf, [&](const acc_t* x, int64_t j0, int64_t n) {
      for_each_at_least(x, n, threshold, a - j0, r - j0, [&](int64_t k) { visit(j0 + k, x[k]); });
    });
  }

  // MMS of row i from its top-2 (mms.h); NaN for invalid rows.
  void write_mms(int64_t i, const scalar_t* row, const Top2<acc_t>& top, const RowScores<acc_t>& r,
                 float* buf) const {
    if (mms->mode == kMmsNone) return;
    if (!r.valid) {
      out->mms[i] = quiet_nan<acc_t>();
      return;
    }
    const int64_t a = top.i1;
    const int64_t runner_up = runner_up_index(row, C, top, buf);
    const MmsWeights& mw = mms->weights;
    if (mms->mode == kMmsTop2 || mw.inv_dist != nullptr) {
      out->mms[i] = mms_top2_or_gram(row, top.v1, a, runner_up, r.margin, buf);
      return;
    }
    const acc_t distance = mms_needs_runner_up(r.margin, runner_up)
                               ? checked_pair_distance(static_cast<const acc_t*>(mw.w), mw.D, a, runner_up)
                               : acc_t(1);
    out->mms[i] = mms_exact_pruned<acc_t>(top.v1, a, runner_up, r.margin, distance, mw,
                                          [&](acc_t threshold, auto&& visit) {
                                            sweep_candidates(row, threshold, a, runner_up, buf, visit);
                                          });
  }

  // The top-2 MMS, or the exact MMS from the [C, C] inverse distances (small C), for the
  // generic path (write_mms) and the group path (group_mms).
  acc_t mms_top2_or_gram(const scalar_t* row, acc_t za, int64_t a, int64_t r, acc_t margin, float* buf) const {
    const MmsWeights& mw = mms->weights;
    if (mms->mode == kMmsExact) {
      return mms_exact_gram<acc_t>(za, a, r, margin, mw, [&](auto&& visit_block) { row_blocks(row, buf, visit_block); });
    }
    if (const auto trivial = mms_without_distance(margin, r)) return *trivial;
    if (mw.inv_dist != nullptr) return margin * static_cast<const acc_t*>(mw.inv_dist)[a * C + r];
    return margin / checked_pair_distance(static_cast<const acc_t*>(mw.w), mw.D, a, r);
  }

  // MMS of the rows of a group (C <= kBlock), after their row passes: the rows are still
  // in L2 (kLanes rows of at most kBlock columns); interleaved with the row passes, which
  // stream from memory, the same work would compete with them for the caches. Pass 2 listed each row's columns at or
  // above its floor (RowCandidates, mms.h): the runner-up comes from that list, and so do
  // the exact mode's candidates when the list covers them; else the row is swept. Either
  // way reach_factor (mms.h) adapts.
  void group_mms(int64_t i0, int64_t rows, const bool* ok, const float* v1, const float* v2,
                 const float* i1, const RowCandidates* candidates, float& reach_factor, float* buf) const {
    static_assert(std::is_same_v<acc_t, float>);
    const MmsWeights& mw = mms->weights;
    ListedColumns list;
    for (int64_t r = 0; r < rows; ++r) {
      if (!ok[r]) continue;
      const scalar_t* row = base + (i0 + r) * row_stride;
      const int64_t a = static_cast<int64_t>(i1[r]);
      const float margin = v1[r] - v2[r];
      list.gather(candidates[r], row);
      int64_t ru = candidates[r].covers(v2[r]) ? list.find(v2[r], a) : -1;
      if (ru < 0) {
        Top2<float> top;
        top.v1 = v1[r]; top.v2 = v2[r]; top.i1 = a; top.i2 = -1;
        ru = runner_up_index(row, C, top, buf);
      }
      if (mms->mode == kMmsTop2 || mw.inv_dist != nullptr) {
        out->mms[i0 + r] = mms_top2_or_gram(row, v1[r], a, ru, margin, buf);
        continue;
      }
      const float distance = mms_needs_runner_up(margin, ru) ? checked_pair_distance(static_cast<const float*>(mw.w), mw.D, a, ru) : 1.f;
      out->mms[i0 + r] = mms_exact_pruned<float>(v1[r], a, ru, margin, distance, mw, [&](float threshold, auto&& visit) {
        if (list.complete && candidates[r].covers(threshold)) {
          for (int k = 0; k < list.n; ++k) {
            const int64_t j = list.index[k];
            if (list.value[k] >= threshold && j != a && j != ru) visit(j, list.value[k]);
          }
          reach_factor = std::max(1.f, reach_factor * kReachDecay);
          return;
        }
        if (list.complete) reach_factor = std::min(kMaxReachFactor, reach_factor * kReachGrowth);  // floor too high
        sweep_candidates(row, threshold, a, ru, buf, visit);
      });
    }
  }

  // Row-wise path: vector passes along the row, scalar fallback for invalid rows.
  void score_row(int64_t i, int64_t y, float* buf) const {
    const scalar_t* row = base + i * row_stride;
    SoftmaxState<acc_t> st;
    Top2<acc_t> top;
    bool ok = false;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (C < kMaxVectorClasses) ok = score_row_vectorized(row, C, buf, st, top);
    }
    int64_t first_nan = -1;
    RowScores<acc_t> r;
    if (ok) {
      r = finalize_row(st, top, y >= 0 ? static_cast<acc_t>(row[y]) : acc_t(0), y);
    } else {
      // The scalar path accumulates in double whatever the logits: a float sum of more
      // than 2^24 terms of 1 (a row of 2^24 + k equal logits) would stop growing at 2^24.
      SoftmaxState<double> sd;
      Top2<double> td;
      first_nan = score_row_scalar(row, C, sd, td);
      const RowScores<double> rd = finalize_row(sd, td, y >= 0 ? static_cast<double>(row[y]) : 0.0, y);
      r = rd.cast<acc_t>();
      top.v1 = static_cast<acc_t>(td.v1);
      top.v2 = static_cast<acc_t>(td.v2);
      top.i1 = td.i1;
      top.i2 = td.i2;
    }
    if (first_nan >= 0) r.pred = first_nan;  // torch.argmax ranks NaN first
    out->write(i, r);
    write_mms(i, row, top, r, buf);
  }

  // finalize_row of row_scores.h for kLanes rows at once (one row per lane), storing
  // rows [i0, i0 + rows) of every float output. Vectorizing the per-row epilogue
  // (log1p, exp, sqrt, divisions) matters when C is small or moderate.
  void finalize_lanes(int64_t i0, int64_t rows, const Vec& m, const Vec& v2, const Vec& i1,
                      const Vec& n_eq, const Vec& d_sub, const Vec& s1, const Vec& s2,
                      const Vec& z_y, const Vec& yv) const {
    const Vec one(1.f), zero(0.f), nan(std::numeric_limits<float>::quiet_NaN());
    const Vec dm1 = (n_eq - one) + d_sub;
    const Vec d = n_eq + d_sub;
    const Vec log_d = dm1.log1p();
    const Vec ignored = yv < zero;
    const Vec runner_up = Vec::blendv(m, v2, yv == i1);
    const Vec zy_is_max = z_y == m;
    const Vec e_y = exp_nonpositive(at::vec::clamp_min(z_y - m, Vec(kExpFloor)));
    const Vec one_minus_py = Vec::blendv(d - e_y, dm1, zy_is_max);
    // sum_{j != y} p_j^2 d^2 U and the norm as finalize_row computes them (s2 is scaled
    // by U = root^2 against underflow: row_scores.h)
    const Vec root(s2_root(0.f)), unit(s2_unit<float>());
    const Vec e_y_scaled = e_y * root;
    const Vec rest_sq = at::vec::clamp_min(
        Vec::blendv(at::vec::fmadd(n_eq, unit, s2) - e_y_scaled * e_y_scaled,
                    at::vec::fmadd(n_eq - one, unit, s2), zy_is_max), zero);
    const Vec g = one_minus_py * root;
    const Vec scaled_norm = at::vec::fmadd(g, g, rest_sq).sqrt() / root;
    const Vec plain_norm = at::vec::fmadd(one_minus_py, one_minus_py, rest_sq / unit).sqrt();
    const Vec norm = Vec::blendv(plain_norm, scaled_norm, scaled_norm < Vec(std::numeric_limits<float>::infinity()));
    const Vec grad_norm = at::vec::maximum(norm, one_minus_py) / d;  // >= 1 - p_y (row_scores.h)
    Vec::blendv((m - z_y) + log_d, zero, ignored).store(out->loss + i0, rows);
    (log_d - s1 / d).store(out->entropy + i0, rows);
    (m - v2).store(out->margin + i0, rows);
    Vec::blendv(z_y - runner_up, nan, ignored).store(out->true_margin + i0, rows);
    Vec::blendv(grad_norm, nan, ignored).store(out->grad_norm + i0, rows);
    (one / d).store(out->confidence + i0, rows);
    (m + log_d).store(out->lse + i0, rows);
  }

  // MMS of valid row i from its top-2 and margin v1 - v2 (as finalize_lanes computes it).
  void lane_mms(int64_t i, float v1, float v2, int64_t i1, int64_t i2, float* buf) const {
    if (mms->mode == kMmsNone) return;
    Top2<acc_t> top;
    top.v1 = v1; top.i1 = i1; top.v2 = v2; top.i2 = i2;
    RowScores<acc_t> rs;
    rs.valid = true;
    rs.margin = v1 - v2;
    rs.pred = i1;
    write_mms(i, base + i * row_stride, top, rs, buf);
  }

  // Row-wise vector passes for kLanes consecutive rows, then one vectorized epilogue.
  //
  // kMms: an MMS is asked for (a separate instance, so that the MMS code and its buffers
  // stay out of the plain scoring loop: sharing one function cost that loop ~7%).
  // reach_factor: the running estimate of candidate_floor (mms.h), one per thread.
  template <bool kMms>
  void score_row_group(int64_t i0, int64_t rows, const int64_t* y, float* buf, float& reach_factor) const {
    static_assert(std::is_same_v<acc_t, float>);
    alignas(64) float m[kLanes], v2[kLanes], i1[kLanes], n_eq[kLanes], d_sub[kLanes],
        s1[kLanes], s2[kLanes], zy[kLanes], yf[kLanes];
    bool ok[kLanes];
    // Float rows of one block: each row's pass 2 runs fused with the next row's pass 1.
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    const bool fused = kFloat && C <= kBlock;
    // Rows of one block list their MMS candidates in pass 2 (the pruned exact search needs
    // the columns within reach of the maximum, the others only the runner-up).
    const bool collect = kMms && C <= kBlock;  // fused, or one converted block
    const float floor_factor =
        mms->mode == kMmsExact && mms->weights.inv_dist == nullptr ? reach_factor : 1.f;
    RowCandidates candidates[kMms ? kLanes : 1];
    LaneMax pass1;  // pass 1 of the row scored next (fused path)
    if constexpr (kFloat) {
      if (fused && rows > 0) pass1.sweep(base + i0 * row_stride, C);
    }
    for (int64_t r = 0; r < kLanes; ++r) {
      SoftmaxState<float> st;
      Top2<float> top;
      if (r >= rows) {
        ok[r] = false;
      } else if (fused) {
        if constexpr (kFloat) {
          const LaneMax lanes = pass1;
          pass1 = LaneMax();
          const float* next = r + 1 < rows ? base + (i0 + r + 1) * row_stride : nullptr;
          ok[r] = score_row_fused(base + (i0 + r) * row_stride, C, lanes, next, pass1, st, top,
                                  collect ? &candidates[r] : nullptr, floor_factor);
        }
      } else {
        ok[r] = C < kMaxVectorClasses &&
                score_row_vectorized(base + (i0 + r) * row_stride, C, buf, st, top,
                                     collect ? &candidates[r] : nullptr, floor_factor);
      }
      if (!ok[r]) {  // placeholder lane, overwritten by the scalar path below
        st.m = 0.f; st.n_eq = 1.f; top.v1 = 0.f; top.v2 = 0.f; top.i1 = 0;
      } else if (!collect) {
        // now, while the row is in cache: the MMS sweeps it again (runner-up, candidates)
        lane_mms(i0 + r, top.v1, top.v2, top.i1, top.i2, buf);
      }
      m[r] = st.m; n_eq[r] = st.n_eq; d_sub[r] = st.d_sub; s1[r] = st.s1; s2[r] = st.s2;
      v2[r] = top.v2; i1[r] = static_cast<float>(top.i1);
      zy[r] = (ok[r] && y[r] >= 0) ? static_cast<float>(base[(i0 + r) * row_stride + y[r]]) : 0.f;
      yf[r] = static_cast<float>(r < rows ? y[r] : -1);
    }
    finalize_lanes(i0, rows, Vec::loadu(m), Vec::loadu(v2), Vec::loadu(i1), Vec::loadu(n_eq),
                   Vec::loadu(d_sub), Vec::loadu(s1), Vec::loadu(s2), Vec::loadu(zy), Vec::loadu(yf));
    if constexpr (kMms) {
      if (collect) group_mms(i0, rows, ok, m, v2, i1, candidates, reach_factor, buf);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      if (!ok[r]) {
        score_row(i, y[r], buf);
        continue;
      }
      out->pred[i] = static_cast<int64_t>(i1[r]);
    }
  }

  // Lane-wise path for small C: kLanes rows at once, one row per vector lane. The rows
  // are transposed into tbuf[j * kLanes + r] (float) and swept twice; top-2 indices are
  // tracked exactly (strictly greater wins, so the lowest index wins ties).
  void score_lanes(int64_t i0, int64_t rows, const int64_t* y, float* tbuf, float* buf) const {
    static_assert(std::is_same_v<acc_t, float>);
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < kLanes; ++r) {
      const scalar_t* row = base + (i0 + std::min(r, rows - 1)) * row_stride;
      for (int64_t j = 0; j < C; ++j) tbuf[j * kLanes + r] = static_cast<float>(row[j]);
    }
    Vec v1(kNegInf), v2(kNegInf), i1(-1.f), i2(-1.f), check(0.f);
    for (int64_t j = 0; j < C; ++j) {
      const Vec x = Vec::loadu(tbuf + j * kLanes);
      const Vec jv(static_cast<float>(j));
      const Vec gt1 = x > v1;
      const Vec gt2 = x > v2;
      v2 = Vec::blendv(v2, x, gt2);
      i2 = Vec::blendv(i2, jv, gt2);
      v2 = Vec::blendv(v2, v1, gt1);
      i2 = Vec::blendv(i2, i1, gt1);
      v1 = Vec::blendv(v1, x, gt1);
      i1 = Vec::blendv(i1, jv, gt1);
      check = check + x;
    }
    Vec d_sub(0.f), s1(0.f), s2(0.f);
    alignas(64) float n_eq_a[kLanes] = {}, zy_a[kLanes], yf_a[kLanes];
    for (int64_t j = 0; j < C; ++j) {
      uint32_t at_max = LaneSums::accumulate(Vec::loadu(tbuf + j * kLanes), v1, d_sub, s1, s2);
      for (; at_max != 0; at_max &= at_max - 1) n_eq_a[__builtin_ctz(at_max)] += 1.f;
    }
    for (int64_t r = 0; r < kLanes; ++r) {
      zy_a[r] = y[r] >= 0 ? tbuf[y[r] * kLanes + r] : 0.f;
      yf_a[r] = static_cast<float>(y[r]);
    }
    finalize_lanes(i0, rows, v1, v2, i1, Vec::loadu(n_eq_a), d_sub, s1, s2, Vec::loadu(zy_a),
                   Vec::loadu(yf_a));
    alignas(64) float m_a[kLanes], chk_a[kLanes], v2_a[kLanes], i1_a[kLanes], i2_a[kLanes], mms_a[kLanes];
    v1.store(m_a); check.store(chk_a); v2.store(v2_a); i1.store(i1_a); i2.store(i2_a);
    bool lane_mms_done = false;
#if defined(FASTSEL_VEC512)
    // 16 rows at once from the [C, C] inverse distances (mms.h); else per row (lane_mms)
    const auto* inv = static_cast<const float*>(mms->weights.inv_dist);
    if (inv != nullptr && mms->mode == kMmsExact && C <= kLaneMmsMaxClasses) {
      lanes_mms_gram(tbuf, C, inv, v1, v2, i1, i2).store(mms_a);
      lane_mms_done = true;
    } else if (inv != nullptr && mms->mode == kMmsTop2) {
      lanes_mms_top2(C, inv, v1, v2, i1, i2).store(mms_a);
      lane_mms_done = true;
    }
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      // NaN / +inf (non-finite check sum other than -inf) or no finite element
      const bool valid = m_a[r] > kNegInf &&
                         (chk_a[r] == kNegInf || (chk_a[r] > kNegInf && chk_a[r] < -kNegInf));
      if (!valid) {
        score_row(i, y[r], buf);  // exact semantics (and argmax of NaN rows) from the scalar path
        continue;
      }
      out->pred[i] = static_cast<int64_t>(i1_a[r]);
      if (lane_mms_done) {
        out->mms[i] = mms_a[r];
      } else {
        lane_mms(i, m_a[r], v2_a[r], static_cast<int64_t>(i1_a[r]), static_cast<int64_t>(i2_a[r]), buf);
      }
    }
  }
};

// Rows up to this many classes take the lane-wise path.
constexpr int64_t kLaneWiseMaxClasses = 128;

template <typename scalar_t, typename target_t>
void score_rows(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                const MmsInputs& mms, const OutputPointers<acc_type_t<scalar_t>>& out,
                std::atomic<int64_t>& first_bad_target) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t target_stride = target.stride(0);
  const target_t* tgt = target.const_data_ptr<target_t>();
  const RowJob<scalar_t> job{logits.const_data_ptr<scalar_t>(), logits.stride(0), C, &mms, &out};
  const bool lane_wise = std::is_same_v<acc_t, float> && C <= kLaneWiseMaxClasses;
  const int64_t group = std::is_same_v<acc_t, float> ? kLanes : 1;  // rows per epilogue
  const int64_t n_groups = (N + group - 1) / group;
  const int64_t grain = std::max<int64_t>(1, 16384 / (C * group));

  // Target index of row i: -1 for ignore_index; out-of-range values are recorded.
  auto target_of = [&](int64_t i) -> int64_t {
    const int64_t t = static_cast<int64_t>(tgt[i * target_stride]);
    if (t == ignore_index) return -1;
    if (t < 0 || t >= C) {
      int64_t expected = -1;
      first_bad_target.compare_exchange_strong(expected, i);
      return -1;
    }
    return t;
  };

  at::parallel_for(0, n_groups, grain, [&](int64_t g_begin, int64_t g_end) {
    std::vector<float> buf(kBlock);
    float reach_factor = kInitialReachFactor;
    std::vector<float> tbuf(lane_wise ? C * kLanes : 0);
    for (int64_t g = g_begin; g < g_end; ++g) {
      if constexpr (std::is_same_v<acc_t, float>) {
        const int64_t i0 = g * kLanes;
        const int64_t rows = std::min(kLanes, N - i0);
        int64_t y[kLanes];
        for (int64_t r = 0; r < kLanes; ++r) y[r] = r < rows ? target_of(i0 + r) : -1;
        if (lane_wise) {
          job.score_lanes(i0, rows, y, tbuf.data(), buf.data());
        } else {
          if (mms.mode != kMmsNone) {
            job.template score_row_group<true>(i0, rows, y, buf.data(), reach_factor);
          } else {
            job.template score_row_group<false>(i0, rows, y, buf.data(), reach_factor);
          }
        }
      } else {
        job.score_row(g, target_of(g), buf.data());
      }
    }
  });
}

// grad_norm of the most confident rows, again. The row pass keeps sum_j exp(2 (z_j - m))
// scaled by 2^100 (float) or 2^960 (double) (row_scores.h), which holds its precision
// while the largest term exp(z_j - m), j != y, is above ~2^-113 (2^-991); below, the
// squares are subnormal and grad_norm loses digits. A row there has 0 < loss < 2^-100
// (2^-960), its target the unique maximum: its grad_norm is recomputed in double from
// the row, relative to its largest competitor t = max_{j != y} z_j - z_y:
//   ||p - onehot(y)|| = exp(t) sqrt(R1^2 + R2) / d,  R1 = sum_{j != y} exp(z_j - z_y - t),
//   R2 = sum_{j != y} exp(2 (z_j - z_y - t)), d = 1 + exp(t) R1,
// where nothing underflows but the final product (rows of logits a margin of 70 apart in
// float32, 700 in float64; one more pass over each).
template <typename scalar_t, typename target_t>
void refine_confident_grad_norms(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                                 const OutputPointers<acc_type_t<scalar_t>>& out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const target_t* tgt = target.const_data_ptr<target_t>();
  const int64_t rs = logits.stride(0), ts = target.stride(0);
  const acc_t below = std::is_same_v<acc_t, float> ? acc_t(0x1p-100) : acc_t(0x1p-960);
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t loss = out.loss[i];
      if (!(loss > acc_t(0) && loss < below)) continue;  // NaN, ignored (0) and ordinary rows
      const int64_t y = static_cast<int64_t>(tgt[i * ts]);
      if (y == ignore_index) continue;
      const scalar_t* row = base + i * rs;
      const double zy = static_cast<double>(row[y]);
      double t = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < C; ++j) {
        if (j != y) t = std::max(t, static_cast<double>(row[j]) - zy);
      }
      double r1 = 0.0, r2 = 0.0;
      for (int64_t j = 0; j < C; ++j) {
        if (j == y) continue;
        const double e = std::exp((static_cast<double>(row[j]) - zy) - t);
        r1 += e;
        r2 += e * e;
      }
      const double top = std::exp(t);
      out.grad_norm[i] = static_cast<acc_t>(top * std::sqrt(r1 * r1 + r2) / (1.0 + top * r1));
    }
  });
}

// Raises the IndexError for the first row whose target is neither in [0, C) nor
// ignore_index (recorded by the row loops, so no separate pass over the targets).
void throw_if_bad_target(int64_t bad_row, const at::Tensor& target, int64_t C,
                         int64_t ignore_index, const char* op) {
  if (bad_row < 0) return;
  const int64_t value = target.scalar_type() == at::kLong ? target[bad_row].item<int64_t>()
                                                           : target[bad_row].item<int32_t>();
  TORCH_CHECK_INDEX(false, op, ": target[", bad_row, "] = ", value, " is outside [0, ", C,
                    ") and is not ignore_index (", ignore_index, ")");
}

}  // namespace
FASTSEL_ISA_END
}  // namespace fastsel::cpu

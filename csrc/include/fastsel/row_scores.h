// Per-row scoring math shared by the CPU and CUDA kernels (host/device inline).
//
// One read of a row z in R^C yields every score of docs/methods.md section 1 from two small
// pieces of state:
//
//   SoftmaxState, relative to the running maximum m:
//     n_eq  = #{j : z_j == m}                     (each contributes exp(0) = 1)
//     d_sub = sum_{z_j < m} exp(z_j - m)
//     s1    = sum_{z_j < m} exp(z_j - m) (z_j - m)            (<= 0)
//     s2    = sum_{z_j < m} exp(2 (z_j - m)) * U      (U = s2_unit: 2^100 in float, 2^960 in double)
//   so that d = sum_j exp(z_j - m) = n_eq + d_sub. s2 carries the factor U because the
//   squares of a confident row's terms underflow (exp(z_j - m) < 2^-63 in float): with it
//   grad_norm keeps its relative accuracy down to the smallest normal number. Keeping the maxima apart makes
//   d - 1 = (n_eq - 1) + d_sub exact, so log d = log1p(d - 1) and 1 - p_y stay accurate
//   for confident rows where p_(1) rounds to 1 (a plain sum would give loss 0 and
//   grad_norm 0 there). When m grows to m' every term is multiplied by exp(m - m')
//   (s2 by its square), the old maxima move into d_sub, and s1, being relative to m,
//   gains (m - m') times the old d:  s1' = (s1 + (m - m') d) exp(m - m').
//
//   Top2: the two largest values with their indices, lowest index first among ties.
//
// Then with L = log1p(d - 1):  lse = m + L,  loss = m - z_y + L,
//   entropy = L - s1 / d  (= lse - sum p_j z_j; both terms >= 0, no cancellation),
//   confidence = 1 / d,  ||p - onehot(y)||^2 = (1 - p_y)^2 + sum_{j != y} p_j^2, the first
//   term scaled by U as well.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTSEL_HD __host__ __device__ __forceinline__
#else
#define FASTSEL_HD inline
#endif

#include "fastsel/isa_namespace.h"
#include "fastsel/score_contract.h"

namespace fastsel {
FASTSEL_ISA_BEGIN

template <typename T>
FASTSEL_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }
template <typename T>
FASTSEL_HD T pos_inf() { return std::numeric_limits<T>::infinity(); }
template <typename T>
FASTSEL_HD T quiet_nan() { return std::numeric_limits<T>::quiet_NaN(); }

FASTSEL_HD float exp_(float x) { return expf(x); }
FASTSEL_HD double exp_(double x) { return exp(x); }
FASTSEL_HD float log1p_(float x) { return log1pf(x); }
FASTSEL_HD double log1p_(double x) { return log1p(x); }
FASTSEL_HD float sqrt_(float x) { return sqrtf(x); }
FASTSEL_HD double sqrt_(double x) { return sqrt(x); }

// sqrt(U) and U, the scale of SoftmaxState::s2 (see the top of this file). A sum of C
// terms of at most U stays finite for C < 2^27 (float) or 2^63 (double).
FASTSEL_HD float s2_root(float) { return 0x1p50f; }
FASTSEL_HD double s2_root(double) { return 0x1p480; }
template <typename T>
FASTSEL_HD T s2_unit() { return s2_root(T(0)) * s2_root(T(0)); }

// Online softmax statistics of one row (or part of a row) relative to its maximum m.
template <typename T>
struct SoftmaxState {
  T m = neg_inf<T>();
  T n_eq = 0;
  T d_sub = 0;
  T s1 = 0;
  T s2 = 0;

  // Moves the reference point from m to new_m >= m (new_m finite).
  FASTSEL_HD void rebase(T new_m) {
    if (m == neg_inf<T>()) {  // nothing accumulated yet
      m = new_m;
      return;
    }
    const T delta = m - new_m;  // <= 0; -inf when the span overflows (m = -1e308, new_m = 1e308)
    const T scale = exp_(delta);
    const T d_old = n_eq + d_sub;
    // scale == 0: the old terms vanish; (s1 + delta d_old) * 0 would be NaN for delta = -inf
    s1 = scale == T(0) ? T(0) : (s1 + delta * d_old) * scale;
    d_sub = d_old * scale;
    s2 = (s2 + n_eq * s2_unit<T>()) * scale * scale;
    n_eq = 0;
    m = new_m;
  }

  // Adds one value. -inf has zero probability and is skipped; NaN poisons d_sub and
  // +inf poisons m, which finalize() reports as an invalid row.
  FASTSEL_HD void push(T x) {
    if (x == neg_inf<T>()) return;
    if (x > m) {
      rebase(x);
      n_eq = 1;
    } else if (x == m) {
      n_eq += 1;
    } else {
      const T t = x - m;  // -inf when the span overflows: then e = 0 and so is its term
      const T e = exp_(t);
      d_sub += e;
      if (e != T(0)) s1 += e * t;
      const T scaled = e * s2_root(T(0));
      s2 += scaled * scaled;
    }
  }

  // Combines the statistics of two disjoint parts of a row.
  FASTSEL_HD void merge(const SoftmaxState& o) {
    if (o.m == neg_inf<T>()) {
      if (o.d_sub != o.d_sub) d_sub = o.d_sub;  // keep a NaN
      return;
    }
    SoftmaxState other = o;
    if (other.m > m) {
      rebase(other.m);
    } else if (other.m < m) {
      other.rebase(m);
    }
    n_eq += other.n_eq;
    d_sub += other.d_sub;
    s1 += other.s1;
    s2 += other.s2;
  }
};

// The two largest values of a row and their indices; among equal values the lower
// index ranks first, so i1 matches torch.argmax on rows without NaN. v2 stays -inf
// when the row has no runner-up (C = 1). Kernels that only need v2 may leave i2 unset.
template <typename T>
struct Top2 {
  T v1 = neg_inf<T>();
  T v2 = neg_inf<T>();
  int64_t i1 = -1;
  int64_t i2 = -1;

  FASTSEL_HD static bool before(T va, int64_t ia, T vb, int64_t ib) {
    // true when (va, ia) ranks strictly before (vb, ib); empty slots (index -1) rank last
    if (ib < 0) return ia >= 0;
    if (ia < 0) return false;
    return va > vb || (va == vb && ia < ib);
  }

  FASTSEL_HD void push(T x, int64_t j) {
    if (before(x, j, v1, i1)) {
      v2 = v1; i2 = i1; v1 = x; i1 = j;
    } else if (before(x, j, v2, i2)) {
      v2 = x; i2 = j;
    }
  }

  FASTSEL_HD void merge(const Top2& o) {
    push(o.v1, o.i1);
    if (o.i2 >= 0) push(o.v2, o.i2);
  }
};

// The scores of one row: a field per "row" output of the contract (fastsel/contract.py),
// the prediction, and whether the row was valid.
template <typename T>
struct RowScores {
#define FASTSEL_ROW_FIELD(name) T name;
  FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_FIELD)
#undef FASTSEL_ROW_FIELD
  int64_t pred;
  bool valid;

  template <typename U>
  FASTSEL_HD RowScores<U> cast() const {
    RowScores<U> r;
#define FASTSEL_ROW_CAST(name) r.name = static_cast<U>(name);
    FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_CAST)
#undef FASTSEL_ROW_CAST
    r.pred = pred;
    r.valid = valid;
    return r;
  }
};

// Turns the one-pass state of a row into its scores.
//   z_y:      the target logit (any value when ignored)
//   y:        the target index, or -1 when the row's target is ignore_index
//   c:        number of classes
template <typename T>
FASTSEL_HD RowScores<T> finalize_row(const SoftmaxState<T>& s, const Top2<T>& top, T z_y, int64_t y) {
  RowScores<T> r;
  const T nan = quiet_nan<T>();
  const T inf = pos_inf<T>();
  r.pred = top.i1 < 0 ? 0 : top.i1;
  // Invalid: no finite maximum (all -inf, or +inf present) or a NaN reached the sums.
  r.valid = (s.m > neg_inf<T>()) && (s.m < inf) && (s.d_sub == s.d_sub) && (s.s1 == s.s1);
  if (!r.valid) {
#define FASTSEL_ROW_NAN(name) r.name = nan;
    FASTSEL_ROW_OUTPUTS(FASTSEL_ROW_NAN)
#undef FASTSEL_ROW_NAN
    r.loss = y < 0 ? T(0) : nan;
    return r;
  }
  const T dm1 = (s.n_eq - T(1)) + s.d_sub;  // d - 1, exact for the maxima
  const T d = s.n_eq + s.d_sub;
  const T log_d = log1p_(dm1);
  r.lse = s.m + log_d;
  r.entropy = log_d - s.s1 / d;
  r.confidence = T(1) / d;
  r.margin = top.v1 - top.v2;  // v2 = -inf without a runner-up (C = 1): +inf
  if (y < 0) {
    r.loss = T(0);
    r.true_margin = nan;
    r.grad_norm = nan;
    return r;
  }
  r.loss = (s.m - z_y) + log_d;
  const T runner_up = (y == top.i1) ? top.v2 : top.v1;
  r.true_margin = z_y - runner_up;
  // 1 - p_y times d, and sum_{j != y} p_j^2 times d^2 U
  const T root = s2_root(T(0)), unit = root * root;
  T one_minus_py, rest_sq;
  if (z_y == s.m) {
    one_minus_py = dm1;
    rest_sq = (s.n_eq - T(1)) * unit + s.s2;
  } else {
    const T e_y = exp_(z_y - s.m);  // < 1, so d - e_y >= 1: no cancellation
    one_minus_py = d - e_y;
    const T scaled = e_y * root;
    rest_sq = (s.n_eq * unit + s.s2) - scaled * scaled;
  }
  if (rest_sq < T(0)) rest_sq = T(0);
  const T g = one_minus_py * root;
  T norm = sqrt_(g * g + rest_sq) / root;
  // (1 - p_y) d above 2^14 (float; 2^32 double) squares past the range once scaled: unscaled
  if (!(norm < inf)) norm = sqrt_(one_minus_py * one_minus_py + rest_sq / unit);
  // >= 1 - p_y, which it stays where even the scaled squares underflow (1 - p_y below
  // ~1e-30 in float, 1e-150 in double: within sqrt(2) there)
  r.grad_norm = (norm > one_minus_py ? norm : one_minus_py) / d;
  return r;
}

// One competitor's term of the Minimal Margin Score: the displacement of the features
// along (w_a - w_j) that makes class j tie with the prediction a. diff = z_a - z_j >= 0,
// inv_dist = 1 / ||w_a - w_j|| (inf for identical rows). A tie is already on the
// boundary: 0 whatever the distance.
template <typename T>
FASTSEL_HD T mms_term(T diff, T inv_dist) {
  return diff == T(0) ? T(0) : diff * inv_dist;
}

// Inverse distance from squared norms and the dot product (Gram-matrix form).
template <typename T>
FASTSEL_HD T inv_distance(T sq_a, T sq_j, T dot_aj) {
  T d2 = sq_a + sq_j - T(2) * dot_aj;
  if (d2 < T(0)) d2 = T(0);
  return T(1) / sqrt_(d2);  // 1/0 = inf for identical rows
}

FASTSEL_ISA_END
}  // namespace fastsel

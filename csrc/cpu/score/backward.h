// The backward of the scoring op: g * (softmax(z) - onehot(y)) per row from the saved
// lse, vectorized, written into buffers of the large-block allocator (large_alloc.h).
#pragma once

#include "exp.h"

namespace fastsel::cpu {
FASTSEL_ISA_BEGIN
namespace {

// grad[j] = g * exp(z_j - lse) - g * [j == y], vectorized over a float row.
inline void softmax_minus_onehot(const float* z, float* grad, int64_t n, float lse, float g) {
  const Vec lv(lse), gv(g);
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    ((Vec::loadu(z + k) - lv).exp_u20() * gv).store(grad + k);
  }
  for (; k < n; ++k) grad[k] = std::exp(z[k] - lse) * g;
}

// The same with lse = m + log_d kept in two parts: p_j = exp((z_j - m) - log_d).
inline void softmax_minus_onehot_split(const float* z, float* grad, int64_t n, float m, float log_d, float g) {
  const Vec mv(m), lv(log_d), gv(g);
  int64_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    (((Vec::loadu(z + k) - mv) - lv).exp_u20() * gv).store(grad + k);
  }
  for (; k < n; ++k) grad[k] = std::exp((z[k] - m) - log_d) * g;
}

// exp(z_j - lse) takes the rounding of lse, ulp(lse) / 2, as a relative error of p_j:
// nothing for ordinary rows, but at |lse| >= 64 it exceeds 4e-6 in float (7e-15 in
// double), and where ulp(lse) passes log d (ties at 1e308: lse rounds to the maximum, p_j
// to 1 instead of 1/2) it is all of p_j. Such rows recompute the maximum m and
// log d = log sum_j exp(z_j - m) (two more passes) and use exp((z_j - m) - log d), as
// log_softmax does.
constexpr float kSplitLseFrom = 64.f;

// (m, log d) of a row given as float blocks: blocks(visit) calls visit(x, n) per block.
template <typename Blocks>
std::pair<float, float> max_and_log_d(Blocks&& blocks) {
  float m = -std::numeric_limits<float>::infinity();
  blocks([&](const float* x, int64_t n) {
    Vec acc(m);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) acc = at::vec::maximum(acc, Vec::loadu(x + k));
    float r = hmax(acc);
    for (; k < n; ++k) r = std::max(r, x[k]);
    m = std::max(m, r);
  });
  double d = 0.0;  // double across blocks: the row may be wider than 2^24
  blocks([&](const float* x, int64_t n) {
    const Vec mv(m);
    Vec acc(0.f);
    int64_t k = 0;
    for (; k + kLanes <= n; k += kLanes) acc = acc + (Vec::loadu(x + k) - mv).exp_u20();
    double part = hsum(acc);
    for (; k < n; ++k) part += std::exp(x[k] - m);
    d += part;
  });
  return {m, static_cast<float>(std::log(d))};
}

template <typename scalar_t, typename target_t>
void backward_rows(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                   const at::Tensor& lse, int64_t ignore_index, at::Tensor& grad,
                   std::atomic<int64_t>& first_bad_target) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t N = logits.size(0), C = logits.size(1);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const acc_t* g = grad_loss.const_data_ptr<acc_t>();
  const acc_t* l = lse.const_data_ptr<acc_t>();
  const target_t* tgt = target.const_data_ptr<target_t>();
  const int64_t zs = logits.stride(0), gs = grad_loss.stride(0), ls = lse.stride(0),
                ts = target.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / C);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> zf, gf;
    if constexpr (!std::is_same_v<scalar_t, float> && !std::is_same_v<scalar_t, double>) {
      zf.resize(std::min(C, kBlock));
      gf.resize(std::min(C, kBlock));
    }
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* zr = z + i * zs;
      scalar_t* gr = out + i * C;
      const int64_t t = static_cast<int64_t>(tgt[i * ts]);
      if (t == ignore_index || t < 0 || t >= C) {
        if (t != ignore_index) {  // reported after the loop
          int64_t expected = -1;
          first_bad_target.compare_exchange_strong(expected, i);
        }
        std::memset(static_cast<void*>(gr), 0, sizeof(scalar_t) * C);
        continue;
      }
      const acc_t gi = g[i * gs];
      const acc_t li = l[i * ls];
      if constexpr (std::is_same_v<scalar_t, double>) {
        if (std::abs(li) < kSplitLseFrom || li != li) {  // NaN lse (an invalid row): NaN, as its loss
          for (int64_t j = 0; j < C; ++j) gr[j] = std::exp(zr[j] - li) * gi;
        } else {
          double m = -std::numeric_limits<double>::infinity(), d = 0.0;
          for (int64_t j = 0; j < C; ++j) m = std::max(m, zr[j]);
          for (int64_t j = 0; j < C; ++j) d += std::exp(zr[j] - m);
          const double log_d = std::log(d);
          for (int64_t j = 0; j < C; ++j) gr[j] = std::exp((zr[j] - m) - log_d) * gi;
        }
        gr[t] -= gi;
      } else if constexpr (std::is_same_v<scalar_t, float>) {
        if (std::abs(li) < kSplitLseFrom || li != li) {
          softmax_minus_onehot(zr, gr, C, li, gi);
        } else {
          const auto [m, log_d] = max_and_log_d([&](auto&& visit) { visit(zr, C); });
          softmax_minus_onehot_split(zr, gr, C, m, log_d, gi);
        }
        gr[t] -= gi;
      } else {
        const bool split = !(std::abs(li) < kSplitLseFrom) && li == li;
        float m = 0.f, log_d = 0.f;
        if (split) {
          std::tie(m, log_d) = max_and_log_d([&](auto&& visit) {
            for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
              const int64_t n = std::min(kBlock, C - j0);
              to_float(zr + j0, zf.data(), n);
              visit(zf.data(), n);
            }
          });
        }
        for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
          const int64_t n = std::min(kBlock, C - j0);
          to_float(zr + j0, zf.data(), n);
          if (split) {
            softmax_minus_onehot_split(zf.data(), gf.data(), n, m, log_d, gi);
          } else {
            softmax_minus_onehot(zf.data(), gf.data(), n, li, gi);
          }
          if (t >= j0 && t < j0 + n) gf[t - j0] -= gi;
          from_float(gf.data(), gr + j0, n);
        }
      }
    }
  });
}

}  // namespace
FASTSEL_ISA_END
}  // namespace fastsel::cpu

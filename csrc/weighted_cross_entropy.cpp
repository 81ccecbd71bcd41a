// Weighted cross-entropy, C++/OpenMP CPU kernels (reference: utilgen/ops/weighted_cross_entropy.py).
//
// Forward, per row i of logits z (N, K):
//   m = max_k z_k;  S = sum_k e^{z_k - m};  lse = m + log S;  l_i = lse - z_{y_i}
//   s_i = (sum_k e^{z_k - m} u_k) / S - u_{y_i}            (only with a tangent u)
// With a gradient buffer the forward also writes, per row,
//   G_ik = c_i (e^{z_k - lse} - [k == y_i]),   c_i = scale w_i  (scale = 1/N for mean),
// and autograd's backward only multiplies G by grad_output. On CPU the exp is
// the cost (memory is not: see csrc/fast_math.h), so computing the softmax once
// instead of again in the backward halves the exps; the GPU kernels, which are
// bandwidth-bound, recompute instead. Rows are independent: threads take
// contiguous row ranges, and a row (K floats) stays in L1 across its passes.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "fast_math.h"
#include "ops.h"
#include "weighted_cross_entropy.h"

namespace py = pybind11;

namespace utilgen {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct RowResult {
  float lse;
  float loss;
  float directional;
};

// Row loops. The compiler's vectorised loops end in a scalar remainder, and
// for short rows its set-up and remainder dominated: K=10 rows took 101 ns,
// K=100 rows 99 ns (one thread, 2-core CI Xeon, AVX-512). So rows of at least
// one block run whole blocks, then one more block aligned to the row's end
// that overlaps the body (harmless for a max and for recomputed stores; sums
// mask the overlap), and shorter rows run plain scalar loops: K=10 rows now
// take 22 ns, K=100 rows 73 ns; K=1000 is unchanged.
constexpr std::int64_t kBlock = 16;

inline float row_max(const float* z, std::int64_t k) {
  float m = -std::numeric_limits<float>::infinity();
  if (k < kBlock) {
    for (std::int64_t j = 0; j < k; ++j) m = z[j] > m ? z[j] : m;
    return m;
  }
  const std::int64_t body = k - k % kBlock;
  // The ternary, not std::max: std::max compiled to a scalar chain, 6x slower.
#pragma omp simd reduction(max : m)
  for (std::int64_t j = 0; j < body; ++j) m = z[j] > m ? z[j] : m;
  const float* last = z + (k - kBlock);
#pragma omp simd reduction(max : m)
  for (std::int64_t j = 0; j < kBlock; ++j) m = last[j] > m ? last[j] : m;
  return m;
}

// sum_j e^{z_j - m}, storing the terms in `out` when given.
inline float sum_exp_shifted(const float* z, float m, std::int64_t k, float* out) {
  float sum = 0.0f;
  if (k < kBlock) {
    for (std::int64_t j = 0; j < k; ++j) {
      const float e = exp_nonpositive(z[j] - m);
      if (out) out[j] = e;
      sum += e;
    }
    return sum;
  }
  const std::int64_t body = k - k % kBlock;
  const std::int64_t start = k - kBlock;  // the last block, overlapping the body
  const float* z_last = z + start;
  if (out != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (std::int64_t j = 0; j < body; ++j) {
      out[j] = exp_nonpositive(z[j] - m);
      sum += out[j];
    }
    if (body < k) {
      float* out_last = out + start;
#pragma omp simd reduction(+ : sum)
      for (std::int64_t j = 0; j < kBlock; ++j) {
        const float e = exp_nonpositive(z_last[j] - m);
        out_last[j] = e;
        sum += start + j >= body ? e : 0.0f;
      }
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (std::int64_t j = 0; j < body; ++j) sum += exp_nonpositive(z[j] - m);
    if (body < k) {
#pragma omp simd reduction(+ : sum)
      for (std::int64_t j = 0; j < kBlock; ++j) {
        const float e = exp_nonpositive(z_last[j] - m);
        sum += start + j >= body ? e : 0.0f;
      }
    }
  }
  return sum;
}

// g_j *= c (each element once: the overlapping block keeps the body's values).
inline void scale_row(float* g, float c, std::int64_t k) {
  if (k < kBlock) {
    for (std::int64_t j = 0; j < k; ++j) g[j] *= c;
    return;
  }
  const std::int64_t body = k - k % kBlock;
#pragma omp simd
  for (std::int64_t j = 0; j < body; ++j) g[j] *= c;
  if (body < k) {
    const std::int64_t start = k - kBlock;
    float* g_last = g + start;
#pragma omp simd
    for (std::int64_t j = 0; j < kBlock; ++j) g_last[j] = start + j >= body ? g_last[j] * c : g_last[j];
  }
}

// One row's statistics (and, with `grad`, its gradient row). Non-finite
// logits give what torch gives: -inf (a masked class) contributes e^{-inf} = 0;
// +inf, or a row of only -inf, makes the row NaN (checked on the maximum);
// a NaN logit is skipped by the maximum but turns its e^{z - m}, and so the
// sum, the loss and the gradient row, into NaN. (A separate non-finite count
// in the max loop cost ~20 of ~100 ns per K=100 row.)
inline RowResult forward_row(const float* z, const float* u, std::int64_t k, std::int64_t y, float* grad,
                             float grad_scale) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const float m = row_max(z, k);
  if (m == kInf || m == -kInf) {
    if (grad) std::fill(grad, grad + k, kNaN);
    return {kNaN, kNaN, kNaN};
  }
  const float sum = sum_exp_shifted(z, m, k, grad);  // grad (if any) now holds e^{z - m}
  float tangent_sum = 0.0f;
  if (u != nullptr) {  // the meta-gradient path: plain loops suffice
#pragma omp simd reduction(+ : tangent_sum)
    for (std::int64_t j = 0; j < k; ++j) tangent_sum += (grad ? grad[j] : exp_nonpositive(z[j] - m)) * u[j];
  }
  if (grad != nullptr) {
    scale_row(grad, grad_scale / sum, k);
    grad[y] -= grad_scale;
  }
  const float lse = m + std::log(sum);
  const float directional = u == nullptr ? 0.0f : tangent_sum / sum - u[y];
  return {lse, lse - z[y], directional};
}

// Rows [begin, end) of the forward. Returns the sum of w_i l_i (double, so the
// mean over large N does not drift) and records the first invalid target.
UTILGEN_SIMD_CLONES
double forward_rows(const float* logits, const std::int64_t* target, const float* weight, const float* tangent,
                    std::int64_t begin, std::int64_t end, std::int64_t k, Reduction reduction, float grad_scale,
                    float* loss, float* per_sample, float* lse, float* directional, float* grad,
                    std::atomic<std::int64_t>& bad_row) {
  double weighted_sum = 0.0;
  for (std::int64_t i = begin; i < end; ++i) {
    const std::int64_t y = target[i];
    if (y < 0 || y >= k) {
      std::int64_t expected = -1;
      bad_row.compare_exchange_strong(expected, i);
      per_sample[i] = lse[i] = kNaN;
      if (directional) directional[i] = kNaN;
      if (reduction == Reduction::kNone) loss[i] = kNaN;
      if (grad) std::fill(grad + i * k, grad + (i + 1) * k, kNaN);
      continue;
    }
    const RowResult row = forward_row(logits + i * k, tangent ? tangent + i * k : nullptr, k, y,
                                      grad ? grad + i * k : nullptr, grad_scale * weight[i]);
    per_sample[i] = row.loss;
    lse[i] = row.lse;
    if (directional) directional[i] = row.directional;
    const float weighted = weight[i] * row.loss;
    if (reduction == Reduction::kNone) loss[i] = weighted;
    weighted_sum += weighted;
  }
  return weighted_sum;
}

void weighted_cross_entropy_fwd_cpu(std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight,
                                    std::uintptr_t tangent, std::int64_t n, std::int64_t k, int reduction_code,
                                    std::uintptr_t loss, std::uintptr_t per_sample, std::uintptr_t lse,
                                    std::uintptr_t directional, std::uintptr_t grad_logits, int num_threads) {
  UTILGEN_CHECK(n > 0 && k > 0, "weighted_cross_entropy_fwd_cpu: logits must be non-empty, got N=" << n << ", K=" << k);
  UTILGEN_CHECK(is_reduction(reduction_code),
                "weighted_cross_entropy_fwd_cpu: reduction code " << reduction_code << " is not a utilgen._C.Reduction value");
  const Reduction reduction = static_cast<Reduction>(reduction_code);
  UTILGEN_CHECK_PTR(logits, "logits");
  UTILGEN_CHECK_PTR(target, "target");
  UTILGEN_CHECK_PTR(weight, "weight");
  UTILGEN_CHECK_PTR(loss, "loss");
  UTILGEN_CHECK_PTR(per_sample, "per_sample");
  UTILGEN_CHECK_PTR(lse, "lse");
  UTILGEN_CHECK(tangent == 0 || directional != 0, "weighted_cross_entropy_fwd_cpu: a tangent needs a directional output");

  const float* z = as_ptr<const float>(logits);
  const std::int64_t* y = as_ptr<const std::int64_t>(target);
  const float* w = as_ptr<const float>(weight);
  const float* u = tangent ? as_ptr<const float>(tangent) : nullptr;
  float* loss_out = as_ptr<float>(loss);
  float* directional_out = tangent ? as_ptr<float>(directional) : nullptr;
  float* grad = grad_logits ? as_ptr<float>(grad_logits) : nullptr;
  const float grad_scale = reduction == Reduction::kMean ? 1.0f / static_cast<float>(n) : 1.0f;

  // Fixed row chunks, one partial sum each, added in chunk order: the loss is
  // deterministic for a given thread count.
  const std::int64_t chunks = std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, n / 16));
  std::vector<double> partial(chunks, 0.0);
  std::atomic<std::int64_t> bad_row{-1};
  parallel_for(chunks, num_threads, 1, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t c = first; c < last; ++c) {
      partial[c] = forward_rows(z, y, w, u, n * c / chunks, n * (c + 1) / chunks, k, reduction, grad_scale,
                                loss_out, as_ptr<float>(per_sample), as_ptr<float>(lse), directional_out, grad,
                                bad_row);
    }
  });
  if (bad_row.load() >= 0) {
    const std::int64_t row = bad_row.load();
    UTILGEN_CHECK(false, "weighted_cross_entropy: target[" << row << "] = " << y[row] << " is not a class index in [0, "
                                                           << k << ")");
  }
  if (reduction != Reduction::kNone) {
    double total = 0.0;
    for (double p : partial) total += p;
    *loss_out = static_cast<float>(reduction == Reduction::kMean ? total / static_cast<double>(n) : total);
  }
}

}  // namespace

void register_weighted_cross_entropy(py::module_& m) {
  py::enum_<Reduction>(m, "Reduction", "weighted_cross_entropy's reduction codes (csrc/weighted_cross_entropy.h)")
      .value("none", Reduction::kNone)
      .value("mean", Reduction::kMean)
      .value("sum", Reduction::kSum);
  m.def("weighted_cross_entropy_fwd_cpu", &weighted_cross_entropy_fwd_cpu, py::arg("logits"), py::arg("target"),
        py::arg("weight"), py::arg("tangent"), py::arg("n"), py::arg("k"), py::arg("reduction"), py::arg("loss"),
        py::arg("per_sample"), py::arg("lse"), py::arg("directional"), py::arg("grad_logits"),
        py::arg("num_threads"),
        "Weighted cross-entropy forward on float32 CPU buffers (pointers as ints; tangent, directional and "
        "grad_logits 0 = absent). With grad_logits it also writes d loss / d logits for grad_output = 1.",
        py::call_guard<py::gil_scoped_release>());
#ifdef UTILGEN_WITH_CUDA
  m.def("weighted_cross_entropy_cuda_blocks", &weighted_cross_entropy_cuda_blocks, py::arg("n"),
        "Blocks the CUDA forward launches for N rows (size of its partial-sum workspace)");
  m.def("weighted_cross_entropy_fwd_cuda", &weighted_cross_entropy_fwd_cuda, py::arg("logits"), py::arg("target"),
        py::arg("weight"), py::arg("tangent"), py::arg("n"), py::arg("k"), py::arg("reduction"), py::arg("dtype"),
        py::arg("loss"), py::arg("per_sample"), py::arg("lse"), py::arg("directional"), py::arg("partials"),
        py::arg("counter"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("weighted_cross_entropy_bwd_cuda", &weighted_cross_entropy_bwd_cuda, py::arg("grad_loss"),
        py::arg("grad_per_row"), py::arg("scale"), py::arg("logits"), py::arg("target"), py::arg("weight"),
        py::arg("per_sample"), py::arg("lse"), py::arg("n"), py::arg("k"), py::arg("dtype"), py::arg("grad_logits"),
        py::arg("grad_weight"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace utilgen

// logit_hvp CPU kernel (C++/OpenMP) and the pybind11 bindings of the op.
//
//   out_i = w_i * (p_i * v_i - p_i * <p_i, v_i>),   p_i = softmax(z_i)      row i of (N, K)
//
// One row at a time, three passes over a row that stays in L1/L2 (K = 1000 is
// 4 KB per operand): max; exp(z - max) written into `out` while summing it and
// its dot with v; then the scaled write. One exp per element, rows in parallel.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"
#include "fast_math.h"
#include "logit_hvp.h"
#include "ops.h"

namespace py = pybind11;

namespace utilgen {
namespace {

UTILGEN_SIMD_CLONES
void exp_nonpositive_array(const float* x, float* y, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) y[j] = exp_nonpositive(x[j]);
}

// Rows [begin, end) of the op. `weight` may be null (all ones).
UTILGEN_SIMD_CLONES
void logit_hvp_rows(const float* logits, const float* v, const float* weight, float* out, std::int64_t begin,
                    std::int64_t end, std::int64_t k) {
  for (std::int64_t i = begin; i < end; ++i) {
    const float* z = logits + i * k;  // (K,)
    const float* vi = v + i * k;      // (K,)
    float* oi = out + i * k;          // (K,)

    float row_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : row_max)
    for (std::int64_t j = 0; j < k; ++j) row_max = z[j] > row_max ? z[j] : row_max;

    // oi holds the unnormalised probabilities until the last pass.
    float sum_exp = 0.0f, dot_exp_v = 0.0f;
#pragma omp simd reduction(+ : sum_exp, dot_exp_v)
    for (std::int64_t j = 0; j < k; ++j) {
      const float e = exp_nonpositive(z[j] - row_max);
      oi[j] = e;
      sum_exp += e;
      dot_exp_v += e * vi[j];
    }

    const float inv_sum = 1.0f / sum_exp;
    const float p_dot_v = dot_exp_v * inv_sum;  // <p_i, v_i>
    const float scale = (weight == nullptr ? 1.0f : weight[i]) * inv_sum;
#pragma omp simd
    for (std::int64_t j = 0; j < k; ++j) oi[j] = scale * oi[j] * (vi[j] - p_dot_v);
  }
}

}  // namespace

void logit_hvp_fwd_cpu(std::uintptr_t logits, std::uintptr_t v, std::uintptr_t weight, std::int64_t n,
                       std::int64_t k, std::uintptr_t out, int num_threads) {
  UTILGEN_CHECK(n > 0 && k > 0, "logit_hvp_fwd_cpu: logits must be a non-empty (N, K) tensor, got N=" << n
                                                                                                     << ", K=" << k);
  UTILGEN_CHECK(num_threads >= 1, "logit_hvp_fwd_cpu: num_threads must be >= 1, got " << num_threads);
  UTILGEN_CHECK_PTR(logits, "logit_hvp_fwd_cpu: logits");
  UTILGEN_CHECK_PTR(v, "logit_hvp_fwd_cpu: v");
  UTILGEN_CHECK_PTR(out, "logit_hvp_fwd_cpu: out");
  const float* logits_p = as_ptr<const float>(logits);
  const float* v_p = as_ptr<const float>(v);
  const float* weight_p = weight == 0 ? nullptr : as_ptr<const float>(weight);
  float* out_p = as_ptr<float>(out);
  // ~32K elements per chunk: below that, waking a second thread costs more
  // than the row work it takes over.
  const std::int64_t grain_rows = std::max<std::int64_t>(1, 32768 / k);
  py::gil_scoped_release release;
  parallel_for(n, num_threads, grain_rows, [&](std::int64_t begin, std::int64_t end) {
    logit_hvp_rows(logits_p, v_p, weight_p, out_p, begin, end, k);
  });
}

void register_logit_hvp(py::module_& m) {
  m.def("logit_hvp_fwd_cpu", &logit_hvp_fwd_cpu, py::arg("logits"), py::arg("v"), py::arg("weight"), py::arg("n"),
        py::arg("k"), py::arg("out"), py::arg("num_threads"),
        "out (N, K) float32 = w * (p * v - p * <p, v>) per row, p = softmax(logits); weight=0 means all ones");
  m.def(
      "logit_hvp_exp_cpu",
      [](std::uintptr_t x, std::uintptr_t y, std::int64_t n) {
        UTILGEN_CHECK_PTR(x, "logit_hvp_exp_cpu: x");
        UTILGEN_CHECK_PTR(y, "logit_hvp_exp_cpu: y");
        UTILGEN_CHECK(n >= 0, "logit_hvp_exp_cpu: n must be >= 0, got " << n);
        exp_nonpositive_array(as_ptr<const float>(x), as_ptr<float>(y), n);
      },
      py::arg("x"), py::arg("y"), py::arg("n"),
      "The kernel's vectorised exp on a float32 buffer (exposed so tests can bound its error)");
#ifdef UTILGEN_WITH_CUDA
  m.def("logit_hvp_fwd_cuda", &logit_hvp_fwd_cuda, py::arg("logits"), py::arg("v"), py::arg("weight"), py::arg("n"),
        py::arg("k"), py::arg("dtype"), py::arg("out"), py::arg("stream"),
        "CUDA launch of logit_hvp on `stream` (asynchronous); weight=0 means all ones");
#endif
}

}  // namespace utilgen

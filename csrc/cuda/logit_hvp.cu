// logit_hvp CUDA kernel: one warp per row, fp32 math for fp32/fp16/bf16 inputs.
//
//   out_i = w_i * (p_i * v_i - p_i * <p_i, v_i>),   p_i = softmax(z_i)
//
// Pass 1 streams the row once with an online softmax: each lane keeps a
// running max m, s = sum exp(z - m) and d = sum exp(z - m) v over its strided
// columns, rescaling both when m grows; a butterfly of warp shuffles merges
// the 32 partial states, leaving every lane with <p, v> = d / s. Pass 2 reads
// the row again and writes the output: two reads of (z, v), one write, nothing
// stored in between, no shared memory, no host synchronisation.
//
// A warp per row keeps loads coalesced for the K of classifiers (10 to a few
// thousand classes); for K < 32 lanes idle, which only matters when N*K is too
// small to be worth a launch anyway.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../logit_hvp.h"
#include "cuda_common.cuh"
#include "online_softmax.cuh"

namespace utilgen {
namespace {

using online_softmax::kFullMask;
using online_softmax::kWarp;
using online_softmax::SoftmaxDotState;
constexpr int kRowsPerBlock = 8;  // 256 threads

template <typename T>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
    logit_hvp_fwd_kernel(const T* __restrict__ logits, const T* __restrict__ v, const float* __restrict__ weight,
                         T* __restrict__ out, std::int64_t n, std::int64_t k) {
  const int lane = threadIdx.x % kWarp;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (row >= n) return;  // the whole warp leaves together: shuffles below stay full-mask
  const T* z_row = logits + row * k;  // (K,)
  const T* v_row = v + row * k;       // (K,)
  T* out_row = out + row * k;         // (K,)

  SoftmaxDotState state{-INFINITY, 0.0f, 0.0f};
  for (std::int64_t j = lane; j < k; j += kWarp) {
    online_softmax::absorb(state, load_as_float(z_row, j), load_as_float(v_row, j));
  }
  state = online_softmax::warp_allreduce(state);
  // A single +inf logit leaves max = +inf with a finite sum, so only its own
  // column would turn NaN; torch (and the CPU/Triton kernels) make the row NaN.
  if (state.max == INFINITY) state.sum_exp = NAN;

  const float inv_sum = 1.0f / state.sum_exp;
  const float p_dot_v = state.dot_exp * inv_sum;  // <p_i, v_i>
  const float scale = (weight == nullptr ? 1.0f : weight[row]) * inv_sum;
  for (std::int64_t j = lane; j < k; j += kWarp) {
    const float e = expf(load_as_float(z_row, j) - state.max);
    store_from_float(out_row, j, scale * e * (load_as_float(v_row, j) - p_dot_v));
  }
}

}  // namespace

void logit_hvp_fwd_cuda(std::uintptr_t logits, std::uintptr_t v, std::uintptr_t weight, std::int64_t n,
                        std::int64_t k, int dtype, std::uintptr_t out, std::uintptr_t stream) {
  UTILGEN_CHECK(n > 0 && k > 0, "logit_hvp_fwd_cuda: logits must be a non-empty (N, K) tensor, got N=" << n
                                                                                                      << ", K=" << k);
  UTILGEN_CHECK_PTR(logits, "logit_hvp_fwd_cuda: logits");
  UTILGEN_CHECK_PTR(v, "logit_hvp_fwd_cuda: v");
  UTILGEN_CHECK_PTR(out, "logit_hvp_fwd_cuda: out");
  const std::int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
  UTILGEN_CHECK(blocks <= 0x7fffffff, "logit_hvp_fwd_cuda: N=" << n << " rows exceed the grid limit; split the batch");
  const float* weight_p = weight == 0 ? nullptr : as_ptr<const float>(weight);
  dispatch_floating(dtype, "logit_hvp_fwd_cuda", [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    logit_hvp_fwd_kernel<T><<<static_cast<unsigned>(blocks), kWarp * kRowsPerBlock, 0, as_stream(stream)>>>(
        as_ptr<const T>(logits), as_ptr<const T>(v), weight_p, as_ptr<T>(out), n, k);
  });
  check_launch("logit_hvp_fwd_kernel");
}

}  // namespace utilgen

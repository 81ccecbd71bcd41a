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

namespace utilgen {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 256 threads
constexpr unsigned kFullMask = 0xffffffffu;

struct SoftmaxDotState {
  float max;      // running max of the row's logits seen so far
  float sum_exp;  // sum exp(z - max)
  float dot_exp;  // sum exp(z - max) * v
};

// exp(a - b) where a = -inf means "nothing seen yet" (contributes 0).
__device__ __forceinline__ float rescale_factor(float old_max, float new_max) {
  return old_max == -INFINITY ? 0.0f : expf(old_max - new_max);
}

__device__ __forceinline__ void absorb(SoftmaxDotState& state, float z, float v) {
  if (z == -INFINITY) return;  // probability exactly 0 (masked class)
  if (z > state.max) {
    const float factor = rescale_factor(state.max, z);
    state.sum_exp = state.sum_exp * factor + 1.0f;
    state.dot_exp = state.dot_exp * factor + v;
    state.max = z;
  } else {
    const float e = expf(z - state.max);
    state.sum_exp += e;
    state.dot_exp += e * v;
  }
}

__device__ __forceinline__ SoftmaxDotState merge(const SoftmaxDotState& a, const SoftmaxDotState& b) {
  const float new_max = fmaxf(a.max, b.max);
  const float fa = rescale_factor(a.max, new_max);
  const float fb = rescale_factor(b.max, new_max);
  return {new_max, a.sum_exp * fa + b.sum_exp * fb, a.dot_exp * fa + b.dot_exp * fb};
}

__device__ __forceinline__ SoftmaxDotState warp_allreduce(SoftmaxDotState state) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    SoftmaxDotState other;
    other.max = __shfl_xor_sync(kFullMask, state.max, offset);
    other.sum_exp = __shfl_xor_sync(kFullMask, state.sum_exp, offset);
    other.dot_exp = __shfl_xor_sync(kFullMask, state.dot_exp, offset);
    state = merge(state, other);
  }
  return state;
}

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
    absorb(state, load_as_float(z_row, j), load_as_float(v_row, j));
  }
  state = warp_allreduce(state);

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

// Online softmax with a dot product, shared by the softmax-based CUDA kernels.
//
// Each lane keeps, over its strided columns of a row, a running max m,
// s = sum exp(z - m) and d = sum exp(z - m) v (v: a second row, such as a
// tangent or the HVP's direction), rescaling both when m grows; a butterfly of
// warp shuffles merges the 32 lane states, leaving every lane with the row's
// (m, s, d): logsumexp = m + log s and <softmax(z), v> = d / s.
#pragma once

#include <cmath>

namespace utilgen {
namespace online_softmax {

constexpr int kWarp = 32;
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

}  // namespace online_softmax
}  // namespace utilgen

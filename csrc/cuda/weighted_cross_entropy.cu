// Weighted cross-entropy, CUDA kernels (reference: utilgen/ops/weighted_cross_entropy.py).
//
// One warp per row, rows grid-strided. The forward keeps an online (max, sum,
// tangent-sum) per lane (online_softmax.cuh), merges lanes with shuffles, and reduces sum_i w_i l_i
// in one launch: each block writes a partial, and the last block to finish
// (threadfence + atomic ticket) adds the partials in block order, so the loss
// is deterministic and no second kernel or host sync is needed.
#include "../weighted_cross_entropy.h"
#include "cuda_common.cuh"
#include "online_softmax.cuh"

#include <cfloat>
#include <cmath>

namespace utilgen {
namespace {

using online_softmax::kWarp;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kMaxBlocks = 1024;

template <typename T>
__global__ void weighted_cross_entropy_fwd_kernel(const T* __restrict__ logits, const std::int64_t* __restrict__ target,
                                                  const float* __restrict__ weight, const T* __restrict__ tangent,
                                                  std::int64_t n, std::int64_t k, Reduction reduction, float* __restrict__ loss,
                                                  float* __restrict__ per_sample, float* __restrict__ lse_out,
                                                  float* __restrict__ directional, float* __restrict__ partials,
                                                  unsigned int* __restrict__ counter) {
  __shared__ float warp_sums[kWarpsPerBlock];
  __shared__ bool is_last_block;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  float weighted_sum = 0.0f;

  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < n;
       row += static_cast<std::int64_t>(gridDim.x) * kWarpsPerBlock) {
    const T* z = logits + row * k;
    const T* u = tangent ? tangent + row * k : nullptr;
    online_softmax::SoftmaxDotState s{-INFINITY, 0.0f, 0.0f};
    bool non_finite = false;
    for (std::int64_t j = lane; j < k; j += kWarp) {
      const float zj = load_as_float(z, j);
      non_finite |= isnan(zj) || zj == INFINITY;
      online_softmax::absorb(s, zj, u ? load_as_float(u, j) : 0.0f);
    }
    s = online_softmax::warp_allreduce(s);
    non_finite = __any_sync(0xffffffffu, non_finite);
    if (lane == 0) {
      const std::int64_t y = target[row];
      float lse, l, d;
      if (non_finite || s.max == -INFINITY || y < 0 || y >= k) {
        lse = l = d = NAN;  // invalid targets cannot raise on the device: NaN marks the row
      } else {
        lse = s.max + __logf(s.sum_exp);
        l = lse - load_as_float(z, y);
        d = u ? s.dot_exp / s.sum_exp - load_as_float(u, y) : 0.0f;
      }
      per_sample[row] = l;
      lse_out[row] = lse;
      if (directional) directional[row] = d;
      const float wl = weight[row] * l;
      if (reduction == Reduction::kNone) loss[row] = wl;
      weighted_sum += wl;
    }
  }

  if (reduction == Reduction::kNone) return;
  if (lane == 0) warp_sums[warp] = weighted_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float block_sum = 0.0f;
    for (int w = 0; w < kWarpsPerBlock; ++w) block_sum += warp_sums[w];
    partials[blockIdx.x] = block_sum;
    __threadfence();  // the partial is visible before the ticket is taken
    is_last_block = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last_block && threadIdx.x == 0) {
    __threadfence();
    double total = 0.0;  // fixed order over blocks: deterministic
    for (unsigned int b = 0; b < gridDim.x; ++b) total += static_cast<double>(*((volatile float*)partials + b));
    *loss = static_cast<float>(reduction == Reduction::kMean ? total / static_cast<double>(n) : total);
    *counter = 0u;
  }
}

template <typename T>
__global__ void weighted_cross_entropy_bwd_kernel(const float* __restrict__ grad_loss, bool grad_per_row, float scale,
                                                  const T* __restrict__ logits, const std::int64_t* __restrict__ target,
                                                  const float* __restrict__ weight, const float* __restrict__ per_sample,
                                                  const float* __restrict__ lse, std::int64_t n, std::int64_t k,
                                                  T* __restrict__ grad_logits, float* __restrict__ grad_weight) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const float g_scalar = grad_per_row ? 0.0f : grad_loss[0] * scale;
  for (std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < n;
       row += static_cast<std::int64_t>(gridDim.x) * kWarpsPerBlock) {
    const float g = grad_per_row ? grad_loss[row] : g_scalar;
    const float c = g * weight[row];
    const float row_lse = lse[row];
    const std::int64_t y = target[row];
    const T* z = logits + row * k;
    T* dz = grad_logits + row * k;
    for (std::int64_t j = lane; j < k; j += kWarp) {
      const float p = __expf(load_as_float(z, j) - row_lse);
      store_from_float(dz, j, c * (p - (j == y ? 1.0f : 0.0f)));
    }
    if (lane == 0 && grad_weight) grad_weight[row] = g * per_sample[row];
  }
}

int blocks_for(std::int64_t n) {
  const std::int64_t needed = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(needed < kMaxBlocks ? needed : kMaxBlocks);
}

}  // namespace

int weighted_cross_entropy_cuda_blocks(std::int64_t n) { return blocks_for(n); }

void weighted_cross_entropy_fwd_cuda(std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight,
                                     std::uintptr_t tangent, std::int64_t n, std::int64_t k, int reduction_code,
                                     int dtype, std::uintptr_t loss, std::uintptr_t per_sample, std::uintptr_t lse,
                                     std::uintptr_t directional, std::uintptr_t partials, std::uintptr_t counter,
                                     std::uintptr_t stream) {
  UTILGEN_CHECK(n > 0 && k > 0, "weighted_cross_entropy_fwd_cuda: logits must be non-empty, got N=" << n << ", K=" << k);
  UTILGEN_CHECK(is_reduction(reduction_code),
                "weighted_cross_entropy_fwd_cuda: reduction code " << reduction_code << " is not a utilgen._C.Reduction value");
  const Reduction reduction = static_cast<Reduction>(reduction_code);
  UTILGEN_CHECK_PTR(logits, "logits");
  UTILGEN_CHECK_PTR(target, "target");
  UTILGEN_CHECK_PTR(weight, "weight");
  UTILGEN_CHECK_PTR(loss, "loss");
  UTILGEN_CHECK_PTR(per_sample, "per_sample");  // written for every row
  UTILGEN_CHECK_PTR(lse, "lse");
  UTILGEN_CHECK_PTR(partials, "partials");
  UTILGEN_CHECK_PTR(counter, "counter");
  UTILGEN_CHECK(tangent == 0 || directional != 0, "weighted_cross_entropy_fwd_cuda: a tangent needs a directional output");
  const int blocks = blocks_for(n);
  dispatch_floating(dtype, "weighted_cross_entropy_fwd_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    weighted_cross_entropy_fwd_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(
        as_ptr<const T>(logits), as_ptr<const std::int64_t>(target), as_ptr<const float>(weight),
        tangent ? as_ptr<const T>(tangent) : nullptr, n, k, reduction, as_ptr<float>(loss), as_ptr<float>(per_sample),
        as_ptr<float>(lse), directional ? as_ptr<float>(directional) : nullptr, as_ptr<float>(partials),
        as_ptr<unsigned int>(counter));
  });
  check_launch("weighted_cross_entropy_fwd_kernel");
}

void weighted_cross_entropy_bwd_cuda(std::uintptr_t grad_loss, bool grad_per_row, float scale, std::uintptr_t logits,
                                     std::uintptr_t target, std::uintptr_t weight, std::uintptr_t per_sample,
                                     std::uintptr_t lse, std::int64_t n, std::int64_t k, int dtype,
                                     std::uintptr_t grad_logits, std::uintptr_t grad_weight, std::uintptr_t stream) {
  UTILGEN_CHECK(n > 0 && k > 0, "weighted_cross_entropy_bwd_cuda: logits must be non-empty, got N=" << n << ", K=" << k);
  UTILGEN_CHECK_PTR(grad_loss, "grad_loss");
  UTILGEN_CHECK_PTR(logits, "logits");
  UTILGEN_CHECK_PTR(grad_logits, "grad_logits");
  UTILGEN_CHECK_PTR(target, "target");  // read for every row
  UTILGEN_CHECK_PTR(weight, "weight");
  UTILGEN_CHECK_PTR(lse, "lse");
  UTILGEN_CHECK(grad_weight == 0 || per_sample != 0, "weighted_cross_entropy_bwd_cuda: grad_weight needs per_sample");
  const int blocks = blocks_for(n);
  dispatch_floating(dtype, "weighted_cross_entropy_bwd_cuda", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    weighted_cross_entropy_bwd_kernel<T><<<blocks, kThreads, 0, as_stream(stream)>>>(
        as_ptr<const float>(grad_loss), grad_per_row, scale, as_ptr<const T>(logits),
        as_ptr<const std::int64_t>(target), as_ptr<const float>(weight), as_ptr<const float>(per_sample),
        as_ptr<const float>(lse), n, k, as_ptr<T>(grad_logits), grad_weight ? as_ptr<float>(grad_weight) : nullptr);
  });
  check_launch("weighted_cross_entropy_bwd_kernel");
}

}  // namespace utilgen

// latent_update: CUDA kernels of the fused ILPO optimiser step.
//
// Grid per part: (chunks of kLatentUpdateCudaChunk elements, N instances), so small
// batches still fill the GPU. Kernel 1 updates a chunk in one pass and, when the
// part is projected, writes the chunk's sum of squares to the workspace (one slot
// per instance and chunk: no atomics, deterministic). Kernel 2 (projected parts
// only) sums an instance's slots in a fixed order and rescales its chunk. Kernel 3
// increments the active instances' steps after every part has read them. All on
// the caller's stream; nothing waits on the host.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../latent_update.h"
#include "cuda_common.cuh"

namespace utilgen {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct DeviceHyper {
  OptimizerKind kind;
  float grad_sign, weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, momentum;
};

__device__ __forceinline__ bool instance_active(const std::uint8_t* active, std::int64_t i) {
  return active == nullptr || active[i] != 0;
}

// Sum over the block; every thread gets the result.
__device__ float block_sum(float value) {
  __shared__ float warp_sums[kWarps];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kWarps ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    if (lane == 0) total = value;
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void latent_update_part_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                          float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                                          const float* __restrict__ lr, const float* __restrict__ step,
                                          const std::uint8_t* __restrict__ active, const T* __restrict__ center,
                                          std::int64_t center_stride, std::int64_t numel, Projection projection,
                                          DeviceHyper h, float* __restrict__ chunk_sum_sq) {
  const std::int64_t i = blockIdx.y;
  if (!instance_active(active, i)) return;  // uniform over the block
  const std::int64_t chunk = blockIdx.x;
  const std::int64_t begin = chunk * kLatentUpdateCudaChunk;
  const std::int64_t end = min(numel, begin + kLatentUpdateCudaChunk);

  // Per-instance coefficients; every thread computes them (cheaper than a broadcast).
  const float t = step[i] + 1.0f;
  float step_size = lr[i], inv_bias_correction2_sqrt = 1.0f;
  if (h.kind == OptimizerKind::kAdam) {
    step_size /= 1.0f - powf(h.beta1, t);
    inv_bias_correction2_sqrt = rsqrtf(1.0f - powf(h.beta2, t));
  }

  const std::int64_t base = i * numel;
  const std::int64_t center_base = i * center_stride;
  float sum_sq = 0.0f;
  for (std::int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const float x = load_as_float(param, base + j);
    const float g = h.grad_sign * load_as_float(grad, base + j) + h.weight_decay * x;
    float x_new;
    if (h.kind == OptimizerKind::kAdam) {
      const float m_old = exp_avg[base + j];
      const float m = m_old + h.one_minus_beta1 * (g - m_old);
      const float v = h.beta2 * exp_avg_sq[base + j] + h.one_minus_beta2 * g * g;
      exp_avg[base + j] = m;
      exp_avg_sq[base + j] = v;
      x_new = x - step_size * m / (sqrtf(v) * inv_bias_correction2_sqrt + h.eps);
    } else if (h.kind == OptimizerKind::kSgdMomentum) {
      const float buffer = h.momentum * exp_avg[base + j] + g;
      exp_avg[base + j] = buffer;
      x_new = x - step_size * buffer;
    } else {
      x_new = x - step_size * g;
    }
    store_from_float(param, base + j, x_new);
    if (projection == Projection::kShell) {
      sum_sq += x_new * x_new;
    } else if (projection == Projection::kBall) {
      const float d = x_new - load_as_float(center, center_base + j);
      sum_sq += d * d;
    }
  }
  if (projection == Projection::kNone) return;
  sum_sq = block_sum(sum_sq);
  if (threadIdx.x == 0) chunk_sum_sq[i * gridDim.x + chunk] = sum_sq;
}

template <typename T>
__global__ void latent_project_part_kernel(T* __restrict__ param, const std::uint8_t* __restrict__ active,
                                           const T* __restrict__ center, std::int64_t center_stride,
                                           std::int64_t numel, Projection projection, float shell_norm,
                                           const float* __restrict__ radius, const float* __restrict__ chunk_sum_sq) {
  const std::int64_t i = blockIdx.y;
  if (!instance_active(active, i)) return;
  // Every thread adds the instance's few chunk sums in the same order: same norm everywhere.
  double sum_sq = 0.0;
  for (unsigned k = 0; k < gridDim.x; ++k) sum_sq += chunk_sum_sq[i * gridDim.x + k];
  const float norm = static_cast<float>(sqrt(sum_sq));
  if (norm < kTinyNorm) return;
  float scale;
  if (projection == Projection::kShell) {
    scale = shell_norm / norm;
  } else {
    if (norm <= radius[i]) return;  // inside its ball: untouched
    scale = radius[i] / norm;
  }
  const std::int64_t begin = static_cast<std::int64_t>(blockIdx.x) * kLatentUpdateCudaChunk;
  const std::int64_t end = min(numel, begin + kLatentUpdateCudaChunk);
  const std::int64_t base = i * numel;
  for (std::int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const float x = load_as_float(param, base + j);
    if (projection == Projection::kShell) {
      store_from_float(param, base + j, x * scale);
    } else {
      const float c = load_as_float(center, i * center_stride + j);
      store_from_float(param, base + j, c + (x - c) * scale);
    }
  }
}

__global__ void latent_increment_steps_kernel(float* __restrict__ step, const std::uint8_t* __restrict__ active,
                                              std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && instance_active(active, i)) step[i] += 1.0f;
}

void launch_part(const LatentUpdateArgs& a, const LatentPart& part, const DeviceHyper& h, float* chunk_sum_sq,
                 cudaStream_t stream) {
  if (!part.present()) return;
  const std::int64_t chunks = (part.numel + kLatentUpdateCudaChunk - 1) / kLatentUpdateCudaChunk;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(a.n));
  const auto* step = as_ptr<const float>(a.step);
  const auto* active = as_ptr<const std::uint8_t>(a.active);
  dispatch_floating(part.dtype, "latent_update", [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    latent_update_part_kernel<T><<<grid, kThreads, 0, stream>>>(
        as_ptr<T>(part.param), as_ptr<const T>(part.grad), as_ptr<float>(part.exp_avg), as_ptr<float>(part.exp_avg_sq),
        as_ptr<const float>(part.lr), step, active, as_ptr<const T>(part.center), part.center_stride, part.numel,
        part.projection, h, chunk_sum_sq);
    check_launch("latent_update_part_kernel");
    if (part.projection == Projection::kNone) return;
    latent_project_part_kernel<T><<<grid, kThreads, 0, stream>>>(
        as_ptr<T>(part.param), active, as_ptr<const T>(part.center), part.center_stride, part.numel, part.projection,
        part.shell_norm, as_ptr<const float>(part.radius), chunk_sum_sq);
    check_launch("latent_project_part_kernel");
  });
}

}  // namespace

void latent_update_cuda(const LatentUpdateArgs& a, std::uintptr_t workspace, std::int64_t workspace_numel,
                        std::uintptr_t stream_handle) {
  if (a.n == 0) return;
  UTILGEN_CHECK(a.n <= 65535, "latent_update (CUDA): N=" << a.n << " exceeds the grid's 65535 instances; split the batch");
  std::int64_t max_chunks = 1;
  for (const LatentPart* part : {&a.noise, &a.embed}) {
    if (part->present()) {
      max_chunks = std::max(max_chunks, (part->numel + kLatentUpdateCudaChunk - 1) / kLatentUpdateCudaChunk);
    }
  }
  UTILGEN_CHECK(workspace != 0 && workspace_numel >= 2 * a.n * max_chunks,
                "latent_update (CUDA): the workspace needs " << 2 * a.n * max_chunks << " floats, got " << workspace_numel);
  const DeviceHyper h{a.optimizer, a.maximize ? -1.0f : 1.0f, a.weight_decay, a.beta1, 1.0f - a.beta1,
                      a.beta2, 1.0f - a.beta2, a.eps, a.momentum};
  cudaStream_t stream = as_stream(stream_handle);
  float* slots = as_ptr<float>(workspace);
  launch_part(a, a.noise, h, slots, stream);
  launch_part(a, a.embed, h, slots + a.n * max_chunks, stream);
  const int blocks = static_cast<int>((a.n + kThreads - 1) / kThreads);
  latent_increment_steps_kernel<<<blocks, kThreads, 0, stream>>>(as_ptr<float>(a.step),
                                                                  as_ptr<const std::uint8_t>(a.active), a.n);
  check_launch("latent_increment_steps_kernel");
}

}  // namespace utilgen

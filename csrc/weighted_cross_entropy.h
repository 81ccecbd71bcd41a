// CUDA launchers of the weighted cross-entropy op (csrc/cuda/weighted_cross_entropy.cu).
#pragma once

#include <cstdint>

namespace utilgen {

int weighted_cross_entropy_cuda_blocks(std::int64_t n);

void weighted_cross_entropy_fwd_cuda(std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight,
                                     std::uintptr_t tangent, std::int64_t n, std::int64_t k, int reduction,
                                     int dtype, std::uintptr_t loss, std::uintptr_t per_sample,
                                     std::uintptr_t lse, std::uintptr_t directional, std::uintptr_t partials,
                                     std::uintptr_t counter, std::uintptr_t stream);

void weighted_cross_entropy_bwd_cuda(std::uintptr_t grad_loss, bool grad_per_row, float scale,
                                     std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight,
                                     std::uintptr_t per_sample, std::uintptr_t lse, std::int64_t n,
                                     std::int64_t k, int dtype, std::uintptr_t grad_logits,
                                     std::uintptr_t grad_weight, std::uintptr_t stream);

}  // namespace utilgen

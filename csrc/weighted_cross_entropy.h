// The weighted cross-entropy op's reduction codes, and its CUDA launchers
// (csrc/cuda/weighted_cross_entropy.cu).
#pragma once

#include <cstdint>

namespace utilgen {

// The one definition of these codes: register_weighted_cross_entropy exports them as
// utilgen._C.Reduction ("none", "mean", "sum"), whose values utilgen/ops/weighted_cross_entropy.py
// passes (tests/test_weighted_cross_entropy.py checks the names agree with its REDUCTIONS).
enum class Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

// Whether an int from Python is a Reduction code.
inline bool is_reduction(int code) {
  return code == static_cast<int>(Reduction::kNone) || code == static_cast<int>(Reduction::kMean) ||
         code == static_cast<int>(Reduction::kSum);
}

int weighted_cross_entropy_cuda_blocks(std::int64_t n);

void weighted_cross_entropy_fwd_cuda(std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight,
                                     std::uintptr_t tangent, std::int64_t n, std::int64_t k, int reduction_code,
                                     int dtype, std::uintptr_t loss, std::uintptr_t per_sample,
                                     std::uintptr_t lse, std::uintptr_t directional, std::uintptr_t partials,
                                     std::uintptr_t counter, std::uintptr_t stream);

void weighted_cross_entropy_bwd_cuda(std::uintptr_t grad_loss, bool grad_per_row, float scale,
                                     std::uintptr_t logits, std::uintptr_t target, std::uintptr_t weight,
                                     std::uintptr_t per_sample, std::uintptr_t lse, std::int64_t n,
                                     std::int64_t k, int dtype, std::uintptr_t grad_logits,
                                     std::uintptr_t grad_weight, std::uintptr_t stream);

}  // namespace utilgen

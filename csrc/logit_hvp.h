// logit_hvp: softmax cross-entropy Hessian (w.r.t. the logits) times a vector,
// per row: out_i = w_i * (p_i * v_i - p_i * <p_i, v_i>), p_i = softmax(z_i).
//
// The CPU kernel lives in csrc/logit_hvp.cpp, the CUDA kernel in
// csrc/cuda/logit_hvp.cu; both are bound in register_logit_hvp.
#pragma once

#include <cstdint>

namespace utilgen {

#ifdef UTILGEN_WITH_CUDA
// Launches the CUDA kernel on `stream` (no synchronisation). logits, v and out
// hold `dtype` elements (float32/float16/bfloat16), weight is float32 or null.
void logit_hvp_fwd_cuda(std::uintptr_t logits, std::uintptr_t v, std::uintptr_t weight, std::int64_t n,
                        std::int64_t k, int dtype, std::uintptr_t out, std::uintptr_t stream);
#endif

}  // namespace utilgen

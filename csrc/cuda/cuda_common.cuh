// Helpers shared by the CUDA kernels of utilgen._C.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "../common.h"

namespace utilgen {

inline cudaStream_t as_stream(std::uintptr_t stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

// Launch errors surface as RuntimeError with the kernel's name; no device sync.
inline void check_launch(const char* kernel) {
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    std::ostringstream msg;
    msg << kernel << " launch failed: " << cudaGetErrorString(status);
    throw std::runtime_error(msg.str());
  }
}

// Load any supported element type as float, store float as that type.
__device__ __forceinline__ float load_as_float(const float* p, std::int64_t i) { return p[i]; }
__device__ __forceinline__ float load_as_float(const __half* p, std::int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_as_float(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store_from_float(float* p, std::int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_from_float(__half* p, std::int64_t i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ void store_from_float(__nv_bfloat16* p, std::int64_t i, float v) { p[i] = __float2bfloat16(v); }

// Calls fn with a null pointer of the C++ element type for a dtype code.
template <typename Fn>
void dispatch_floating(int dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(static_cast<float*>(nullptr)); break;
    case kFloat16: fn(static_cast<__half*>(nullptr)); break;
    case kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: UTILGEN_CHECK(false, what << ": unsupported dtype code " << dtype
                                       << " (expected float32, float16 or bfloat16)");
  }
}

}  // namespace utilgen

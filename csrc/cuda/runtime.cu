// CUDA runtime facts for utilgen._C. Nothing here runs at import: the first
// call initialises the runtime, so `import utilgen` stays free of CUDA.
#include <cuda_runtime.h>

#include <string>

#include "cuda_common.cuh"

namespace utilgen {

namespace {
std::string g_last_error = "";
}

int cuda_device_count() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    g_last_error = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(status);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  if (count == 0) g_last_error = "no CUDA device is visible";
  return count;
}

int cuda_runtime_version() {
  int version = 0;
  cudaRuntimeGetVersion(&version);
  return version;
}

std::string cuda_last_error() { return g_last_error; }

}  // namespace utilgen

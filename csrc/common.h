// Shared helpers for utilgen._C entry points.
//
// The extension does not link libtorch. Python passes each tensor as a raw data
// pointer (an integer), its sizes, a dtype code and, for CUDA, the current
// stream. The Python op modules guarantee contiguity and placement; entry
// points still validate what they can see, with messages a user can act on.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#ifdef UTILGEN_WITH_OPENMP
#include <omp.h>
#endif

namespace utilgen {

// Element types of the tensors Python passes. The one definition of these codes: module.cpp
// exports them as utilgen._C.DType (members named as torch's dtypes), which utilgen/_native.py reads.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Raises ValueError (via pybind11's translation of std::invalid_argument).
#define UTILGEN_CHECK(cond, ...)                                            \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::ostringstream utilgen_msg_;                                      \
      utilgen_msg_ << __VA_ARGS__;                                          \
      throw std::invalid_argument(utilgen_msg_.str());                      \
    }                                                                       \
  } while (0)

#define UTILGEN_CHECK_PTR(address, name)                                    \
  UTILGEN_CHECK((address) != 0, name << " is a null pointer; pass a tensor " \
                                     "with storage (not a meta tensor)")

// Runs `body(begin, end)` over [0, n) in chunks on `num_threads` OpenMP
// threads. Python passes torch.get_num_threads() so the extension and torch
// agree on the thread count even if they link different OpenMP runtimes.
template <typename Body>
inline void parallel_for(std::int64_t n, int num_threads, std::int64_t grain, const Body& body) {
  if (n <= 0) return;
#ifdef UTILGEN_WITH_OPENMP
  if (num_threads > 1 && n > grain) {
    const std::int64_t chunks = std::min<std::int64_t>(num_threads, (n + grain - 1) / grain);
#pragma omp parallel for num_threads(static_cast<int>(chunks)) schedule(static)
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::int64_t begin = n * c / chunks;
      const std::int64_t end = n * (c + 1) / chunks;
      body(begin, end);
    }
    return;
  }
#else
  (void)num_threads;
  (void)grain;
#endif
  body(0, n);
}

}  // namespace utilgen

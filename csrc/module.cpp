// utilgen._C: the pybind11 module. Each op registers its own entry points
// (csrc/<op>.cpp -> register_<op>); this file adds only build and device facts.
#include <pybind11/pybind11.h>

#include "common.h"
#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "utilgen compiled kernels (C++/OpenMP CPU, CUDA when built)";

  py::enum_<utilgen::DType>(m, "DType", "Element type codes of the kernels' tensors (csrc/common.h)")
      .value("float32", utilgen::kFloat32)
      .value("float16", utilgen::kFloat16)
      .value("bfloat16", utilgen::kBFloat16);

#ifdef UTILGEN_WITH_CUDA
  m.attr("cuda_built") = true;
  m.def("cuda_device_count", &utilgen::cuda_device_count,
        "Number of CUDA devices visible to the extension's runtime (0 without a GPU). "
        "Initialises the CUDA runtime: call lazily.");
  m.def("cuda_runtime_version", &utilgen::cuda_runtime_version);
  m.def("cuda_last_error", &utilgen::cuda_last_error,
        "Why cuda_device_count() returned 0, if it did");
#else
  m.attr("cuda_built") = false;
  m.def("cuda_device_count", []() { return 0; });
  m.def("cuda_runtime_version", []() { return 0; });
  m.def("cuda_last_error", []() { return std::string("the extension was built without CUDA"); });
#endif

#ifdef UTILGEN_WITH_OPENMP
  m.attr("openmp") = true;
  m.def("max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("openmp") = false;
  m.def("max_threads", []() { return 1; });
#endif

  utilgen::register_weighted_cross_entropy(m);
  utilgen::register_latent_update(m);
  utilgen::register_logit_hvp(m);
}

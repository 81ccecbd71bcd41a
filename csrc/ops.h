// Registration hooks of every op (one csrc/<op>.cpp each) and the CUDA runtime facts.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

namespace utilgen {

void register_weighted_cross_entropy(pybind11::module_& m);
void register_latent_update(pybind11::module_& m);
void register_logit_hvp(pybind11::module_& m);

#ifdef UTILGEN_WITH_CUDA
// csrc/cuda/runtime.cu
int cuda_device_count();
int cuda_runtime_version();
std::string cuda_last_error();
#endif

}  // namespace utilgen

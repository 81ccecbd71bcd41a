// PLACEHOLDER: replaced by the latent_update implementation.
#include "ops.h"
namespace utilgen { void register_latent_update(pybind11::module_&) {} }

// PLACEHOLDER: replaced by the logit_hvp implementation.
#include "ops.h"
namespace utilgen { void register_logit_hvp(pybind11::module_&) {} }

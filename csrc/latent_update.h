// latent_update: the arguments shared by the C++ (csrc/latent_update.cpp) and CUDA
// (csrc/cuda/latent_update.cu) kernels, and the CUDA launcher.
//
// One fused optimiser step over N instances, each with an optional noise part
// (C*H*W elements) and an optional embedding part (L*D elements); see
// utilgen/ops/latent_update.py (latent_update_reference) for the equations.
#pragma once

#include <cstdint>

namespace utilgen {

// The one definition of these codes. register_latent_update exports them to Python as
// utilgen._C.OptimizerKind ("adam", "sgd_momentum", "sgd") and utilgen._C.Projection ("none",
// "shell", "ball"): utilgen/ops/latent_update.py passes the exported values, and the Triton kernel
// branches on the same names (tests/test_latent_update.py checks that the names agree).
enum class OptimizerKind : int { kAdam = 0, kSgdMomentum = 1, kSgdPlain = 2 };
enum class Projection : int { kNone = 0, kShell = 1, kBall = 2 };

// Below this norm a projection leaves the instance alone (exported as _C.latent_update_tiny_norm;
// tests/test_latent_update.py checks it equals the Python reference's and the Triton kernel's).
constexpr float kTinyNorm = 1e-12f;

// One part (noise or embedding) of all N instances; param == 0 means absent.
struct LatentPart {
  std::uintptr_t param = 0;       // (N, numel) in `dtype`, updated in place
  std::uintptr_t grad = 0;        // (N, numel) in `dtype`
  std::uintptr_t exp_avg = 0;     // (N, numel) fp32: Adam first moment / SGD momentum buffer
  std::uintptr_t exp_avg_sq = 0;  // (N, numel) fp32: Adam second moment
  std::uintptr_t lr = 0;          // (N,) fp32
  std::int64_t numel = 0;         // elements per instance
  int dtype = 0;                  // DType code of param and grad
  Projection projection = Projection::kNone;
  std::uintptr_t center = 0;       // kBall: anchors, (N, numel) or (1, numel), in `dtype`
  std::int64_t center_stride = 0;  // kBall: numel (one anchor per instance) or 0 (shared)
  std::uintptr_t radius = 0;       // kBall: (N,) fp32
  float shell_norm = 0.0f;         // kShell: target norm sqrt(numel)

  bool present() const { return param != 0; }
};

struct LatentUpdateArgs {
  std::int64_t n = 0;
  OptimizerKind optimizer = OptimizerKind::kAdam;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.0f, momentum = 0.0f;
  bool maximize = false;
  std::uintptr_t step = 0;    // (N,) fp32, incremented for active instances
  std::uintptr_t active = 0;  // (N,) bool (1 byte each), or 0 for all active
  LatentPart noise, embed;
};

#ifdef UTILGEN_WITH_CUDA
// Elements of one instance that one CUDA block updates (the projection workspace
// holds one partial sum per instance and chunk of each part).
constexpr std::int64_t kLatentUpdateCudaChunk = 8192;

// Enqueues the step on `stream`; `workspace` holds >= 2 * n * max_chunks floats. No host sync.
void latent_update_cuda(const LatentUpdateArgs& args, std::uintptr_t workspace, std::int64_t workspace_numel,
                        std::uintptr_t stream);
#endif

}  // namespace utilgen

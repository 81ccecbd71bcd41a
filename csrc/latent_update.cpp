// latent_update: the fused ILPO optimiser step, C++/OpenMP CPU kernel and the
// Python entry points (CPU always, CUDA when built).
//
// Work layout. Each instance's part (noise or embedding) is cut into chunks of
// kChunk elements. One pass over a chunk does the whole optimiser update and
// returns the chunk's sum of squares (of x, or of x - anchor) for the
// projection; the per-instance sum adds the chunk sums in chunk order (in
// double), so the result does not depend on the thread count or on the mode:
//   - many instances (N >= kInstancesPerThread * threads): threads take whole
//     instances; the projection's second pass rescales an instance right after
//     its update, while it is still in this core's L2 (an embedding of 77x1024
//     fp32 with grad and both moments is 1.2 MB; L2 is 2 MB per core here);
//   - few instances: threads take chunks of all instances, then (after the
//     implicit barrier) rescale the chunks that need it.
#include "latent_update.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "ops.h"

namespace py = pybind11;

namespace utilgen {
namespace {

// 16 KB of fp32 per stream. Not tuned: the step runs at ~35 GB/s on 2 threads (Xeon SPR,
// N=256, 4x64x64 + 77x1024, 19.7 ms), against 31.5 GB/s for torch.compile of the reference.
// The loop vectorises only with -fno-math-errno (CMakeLists.txt): 75.5 ms without it.
// -march=native (AVX-512) gave 16 ms but would make the wheel unportable; not taken.
constexpr std::int64_t kChunk = 4096;
// Instance-parallel mode needs enough instances per thread to balance the load.
constexpr std::int64_t kInstancesPerThread = 4;

// Per-element constants of one call.
struct Hyper {
  float grad_sign, weight_decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, momentum;
};

// Per-instance constants: Adam's bias corrections come from the instance's own step.
struct Coefficients {
  float step_size;                  // Adam: lr / (1 - beta1^t); SGD: lr
  float inv_bias_correction2_sqrt;  // Adam: 1 / sqrt(1 - beta2^t)
};

// One chunk of one instance: raw pointers at the chunk's first element.
struct ChunkView {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  const float* center;
  std::int64_t count;
};

Hyper make_hyper(const LatentUpdateArgs& a) {
  return Hyper{a.maximize ? -1.0f : 1.0f, a.weight_decay, a.beta1, 1.0f - a.beta1,
               a.beta2, 1.0f - a.beta2, a.eps, a.momentum};
}

Coefficients coefficients(const LatentUpdateArgs& a, const LatentPart& part, std::int64_t i) {
  const float lr = as_ptr<const float>(part.lr)[i];
  if (a.optimizer != OptimizerKind::kAdam) return Coefficients{lr, 1.0f};
  const double t = static_cast<double>(as_ptr<const float>(a.step)[i]) + 1.0;  // this step included
  const double bias_correction1 = 1.0 - std::pow(static_cast<double>(a.beta1), t);
  const double bias_correction2 = 1.0 - std::pow(static_cast<double>(a.beta2), t);
  return Coefficients{static_cast<float>(lr / bias_correction1), static_cast<float>(1.0 / std::sqrt(bias_correction2))};
}

ChunkView chunk_view(const LatentPart& part, std::int64_t i, std::int64_t chunk) {
  const std::int64_t offset = i * part.numel + chunk * kChunk;
  const float* center = part.center == 0 ? nullptr
                                         : as_ptr<const float>(part.center) + i * part.center_stride + chunk * kChunk;
  return ChunkView{as_ptr<float>(part.param) + offset,
                   as_ptr<const float>(part.grad) + offset,
                   part.exp_avg == 0 ? nullptr : as_ptr<float>(part.exp_avg) + offset,
                   part.exp_avg_sq == 0 ? nullptr : as_ptr<float>(part.exp_avg_sq) + offset,
                   center,
                   std::min(kChunk, part.numel - chunk * kChunk)};
}

// The whole update of one chunk in one pass; returns its sum of squares for kProjection.
// The kind and projection are template arguments so the loop has no branches and vectorises.
template <OptimizerKind kKind, Projection kProjection>
float update_chunk(const ChunkView& view, const Hyper& h, const Coefficients& c) {
  float* __restrict param = view.param;
  const float* __restrict grad = view.grad;
  float* __restrict exp_avg = view.exp_avg;
  float* __restrict exp_avg_sq = view.exp_avg_sq;
  const float* __restrict center = view.center;
  float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
  for (std::int64_t j = 0; j < view.count; ++j) {
    const float x = param[j];
    const float g = h.grad_sign * grad[j] + h.weight_decay * x;
    float x_new;
    if constexpr (kKind == OptimizerKind::kAdam) {
      const float m_old = exp_avg[j];
      const float m = m_old + h.one_minus_beta1 * (g - m_old);  // torch's lerp form
      const float v = h.beta2 * exp_avg_sq[j] + h.one_minus_beta2 * g * g;
      exp_avg[j] = m;
      exp_avg_sq[j] = v;
      x_new = x - c.step_size * m / (std::sqrt(v) * c.inv_bias_correction2_sqrt + h.eps);
    } else if constexpr (kKind == OptimizerKind::kSgdMomentum) {
      const float buffer = h.momentum * exp_avg[j] + g;
      exp_avg[j] = buffer;
      x_new = x - c.step_size * buffer;
    } else {
      x_new = x - c.step_size * g;
    }
    param[j] = x_new;
    if constexpr (kProjection == Projection::kShell) {
      sum_sq += x_new * x_new;
    } else if constexpr (kProjection == Projection::kBall) {
      const float d = x_new - center[j];
      sum_sq += d * d;
    }
  }
  return sum_sq;
}

using ChunkUpdate = float (*)(const ChunkView&, const Hyper&, const Coefficients&);

template <OptimizerKind kKind>
ChunkUpdate pick_projection(Projection projection) {
  switch (projection) {
    case Projection::kShell: return &update_chunk<kKind, Projection::kShell>;
    case Projection::kBall: return &update_chunk<kKind, Projection::kBall>;
    default: return &update_chunk<kKind, Projection::kNone>;
  }
}

ChunkUpdate pick_update(OptimizerKind kind, Projection projection) {
  switch (kind) {
    case OptimizerKind::kAdam: return pick_projection<OptimizerKind::kAdam>(projection);
    case OptimizerKind::kSgdMomentum: return pick_projection<OptimizerKind::kSgdMomentum>(projection);
    default: return pick_projection<OptimizerKind::kSgdPlain>(projection);
  }
}

// Factor applied to (x - center) after the update: 1 means leave the instance as it is.
float projection_scale(const LatentPart& part, std::int64_t i, double sum_sq) {
  const double norm = std::sqrt(sum_sq);
  if (part.projection == Projection::kShell) {
    return norm < kTinyNorm ? 1.0f : static_cast<float>(part.shell_norm / norm);
  }
  const double radius = as_ptr<const float>(part.radius)[i];
  return norm <= radius || norm < kTinyNorm ? 1.0f : static_cast<float>(radius / norm);
}

void scale_chunk(const ChunkView& view, Projection projection, float scale) {
  float* __restrict param = view.param;
  if (projection == Projection::kShell) {
#pragma omp simd
    for (std::int64_t j = 0; j < view.count; ++j) param[j] *= scale;
    return;
  }
  const float* __restrict center = view.center;
#pragma omp simd
  for (std::int64_t j = 0; j < view.count; ++j) param[j] = center[j] + (param[j] - center[j]) * scale;
}

std::int64_t chunks_of(const LatentPart& part) {
  return part.present() ? (part.numel + kChunk - 1) / kChunk : 0;
}

bool is_active(const LatentUpdateArgs& a, std::int64_t i) {
  return a.active == 0 || as_ptr<const std::uint8_t>(a.active)[i] != 0;
}

// Update and (if asked) project one instance's part, all chunks on this thread.
void update_instance(const LatentUpdateArgs& a, const LatentPart& part, const Hyper& h, std::int64_t i) {
  if (!part.present()) return;
  const ChunkUpdate update = pick_update(a.optimizer, part.projection);
  const Coefficients c = coefficients(a, part, i);
  const std::int64_t chunks = chunks_of(part);
  double sum_sq = 0.0;
  for (std::int64_t k = 0; k < chunks; ++k) sum_sq += update(chunk_view(part, i, k), h, c);
  if (part.projection == Projection::kNone) return;
  const float scale = projection_scale(part, i, sum_sq);
  if (scale == 1.0f) return;
  for (std::int64_t k = 0; k < chunks; ++k) scale_chunk(chunk_view(part, i, k), part.projection, scale);
}

void run_instance_parallel(const LatentUpdateArgs& a, const Hyper& h, int threads) {
  parallel_for(a.n, threads, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      if (!is_active(a, i)) continue;
      update_instance(a, a.noise, h, i);
      update_instance(a, a.embed, h, i);
    }
  });
}

void run_chunk_parallel(const LatentUpdateArgs& a, const Hyper& h, int threads) {
  // Items: all (instance, chunk) pairs of the noise part, then those of the embedding part.
  const LatentPart* parts[2] = {&a.noise, &a.embed};
  const std::int64_t part_items[2] = {a.n * chunks_of(a.noise), a.n * chunks_of(a.embed)};
  const std::int64_t total = part_items[0] + part_items[1];
  std::vector<float> chunk_sum_sq(static_cast<std::size_t>(total), 0.0f);
  auto locate = [&](std::int64_t item, int* which, std::int64_t* i, std::int64_t* k) {
    *which = item < part_items[0] ? 0 : 1;
    const std::int64_t local = *which == 0 ? item : item - part_items[0];
    const std::int64_t chunks = chunks_of(*parts[*which]);
    *i = local / chunks;
    *k = local % chunks;
  };

  parallel_for(total, threads, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t item = begin; item < end; ++item) {
      int which;
      std::int64_t i, k;
      locate(item, &which, &i, &k);
      if (!is_active(a, i)) continue;
      const LatentPart& part = *parts[which];
      const ChunkUpdate update = pick_update(a.optimizer, part.projection);
      chunk_sum_sq[item] = update(chunk_view(part, i, k), h, coefficients(a, part, i));
    }
  });

  // Per-instance scales (N is small here), summing chunk sums in chunk order as update_instance does.
  std::vector<float> scales(static_cast<std::size_t>(2 * a.n), 1.0f);
  bool any_projection = false;
  for (int which = 0; which < 2; ++which) {
    const LatentPart& part = *parts[which];
    if (!part.present() || part.projection == Projection::kNone) continue;
    any_projection = true;
    const std::int64_t chunks = chunks_of(part);
    const std::int64_t first = which == 0 ? 0 : part_items[0];
    for (std::int64_t i = 0; i < a.n; ++i) {
      if (!is_active(a, i)) continue;
      double sum_sq = 0.0;
      for (std::int64_t k = 0; k < chunks; ++k) sum_sq += chunk_sum_sq[first + i * chunks + k];
      scales[which * a.n + i] = projection_scale(part, i, sum_sq);
    }
  }
  if (!any_projection) return;

  parallel_for(total, threads, 1, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t item = begin; item < end; ++item) {
      int which;
      std::int64_t i, k;
      locate(item, &which, &i, &k);
      const float scale = scales[which * a.n + i];
      if (scale != 1.0f) scale_chunk(chunk_view(*parts[which], i, k), parts[which]->projection, scale);
    }
  });
}

void increment_steps(const LatentUpdateArgs& a) {
  float* step = as_ptr<float>(a.step);
  for (std::int64_t i = 0; i < a.n; ++i) {
    if (is_active(a, i)) step[i] += 1.0f;
  }
}

void latent_update_cpu(const LatentUpdateArgs& a, int threads) {
  if (a.n == 0) return;
  const Hyper h = make_hyper(a);
  if (a.n >= kInstancesPerThread * threads) {
    run_instance_parallel(a, h, threads);
  } else {
    run_chunk_parallel(a, h, threads);
  }
  increment_steps(a);
}

// ---------------------------------------------------------------------------------------------
// Argument parsing and validation (shared by the CPU and CUDA entry points)
// ---------------------------------------------------------------------------------------------

template <typename T>
T take(py::kwargs& kwargs, const char* name) {
  UTILGEN_CHECK(kwargs.contains(name), "latent_update: missing keyword argument '" << name << "'");
  T value = kwargs[name].cast<T>();
  PyDict_DelItemString(kwargs.ptr(), name);
  return value;
}

LatentPart take_part(py::kwargs& kwargs, const std::string& prefix) {
  auto key = [&](const char* field) { return prefix + "_" + field; };
  LatentPart part;
  part.param = take<std::uintptr_t>(kwargs, key("param").c_str());
  part.grad = take<std::uintptr_t>(kwargs, key("grad").c_str());
  part.exp_avg = take<std::uintptr_t>(kwargs, key("exp_avg").c_str());
  part.exp_avg_sq = take<std::uintptr_t>(kwargs, key("exp_avg_sq").c_str());
  part.lr = take<std::uintptr_t>(kwargs, key("lr").c_str());
  part.numel = take<std::int64_t>(kwargs, key("numel").c_str());
  part.dtype = take<int>(kwargs, key("dtype").c_str());
  return part;
}

// Builds the arguments from the keywords utilgen/ops/latent_update.py passes (_native_args);
// leaves the backend-specific keywords (threads, workspace, stream) in `kwargs`.
LatentUpdateArgs take_args(py::kwargs& kwargs) {
  LatentUpdateArgs a;
  a.n = take<std::int64_t>(kwargs, "n");
  a.optimizer = static_cast<OptimizerKind>(take<int>(kwargs, "optimizer"));
  a.beta1 = take<float>(kwargs, "beta1");
  a.beta2 = take<float>(kwargs, "beta2");
  a.eps = take<float>(kwargs, "eps");
  a.weight_decay = take<float>(kwargs, "weight_decay");
  a.momentum = take<float>(kwargs, "momentum");
  a.maximize = take<bool>(kwargs, "maximize");
  a.step = take<std::uintptr_t>(kwargs, "step");
  a.active = take<std::uintptr_t>(kwargs, "active");
  a.noise = take_part(kwargs, "noise");
  a.embed = take_part(kwargs, "embed");
  if (take<bool>(kwargs, "noise_project_shell")) {
    a.noise.projection = Projection::kShell;
    a.noise.shell_norm = static_cast<float>(std::sqrt(static_cast<double>(a.noise.numel)));
  }
  a.embed.center = take<std::uintptr_t>(kwargs, "embed_anchor");
  a.embed.center_stride = take<std::int64_t>(kwargs, "embed_anchor_stride");
  a.embed.radius = take<std::uintptr_t>(kwargs, "embed_max_distance");
  if (a.embed.center != 0) a.embed.projection = Projection::kBall;
  return a;
}

void validate_part(const LatentUpdateArgs& a, const LatentPart& part, const char* name) {
  if (!part.present()) return;
  UTILGEN_CHECK(part.numel > 0, "latent_update: " << name << " has " << part.numel << " elements per instance");
  UTILGEN_CHECK(part.dtype == kFloat32 || part.dtype == kFloat16 || part.dtype == kBFloat16,
                "latent_update: " << name << " has unknown dtype code " << part.dtype);
  UTILGEN_CHECK_PTR(part.grad, std::string(name) + "_grad");
  UTILGEN_CHECK_PTR(part.lr, std::string(name) + "_lr");
  if (a.optimizer != OptimizerKind::kSgdPlain) UTILGEN_CHECK_PTR(part.exp_avg, std::string(name) + "_exp_avg");
  if (a.optimizer == OptimizerKind::kAdam) UTILGEN_CHECK_PTR(part.exp_avg_sq, std::string(name) + "_exp_avg_sq");
  if (part.projection == Projection::kBall) {
    UTILGEN_CHECK_PTR(part.radius, std::string(name) + "_max_distance");
    UTILGEN_CHECK(part.center_stride == 0 || part.center_stride == part.numel,
                  "latent_update: " << name << " anchor stride " << part.center_stride << " must be 0 (shared anchor) or "
                                    << part.numel << " (one per instance)");
  }
}

void validate(const LatentUpdateArgs& a) {
  UTILGEN_CHECK(a.n >= 0, "latent_update: n=" << a.n << " must be >= 0");
  const int kind = static_cast<int>(a.optimizer);
  UTILGEN_CHECK(kind >= static_cast<int>(OptimizerKind::kAdam) && kind <= static_cast<int>(OptimizerKind::kSgdPlain),
                "latent_update: optimizer code " << kind << " is not a utilgen._C.OptimizerKind value");
  UTILGEN_CHECK(a.noise.present() || a.embed.present(), "latent_update: neither noise nor embed is given");
  UTILGEN_CHECK(a.beta1 >= 0.0f && a.beta1 < 1.0f && a.beta2 >= 0.0f && a.beta2 < 1.0f,
                "latent_update: betas (" << a.beta1 << ", " << a.beta2 << ") must lie in [0, 1)");
  UTILGEN_CHECK(a.optimizer != OptimizerKind::kAdam || a.eps > 0.0f, "latent_update: eps=" << a.eps << " must be positive");
  UTILGEN_CHECK_PTR(a.step, "step");
  validate_part(a, a.noise, "noise");
  validate_part(a, a.embed, "embed");
}

void reject_leftovers(const py::kwargs& kwargs) {
  if (kwargs.size() == 0) return;
  std::string names;
  for (const auto& item : kwargs) names += " " + py::str(item.first).cast<std::string>();
  UTILGEN_CHECK(false, "latent_update: unexpected keyword arguments:" << names);
}

void latent_update_cpu_entry(py::kwargs kwargs) {
  LatentUpdateArgs a = take_args(kwargs);
  const int threads = take<int>(kwargs, "threads");
  reject_leftovers(kwargs);
  validate(a);
  UTILGEN_CHECK(threads >= 1, "latent_update: threads=" << threads << " must be >= 1");
  for (const LatentPart* part : {&a.noise, &a.embed}) {
    UTILGEN_CHECK(!part->present() || part->dtype == kFloat32,
                  "latent_update: the C++ CPU kernel takes float32 parameters, got " << dtype_name(part->dtype)
                                                                                    << "; use backend='reference' or float32");
  }
  py::gil_scoped_release release;
  latent_update_cpu(a, threads);
}

#ifdef UTILGEN_WITH_CUDA
void latent_update_cuda_entry(py::kwargs kwargs) {
  LatentUpdateArgs a = take_args(kwargs);
  const auto workspace = take<std::uintptr_t>(kwargs, "workspace");
  const auto workspace_numel = take<std::int64_t>(kwargs, "workspace_numel");
  const auto stream = take<std::uintptr_t>(kwargs, "stream");
  reject_leftovers(kwargs);
  validate(a);
  latent_update_cuda(a, workspace, workspace_numel, stream);
}
#endif

}  // namespace

void register_latent_update(py::module_& m) {
  py::enum_<OptimizerKind>(m, "OptimizerKind", "latent_update's optimizer codes (csrc/latent_update.h)")
      .value("adam", OptimizerKind::kAdam)
      .value("sgd_momentum", OptimizerKind::kSgdMomentum)
      .value("sgd", OptimizerKind::kSgdPlain);
  py::enum_<Projection>(m, "Projection", "latent_update's projection of a part after the step (csrc/latent_update.h)")
      .value("none", Projection::kNone)
      .value("shell", Projection::kShell)
      .value("ball", Projection::kBall);
  m.attr("latent_update_tiny_norm") = kTinyNorm;
  m.def("latent_update_cpu", &latent_update_cpu_entry,
        "Fused Adam/SGD step over N noises and N prompt embeddings (fp32, CPU, OpenMP), in place. "
        "Keyword arguments only; called by utilgen.ops.latent_update.");
#ifdef UTILGEN_WITH_CUDA
  m.def("latent_update_cuda", &latent_update_cuda_entry,
        "CUDA version of latent_update_cpu (fp32/fp16/bf16 params, fp32 state), enqueued on `stream`.");
  m.attr("latent_update_cuda_chunk") = kLatentUpdateCudaChunk;
#endif
}

}  // namespace utilgen

"""``latent_update``: one fused optimiser step over N initial noises and N prompt embeddings (ILPO).

ILPO (docs/method.md, "ILPO") optimises, per generated instance, a prompt embedding
(and optionally the initial noise) with a few Adam steps. All N instances of a
batch step together: one call updates every noise, every embedding and their
optimiser state in place, then optionally

- projects each noise back onto the Gaussian shell ``||noise_i|| = sqrt(C*H*W)``
  so it stays in distribution, and
- projects each embedding back into the ball of radius ``r_i`` around its anchor
  (the class embedding), a hard tether against drift.

Backends (``utilgen.ops._backend``): ``reference`` (fp32 PyTorch, the spec),
``cpp`` (C++/OpenMP, CPU fp32), ``cuda`` (CUDA tensors, fp32/fp16/bf16 params
with fp32 state) and ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

This is an optimiser step, not a differentiable function: it runs under
``torch.no_grad()``, registers no autograd formula, and must not be traced
through by a backward pass. It never synchronises with the host: per-instance
scalars are (N,) device tensors and every data-dependent choice (active mask,
whether an embedding is outside its ball) is made inside the kernels.
"""

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from utilgen import _native
from utilgen.ops import _backend

SUPPORT = _backend.OpSupport(
    "latent_update",
    cpp_dtypes=(torch.float32,),
    cuda_dtypes=(torch.float32, torch.float16, torch.bfloat16),
    triton_dtypes=(torch.float32, torch.float16, torch.bfloat16),
)

OPTIMIZERS = ("adam", "sgd")
# Below this norm a projection leaves the instance alone instead of dividing by ~0. The kernels'
# copies (csrc/latent_update.h kTinyNorm, exported as _C.latent_update_tiny_norm; kernels/latent_update.py)
# are checked against this one by tests/test_latent_update.py.
_TINY_NORM = 1e-12

ScalarOrPerInstance = float | Tensor


@dataclass(frozen=True, eq=False)
class LatentUpdateSettings:
    """How a ``latent_update`` step moves the parameters: everything but the tensors it updates.

    Shared by ``latent_update`` and ``latent_update_reference``; equations in the latter.

    Attributes:
        optimizer: "adam" or "sgd".
        noise_lr, embed_lr: float, or (N,) tensor of per-instance learning rates; each is
            required when its part is given.
        betas, eps: Adam's (torch.optim.Adam's defaults).
        weight_decay: L2, added to the gradient as torch.optim does.
        momentum: SGD's momentum (dampening 0, no Nesterov); 0 is plain SGD with no buffer.
        maximize: ascend the objective instead of descending it.
        project_noise: renormalise each noise to norm sqrt(C*H*W) after the step.
        embed_anchor, embed_max_distance: (N, L, D) / (1, L, D) / (L, D) anchors and a float or
            (N,) radius; each embedding is projected back into its ball. Both or neither.
    """

    optimizer: str = "adam"
    noise_lr: ScalarOrPerInstance | None = None
    embed_lr: ScalarOrPerInstance | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    maximize: bool = False
    project_noise: bool = False
    embed_anchor: Tensor | None = None
    embed_max_distance: ScalarOrPerInstance | None = None


@dataclass
class LatentUpdateState:
    """Optimiser state of N instances, updated in place by ``latent_update``.

    Attributes:
        step: (N,) float32, steps taken by each instance (only active instances step).
        noise_exp_avg: (N, C, H, W) float32 first moment (Adam) / momentum buffer (SGD), or None.
        noise_exp_avg_sq: (N, C, H, W) float32 second moment (Adam only), or None.
        embed_exp_avg: (N, L, D) float32, as noise_exp_avg, or None.
        embed_exp_avg_sq: (N, L, D) float32, as noise_exp_avg_sq, or None.
    """

    step: Tensor
    noise_exp_avg: Tensor | None = None
    noise_exp_avg_sq: Tensor | None = None
    embed_exp_avg: Tensor | None = None
    embed_exp_avg_sq: Tensor | None = None

    @classmethod
    def zeros_like(
        cls, noise: Tensor | None, embed: Tensor | None, optimizer: str = "adam", momentum: float = 0.0
    ) -> "LatentUpdateState":
        """Fresh state for ``noise`` (N, C, H, W) and/or ``embed`` (N, L, D).

        Adam gets both moments; SGD gets a momentum buffer only when ``momentum != 0``.
        """
        _check_optimizer(optimizer)
        first = noise if noise is not None else embed
        if first is None:
            raise ValueError("LatentUpdateState.zeros_like needs noise or embed (both are None)")
        wants_exp_avg = optimizer == "adam" or momentum != 0.0
        wants_exp_avg_sq = optimizer == "adam"

        def zeros(like: Tensor | None, wanted: bool) -> Tensor | None:
            if like is None or not wanted:
                return None
            return torch.zeros(like.shape, dtype=torch.float32, device=like.device)

        return cls(
            step=torch.zeros(first.shape[0], dtype=torch.float32, device=first.device),
            noise_exp_avg=zeros(noise, wants_exp_avg),
            noise_exp_avg_sq=zeros(noise, wants_exp_avg_sq),
            embed_exp_avg=zeros(embed, wants_exp_avg),
            embed_exp_avg_sq=zeros(embed, wants_exp_avg_sq),
        )


# ---------------------------------------------------------------------------------------------
# Argument checking and normalisation (shared by the public op and the public reference)
# ---------------------------------------------------------------------------------------------


def _check_optimizer(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")


def _check_tensor(
    tensor: Tensor,
    name: str,
    *,
    shape: tuple[int, ...],
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device != device:
        raise ValueError(
            f"{name} is on {tensor.device} but the parameters are on {device}; move it with .to({str(device)!r})"
        )
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}; expected {allowed}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} is not contiguous; call .contiguous() on it first")


_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_part(
    label: str,
    param: Tensor,
    grad: Tensor | None,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    *,
    ndim: int,
    dims: str,
    optimizer: str,
    momentum: float,
    device: torch.device,
) -> None:
    if not isinstance(param, Tensor):
        raise TypeError(f"{label} must be a torch.Tensor or None, got {type(param).__name__}")
    if param.dim() != ndim:
        raise ValueError(f"{label} must have shape {dims}, got {tuple(param.shape)}")
    _check_tensor(param, label, shape=tuple(param.shape), device=device, dtypes=_PARAM_DTYPES)
    if grad is None:
        raise ValueError(f"{label}_grad is None but {label} is given; pass its gradient")
    _check_tensor(grad, f"{label}_grad", shape=tuple(param.shape), device=device, dtypes=(param.dtype,))
    state = f"state.{label}_exp_avg"
    if optimizer == "adam" or momentum != 0.0:
        if exp_avg is None:
            raise ValueError(
                f"{state} is None; create the state with "
                "LatentUpdateState.zeros_like(noise, embed, optimizer, momentum)"
            )
        _check_tensor(exp_avg, state, shape=tuple(param.shape), device=device, dtypes=(torch.float32,))
    if optimizer == "adam":
        if exp_avg_sq is None:
            raise ValueError(f"{state}_sq is None; Adam needs it (LatentUpdateState.zeros_like(noise, embed))")
        _check_tensor(exp_avg_sq, f"{state}_sq", shape=tuple(param.shape), device=device, dtypes=(torch.float32,))


def _per_instance(value: ScalarOrPerInstance, name: str, n: int, device: torch.device) -> Tensor:
    """A float or a (N,)/0-d tensor as an (N,) float32 tensor on ``device`` (no host sync)."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(n)
        if tuple(value.shape) != (n,):
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}; expected a float or a ({n},) tensor (one per instance)"
            )
        if not value.is_floating_point():
            raise ValueError(f"{name} has dtype {value.dtype}; expected a floating-point tensor")
        return value.to(device=device, dtype=torch.float32).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a ({n},) tensor, got {type(value).__name__}")
    return torch.full((n,), float(value), dtype=torch.float32, device=device)


def _prepare(
    noise: Tensor | None,
    noise_grad: Tensor | None,
    embed: Tensor | None,
    embed_grad: Tensor | None,
    state: LatentUpdateState,
    settings: LatentUpdateSettings,
    active: Tensor | None,
) -> dict:
    """Validates everything and returns the custom op's keyword arguments (minus ``backend``).

    The one place the settings are flattened into the op's tensor and scalar arguments.
    """
    if not isinstance(settings, LatentUpdateSettings):
        raise TypeError(f"settings must be a LatentUpdateSettings, got {type(settings).__name__}")
    optimizer, betas, eps, momentum = settings.optimizer, settings.betas, settings.eps, settings.momentum
    weight_decay, project_noise = settings.weight_decay, settings.project_noise
    noise_lr, embed_lr = settings.noise_lr, settings.embed_lr
    _check_optimizer(optimizer)
    if noise is None and embed is None:
        raise ValueError("latent_update needs noise or embed (both are None)")
    if not isinstance(state, LatentUpdateState):
        raise TypeError(f"state must be a LatentUpdateState, got {type(state).__name__}")
    first = noise if noise is not None else embed
    if not isinstance(first, Tensor):
        raise TypeError(
            f"{'noise' if noise is not None else 'embed'} must be a torch.Tensor, got {type(first).__name__}"
        )
    device, n = first.device, first.shape[0]
    beta1, beta2 = (float(b) for b in betas)
    if optimizer == "adam":
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas={betas} must lie in [0, 1)")
        if not eps > 0.0:
            raise ValueError(f"eps={eps} must be positive")
        if momentum != 0.0:
            raise ValueError("momentum applies to optimizer='sgd'; Adam's momentum is betas[0]")
    if momentum < 0.0 or weight_decay < 0.0:
        raise ValueError(f"momentum={momentum} and weight_decay={weight_decay} must be >= 0")

    if noise is not None and embed is not None and isinstance(embed, Tensor) and embed.shape[0] != n:
        raise ValueError(f"noise has N={n} instances but embed has N={embed.shape[0]}; they must match")
    if noise is None and project_noise:
        raise ValueError("project_noise=True but noise is None")
    for label, param, grad, lr, ndim, dims in (
        ("noise", noise, noise_grad, noise_lr, 4, "(N, C, H, W)"),
        ("embed", embed, embed_grad, embed_lr, 3, "(N, L, D)"),
    ):
        if param is None:
            continue
        exp_avg, exp_avg_sq = getattr(state, f"{label}_exp_avg"), getattr(state, f"{label}_exp_avg_sq")
        _check_part(
            label,
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            ndim=ndim,
            dims=dims,
            optimizer=optimizer,
            momentum=momentum,
            device=device,
        )
        if lr is None:
            raise ValueError(f"{label}_lr is required when {label} is given")
    _check_tensor(state.step, "state.step", shape=(n,), device=device, dtypes=(torch.float32,))
    if active is not None:
        _check_tensor(active, "active", shape=(n,), device=device, dtypes=(torch.bool,))

    anchor, radius = _prepare_anchor(embed, settings.embed_anchor, settings.embed_max_distance, n, device)
    use_buffer = optimizer == "adam" or momentum != 0.0
    return {
        "noise": noise,
        "noise_grad": noise_grad if noise is not None else None,
        "noise_exp_avg": state.noise_exp_avg if noise is not None and use_buffer else None,
        "noise_exp_avg_sq": state.noise_exp_avg_sq if noise is not None and optimizer == "adam" else None,
        "noise_lr": _per_instance(noise_lr, "noise_lr", n, device) if noise is not None else None,
        "embed": embed,
        "embed_grad": embed_grad if embed is not None else None,
        "embed_exp_avg": state.embed_exp_avg if embed is not None and use_buffer else None,
        "embed_exp_avg_sq": state.embed_exp_avg_sq if embed is not None and optimizer == "adam" else None,
        "embed_lr": _per_instance(embed_lr, "embed_lr", n, device) if embed is not None else None,
        "embed_anchor": anchor,
        "embed_max_distance": radius,
        "step": state.step,
        "active": active,
        "optimizer": optimizer,
        "beta1": beta1,
        "beta2": beta2,
        "eps": float(eps),
        "weight_decay": float(weight_decay),
        "momentum": float(momentum),
        "maximize": bool(settings.maximize),
        "project_noise": bool(project_noise),
    }


def _prepare_anchor(embed, anchor, max_distance, n, device) -> tuple[Tensor | None, Tensor | None]:
    """Anchor as (N, L, D) or (1, L, D) (shared), radius as (N,) fp32; both or neither."""
    if anchor is None and max_distance is None:
        return None, None
    if anchor is None or max_distance is None:
        raise ValueError(
            "embed_anchor and embed_max_distance go together: pass both to bound the embeddings, or neither"
        )
    if embed is None:
        raise ValueError("embed_anchor is given but embed is None")
    if not isinstance(anchor, Tensor):
        raise TypeError(f"embed_anchor must be a torch.Tensor, got {type(anchor).__name__}")
    length, width = embed.shape[1], embed.shape[2]
    if anchor.dim() == 2:
        anchor = anchor.unsqueeze(0)  # (1, L, D): one anchor shared by all instances
    if anchor.dim() != 3 or anchor.shape[0] not in (1, n) or tuple(anchor.shape[1:]) != (length, width):
        raise ValueError(
            f"embed_anchor has shape {tuple(anchor.shape)}; expected ({n}, {length}, {width}), (1, {length}, {width}) "
            f"or ({length}, {width})"
        )
    _check_tensor(anchor, "embed_anchor", shape=tuple(anchor.shape), device=device, dtypes=(embed.dtype,))
    return anchor, _per_instance(max_distance, "embed_max_distance", n, device)


# ---------------------------------------------------------------------------------------------
# Reference (the spec)
# ---------------------------------------------------------------------------------------------


def latent_update_reference(
    noise: Tensor | None,
    noise_grad: Tensor | None,
    embed: Tensor | None,
    embed_grad: Tensor | None,
    state: LatentUpdateState,
    settings: LatentUpdateSettings,
    *,
    active: Tensor | None = None,
) -> None:
    """One optimiser step on every active instance, in fp32 PyTorch; updates everything in place.

    Shapes: noise, noise_grad (N, C, H, W); embed, embed_grad (N, L, D); active (N,) bool.
    Either part may be None. ``settings``: see ``LatentUpdateSettings``.

    For each active instance i and each part x (noise or embed) with gradient g,
    step t_i <- t_i + 1, and (``maximize`` flips g; ``weight_decay`` is L2, as torch):

        g   = ±g + weight_decay * x
        Adam:  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
               x = x - lr_i / (1 - beta1^t_i) * m / (sqrt(v) / sqrt(1 - beta2^t_i) + eps)
        SGD:   b = momentum b + g (b = g at the first step);  x = x - lr_i b
               (momentum = 0: x = x - lr_i g, no buffer)

    then, per instance,

        project_noise:  noise_i <- noise_i * sqrt(C H W) / ||noise_i||
        anchor bound:   if ||e_i - a_i|| > r_i:  e_i <- a_i + (e_i - a_i) r_i / ||e_i - a_i||

    Inactive instances keep their parameters, state and step untouched.
    """
    with torch.no_grad():
        _reference_impl(_prepare(noise, noise_grad, embed, embed_grad, state, settings, active))


def _per_instance_view(values: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) so it broadcasts over one instance's elements."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def _reference_step(
    param, grad, exp_avg, exp_avg_sq, lr, step, *, optimizer, beta1, beta2, eps, weight_decay, momentum, maximize
):
    """New (param, exp_avg, exp_avg_sq) in fp32 for every instance; the caller masks inactive ones."""
    x = param.float()  # (N, ...)
    g = -grad.float() if maximize else grad.float()
    if weight_decay != 0.0:
        g = g + weight_decay * x
    lr = _per_instance_view(lr, x)
    if optimizer == "adam":
        t = _per_instance_view(step, x)  # steps including this one
        m = exp_avg.lerp(g, 1.0 - beta1)  # torch.optim.Adam's form of beta1 m + (1 - beta1) g
        v = exp_avg_sq * beta2 + (1.0 - beta2) * g * g
        bias_correction1 = 1.0 - torch.pow(beta1, t)
        bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, t))
        denom = v.sqrt() / bias_correction2_sqrt + eps
        return x - (lr / bias_correction1) * (m / denom), m, v
    if exp_avg is None:  # plain SGD
        return x - lr * g, None, None
    buffer = exp_avg * momentum + g  # dampening 0: the zero buffer makes step 1 give b = g, as torch
    return x - lr * buffer, buffer, None


def _project(x: Tensor, center: Tensor | None, target: Tensor, only_shrink: bool) -> Tensor:
    """Rescales x - center (per instance) to norm ``target`` (N,).

    ``only_shrink`` leaves instances already inside the ball bit-for-bit as they are;
    a (near) zero offset has no direction and is left alone too.
    """
    offset = x if center is None else x - center.float()
    norm = offset.flatten(1).norm(dim=1)  # (N,)
    moves = norm >= _TINY_NORM
    if only_shrink:
        moves = moves & (norm > target)
    moved = offset * _per_instance_view(target / norm.clamp_min(_TINY_NORM), offset)
    projected = moved if center is None else center.float() + moved
    return torch.where(_per_instance_view(moves, x), projected, x)


def _write_back(dst: Tensor | None, new: Tensor | None, active: Tensor | None) -> None:
    if dst is None:
        return
    if active is not None:
        new = torch.where(_per_instance_view(active, new), new, dst.float())
    dst.copy_(new)


def _reference_impl(args: dict) -> None:
    """The step on the custom op's (validated) arguments, by name, in fp32 PyTorch."""
    hyper = {
        name: args[name] for name in ("optimizer", "beta1", "beta2", "eps", "weight_decay", "momentum", "maximize")
    }
    step, active = args["step"], args["active"]
    new_step = step + 1.0  # (N,)
    for part in ("noise", "embed"):
        param = args[part]
        if param is None:
            continue
        exp_avg, exp_avg_sq = args[f"{part}_exp_avg"], args[f"{part}_exp_avg_sq"]
        x, m, v = _reference_step(
            param, args[f"{part}_grad"], exp_avg, exp_avg_sq, args[f"{part}_lr"], new_step, **hyper
        )
        if part == "noise" and args["project_noise"]:
            shell = torch.full_like(new_step, math.sqrt(x[0].numel()))
            x = _project(x, None, shell, only_shrink=False)
        if part == "embed" and args["embed_anchor"] is not None:
            x = _project(x, args["embed_anchor"], args["embed_max_distance"], only_shrink=True)
        for dst, new in ((param, x), (exp_avg, m), (exp_avg_sq, v)):
            _write_back(dst, new, active)
    _write_back(step, new_step, active)


# ---------------------------------------------------------------------------------------------
# Kernel backends
# ---------------------------------------------------------------------------------------------


def _optimizer_kind(args: dict) -> str:
    """The kernels' name for the step: "adam", "sgd_momentum" (SGD with a buffer) or "sgd".

    Names of ``enum class OptimizerKind`` (csrc/latent_update.h), which the extension exports as
    ``_C.OptimizerKind`` and the Triton kernel branches on (tests/test_latent_update.py checks both).
    """
    if args["optimizer"] == "adam":
        return "adam"
    exp_avg = args["noise_exp_avg"] if args["noise"] is not None else args["embed_exp_avg"]
    return "sgd_momentum" if exp_avg is not None else "sgd"


def _native_args(args: dict) -> dict:
    """The custom op's arguments as the extension's keyword arguments (pointers, sizes, codes)."""
    noise, embed, anchor = args["noise"], args["embed"], args["embed_anchor"]
    first = noise if noise is not None else embed
    out = {
        "n": first.shape[0],
        "optimizer": getattr(_native.extension().OptimizerKind, _optimizer_kind(args)).value,
        "beta1": args["beta1"],
        "beta2": args["beta2"],
        "eps": args["eps"],
        "weight_decay": args["weight_decay"],
        "momentum": args["momentum"],
        "maximize": args["maximize"],
        "step": _native.ptr(args["step"]),
        "active": _native.ptr(args["active"]),
    }
    for part, param in (("noise", noise), ("embed", embed)):
        out.update(
            {
                f"{part}_param": _native.ptr(param),
                f"{part}_grad": _native.ptr(args[f"{part}_grad"]),
                f"{part}_exp_avg": _native.ptr(args[f"{part}_exp_avg"]),
                f"{part}_exp_avg_sq": _native.ptr(args[f"{part}_exp_avg_sq"]),
                f"{part}_lr": _native.ptr(args[f"{part}_lr"]),
                f"{part}_numel": 0 if param is None else param[0].numel(),
                f"{part}_dtype": 0 if param is None else _native.dtype_code(param),
            }
        )
    out["noise_project_shell"] = args["project_noise"]
    out["embed_anchor"] = _native.ptr(anchor)
    out["embed_anchor_stride"] = 0 if anchor is None or anchor.shape[0] == 1 else anchor[0].numel()
    out["embed_max_distance"] = _native.ptr(args["embed_max_distance"])
    return out


def _run_cpp(args: dict) -> None:
    _native.extension().latent_update_cpu(**_native_args(args), threads=_native.cpu_threads())


def _run_cuda(args: dict) -> None:
    module = _native.extension()
    native = _native_args(args)
    chunk = module.latent_update_cuda_chunk
    first = args["noise"] if args["noise"] is not None else args["embed"]
    # Per-(instance, chunk) partial sums of squares for the projections, written then read on
    # the stream by the kernels: a device buffer instead of a host round trip.
    chunks = max(-(-native["noise_numel"] // chunk), -(-native["embed_numel"] // chunk), 1)
    workspace = torch.empty(2 * native["n"] * chunks, dtype=torch.float32, device=first.device)
    module.latent_update_cuda(
        **native, workspace=_native.ptr(workspace), workspace_numel=workspace.numel(), stream=_native.cuda_stream(first)
    )


def _run_triton(args: dict) -> None:
    from utilgen.kernels import latent_update as triton_kernels  # lazy: never at `import utilgen.ops`

    triton_kernels.latent_update_triton(args, _optimizer_kind(args))


_RUNNERS = {
    "reference": _reference_impl,
    "cpp": _run_cpp,
    "cuda": _run_cuda,
    "triton": _run_triton,
}


# ---------------------------------------------------------------------------------------------
# The custom op
# ---------------------------------------------------------------------------------------------

_MUTATED = ("noise", "noise_exp_avg", "noise_exp_avg_sq", "embed", "embed_exp_avg", "embed_exp_avg_sq", "step")


def _latent_update_default(
    noise: Tensor | None,
    noise_grad: Tensor | None,
    noise_exp_avg: Tensor | None,
    noise_exp_avg_sq: Tensor | None,
    noise_lr: Tensor | None,
    embed: Tensor | None,
    embed_grad: Tensor | None,
    embed_exp_avg: Tensor | None,
    embed_exp_avg_sq: Tensor | None,
    embed_lr: Tensor | None,
    embed_anchor: Tensor | None,
    embed_max_distance: Tensor | None,
    step: Tensor,
    active: Tensor | None,
    optimizer: str,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    maximize: bool,
    project_noise: bool,
    backend: str,
) -> None:
    """The op's flat arguments (``_prepare`` builds them); devices other than CPU and CUDA run the reference."""
    args = dict(locals())
    args.pop("backend")
    _reference_impl(args)


_SIGNATURE = inspect.signature(_latent_update_default)
_latent_update_op = torch.library.custom_op("utilgen::latent_update", mutates_args=_MUTATED)(_latent_update_default)


def _device_kernel(device_backends: tuple[str, ...]):
    """The kernel of one device: runs the backend the public op resolved (an op argument)."""

    def kernel(*args, **kwargs) -> None:
        bound = _SIGNATURE.bind(*args, **kwargs).arguments
        backend = bound.pop("backend")
        if backend not in device_backends:
            raise ValueError(
                f"latent_update: backend {backend!r} cannot run here; this device takes {', '.join(device_backends)}"
            )
        device = bound["step"].device
        if device.type != "cuda":
            _RUNNERS[backend](bound)
            return
        # Python custom ops get no device guard; the CUDA and Triton launches use the current device.
        with torch.cuda.device(device):
            _RUNNERS[backend](bound)

    return kernel


_latent_update_op.register_kernel("cpu")(_device_kernel(("reference", "cpp", "triton")))
_latent_update_op.register_kernel("cuda")(_device_kernel(("reference", "cuda", "triton")))


@_latent_update_op.register_fake
def _(*args) -> None:
    """Returns nothing: every output is an input updated in place."""
    return None


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def _resolve_backend(args: dict, explicit: str | None) -> str:
    params = [t for t in (args["noise"], args["embed"]) if t is not None]
    # The most restrictive dtype decides (the C++ kernel takes fp32 only).
    tensor = next((t for t in params if t.dtype != torch.float32), params[0])
    return _backend.resolve(SUPPORT, tensor, explicit)


def latent_update(
    noise: Tensor | None,
    noise_grad: Tensor | None,
    embed: Tensor | None,
    embed_grad: Tensor | None,
    state: LatentUpdateState,
    settings: LatentUpdateSettings,
    *,
    active: Tensor | None = None,
    backend: str | None = None,
) -> None:
    """One fused optimiser step over N instances' noises and prompt embeddings, in place.

    Equations and shapes: see ``latent_update_reference``. With the options off it
    matches ``torch.optim.Adam`` / ``torch.optim.SGD`` (dampening 0, no Nesterov)
    run separately on each instance, bias correction using each instance's step.

    Args:
        noise, noise_grad: (N, C, H, W) initial noises and their gradients, or None.
        embed, embed_grad: (N, L, D) prompt embeddings and their gradients, or None.
        state: ``LatentUpdateState.zeros_like(noise, embed, optimizer, momentum)``.
        settings: optimiser, learning rates and projections (``LatentUpdateSettings``).
        active: (N,) bool; inactive instances are left entirely untouched.
        backend: None (``UTILGEN_BACKEND`` / ``use_backend`` / auto) or a backend name.

    Params and grads: float32 (all backends) or float16/bfloat16 (cuda, triton,
    reference); state is always float32 and the math runs in float32.
    Not differentiable: this is an optimiser step and runs under ``torch.no_grad()``.
    """
    args = _prepare(noise, noise_grad, embed, embed_grad, state, settings, active)
    chosen = _resolve_backend(args, backend)
    with torch.no_grad():
        _latent_update_op(**args, backend=chosen)

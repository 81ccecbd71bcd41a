"""utilgen.ops.latent_update: every backend against the reference, the reference against torch.optim."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE, backend_params

from utilgen import _native
from utilgen.ops import (
    BackendUnavailable,
    LatentUpdateSettings,
    LatentUpdateState,
    latent_update,
    latent_update_reference,
)
from utilgen.ops.latent_update import _TINY_NORM, SUPPORT, _native_args, _optimizer_kind, _prepare

BACKENDS = backend_params(SUPPORT)
# The Triton interpreter (triton 3.6, numpy 1.x/2.x) warns on its own loop-bound conversion.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# (N, C, H, W, L, D). "odd": nothing is a power of two, N=5 < 4 * 2 threads so the C++
# kernel runs its chunk-parallel mode; "small_real": parts larger than one 4096-element
# C++ chunk (6400 and 4928 elements), N=16 runs the instance-parallel mode.
SHAPES = {"odd": (5, 3, 7, 9, 7, 13), "small_real": (16, 4, 40, 40, 77, 64)}
STEPS = 3


@dataclass
class Problem:
    noise: torch.Tensor | None  # (N, C, H, W)
    embed: torch.Tensor | None  # (N, L, D)
    state: LatentUpdateState
    grads: list[tuple[torch.Tensor | None, torch.Tensor | None]]  # per step: (noise_grad, embed_grad)


def make_problem(shape, *, optimizer="adam", momentum=0.0, parts=("noise", "embed"), dtype=torch.float32, seed=0):
    n, c, h, w, length, width = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=DEVICE, dtype=dtype)

    noise = randn(n, c, h, w) if "noise" in parts else None
    embed = randn(n, length, width) if "embed" in parts else None
    grads = [
        (randn(n, c, h, w) if noise is not None else None, randn(n, length, width) if embed is not None else None)
        for _ in range(STEPS)
    ]
    state = LatentUpdateState.zeros_like(noise, embed, optimizer, momentum)
    return Problem(noise, embed, state, grads)


def clone_problem(problem: Problem) -> Problem:
    return copy.deepcopy(problem)


def run_steps(problem: Problem, update=latent_update, *, active=None, **kwargs) -> Problem:
    """Every step of ``problem``; ``kwargs`` are ``LatentUpdateSettings`` fields, plus ``backend`` for the op."""
    call = {"active": active}
    if "backend" in kwargs:
        call["backend"] = kwargs.pop("backend")
    settings = LatentUpdateSettings(**kwargs)
    for noise_grad, embed_grad in problem.grads:
        update(problem.noise, noise_grad, problem.embed, embed_grad, problem.state, settings, **call)
    return problem


def state_tensors(problem: Problem) -> dict[str, torch.Tensor]:
    out = {"noise": problem.noise, "embed": problem.embed, "step": problem.state.step}
    for name in ("noise_exp_avg", "noise_exp_avg_sq", "embed_exp_avg", "embed_exp_avg_sq"):
        out[name] = getattr(problem.state, name)
    return {k: v for k, v in out.items() if v is not None}


def assert_problems_close(actual: Problem, expected: Problem, atol=1e-5, rtol=1e-5):
    got, want = state_tensors(actual), state_tensors(expected)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name].float(), want[name].float(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )


def full_options(n: int, embed: torch.Tensor, *, optimizer: str, momentum: float) -> dict:
    """Every feature on: per-instance lr, mask, weight decay, maximize, shell, anchor ball."""
    anchor = embed.float().mul(0.5).to(embed.dtype)  # (N, L, D): the ball is off-centre from the start
    return {
        "optimizer": optimizer,
        "momentum": momentum,
        "noise_lr": torch.linspace(0.01, 0.2, n, device=DEVICE),
        "embed_lr": torch.linspace(0.05, 0.01, n, device=DEVICE),
        "weight_decay": 0.01,
        "maximize": True,
        "active": (torch.arange(n, device=DEVICE) % 3 != 1),
        "project_noise": True,
        "embed_anchor": anchor,
        "embed_max_distance": torch.linspace(0.0, 2.0 * math.sqrt(embed[0].numel()), n, device=DEVICE),
    }


# ---------------------------------------------------------------------------------------------
# Backends against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(
    ("optimizer", "momentum"), [("adam", 0.0), ("sgd", 0.9), ("sgd", 0.0)], ids=["adam", "sgd_momentum", "sgd"]
)
def test_backend_matches_reference_with_every_option(backend, shape, optimizer, momentum):
    problem = make_problem(shape, optimizer=optimizer, momentum=momentum)
    options = full_options(shape[0], problem.embed, optimizer=optimizer, momentum=momentum)
    expected = run_steps(clone_problem(problem), update=latent_update_reference, **options)
    actual = run_steps(clone_problem(problem), backend=backend, **options)
    assert_problems_close(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parts", [("noise",), ("embed",)], ids=["noise_only", "embed_only"])
def test_backend_matches_reference_with_one_part(backend, parts):
    problem = make_problem(SHAPES["odd"], parts=parts)
    options = {"noise_lr": 0.1, "embed_lr": 0.05, "project_noise": "noise" in parts}
    if "embed" in parts:
        options.update(embed_anchor=problem.embed[0].clone(), embed_max_distance=1.0)  # (L, D): one shared anchor
    expected = run_steps(clone_problem(problem), update=latent_update_reference, **options)
    actual = run_steps(clone_problem(problem), backend=backend, **options)
    assert_problems_close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("triton", "cuda")])
def test_half_precision_params_within_dtype_error(backend, dtype):
    """Kernel error at most 2x the reference's own error in that dtype, both against fp32."""
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates fp32->bf16 casts instead of rounding")
    shape = SHAPES["odd"]
    exact = make_problem(shape)
    low = make_problem(shape, dtype=dtype)
    options = full_options(shape[0], exact.embed, optimizer="adam", momentum=0.0)
    low_options = dict(options, embed_anchor=options["embed_anchor"].to(dtype))
    exact = run_steps(exact, update=latent_update_reference, **options)
    reference_low = run_steps(clone_problem(low), update=latent_update_reference, **low_options)
    kernel_low = run_steps(clone_problem(low), backend=backend, **low_options)
    for name in ("noise", "embed"):
        want = getattr(exact, name)
        kernel_error = (getattr(kernel_low, name).float() - want).abs().max()
        reference_error = (getattr(reference_low, name).float() - want).abs().max()
        assert kernel_error <= 2 * reference_error + 1e-6, (name, kernel_error, reference_error)


def test_cpp_result_does_not_depend_on_thread_count():
    if _native.extension() is None or DEVICE != "cpu":
        pytest.skip("needs the C++ extension on CPU")
    before = torch.get_num_threads()
    results = []
    for shape in SHAPES.values():
        problem = make_problem(shape)
        options = full_options(shape[0], problem.embed, optimizer="adam", momentum=0.0)
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            try:
                results.append((shape, run_steps(clone_problem(problem), backend="cpp", **options)))
            finally:
                torch.set_num_threads(before)
    for (shape_a, a), (shape_b, b) in itertools.pairwise(results):
        if shape_a == shape_b:
            for name, tensor in state_tensors(a).items():
                assert torch.equal(tensor, state_tensors(b)[name]), name


# ---------------------------------------------------------------------------------------------
# Behaviour of each option, on every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_inactive_instances_are_untouched(backend):
    problem = make_problem(SHAPES["odd"])
    active = torch.tensor([True, False, True, False, False], device=DEVICE)
    before = {k: v.clone() for k, v in state_tensors(problem).items()}
    run_steps(
        problem,
        backend=backend,
        noise_lr=0.1,
        embed_lr=0.1,
        active=active,
        project_noise=True,
        embed_anchor=problem.embed.clone(),
        embed_max_distance=0.01,
    )
    for name, tensor in state_tensors(problem).items():
        assert torch.equal(tensor[~active], before[name][~active]), name
        assert not torch.equal(tensor[active], before[name][active]), name
    assert problem.state.step.tolist() == [STEPS, 0, STEPS, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_projection_lands_on_gaussian_shell(backend):
    problem = make_problem(SHAPES["small_real"], parts=("noise",))
    problem.noise.mul_(torch.linspace(0.2, 3.0, problem.noise.shape[0], device=DEVICE).view(-1, 1, 1, 1))
    run_steps(problem, backend=backend, noise_lr=0.5, project_noise=True)
    norms = problem.noise.flatten(1).norm(dim=1)
    expected = torch.full_like(norms, math.sqrt(problem.noise[0].numel()))
    torch.testing.assert_close(norms, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_bound_projects_outside_and_leaves_inside(backend):
    """Every step is the free step, then e <- a + (e - a) min(1, r / ||e - a||): onto the ball's surface, or kept."""
    problem = make_problem(SHAPES["odd"], parts=("embed",))
    anchor = problem.embed.clone()  # (N, L, D)
    radius = torch.tensor([0.05, 1e6, 0.2, 1e6, 0.0], device=DEVICE)  # (N,); 1e6: never reached
    bounded = run_steps(
        clone_problem(problem), backend=backend, embed_lr=0.1, embed_anchor=anchor, embed_max_distance=radius
    )
    # The free run, one step at a time. Without weight decay an Adam step depends on the gradients, not on
    # where the embedding is, so the bounded run is the free steps replayed with a projection after each.
    free = clone_problem(problem)
    positions = [free.embed.clone()]
    for grads in problem.grads:
        run_steps(Problem(free.noise, free.embed, free.state, [grads]), backend=backend, embed_lr=0.1)
        positions.append(free.embed.clone())
    expected = problem.embed.clone()
    for before, after in itertools.pairwise(positions):
        offset = expected + (after - before) - anchor  # (N, L, D)
        scale = (radius / offset.flatten(1).norm(dim=1)).clamp(max=1.0)  # (N,)
        expected = anchor + offset * scale.view(-1, 1, 1)
    torch.testing.assert_close(bounded.embed, expected, rtol=1e-5, atol=1e-6)
    inside = radius > 1e5
    assert torch.equal(bounded.embed[inside], free.embed[inside])  # never projected: the free run, bit for bit
    distance = (bounded.embed - anchor).flatten(1).norm(dim=1)  # (N,)
    torch.testing.assert_close(distance[~inside], radius[~inside], rtol=1e-5, atol=1e-6)  # on the surface
    assert torch.all((free.embed - anchor).flatten(1).norm(dim=1)[~inside] > 2 * radius[~inside])  # it had left


# ---------------------------------------------------------------------------------------------
# The reference against torch.optim, one optimiser per instance
# ---------------------------------------------------------------------------------------------


def torch_optim_per_instance(problem: Problem, make_optimizer, lrs: tuple[list[float], list[float]]) -> Problem:
    """Runs one torch.optim optimiser per instance and part on copies of the start point."""
    result = clone_problem(problem)
    n = problem.noise.shape[0]
    for i in range(n):
        noise_i = torch.nn.Parameter(problem.noise[i].clone())
        embed_i = torch.nn.Parameter(problem.embed[i].clone())
        optimizers = [make_optimizer([noise_i], lrs[0][i]), make_optimizer([embed_i], lrs[1][i])]
        for noise_grad, embed_grad in problem.grads:
            noise_i.grad, embed_i.grad = noise_grad[i].clone(), embed_grad[i].clone()
            for opt in optimizers:
                opt.step()
        result.noise[i] = noise_i.detach()
        result.embed[i] = embed_i.detach()
    return result


@pytest.mark.parametrize(("weight_decay", "maximize"), [(0.0, False), (0.1, True)], ids=["plain", "decay_maximize"])
@pytest.mark.parametrize(
    ("optimizer", "momentum"), [("adam", 0.0), ("sgd", 0.9), ("sgd", 0.0)], ids=["adam", "sgd_momentum", "sgd"]
)
def test_reference_matches_torch_optim_per_instance(optimizer, momentum, weight_decay, maximize):
    problem = make_problem(SHAPES["odd"], optimizer=optimizer, momentum=momentum)
    n = problem.noise.shape[0]
    noise_lrs = [0.01 * (i + 1) for i in range(n)]
    embed_lrs = [0.003 * (n - i) for i in range(n)]
    betas = (0.8, 0.99)

    def make_optimizer(params, lr):
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)

    expected = torch_optim_per_instance(problem, make_optimizer, (noise_lrs, embed_lrs))
    extra = {"betas": betas} if optimizer == "adam" else {"momentum": momentum}
    actual = run_steps(
        clone_problem(problem),
        update=latent_update_reference,
        optimizer=optimizer,
        weight_decay=weight_decay,
        maximize=maximize,
        noise_lr=torch.tensor(noise_lrs),
        embed_lr=torch.tensor(embed_lrs),
        **extra,
    )
    for name in ("noise", "embed"):  # deltas from the start point, so tolerance is relative to the step
        start = getattr(problem, name)
        torch.testing.assert_close(getattr(actual, name) - start, getattr(expected, name) - start, atol=2e-6, rtol=1e-5)


def test_adam_bias_correction_uses_each_instance_step():
    """Instance 0 steps three times, instance 1 once: its last step equals a fresh Adam's first."""
    problem = make_problem(SHAPES["odd"], parts=("noise",))
    masks = [
        torch.tensor([True, False, False, False, False]),
        torch.tensor([True, False, False, False, False]),
        torch.tensor([True, True, False, False, False]),
    ]
    start = problem.noise.clone()
    for (noise_grad, _), active in zip(problem.grads, masks, strict=True):
        settings = LatentUpdateSettings(noise_lr=0.1)
        latent_update_reference(problem.noise, noise_grad, None, None, problem.state, settings, active=active)
    fresh = torch.nn.Parameter(start[1].clone())
    opt = torch.optim.Adam([fresh], lr=0.1)
    fresh.grad = problem.grads[2][0][1].clone()
    opt.step()
    # Steps from the start (0.1 here), as in the test above: the two fp32 Adams round differently, by up to
    # 7.2e-7 on entries of magnitude ~3 (AMD EPYC; torch.optim's vectorised path depends on the CPU).
    torch.testing.assert_close(problem.noise[1] - start[1], fresh.detach() - start[1], atol=2e-6, rtol=1e-5)
    assert problem.state.step.tolist() == [3, 1, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# The custom op and autograd
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    problem = make_problem((2, 2, 3, 4, 3, 5))
    n = 2
    args = (
        problem.noise,
        problem.grads[0][0],
        problem.state.noise_exp_avg,
        problem.state.noise_exp_avg_sq,
        torch.full((n,), 0.1, device=DEVICE),
        problem.embed,
        problem.grads[0][1],
        problem.state.embed_exp_avg,
        problem.state.embed_exp_avg_sq,
        torch.full((n,), 0.05, device=DEVICE),
        problem.embed.clone(),
        torch.full((n,), 0.01, device=DEVICE),
        problem.state.step,
        torch.tensor([True, False], device=DEVICE),
        "adam",
        0.9,
        0.999,
        1e-8,
        0.0,
        0.0,
        False,
        True,
        backend,
    )
    torch.library.opcheck(torch.ops.utilgen.latent_update.default, args)


def test_leaf_parameters_requiring_grad_are_updated_without_a_graph():
    problem = make_problem(SHAPES["odd"])
    noise = problem.noise.clone().requires_grad_(True)
    embed = problem.embed.clone().requires_grad_(True)
    settings = LatentUpdateSettings(noise_lr=0.1, embed_lr=0.1)
    latent_update(noise, problem.grads[0][0], embed, problem.grads[0][1], problem.state, settings)
    assert noise.grad_fn is None
    assert embed.grad_fn is None
    assert noise.requires_grad
    assert not torch.equal(noise.detach(), problem.noise)


# ---------------------------------------------------------------------------------------------
# Argument errors a user can act on
# ---------------------------------------------------------------------------------------------


def _call(problem: Problem, **overrides):
    """One step with learning rates 0.1; ``overrides`` name tensors, settings fields, ``active`` or ``backend``."""
    tensors = {
        "noise": problem.noise,
        "noise_grad": problem.grads[0][0],
        "embed": problem.embed,
        "embed_grad": problem.grads[0][1],
        "state": problem.state,
    }
    settings, call = {"noise_lr": 0.1, "embed_lr": 0.1}, {}
    for name, value in overrides.items():
        if name in tensors:
            tensors[name] = value
        elif name in ("active", "backend"):
            call[name] = value
        else:
            settings[name] = value
    latent_update(**tensors, settings=LatentUpdateSettings(**settings), **call)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (lambda p: {"noise_grad": p.grads[0][0].double()}, "noise_grad has dtype float64"),
        (lambda p: {"noise": p.noise.to(torch.int32)}, "noise has dtype int32"),
        (lambda p: {"embed_grad": p.grads[0][1].to("meta")}, "embed_grad is on meta"),
        (lambda p: {"embed_grad": p.grads[0][1][:, :3]}, r"embed_grad has shape \(5, 3, 13\)"),
        (lambda p: {"noise": p.noise[:3], "noise_grad": p.grads[0][0][:3]}, "noise has N=3"),
        (
            lambda p: {"noise_grad": p.grads[0][0].transpose(2, 3).contiguous().transpose(2, 3)},
            r"call \.contiguous\(\)",
        ),
        (lambda p: {"optimizer": "adagrad"}, "optimizer='adagrad' is not supported"),
        (lambda p: {"state": LatentUpdateState.zeros_like(p.noise, None)}, "state.embed_exp_avg is None"),
        (lambda p: {"noise_lr": torch.ones(4)}, r"noise_lr has shape \(4,\)"),
        (lambda p: {"active": torch.ones(5)}, "active has dtype float32"),
        (lambda p: {"embed_anchor": p.embed}, "embed_anchor and embed_max_distance go together"),
        (lambda p: {"embed_anchor": p.embed[:, :2].contiguous(), "embed_max_distance": 1.0}, "embed_anchor has shape"),
        (lambda p: {"momentum": 0.9}, "momentum applies to optimizer='sgd'"),
        (lambda p: {"embed_lr": None}, "embed_lr is required"),
        (
            lambda p: {"noise": p.noise.flatten(2), "noise_grad": p.grads[0][0].flatten(2)},
            r"noise must have shape \(N, C, H, W\)",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(override, message):
    problem = make_problem(SHAPES["odd"])
    with pytest.raises((ValueError, TypeError), match=message):
        _call(problem, **override(problem))


def test_explicit_cpp_backend_rejects_half_precision():
    if DEVICE != "cpu":
        pytest.skip("the C++ backend is CPU only")
    problem = make_problem(SHAPES["odd"], dtype=torch.float16)
    with pytest.raises(BackendUnavailable, match="takes float32"):
        _call(problem, backend="cpp")


def test_cpp_entry_point_validates_its_arguments():
    module = _native.extension()
    if module is None:
        pytest.skip(_native.extension_reason())
    problem = make_problem(SHAPES["odd"], parts=("noise",))
    args = _prepare(
        problem.noise, problem.grads[0][0], None, None, problem.state, LatentUpdateSettings(noise_lr=0.1), None
    )
    native = _native_args(args)
    with pytest.raises(ValueError, match="noise_exp_avg_sq is a null pointer"):
        module.latent_update_cpu(**dict(native, noise_exp_avg_sq=0), threads=1)
    with pytest.raises(ValueError, match="optimizer code 7"):
        module.latent_update_cpu(**dict(native, optimizer=7), threads=1)
    with pytest.raises(ValueError, match="takes float32"):
        module.latent_update_cpu(**dict(native, noise_dtype=1), threads=1)
    with pytest.raises(ValueError, match="unexpected keyword arguments: bogus"):
        module.latent_update_cpu(**native, threads=1, bogus=1)


def test_settings_must_be_latent_update_settings():
    problem = make_problem(SHAPES["odd"])
    with pytest.raises(TypeError, match="settings must be a LatentUpdateSettings, got dict"):
        latent_update(problem.noise, problem.grads[0][0], None, None, problem.state, {"noise_lr": 0.1})


# ---------------------------------------------------------------------------------------------
# One definition of the kernel codes
# ---------------------------------------------------------------------------------------------


def test_python_and_triton_use_the_codes_the_extension_defines():
    """csrc/latent_update.h defines the codes; Python passes the extension's values, Triton branches on the names."""
    module = _native.extension()
    if module is None:
        pytest.skip(_native.extension_reason())
    pytest.importorskip("triton")
    from utilgen.kernels import latent_update as triton_kernels

    kinds = set()
    for optimizer, momentum in (("adam", 0.0), ("sgd", 0.9), ("sgd", 0.0)):
        problem = make_problem(SHAPES["odd"], optimizer=optimizer, momentum=momentum)
        settings = LatentUpdateSettings(optimizer=optimizer, momentum=momentum, noise_lr=0.1, embed_lr=0.1)
        args = _prepare(
            problem.noise, problem.grads[0][0], problem.embed, problem.grads[0][1], problem.state, settings, None
        )
        kind = _optimizer_kind(args)
        assert _native_args(args)["optimizer"] == getattr(module.OptimizerKind, kind).value
        kinds.add(kind)
    assert kinds == set(module.OptimizerKind.__members__) == set(triton_kernels.OPTIMIZER_KINDS)
    assert set(module.Projection.__members__) == set(triton_kernels.PROJECTIONS)
    # The projections' zero guard: C++ holds it as a float, so compare in float32.
    tiny = {torch.tensor(v, dtype=torch.float32).item() for v in (_TINY_NORM, triton_kernels._TINY_NORM.value)}
    assert tiny == {torch.tensor(module.latent_update_tiny_norm, dtype=torch.float32).item()}
    for dtype in {*SUPPORT.cpp_dtypes, *SUPPORT.cuda_dtypes}:  # every kernel dtype has a code
        assert str(dtype).removeprefix("torch.") in module.DType.__members__

"""Triton kernel of ``utilgen.ops.latent_update``: the fused ILPO optimiser step.

One program per instance and part (noise or embedding). A program walks its
instance in tiles of BLOCK elements: the first loop does the optimiser update
and accumulates the sum of squares for the projection; the second loop (only
for a projected part, and for the ball only when the instance left it)
rescales. Inactive instances run zero iterations (the loop bound is zero), so
there is no host-side branching on the mask. The last part's kernel also
increments each active instance's step: program i is the only reader of
step[i] in that launch, and the earlier launch has finished reading it.

Called only by ``utilgen.ops.latent_update`` (lazily). Under
``TRITON_INTERPRET=1`` it runs on CPU tensors (the test suite does this).
"""

import math

import torch
import triton
import triton.language as tl

# The kernel specialises on these names (constexpr strings): the members of csrc/latent_update.h's
# OptimizerKind and Projection, as the extension exports them. tests/test_latent_update.py checks
# that they, and _TINY_NORM, agree with the extension and with utilgen/ops/latent_update.py.
OPTIMIZER_KINDS = ("adam", "sgd_momentum", "sgd")
PROJECTIONS = ("none", "shell", "ball")
_TINY_NORM = tl.constexpr(1e-12)


@triton.jit
def _latent_update_part_kernel(
    param_ptr,
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    lr_ptr,
    step_ptr,
    active_ptr,
    center_ptr,
    radius_ptr,
    numel,
    center_stride,
    grad_sign,
    weight_decay,
    beta1,
    beta2,
    log2_beta1,
    log2_beta2,
    eps,
    momentum,
    shell_norm,
    OPTIMIZER: tl.constexpr,
    PROJECTION: tl.constexpr,
    HAS_ACTIVE: tl.constexpr,
    WRITE_STEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    base = i * numel
    limit = numel
    if HAS_ACTIVE:
        limit = tl.where(tl.load(active_ptr + i) != 0, numel, 0)  # inactive: no iterations at all

    old_step = tl.load(step_ptr + i)
    t = old_step + 1.0
    step_size = tl.load(lr_ptr + i)
    inv_bias_correction2_sqrt = 1.0
    if OPTIMIZER == "adam":  # beta^t as exp2(t log2 beta), no libdevice pow
        step_size = step_size / (1.0 - tl.exp2(t * log2_beta1))
        inv_bias_correction2_sqrt = 1.0 / tl.sqrt(1.0 - tl.exp2(t * log2_beta2))

    offsets = tl.arange(0, BLOCK)
    sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, limit, BLOCK):
        idx = start + offsets
        mask = idx < numel
        x = tl.load(param_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        g = grad_sign * tl.load(grad_ptr + base + idx, mask=mask, other=0.0).to(tl.float32) + weight_decay * x
        if OPTIMIZER == "adam":
            m = tl.load(exp_avg_ptr + base + idx, mask=mask, other=0.0)
            v = tl.load(exp_avg_sq_ptr + base + idx, mask=mask, other=0.0)
            m = m + (1.0 - beta1) * (g - m)
            v = beta2 * v + (1.0 - beta2) * g * g
            tl.store(exp_avg_ptr + base + idx, m, mask=mask)
            tl.store(exp_avg_sq_ptr + base + idx, v, mask=mask)
            x_new = x - step_size * m / (tl.sqrt(v) * inv_bias_correction2_sqrt + eps)
        elif OPTIMIZER == "sgd_momentum":
            buffer = momentum * tl.load(exp_avg_ptr + base + idx, mask=mask, other=0.0) + g
            tl.store(exp_avg_ptr + base + idx, buffer, mask=mask)
            x_new = x - step_size * buffer
        else:
            x_new = x - step_size * g
        tl.store(param_ptr + base + idx, x_new.to(param_ptr.dtype.element_ty), mask=mask)
        if PROJECTION == "shell":
            sum_sq += tl.where(mask, x_new * x_new, 0.0)
        elif PROJECTION == "ball":
            d = x_new - tl.load(center_ptr + i * center_stride + idx, mask=mask, other=0.0).to(tl.float32)
            sum_sq += tl.where(mask, d * d, 0.0)

    if PROJECTION != "none":
        norm = tl.sqrt(tl.sum(sum_sq, axis=0))
        if PROJECTION == "shell":
            scale = shell_norm / tl.maximum(norm, _TINY_NORM)
            project_limit = tl.where(norm >= _TINY_NORM, limit, 0)
        else:
            radius = tl.load(radius_ptr + i)
            scale = radius / tl.maximum(norm, _TINY_NORM)
            project_limit = tl.where((norm > radius) & (norm >= _TINY_NORM), limit, 0)  # inside its ball: untouched
        for start in range(0, project_limit, BLOCK):
            idx = start + offsets
            mask = idx < numel
            x = tl.load(param_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            if PROJECTION == "shell":
                x = x * scale
            else:
                c = tl.load(center_ptr + i * center_stride + idx, mask=mask, other=0.0).to(tl.float32)
                x = c + (x - c) * scale
            tl.store(param_ptr + base + idx, x.to(param_ptr.dtype.element_ty), mask=mask)

    if WRITE_STEP:
        if HAS_ACTIVE:
            t = tl.where(tl.load(active_ptr + i) != 0, t, old_step)
        tl.store(step_ptr + i, t)


def _block_for(numel: int) -> int:
    # Large tiles: in the interpreter each loop iteration is a few numpy calls, so
    # fewer bigger tiles are faster; on a GPU 1024-4096 elements per tile keep
    # enough loads in flight per program.
    return min(4096, triton.next_power_of_2(numel))


def _launch_part(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    lr,
    step,
    active,
    center,
    radius,
    *,
    optimizer_kind,
    projection,
    shell_norm,
    hyper,
    write_step,
) -> None:
    n, numel = param.shape[0], param[0].numel()
    center_stride = 0 if center is None or center.shape[0] == 1 else center[0].numel()
    dummy = step  # a valid pointer for arguments the constexpr switches never read
    _latent_update_part_kernel[(n,)](
        param,
        grad,
        exp_avg if exp_avg is not None else dummy,
        exp_avg_sq if exp_avg_sq is not None else dummy,
        lr,
        step,
        active.view(torch.uint8) if active is not None else dummy,
        center if center is not None else param,
        radius if radius is not None else dummy,
        numel,
        center_stride,
        *hyper,
        shell_norm,
        OPTIMIZER=optimizer_kind,
        PROJECTION=projection,
        HAS_ACTIVE=active is not None,
        WRITE_STEP=write_step,
        BLOCK=_block_for(numel),
    )


def latent_update_triton(args: dict, optimizer_kind: str) -> None:
    """Runs the step on the (already validated) arguments of the ``utilgen::latent_update`` op, by name.

    ``optimizer_kind``: one of ``OPTIMIZER_KINDS`` (it tells SGD with a momentum buffer from plain SGD).
    """
    if optimizer_kind not in OPTIMIZER_KINDS:
        raise ValueError(f"optimizer_kind={optimizer_kind!r} is not one of {OPTIMIZER_KINDS}")
    beta1, beta2 = args["beta1"], args["beta2"]
    # log2(0) is -inf; exp2(t * -inf) = 0 gives the right bias correction for beta = 0.
    log2_beta1 = math.log2(beta1) if beta1 > 0 else -math.inf
    log2_beta2 = math.log2(beta2) if beta2 > 0 else -math.inf
    grad_sign = -1.0 if args["maximize"] else 1.0
    hyper = (grad_sign, args["weight_decay"], beta1, beta2, log2_beta1, log2_beta2, args["eps"], args["momentum"])
    noise, embed, anchor = args["noise"], args["embed"], args["embed_anchor"]
    if noise is not None:
        _launch_part(
            noise,
            args["noise_grad"],
            args["noise_exp_avg"],
            args["noise_exp_avg_sq"],
            args["noise_lr"],
            args["step"],
            args["active"],
            None,
            None,
            optimizer_kind=optimizer_kind,
            projection="shell" if args["project_noise"] else "none",
            shell_norm=math.sqrt(noise[0].numel()),
            hyper=hyper,
            write_step=embed is None,
        )
    if embed is not None:
        _launch_part(
            embed,
            args["embed_grad"],
            args["embed_exp_avg"],
            args["embed_exp_avg_sq"],
            args["embed_lr"],
            args["step"],
            args["active"],
            anchor,
            args["embed_max_distance"],
            optimizer_kind=optimizer_kind,
            projection="ball" if anchor is not None else "none",
            shell_norm=0.0,
            hyper=hyper,
            write_step=True,
        )

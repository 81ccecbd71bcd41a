"""ILPO: instance-level generation policy optimisation (docs/method.md, "ILPO").

Per generated instance i (class y_i, seed s_i, initial noise eps_i):

1. ``optimise_prompts``: start from the class prompt p_y and take ``prompt_steps``
   Adam steps that maximise

       J_i(p) = W_phi(l(f(g(p, eps_i)), y_i)) - drift_weight * drift_i(p)

   through the differentiable sampler (``sample_differentiable``: early denoiser
   calls without grad, the last ``grad_steps`` kept; see "Cost" below). ``drift``:
   "l2" = mean squared distance of p to p_y (the tether), "class_consistency" =
   the classifier's cross-entropy of the image against y_i. With a local CLIP model
   (``ClipAlignment``, ``clip_weight > 0``) the paper's CLIP class-text penalty is added.
2. ``refine_noise`` with the optimised prompt p*: "redenoise" (the paper: one DDIM
   step at high guidance, one inversion step at low guidance), "gradient" (this
   project's extension: the noise is put on the Gaussian shell ||eps|| = sqrt(C H W),
   then Adam steps on it maximise the utility, each projected back onto the
   shell), or "none".
3. Generate g(p*, eps') with the generator given (the MLCO-tuned one, if any); with
   "none" and ``reuse_renders``, the prompt ascent's render of g(p*, eps) is that image.

All N instances of a batch step together with one ``utilgen.ops.latent_update``
call per step. Each instance stops on its own when its objective has not
improved by ``min_improvement`` for ``patience`` evaluations (the per-sample
``active`` mask); stopped instances leave the forward pass, so a batch gets
cheaper as its instances converge. Each instance returns the parameters at
which its objective was best, so the optimised objective never ends below the
start on the differentiable proxy.

Early stopping watches the objective J, not the bare utility: J is what the
steps climb; a utility that rises only by drifting far from the class is
exactly what the drift term is there to refuse.

Cost. An evaluation renders its instances from scratch (every denoiser call depends on
the prompt), so the work saved is only what is exactly the same or not needed
(``ILPOConfig.checkpoint`` and ``reuse_renders``):
- checkpointing the kept calls recomputes their forward in the backward; it only saves
  memory, so "auto" turns it on only when the saved activations would pass 2 GiB;
- the first DDIM step's null-prompt output depends on the noise only: it is computed once
  per batch and every evaluation of the prompt ascent runs only the conditional half there;
- the first kept call of the prompt ascent sees latents without gradient, so its null half
  is a constant: it runs outside the graph and the backward skips it;
- with noise strategy "none" the final image of an instance is the ascent's render at its
  returned prompt (same prompt, noise and sampler) instead of being sampled again.
The last three change batch compositions, so the images equal ``Generator.sample``'s up to
rounding, which Adam's per-entry scaling grows to ~1e-3 in the prompts where a gradient entry
is near zero; ``reuse_renders=False`` is the reference path, bit for bit ``Generator.sample``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from utilgen.adaptation.clip_alignment import ClipAlignment
from utilgen.config import GeneratorConfig, ILPOConfig
from utilgen.data import SyntheticPool
from utilgen.generator import Generator, redenoise_noise, sample_differentiable
from utilgen.ops import LatentUpdateSettings, LatentUpdateState, latent_update
from utilgen.valuation import Valuation

log = logging.getLogger(__name__)

STAGE = "ilpo"
# checkpoint="auto": checkpoint the kept calls when their saved activations would pass this many bytes.
CHECKPOINT_ABOVE_BYTES = 2 * 2**30


@dataclass
class AscentHistory:
    """What one batched ascent did, per instance (N) and per evaluation (E = steps taken + 1).

    utility_before / utility_after: (N,) utility at the start and at the returned parameters.
    objective: (E, N) J at each evaluation, NaN once the instance had stopped.
    change: (E - 1, N) L2 norm of each instance's parameter change per update (0 when stopped).
    stopped_at: (N,) the evaluation index after which the instance stopped (E - 1 = ran to the end).
    seconds: wall time of the ascent.
    """

    utility_before: Tensor
    utility_after: Tensor
    objective: Tensor
    change: Tensor
    stopped_at: Tensor
    seconds: float


@dataclass
class ILPOHistory:
    """Per batch of ``optimise_instances``: the prompt ascent and (strategy "gradient") the noise ascent."""

    prompt: list[AscentHistory] = field(default_factory=list)
    noise: list[AscentHistory] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The differentiable objective
# ---------------------------------------------------------------------------------------------


def _to_valuation_shape(images: Tensor, valuation: Valuation) -> Tensor:
    """images (N, C, H, W) -> (N, *valuation.image_shape): resized (differentiably) when the sizes differ."""
    channels, height, width = valuation.image_shape
    if images.shape[1] != channels:
        raise ValueError(f"the generator makes {images.shape[1]}-channel images; the valuation reads {channels}")
    if tuple(images.shape[2:]) != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return images


def _render(
    generator: Generator,
    prompts: Tensor,
    noise: Tensor,
    sampler: GeneratorConfig,
    *,
    grad_steps: int,
    checkpoint: bool,
    first_null_output: Tensor | None,
    split_guidance: bool,
) -> Tensor:
    """images (N, C, H, W) with a graph through the last ``grad_steps`` denoiser calls."""
    return sample_differentiable(
        generator,
        prompts,
        noise,
        steps=sampler.steps,
        guidance_scale=sampler.guidance_scale,
        grad_steps=grad_steps,
        checkpoint=checkpoint,
        first_null_output=first_null_output,
        split_guidance=split_guidance,
    )


def saved_bytes_per_instance(generator: Generator, guidance_scale: float) -> int:
    """Bytes autograd keeps for one instance of one guided denoiser call with a graph (weights excluded).

    Measured: the storages the saved tensors hold (each once, however many views save it) for a call on
    2 instances minus those for 1 (what the weights and other batch-independent tensors hold cancels).
    """
    held: list[dict[int, int]] = []  # per measurement: storage address -> bytes

    def count(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        held[-1][storage.data_ptr()] = storage.nbytes()
        return tensor

    t = generator.timesteps(1)[0]
    for n in (1, 2):
        held.append({})
        latents = torch.zeros(n, *generator.latent_shape, device=generator.device, dtype=generator.dtype)
        prompts = generator.class_prompt_embeds([0] * n).requires_grad_(True)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
            output = generator.predict_noise(latents.requires_grad_(True), t, prompts, guidance_scale)
        del output  # the graph (and what it saved) goes before the next measurement reuses addresses
    return max(sum(held[1].values()) - sum(held[0].values()), 0)


def _checkpoints(generator: Generator, config: ILPOConfig, guidance_scale: float, kept_calls: int, n: int) -> bool:
    """Whether the ascent's kept calls run under torch.utils.checkpoint (``config.checkpoint``)."""
    if config.checkpoint != "auto":
        return config.checkpoint == "always"
    if kept_calls == 0:
        return False
    return kept_calls * n * saved_bytes_per_instance(generator, guidance_scale) > CHECKPOINT_ABOVE_BYTES


def _drift(valuation: Valuation, images: Tensor, labels: Tensor, prompts: Tensor, anchor: Tensor, kind: str) -> Tensor:
    """(N,) drift penalty of each instance (see the module docstring)."""
    if kind == "l2":
        return (prompts.float() - anchor.float()).pow(2).flatten(1).mean(dim=1)
    logits = valuation.classifier(_to_valuation_shape(images.float(), valuation).to(valuation.device))  # (N, K)
    return F.cross_entropy(logits.float(), labels.to(valuation.device), reduction="none").to(images.device)


# ---------------------------------------------------------------------------------------------
# One batched ascent with per-instance early stopping
# ---------------------------------------------------------------------------------------------


def _ascend(
    generator: Generator,
    valuation: Valuation,
    labels: Tensor,
    prompts: Tensor,
    noise: Tensor,
    *,
    part: str,
    steps: int,
    lr: float,
    config: ILPOConfig,
    sampler: GeneratorConfig,
    anchor: Tensor | None = None,
    ascend_below: float | None = None,
    clip: ClipAlignment | None = None,
    keep_images: bool = False,
    desc: str = "",
    progress: bool = True,
) -> tuple[Tensor, AscentHistory, Tensor | None]:
    """Maximise J over ``part`` ("prompt": (N, L, D), drift included; "noise": (N, C, H, W), shell-projected).

    Returns the best parameters per instance (same shape as ``part``), the history and, with
    ``keep_images``, the images (N, C, H, W) rendered at those parameters (else None).
    """
    start = time.perf_counter()
    n = labels.shape[0]
    device = generator.device
    labels = labels.to(device)
    # latent_update's C++ kernel takes fp32: the optimised copy is fp32 whatever the generator's dtype.
    params = (prompts if part == "prompt" else noise).detach().float().clone().contiguous()
    if part == "noise":
        # Every update lands on the shell ||eps|| = sqrt(C H W); the start goes there too, so that an
        # instance that never improves (and returns its start) is on the same shell as the others.
        params.mul_(math.sqrt(params[0].numel()) / params.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    fixed = (noise if part == "prompt" else prompts).detach().to(generator.dtype)
    best = params.clone()
    best_objective = torch.full((n,), -math.inf, device=device)
    utility_at_best = torch.full((n,), math.nan, device=device)
    stall = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    stopped_at = torch.full((n,), steps, dtype=torch.long)
    state = LatentUpdateState.zeros_like(params if part == "noise" else None, params if part == "prompt" else None)
    if part == "prompt":
        bounded = config.embed_max_distance is not None
        settings = LatentUpdateSettings(
            embed_lr=lr,
            maximize=True,
            embed_anchor=anchor.float().contiguous() if bounded else None,
            embed_max_distance=config.embed_max_distance,
        )
    else:
        settings = LatentUpdateSettings(noise_lr=lr, maximize=True, project_noise=True)
    grad_steps = config.grad_steps if part == "prompt" else (config.noise_grad_steps or sampler.steps)
    checkpoint = _checkpoints(generator, config, sampler.guidance_scale, grad_steps if steps else 0, n)
    first_null = None
    if config.reuse_renders and part == "prompt" and sampler.guidance_scale != 1.0:
        with torch.no_grad():  # (N, C, H, W): every evaluation starts from the same noise
            first_null = generator.predict_null_output(fixed, generator.timesteps(sampler.steps)[0])
    images_at_best = None
    objectives, changes = [], []
    utility_before = None
    bar = tqdm(total=steps, desc=desc or f"ILPO {part}", disable=not progress, leave=False)
    for evaluation in range(steps + 1):
        index = active.nonzero().squeeze(1)  # (A,) instances still optimised: only they run the sampler
        wants_grad = evaluation < steps
        x = params[index].clone().requires_grad_(wants_grad)
        with torch.set_grad_enabled(wants_grad):
            typed = x.to(generator.dtype)
            prompt_in = typed if part == "prompt" else fixed[index]
            noise_in = typed if part == "noise" else fixed[index]
            images = _render(
                generator,
                prompt_in,
                noise_in,
                sampler,
                grad_steps=grad_steps,
                checkpoint=checkpoint,
                first_null_output=first_null[index] if first_null is not None else None,
                split_guidance=config.reuse_renders,
            )  # (A, C, H, W)
            utility = valuation.utility(_to_valuation_shape(images.float(), valuation), labels[index])
            utility = utility.to(device)  # (A,)
            objective = utility
            if part == "prompt" and config.drift_weight > 0:
                drift = _drift(valuation, images, labels[index], typed, anchor[index], config.drift)
                objective = utility - config.drift_weight * drift
            if part == "prompt" and config.clip_weight > 0:
                objective = objective - config.clip_weight * clip.penalty(images.float(), labels[index])
        if utility_before is None:
            utility_before = utility.detach().clone()
        row = torch.full((n,), math.nan, device=device)
        row[index] = objective.detach()
        objectives.append(row)
        # Per-instance bookkeeping: best parameters so far, and how long since the last improvement.
        improved = objective.detach() > best_objective[index] + config.min_improvement
        won = index[improved]
        best[won] = x.detach()[improved]
        best_objective[won] = objective.detach()[improved]
        utility_at_best[won] = utility.detach()[improved]
        if keep_images:
            if images_at_best is None:  # evaluation 0 renders every instance at its start: its best until it improves
                images_at_best = images.detach().clone()  # (N, C, H, W)
            else:
                images_at_best[won] = images.detach()[improved]
        stall[index] = torch.where(improved, 0, stall[index] + 1)
        stopping = index[stall[index] >= config.patience]
        if evaluation == 0 and part == "prompt" and ascend_below is not None:
            # Repair mode: an instance already at or above the threshold keeps its start (recorded as its best above).
            stopping = torch.cat([stopping, index[utility.detach() >= ascend_below]]).unique()
        active[stopping] = False
        stopped_at[stopping.cpu()] = evaluation
        if not wants_grad or not bool(active.any()):
            break
        (grad,) = torch.autograd.grad(objective.sum(), x)  # instances are independent: the sum's grad is per instance
        full_grad = torch.zeros_like(params)
        full_grad[index] = grad.float()
        before = params.clone()
        if part == "prompt":
            latent_update(None, None, params, full_grad, state, settings, active=active, backend=config.backend)
        else:
            latent_update(params, full_grad, None, None, state, settings, active=active, backend=config.backend)
        changes.append((params - before).flatten(1).norm(dim=1))
        bar.update(1)
    bar.close()
    history = AscentHistory(
        utility_before=utility_before.cpu(),
        utility_after=utility_at_best.cpu(),
        objective=torch.stack(objectives).cpu(),
        change=torch.stack(changes).cpu() if changes else torch.zeros(0, n),
        stopped_at=stopped_at,
        seconds=time.perf_counter() - start,
    )
    return best, history, images_at_best


# ---------------------------------------------------------------------------------------------
# The three stages
# ---------------------------------------------------------------------------------------------


def optimise_prompts(
    generator: Generator,
    valuation: Valuation,
    labels: Tensor,
    noise: Tensor,
    config: ILPOConfig = ILPOConfig(),
    clip: ClipAlignment | None = None,
    *,
    sampler: GeneratorConfig = GeneratorConfig(),
    ascend_below: float | None = None,
    progress: bool = True,
) -> tuple[Tensor, AscentHistory]:
    """Optimised prompt embeddings (N, L, D) (generator dtype) for labels (N,) and initial noise (N, C, H, W).

    Starts from the installed class prompts ``generator.class_prompt_embeds(labels)``.
    ``clip`` (with ``config.clip_weight > 0``) adds the CLIP class-text penalty to the drift.
    ``sampler``: the DDIM steps and guidance of the images (the generator section's).
    ``ascend_below`` (repair mode): only instances whose starting utility is below it ascend;
    None = every instance ascends (the paper's form).
    """
    prompts, history, _ = _optimise_prompts(
        generator,
        valuation,
        labels,
        noise,
        config,
        clip,
        sampler=sampler,
        ascend_below=ascend_below,
        keep_images=False,
        progress=progress,
    )
    return prompts, history


def _optimise_prompts(
    generator: Generator,
    valuation: Valuation,
    labels: Tensor,
    noise: Tensor,
    config: ILPOConfig,
    clip: ClipAlignment | None,
    *,
    sampler: GeneratorConfig,
    ascend_below: float | None,
    keep_images: bool,
    progress: bool,
) -> tuple[Tensor, AscentHistory, Tensor | None]:
    """``optimise_prompts`` and, with ``keep_images``, the images (N, C, H, W) rendered at the returned prompts."""
    config.check_sampler(sampler.steps)
    if config.clip_weight > 0 and clip is None:
        raise ValueError("config.clip_weight > 0 needs a ClipAlignment (clip=ClipAlignment.from_directory(...))")
    labels = torch.as_tensor(labels, dtype=torch.long)
    anchor = generator.class_prompt_embeds(labels)  # (N, L, D)
    noise = noise.to(device=generator.device, dtype=generator.dtype)
    best, history, images = _ascend(
        generator,
        valuation,
        labels,
        anchor,
        noise,
        part="prompt",
        steps=config.prompt_steps,
        lr=config.prompt_lr,
        config=config,
        sampler=sampler,
        anchor=anchor,
        ascend_below=ascend_below,
        clip=clip,
        keep_images=keep_images,
        desc="ILPO prompts",
        progress=progress,
    )
    return best.to(generator.dtype), history, images


def refine_noise(
    generator: Generator,
    valuation: Valuation | None,
    labels: Tensor,
    noise: Tensor,
    prompts: Tensor,
    config: ILPOConfig = ILPOConfig(),
    *,
    sampler: GeneratorConfig = GeneratorConfig(),
    progress: bool = True,
) -> tuple[Tensor, AscentHistory | None]:
    """Refined initial noise (N, C, H, W) for ``prompts`` (N, L, D), by ``config.noise_strategy``.

    The history is None except for "gradient", the only strategy that reads ``valuation``.
    """
    noise = noise.to(device=generator.device, dtype=generator.dtype)
    prompts = prompts.to(device=generator.device, dtype=generator.dtype)
    if config.noise_strategy == "none":
        return noise, None
    if config.noise_strategy == "redenoise":
        refined = redenoise_noise(
            generator,
            noise,
            prompts,
            steps=sampler.steps,
            high_guidance=config.redenoise_high_guidance,
            low_guidance=config.redenoise_low_guidance,
        )
        return refined, None
    if valuation is None:
        raise ValueError('noise_strategy="gradient" climbs the utility: it needs a valuation')
    labels = torch.as_tensor(labels, dtype=torch.long)
    best, history, _ = _ascend(
        generator,
        valuation,
        labels,
        prompts,
        noise,
        part="noise",
        steps=config.noise_steps,
        lr=config.noise_lr,
        config=config,
        sampler=sampler,
        desc="ILPO noise",
        progress=progress,
    )
    return best.to(generator.dtype), history


def optimise_instances(
    generator: Generator,
    valuation: Valuation,
    labels: Tensor,
    seeds: Tensor,
    config: ILPOConfig = ILPOConfig(),
    *,
    sampler: GeneratorConfig = GeneratorConfig(),
    ascend_below: float | None = None,
    round: int = 0,
    clip: ClipAlignment | None = None,
    progress: bool = True,
) -> tuple[SyntheticPool, ILPOHistory]:
    """ILPO for N instances (labels (N,), seeds (N,)), in batches: prompts, then noise, then generation.

    ``sampler`` (the generator section: DDIM steps, guidance) renders the images; ``ascend_below``:
    see ``optimise_prompts``.

    Returns the pool (stage "ilpo"; the optimised prompt and refined noise of
    every image; utilities = ``valuation.score`` of the final images) and the
    per-batch histories. Each image depends only on its own label and seed.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    seeds = torch.as_tensor(seeds, dtype=torch.long).cpu()
    if labels.shape != seeds.shape or labels.dim() != 1:
        raise ValueError(f"labels and seeds must be (N,) each, got {tuple(labels.shape)} and {tuple(seeds.shape)}")
    history = ILPOHistory()
    images, prompts, noises = [], [], []
    starts = range(0, labels.shape[0], config.batch_size)
    config.check_sampler(sampler.steps)
    # Noise strategy "none" keeps the noise: the final image is the ascent's render at the returned prompt.
    reuse_images = config.reuse_renders and config.noise_strategy == "none"
    for start in tqdm(starts, desc="ILPO", unit="batch", disable=not progress):
        batch_labels = labels[start : start + config.batch_size]
        noise = generator.initial_noise(seeds[start : start + config.batch_size].tolist())
        batch_prompts, prompt_history, rendered = _optimise_prompts(
            generator,
            valuation,
            batch_labels,
            noise,
            config,
            clip,
            sampler=sampler,
            ascend_below=ascend_below,
            keep_images=reuse_images,
            progress=progress,
        )
        batch_noise, noise_history = refine_noise(
            generator, valuation, batch_labels, noise, batch_prompts, config, sampler=sampler, progress=progress
        )
        history.prompt.append(prompt_history)
        if noise_history is not None:
            history.noise.append(noise_history)
        if reuse_images:
            images.append(rendered.float().cpu())  # (B, C, H, W), as generator.sample returns them
        else:
            images.append(
                generator.sample(
                    batch_prompts,
                    batch_noise,
                    guidance_scale=sampler.guidance_scale,
                    steps=sampler.steps,
                    batch_size=config.batch_size,
                )
            )
        prompts.append(batch_prompts.detach().float().cpu())
        noises.append(batch_noise.detach().float().cpu())
    if not images:
        raise ValueError("optimise_instances needs at least one instance")
    images = torch.cat(images)
    pool = SyntheticPool.create(
        images,
        labels,
        valuation.class_names,
        seeds,
        round=round,
        stage=STAGE,
        prompt_embeds=torch.cat(prompts),
        noises=torch.cat(noises),
    )
    pool.utilities = valuation.score(_to_valuation_shape(images, valuation), labels).float()
    before = torch.cat([h.utility_before for h in history.prompt])
    log.info(
        "ILPO: %d instances, mean utility %.4f with the class prompt -> %.4f generated",
        len(pool),
        float(before.mean()),
        float(pool.utilities.mean()),
    )
    return pool, history

"""Bi-level TODV training (docs/method.md, "TODV"; Meta-Weight-Net's one-step look-ahead).

Per step on a batch of D_merge = D_r + D_g:

    every ``meta_every`` steps:   phi <- Adam(phi, dL_v(theta')/dphi)       (``STRATEGIES``; default finite_difference)
    always:                       w = W_phi(features) under no_grad
                                  theta <- SGD(theta, grad (1/N) sum_i w_i l_i)

After a phi step, ``real_step`` says which w the theta step uses and how its gradient is had
(``meta_iteration``): the updated W_phi's with a fresh forward, the same through the virtual step's
kept graph, or (default, "lagged") the virtual step's own gradient, with the W_phi from before the update.
BatchNorm classifiers always take the fresh forward: the look-ahead runs on cloned buffers, so only a
real forward updates their running statistics.

The weighted loss is ``utilgen.ops.weighted_cross_entropy``. By default the
weights are normalised to a batch mean of 1 before they enter it
(``normalize_weights``), as Meta-Weight-Net's released code does, with the
meta-gradient flowing through the normalisation: with the paper's raw
(1/N) sum_i w_i l_i the look-ahead mostly raised every weight and learned a
rising w(loss) (flipped-vs-clean AUROC 0.09 at smoke scale, 0.91 normalised). Real samples are weighted
like synthetic ones by default, as Meta-Weight-Net weighs every sample;
``fix_real_weights=True`` pins them at 1 and leaves them out of the
meta-gradient. ``meta_every=0`` trains the same classifier without
reweighting (all weights 1): the baseline the evidence compares against.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from utilgen.config import ValuationConfig
from utilgen.data import LabelledImages
from utilgen.models import LossUtility, WeightNet, build_classifier, per_sample_features
from utilgen.ops import weighted_cross_entropy
from utilgen.valuation.multistep import MultiStepLookahead, unrolled_hvp_meta_gradient
from utilgen.valuation.probe import mislabel_auroc
from utilgen.valuation.strategies import META_GRADIENTS, Lookahead, MetaGradient, effective_weights, meta_gradient
from utilgen.valuation.valuation import Valuation

log = logging.getLogger(__name__)

# ValuationConfig.real_step -> what the look-ahead keeps for it (``Lookahead.keep``)
REAL_STEPS = {"fresh_forward": "nothing", "reuse_forward": "forward", "lagged": "gradient"}
# ValuationConfig.strategy: the one-step strategies, and the T-step one (utilgen/valuation/multistep.py)
STRATEGIES = (*META_GRADIENTS, "unrolled_hvp")


@dataclass(frozen=True)
class Unrolled:
    """The later batches and settings of a T-step look-ahead (strategy "unrolled_hvp")."""

    later: tuple = ()  # T - 1 ((inputs, targets), weight mask or None) of the batches after the current one
    hvp_method: str = "exact"
    tangent: str = "forward"


@dataclass
class FitHistory:
    """Per step: the weighted training loss and the mean weight of real and synthetic samples in the batch
    (NaN when the batch has none); per meta step: L_v(theta')."""

    loss: list[float] = field(default_factory=list)
    mean_weight_real: list[float] = field(default_factory=list)
    mean_weight_synthetic: list[float] = field(default_factory=list)
    meta_step: list[int] = field(default_factory=list)
    meta_loss: list[float] = field(default_factory=list)
    # one entry per fit of ``fit_valuation``'s inversion guard: {"seed", "mislabel_auroc", "kept"} (and "error"
    # for a restart that stopped on a non-finite loss)
    attempts: list[dict] = field(default_factory=list)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; ``valuation`` and ``history`` hold the state before that step."""

    def __init__(self, message: str, *, step: int, valuation: Valuation, history: FitHistory):
        super().__init__(message)
        self.step, self.valuation, self.history = step, valuation, history


# --------------------------------------------------------------------------- one step of each kind


def lookahead_model_fn(classifier: nn.Module):
    """(params, inputs) -> logits through ``classifier`` without touching its buffers.

    Buffers are cloned inside the call: BatchNorm's running-stat updates land
    on throwaway copies, and torch.func transforms accept mutations of tensors
    created inside them (not of captured ones).
    """
    buffers = dict(classifier.named_buffers())

    def model_fn(params, inputs):
        return functional_call(classifier, {**params, **{k: b.clone() for k, b in buffers.items()}}, (inputs,))

    return model_fn


def meta_update(
    classifier: nn.Module,
    weight_net: WeightNet,
    meta_optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    meta_batch: tuple[torch.Tensor, torch.Tensor],
    *,
    strategy: str,
    inner_lr: float,
    weight_mask: torch.Tensor | None = None,
    normalize: bool = True,
    keep: str = "nothing",
    unrolled: Unrolled = Unrolled(),
) -> MetaGradient:
    """One look-ahead meta-gradient by ``strategy`` (one of ``STRATEGIES``) and one optimizer step of phi.

    theta is not changed. A non-finite meta loss skips the phi step (the caller sees it in the result).
    ``keep``: what the result carries for the real step (``Lookahead.keep``; one-step strategies only).
    ``unrolled``: strategy "unrolled_hvp"'s later batches and settings.
    """
    params = {name: p.detach() for name, p in classifier.named_parameters()}
    if strategy == "unrolled_hvp":
        if keep == "forward":
            raise ValueError('strategy "unrolled_hvp" keeps no forward graph: use the lagged or fresh_forward step')
        masks = [weight_mask, *(mask for _, mask in unrolled.later)]
        problem = MultiStepLookahead(
            lookahead_model_fn(classifier),
            params,
            weight_net,
            weight_net.features,
            [batch, *(later_batch for later_batch, _ in unrolled.later)],
            meta_batch[0],
            meta_batch[1],
            inner_lr,
            None if all(mask is None for mask in masks) else masks,
            normalize,
        )
        out = unrolled_hvp_meta_gradient(problem, hvp_method=unrolled.hvp_method, tangent=unrolled.tangent)
        return _step_phi(weight_net, meta_optimizer, out)
    problem = Lookahead(
        lookahead_model_fn(classifier),
        params,
        weight_net,
        weight_net.features,
        batch[0],
        batch[1],
        meta_batch[0],
        meta_batch[1],
        inner_lr,
        weight_mask,
        normalize,
        keep,
    )
    return _step_phi(weight_net, meta_optimizer, meta_gradient(problem, strategy))


def _step_phi(weight_net: WeightNet, meta_optimizer: torch.optim.Optimizer, out: MetaGradient) -> MetaGradient:
    """One optimizer step of phi along ``out.phi_grads``, unless the meta loss is non-finite."""
    if not bool(torch.isfinite(out.meta_loss)):
        return out
    for name, p in weight_net.named_parameters():
        p.grad = out.phi_grads[name]
    meta_optimizer.step()
    meta_optimizer.zero_grad(set_to_none=True)
    return out


def _current_weights(weight_net, logits, targets, weight_mask, normalize) -> torch.Tensor:
    """(N,) the effective weights W_phi gives the batch now (all 1 without a weight net), no graph."""
    if weight_net is None:
        return torch.ones(targets.shape[0], device=logits.device)
    with torch.no_grad():
        losses = weighted_cross_entropy(logits.detach(), targets, reduction="none")  # (N,)
        raw = weight_net(per_sample_features(losses, logits.detach(), targets, weight_net.features))  # (N,)
        return effective_weights(raw, weight_mask, normalize)


def weighted_step(
    classifier: nn.Module,
    weight_net: WeightNet | None,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    weight_mask: torch.Tensor | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """theta <- SGD step on (1/N) sum_i w_i l_i, w = W_phi(features) under no_grad (all 1 without a weight net).

    Returns (loss (), weights (N,)), detached. A non-finite loss skips the step, so theta stays finite.
    """
    inputs, targets = batch
    logits = classifier(inputs)  # (N, K)
    weights = _current_weights(weight_net, logits, targets, weight_mask, normalize)
    loss = weighted_cross_entropy(logits, targets, weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if bool(torch.isfinite(loss)):  # one host sync; the fit reads the loss each step anyway
        optimizer.step()
    return loss.detach(), weights


def meta_iteration(
    classifier: nn.Module,
    weight_net: WeightNet,
    optimizer: torch.optim.Optimizer,
    meta_optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    meta_batch: tuple[torch.Tensor, torch.Tensor],
    *,
    strategy: str,
    real_step: str = "fresh_forward",
    weight_mask: torch.Tensor | None = None,
    normalize: bool = True,
    unrolled: Unrolled = Unrolled(),
) -> tuple[MetaGradient, torch.Tensor, torch.Tensor]:
    """One full TODV iteration: the phi step (``meta_update``), then the real theta step (``REAL_STEPS``).

    ``real_step``:
    - "fresh_forward" (Meta-Weight-Net's code): a second forward of the batch, weights from the updated W_phi;
    - "reuse_forward": the same weights, the backward taken through the virtual step's forward graph (the
      same dropout masks): one forward fewer, at the memory of keeping that graph through the meta step;
    - "lagged": theta steps along the virtual step's own gradient, i.e. with the weights of W_phi before
      this update (no second forward or backward; the update reaches theta one iteration later).
    The meta-gradient is the same for all three. Returns (meta-gradient result, real-step loss (),
    weights (N,)); non-finite losses are the caller's to check: a non-finite meta loss skips both steps
    (the loss is then NaN), a non-finite real loss skips the theta step, as in ``weighted_step``.
    """
    if real_step not in REAL_STEPS:
        raise ValueError(f"real_step must be one of {sorted(REAL_STEPS)}, got {real_step!r}")
    out = meta_update(
        classifier,
        weight_net,
        meta_optimizer,
        batch,
        meta_batch,
        strategy=strategy,
        inner_lr=optimizer.param_groups[0]["lr"],
        weight_mask=weight_mask,
        normalize=normalize,
        keep=REAL_STEPS[real_step],
        unrolled=unrolled,
    )
    if not bool(torch.isfinite(out.meta_loss)):
        return out, torch.tensor(float("nan")), torch.ones_like(out.weights)
    if real_step == "fresh_forward":
        loss, weights = weighted_step(
            classifier, weight_net, optimizer, batch, weight_mask=weight_mask, normalize=normalize
        )
        return out, loss, weights
    named = dict(classifier.named_parameters())
    if real_step == "reuse_forward":
        forward, targets = out.training_forward, batch[1]
        weights = _current_weights(weight_net, forward.logits, targets, weight_mask, normalize)
        loss = weighted_cross_entropy(forward.logits, targets, weights)
        grads = torch.autograd.grad(loss, [forward.leaves[name] for name in named], allow_unused=True)
        loss = loss.detach()
    else:  # lagged: the virtual step's loss, weights and gradient
        weights = out.weights
        loss = (weights * out.per_sample_loss).mean()
        grads = [out.training_gradient[name] for name in named]
    optimizer.zero_grad(set_to_none=True)
    for parameter, grad in zip(named.values(), grads, strict=True):
        parameter.grad = grad if parameter.requires_grad else None  # a frozen parameter stays frozen
    if bool(torch.isfinite(loss)):
        optimizer.step()
    return out, loss, weights


# --------------------------------------------------------------------------- the fit


class _Batches:
    """Endless shuffled mini-batches of indices, one permutation per epoch, from its own generator.

    ``peek(k)`` shows the next k batches without consuming them (the T-step look-ahead trains its virtual
    steps on the batches the classifier is about to see); ``next()`` then returns exactly those.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self.order, self.position = torch.randperm(n, generator=generator), 0
        self.ahead: collections.deque[torch.Tensor] = collections.deque()

    def _draw(self) -> torch.Tensor:
        if self.position + self.batch_size > self.n:
            self.order, self.position = torch.randperm(self.n, generator=self.generator), 0
        chosen = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return chosen

    def next(self) -> torch.Tensor:
        return self.ahead.popleft() if self.ahead else self._draw()

    def peek(self, k: int) -> list[torch.Tensor]:
        while len(self.ahead) < k:
            self.ahead.append(self._draw())
        return list(self.ahead)[:k]


def fit_valuation(
    real_train: LabelledImages,
    synthetic: LabelledImages,
    meta: LabelledImages,
    config: ValuationConfig = ValuationConfig(),
    classifier: nn.Module | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Valuation:
    """TODV: train f_theta on real + synthetic with W_phi-weighted loss, W_phi by look-ahead on ``meta``.

    ``synthetic`` may be a ``LabelledImages`` or anything with ``to_labelled()``
    (a ``SyntheticPool``). ``classifier=None`` builds ``config.classifier``; a
    given module is trained in place (and the result cannot be saved unless it
    is that architecture). ``seed`` draws the initialisations and batches. Raises ``NonFiniteLossError`` carrying the
    valuation and history up to the failing step.

    The inversion guard (``config.restarts``): a loss-only W_phi can learn either direction, and from some
    initialisations it learns a w(loss) that rises with the loss, valuing wrong labels above right ones. So
    while the fit ranks the meta set's true labels below wrong ones (``mislabel_auroc`` < 0.5), it is refitted
    from another seed, at most ``config.restarts`` times, and the fit with the highest mislabel AUROC is kept
    (``history.attempts`` lists every fit). Only with ``classifier=None``: a given module cannot start again.
    """
    if hasattr(synthetic, "to_labelled"):
        synthetic = synthetic.to_labelled()
    restarts = config.restarts if classifier is None else 0
    attempts = []
    best = None
    for attempt in range(restarts + 1):
        attempt_seed = seed if attempt == 0 else restart_seed(seed, attempt)
        try:
            valuation = _fit_once(
                real_train, synthetic, meta, config, classifier, seed=attempt_seed, device=device, progress=progress
            )
        except NonFiniteLossError as error:
            if best is None:
                raise
            # a restart that diverged does not cost the fit already made
            attempts.append({"seed": attempt_seed, "mislabel_auroc": None, "kept": False, "error": str(error)})
            log.warning(
                "TODV: the restart from seed %d stopped (%s); keeping the best earlier fit", attempt_seed, error
            )
            continue
        score = mislabel_auroc(valuation, meta.images, meta.labels)
        attempts.append({"seed": attempt_seed, "mislabel_auroc": score, "kept": False})
        if best is None or (score is not None and (best[1] is None or score > best[1])):
            best = (valuation, score, attempt)
        if score is None or score >= 0.5:
            break
        log.warning(
            "TODV: the fit from seed %d ranks the meta set's wrong labels above the true ones (mislabel AUROC "
            "%.3f < 0.5)%s",
            attempt_seed,
            score,
            "; refitting from another seed" if attempt < restarts else "; no restarts left, keeping the best fit",
        )
    valuation, _, kept = best
    attempts[kept]["kept"] = True
    valuation.history.attempts = attempts
    return valuation


def restart_seed(seed: int, attempt: int) -> int:
    """The inversion guard's seed for restart ``attempt`` (>= 1) of a fit from ``seed``: its own stream."""
    return int.from_bytes(hashlib.sha256(f"todv-restart:{seed}:{attempt}".encode()).digest()[:7], "little")


def _fit_once(real_train, synthetic, meta, config, classifier, *, seed, device, progress) -> Valuation:
    """One TODV fit from ``seed``: ``fit_valuation`` without the inversion guard (the same arguments)."""
    for name, part in (("synthetic", synthetic), ("meta", meta)):
        if part.class_names != real_train.class_names or part.image_shape != real_train.image_shape:
            raise ValueError(f"{name} must share real_train's classes and image shape")
    if len(meta) == 0 or len(real_train) + len(synthetic) == 0:
        raise ValueError("need a non-empty meta set and training set")
    if config.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {config.strategy!r}")
    device = torch.device(device)
    torch.manual_seed(seed)  # the classifier's and weight net's initialisation, dropout
    channels, size, _ = real_train.image_shape
    classifier_name = config.classifier if classifier is None else None
    if classifier is None:
        classifier = build_classifier(
            config.classifier, num_classes=real_train.num_classes, in_channels=channels, image_size=size
        )
    classifier = classifier.to(device).train()
    meta_learned = config.utility == "meta-learned"
    weight_net = (WeightNet(config.weight_net_hidden, config.features) if meta_learned else LossUtility()).to(device)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=config.inner_lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    meta_optimizer = (
        torch.optim.Adam(weight_net.parameters(), lr=config.meta_lr, weight_decay=config.meta_weight_decay)
        if meta_learned
        else None
    )

    images = torch.cat([real_train.images, synthetic.images]).to(device)  # (N_r + N_g, C, H, W)
    labels = torch.cat([real_train.labels, synthetic.labels]).to(device)
    is_synthetic = torch.cat(
        [torch.zeros(len(real_train), dtype=torch.bool), torch.ones(len(synthetic), dtype=torch.bool)]
    )
    is_synthetic = is_synthetic.to(device)
    meta_images, meta_labels = meta.images.to(device), meta.labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    batches = _Batches(len(labels), config.batch_size, generator)
    meta_batches = _Batches(len(meta_labels), config.meta_batch_size, generator)
    reweight = meta_learned and config.meta_every > 0  # the classifier-loss utility trains unweighted
    real_step = config.real_step
    if real_step != "fresh_forward" and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in classifier.modules()
    ):
        # the look-ahead's forwards run on cloned buffers: only a real forward moves BatchNorm's running statistics
        log.info("TODV: valuation.real_step=%s -> fresh_forward for a BatchNorm classifier", real_step)
        real_step = "fresh_forward"
    history = FitHistory()

    def result() -> Valuation:
        return Valuation(
            classifier, weight_net, real_train.class_names, real_train.image_shape, classifier_name, history
        )

    def unrolled() -> Unrolled:
        """The T-step look-ahead's later batches: the next T - 1 the classifier will train on."""
        if config.strategy != "unrolled_hvp":
            return Unrolled()
        later = []
        for ahead in batches.peek(config.lookahead_steps - 1):
            ahead = ahead.to(device)
            later.append(((images[ahead], labels[ahead]), is_synthetic[ahead] if config.fix_real_weights else None))
        return Unrolled(tuple(later), config.lookahead_hvp, config.lookahead_tangent)

    for step in tqdm(range(config.steps), desc=f"TODV ({config.strategy})", disable=not progress):
        index = batches.next().to(device)
        batch, synthetic_rows = (images[index], labels[index]), is_synthetic[index]
        mask = synthetic_rows if config.fix_real_weights else None
        if reweight and step % config.meta_every == 0:
            meta_index = meta_batches.next().to(device)
            out, loss, weights = meta_iteration(
                classifier,
                weight_net,
                optimizer,
                meta_optimizer,
                batch,
                (meta_images[meta_index], meta_labels[meta_index]),
                strategy=config.strategy,
                weight_mask=mask,
                normalize=config.normalize_weights,
                real_step=real_step,
                unrolled=unrolled(),
            )
            meta_loss = float(out.meta_loss)
            if not math.isfinite(meta_loss):
                raise NonFiniteLossError(
                    f"TODV: meta loss is {meta_loss} at step {step}", step=step, valuation=result(), history=history
                )
            history.meta_step.append(step)
            history.meta_loss.append(meta_loss)
        else:
            loss, weights = weighted_step(
                classifier,
                weight_net if reweight else None,
                optimizer,
                batch,
                weight_mask=mask,
                normalize=config.normalize_weights,
            )
        loss = float(loss)
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"TODV: training loss is {loss} at step {step} (lower inner_lr?); the result holds steps 0..{step - 1}",
                step=step,
                valuation=result(),
                history=history,
            )
        history.loss.append(loss)
        history.mean_weight_real.append(_mean_or_nan(weights[~synthetic_rows]))
        history.mean_weight_synthetic.append(_mean_or_nan(weights[synthetic_rows]))
    return result()


def _mean_or_nan(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")

"""What the loop's stages write into the run directory and read back (layer 5).

Every stage writes through these functions, atomically, and the next stage reads what was
written, never what is still in memory: pools are 8-bit PNGs, so an uninterrupted run and a
resumed one compute on the same pixels. A stage that stops (a non-finite loss, runaway training)
keeps what it had in a ``*.partial*`` file and raises ``StageError`` with the setting to change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from utilgen import adaptation
from utilgen.adaptation.mlco import prepare_round
from utilgen.config import Config, MLCOConfig, ValuationConfig
from utilgen.data import Splits, SyntheticPool
from utilgen.evaluate import NonFiniteTrainingError, TrainingSet, evaluate, job_digests
from utilgen.generator import Generator
from utilgen.io import atomic_write_bytes, atomic_write_json, safetensors_bytes
from utilgen.rundir import RunDirectory
from utilgen.stages import StageError
from utilgen.valuation import NonFiniteLossError, Valuation, fit_valuation

TOKENS = "tokens.safetensors"
TEST_READS = "test-reads.json"
EVALUATED = "evaluated.json"  # {job digest: test accuracy} of every classifier this run scored


def save_tokens(directory: RunDirectory, tokens: torch.Tensor, steps: int) -> None:
    if not bool(torch.isfinite(tokens).all()):
        raise StageError(
            f"textual inversion diverged: the class tokens hold NaN/inf after {steps} steps. "
            "Lower tokens.lr and resume: --resume DIR --set tokens.lr=..."
        )
    atomic_write_bytes(directory.path / TOKENS, safetensors_bytes({"class_tokens": tokens.float()}))


def load_tokens(directory: RunDirectory, device: torch.device) -> torch.Tensor:
    return load_file(directory.path / TOKENS)["class_tokens"].to(device)


def save_pool(directory: RunDirectory, name: str, pool: SyntheticPool) -> None:
    pool.save(directory.path / "pools" / name)


def load_pool(directory: RunDirectory, name: str) -> SyntheticPool:
    return SyntheticPool.load(directory.path / "pools" / name)


# ------------------------------------------------------------------------------------ TODV


def fit_or_stop(
    real: Splits, synthetic: SyntheticPool, config: ValuationConfig, out: Path, *, seed: int, device, progress: bool
) -> Valuation:
    """``fit_valuation``; on a non-finite loss the weights before that step go to ``<out>.partial``
    (removed again once a later attempt succeeds: it describes a failure that no longer holds)."""
    partial = out.with_name(out.name + ".partial")
    try:
        valuation = fit_valuation(real.train, synthetic, real.meta, config, seed=seed, device=device, progress=progress)
    except NonFiniteLossError as error:
        error.valuation.save(partial)
        raise StageError(
            f"{error}. The weights before that step are in {partial}. Lower valuation.inner_lr "
            "or valuation.meta_lr and resume: --resume DIR --set valuation.inner_lr=..."
        ) from error
    shutil.rmtree(partial, ignore_errors=True)
    return valuation


def save_valuation(valuation: Valuation, pool: SyntheticPool, out: Path) -> None:
    """The valuation, its learned w(loss) curve and training history, and the utilities of the pool it valued."""
    valuation.save(out)
    history = valuation.history
    curve = {}
    if valuation.features == ("loss",):
        losses, weights = valuation.curve()
        curve = {"loss": losses.tolist(), "weight": weights.tolist()}
    atomic_write_json(
        out / "history.json",
        {
            "curve": curve,
            "meta_loss": history.meta_loss if history else [],
            "mean_weight_real": history.mean_weight_real if history else [],
            "mean_weight_synthetic": history.mean_weight_synthetic if history else [],
            "attempts": history.attempts if history else [],  # the inversion guard's fits (seed, mislabel AUROC)
            "pool_utilities": valuation.score(pool.images, pool.labels).tolist(),
        },
    )


def valued_pool_utilities(valuation_dir: Path) -> torch.Tensor:
    """(N,) utilities of the pool the valuation in ``valuation_dir`` was fitted on, as it valued them."""
    return torch.tensor(json.loads((valuation_dir / "history.json").read_text())["pool_utilities"])


# ------------------------------------------------------------------------------------ MLCO


def train_dpo_or_stop(
    generator: Generator, pairs: adaptation.Pairs, config: MLCOConfig, out: Path, round_index: int, *, seed, progress
) -> adaptation.DPORoundResult:
    """``train_dpo_round``; when it diverges (non-finite, loss risen, adapter runaway) the adapter, back at
    its last good weights, is kept, and removed again once a later attempt succeeds."""
    partial = out.with_name(out.name + ".partial.safetensors")
    try:
        result = adaptation.train_dpo_round(
            generator, pairs, config, round_index=round_index - 1, seed=seed, progress=progress
        )
    except adaptation.DPODivergedError as error:  # non-finite, loss risen or adapter runaway
        adaptation.save_adapters(generator.denoiser, partial)
        raise StageError(
            f"{error}. Resume with a smaller step: --resume DIR --set mlco.lr=... (or mlco.beta=...)"
        ) from error
    partial.unlink(missing_ok=True)
    return result


def replay_round(
    generator: Generator, config: MLCOConfig, round_index: int, directory: RunDirectory, seed: int
) -> None:
    """Put a finished round's adapter back: the state ``train_dpo_round`` left (attach or re-anchor, then weights)."""
    path = directory.path / f"mlco/round-{round_index}/adapters.safetensors"
    if not path.exists():  # a round without pairs changed nothing
        return
    prepare_round(generator, config, round_index - 1, seed=seed)
    adaptation.load_adapters(generator.denoiser, path)


# ------------------------------------------------------------------------------------ ILPO, evaluation


def ilpo_summary(history: adaptation.ILPOHistory, pool: SyntheticPool) -> dict:
    """Mean utility with the class prompt, at the optimised prompt (differentiable proxy), of the final images."""
    before = torch.cat([h.utility_before for h in history.prompt]) if history.prompt else torch.empty(0)
    after = torch.cat([h.utility_after for h in history.prompt]) if history.prompt else torch.empty(0)
    # An instance moved when its prompt changed at all (repair mode holds the ones above the threshold still).
    moved = torch.cat([h.change.sum(0) > 0 for h in history.prompt]) if history.prompt else torch.empty(0, dtype=bool)
    # No wall times here (the manifest has the stage's): this file is a result, equal across resumed runs.
    return {
        "utility_before": _mean(before),
        "utility_after_prompt": _mean(after),
        "utility_after": _mean(pool.utilities),
        "instances": len(pool),
        "prompt_moved": int(moved.sum()),
        "moved_utility_before": _mean(before[moved]),
        "moved_utility_after_prompt": _mean(after[moved]),
    }


def _mean(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def evaluate_or_stop(
    settings: list[TrainingSet], real: Splits, cfg: Config, device, directory: RunDirectory, key: str, progress: bool
) -> dict:
    """``evaluate`` with its checkpoint in the run directory; a non-finite loss keeps the finished classifiers.

    A classifier this run already trained and scored in an earlier evaluation (the same digest in
    ``EVALUATED``, see ``evaluate.job_digests``) is not trained again: a run extended with the baselines or
    the ablation trains only the new settings' classifiers, and reads the test split only for them."""
    checkpoint = directory.path / "evaluation.partial.json"
    digests = job_digests(settings, real.test, cfg.evaluation, device)
    evaluated_path = directory.path / EVALUATED
    evaluated = json.loads(evaluated_path.read_text()) if evaluated_path.exists() else {}
    known = {job: evaluated[digest] for job, digest in digests.items() if digest in evaluated}
    try:
        results = evaluate(
            settings,
            real.test,
            cfg.evaluation,
            device=device,
            checkpoint=checkpoint,
            checkpoint_key=key,
            known=known,
            progress=progress,
        )
    except NonFiniteTrainingError as error:
        raise StageError(f"{error}; the classifiers finished so far are kept in {checkpoint}") from error
    for name, result in results.items():
        for seed, accuracy in zip(cfg.evaluation.seeds, result["accuracies"], strict=True):
            evaluated[digests[f"{name}|{seed}"]] = accuracy
    record_test_reads(directory, reads=len(digests) - len(known), reused=len(known), key=key)
    atomic_write_json(evaluated_path, evaluated)
    atomic_write_json(directory.path / "evaluation.json", results)
    checkpoint.unlink(missing_ok=True)
    return results


def record_test_reads(directory: RunDirectory, *, reads: int, reused: int, key: str) -> None:
    """Append this evaluation's reads of the test split (one per classifier trained and scored; ``reused``:
    accuracies taken from an earlier evaluation, no read) to ``TEST_READS``.

    A run that is extended (baselines or ablation added) or re-evaluated overwrites ``evaluation.json``, but
    the earlier evaluation read the test split too, so the count a result reports is the sum of this log."""
    path = directory.path / TEST_READS
    log = json.loads(path.read_text()) if path.exists() else []
    log.append({"evaluate_key": key, "reads": reads, "reused": reused})
    atomic_write_json(path, log)


def count_test_reads(directory: RunDirectory, results: dict) -> int:
    """Every read of the test split this run made; a run from before the log counts its last evaluation."""
    path = directory.path / TEST_READS
    if path.exists():
        return sum(entry["reads"] for entry in json.loads(path.read_text()))
    return sum(len(result["accuracies"]) for result in results.values())

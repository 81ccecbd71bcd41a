"""Every check a run can make before it writes anything (layer 5).

``preflight(cfg, directory, resuming)`` resolves the device, checks the names the config
gives (classifiers, the meta-gradient strategy), the generator's files and dependencies,
reads and checks the data, cuts the splits once to see that every class has enough images,
and compares the disk space the run plans to write with what is free. It raises
``ConfigError`` (or the data and model checks' ``ValueError`` / ``OSError`` /
``ImportError``), which the command line turns into exit status 2 with nothing written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from utilgen.config import Config, ConfigError
from utilgen.data import LabelledImages, load_split_indices, make_splits, splits_from_indices
from utilgen.rundir import free_bytes

log = logging.getLogger(__name__)


def preflight(cfg: Config, directory: Path, resuming: bool) -> tuple[torch.device, LabelledImages]:
    """(device, data) once every check passed; see the module docstring."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    check_run_directory_outside_data(cfg, directory, resuming)
    device = resolve_device(cfg.run.device)
    check_names(cfg, device)
    if cfg.generator.kind == "stable-diffusion":
        check_stable_diffusion(cfg, device)
    data = load_task_data(cfg)
    check_generator_fits_data(cfg, data)
    data = in_generator_class_order(cfg, data)
    make_splits(
        data,
        shots_per_class=cfg.data.shots_per_class,
        meta_per_class=cfg.data.meta_per_class,
        test_per_class=cfg.data.test_per_class,
        seed=cfg.data.split_seed,
    )
    if resuming and (directory / "splits.json").exists():  # the data must still be the data the run split
        splits_from_indices(data, load_split_indices(directory / "splits.json"))
    needed = planned_bytes(cfg, data)
    available = free_bytes(directory)
    if available < needed:
        raise ConfigError(
            f"not enough disk space for the run in {directory}: it plans to write about "
            f"{needed / 2**20:.0f} MiB and {available / 2**20:.0f} MiB are free"
        )
    return device, data


def check_run_directory_outside_data(cfg: Config, directory: Path, resuming: bool) -> None:
    """The run directory is not inside the ImageFolder: there it would read as one more class folder,
    so the run could not be resumed and every later run on that data would fail. Real paths are compared,
    so a symlink or ``..`` cannot hide it."""
    if cfg.data.source in ("embedded", "validation"):
        return
    data = Path(cfg.data.source).resolve()
    run = directory.resolve()
    if run == data or data in run.parents:
        option = "--resume" if resuming else "--out"
        raise ConfigError(
            f"the run directory {option} {directory} (really {run}) is inside the data directory --data "
            f"{cfg.data.source} (really {data}), where it would be read as a class folder; "
            "put the run directory outside the data"
        )


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:  # torch's message lists every device type it knows of
        raise ConfigError(f"run.device={requested!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"run.device={requested!r}: utilgen runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device={requested!r} but torch sees no CUDA device here; use cpu or auto")
    return device


def check_names(cfg: Config, device: torch.device) -> None:
    """What only torch-side code can check: classifier and strategy names, and settings the CLI cannot serve."""
    from utilgen.models.classifier import CLASSIFIERS
    from utilgen.valuation import STRATEGIES

    for key, name, what, known in (
        ("valuation.classifier", cfg.valuation.classifier, "classifier", CLASSIFIERS),
        ("evaluation.classifier", cfg.evaluation.classifier, "classifier", CLASSIFIERS),
        ("valuation.strategy", cfg.valuation.strategy, "meta-gradient strategy", STRATEGIES),
    ):
        if name not in known:
            raise ConfigError(f"{key}={name!r} is not a {what}; choose one of {', '.join(known)}")
    if cfg.ilpo.backend is not None:
        check_latent_update_backend(cfg.ilpo.backend, device)
    if cfg.ilpo.clip_weight > 0:  # the API takes a ClipAlignment; the command line has no CLIP model to load
        raise ConfigError(
            "ilpo.clip_weight > 0 needs a local CLIP model, which python -m utilgen.run does not load; "
            "use optimise_instances(..., clip=ClipAlignment.from_directory(...)) from Python, or leave it at 0"
        )


def check_latent_update_backend(requested: str, device: torch.device) -> None:
    """``ilpo.backend`` names a backend that can run ILPO's fp32 updates on ``device``."""
    from utilgen.ops import _backend
    from utilgen.ops.latent_update import SUPPORT

    try:
        name = _backend._check_request(requested, "ilpo.backend")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    reason = "" if name == "auto" else _backend.unavailable_reason(SUPPORT, name, device.type, torch.float32)
    if reason:
        raise ConfigError(f"ilpo.backend={name!r} cannot run on {device}: {reason}; use auto or leave it unset")


def check_stable_diffusion(cfg: Config, device: torch.device) -> None:
    """The model directory's files, the optional packages and the attention backend."""
    from utilgen.generator.attention import resolve_attention
    from utilgen.generator.stable_diffusion import check_directory

    check_directory(cfg.generator.path)
    import diffusers  # noqa: F401  (ImportError: the message names the package)
    import transformers  # noqa: F401

    resolve_attention(cfg.generator.attention, device)
    if device.type == "cpu" and cfg.generator.dtype != "float32":
        log.warning(
            "generator.dtype=%s on the CPU is slow or unsupported; --set generator.dtype=float32", cfg.generator.dtype
        )


def _shipped_data():
    from utilgen.data.fashion_mnist import load_embedded, load_validation

    return {"embedded": load_embedded, "validation": load_validation}


def load_task_data(cfg: Config) -> LabelledImages:
    """The real dataset the splits are cut from (embedded Fashion-MNIST or an ImageFolder), checked."""
    from utilgen.data import load_image_folder

    shipped = _shipped_data()
    if cfg.data.source in shipped:
        if cfg.data.channels != 1:
            raise ConfigError(
                f"the {cfg.data.source} Fashion-MNIST data is grayscale: data.channels must be 1 "
                "(give --data PATH for an RGB ImageFolder)"
            )
        return shipped[cfg.data.source](cfg.data.image_size)
    data, report = load_image_folder(cfg.data.source, image_size=cfg.data.image_size, channels=cfg.data.channels)
    log.info("ImageFolder %s: %s", cfg.data.source, report.counts)
    return data


def check_generator_fits_data(cfg: Config, data: LabelledImages) -> None:
    """The generator can make the task's images: the embedded one knows 10 gray classes, Stable Diffusion paints RGB."""
    channels = data.images.shape[1]
    if cfg.generator.kind == "embedded":
        from utilgen.generator.embedded import EmbeddedConfig

        embedded = EmbeddedConfig()
        if len(data.class_names) != embedded.num_classes or channels != embedded.channels:
            raise ConfigError(
                f"the embedded generator makes {embedded.channels}-channel images of Fashion-MNIST's "
                f"{embedded.num_classes} classes; the data has {len(data.class_names)} classes with {channels} "
                "channel(s). Use --generator PATH (a Stable Diffusion directory) for other datasets"
            )
    elif channels != 3:
        raise ConfigError(
            f"Stable Diffusion makes RGB images; the data is read with {channels} "
            "channel(s): set data.channels=3 (or use --preset sd21)"
        )


def in_generator_class_order(cfg: Config, data: LabelledImages) -> LabelledImages:
    """``data`` relabelled so that label k is the embedded generator's class k, matched by name.

    An ImageFolder's labels follow its sorted folder names, but the embedded generator's class k is
    Fashion-MNIST's class k: matching by position would label T-shirts "ankle boot" without an error.
    Names are compared without case or punctuation ("T-shirt_top" is "t-shirt/top"); a folder named
    "t-shirt" or "tshirt" also means "t-shirt/top". Anything that does not match is refused, naming it.
    Stable Diffusion draws each class from its own name, so its data keeps the folder order.
    """
    if cfg.generator.kind != "embedded":
        return data
    from utilgen.data.fashion_mnist import CLASS_NAMES
    from utilgen.generator.embedded import matching_rows

    order = matching_rows(CLASS_NAMES, data.class_names)  # data label -> generator class
    unknown = [name for name, k in zip(data.class_names, order, strict=True) if k is None]
    if unknown or len(set(order)) != len(order):
        raise ConfigError(
            f"the embedded generator makes Fashion-MNIST's classes ({', '.join(CLASS_NAMES)}); the data's "
            f"class folders {', '.join(map(repr, unknown or data.class_names))} do not name them one to one "
            "(case, spaces and punctuation are ignored). Rename the folders, or use --generator PATH "
            "(a Stable Diffusion directory) for other classes"
        )
    if order == list(range(len(order))):
        return data
    to_generator = torch.tensor(order, dtype=torch.int64)
    names = [""] * len(order)
    for label, k in enumerate(order):
        names[k] = data.class_names[label]
    log.info("ImageFolder classes matched to the embedded generator's by name: %s", ", ".join(names))
    return LabelledImages(data.images, to_generator[data.labels], tuple(names), data.sources)


def planned_bytes(cfg: Config, data: LabelledImages) -> int:
    """A generous estimate of what the run writes: PNGs (worst case uncompressed), per-image tensors, and
    the fixed part (weights, adapters, report), 1.5x. No flat allowance: a small run fits a small volume."""
    num_classes, channels, image_size = len(data.class_names), data.images.shape[1], data.images.shape[-1]
    per_image = channels * image_size * image_size + 512
    final = cfg.final_per_class() * num_classes
    images = (
        cfg.synthetic.first_pool_per_class * num_classes
        + final * (2 + 2 * cfg.evaluation.ablation)
        + cfg.mlco.rounds * cfg.mlco.candidates_per_class * num_classes
    )
    stable_diffusion = cfg.generator.kind != "embedded"
    latent = 4 * 64 * 64 * 4 if stable_diffusion else 4 * image_size * image_size
    prompt = 77 * 1024 * 4 if stable_diffusion else 4 * 64 * 4
    tensors = final * (1 + 2 * cfg.evaluation.ablation) * (latent + prompt)
    # Measured on the smoke preset (1.9 MiB in all): the valuation's weights, the round's adapter, JSON and
    # the report's plots come to about 0.9 MiB. SD's LoRA adapters (rank 4 on the attention projections)
    # are a few MiB per round; 16 MiB is a generous bound.
    fixed = 2 * 2**20 + cfg.mlco.rounds * (16 * 2**20 if stable_diffusion else 2**19)
    return int(1.5 * (images * per_image + tensors + fixed))


def describe_plan(cfg: Config) -> str:
    per_class = cfg.final_per_class()
    return (
        f"{cfg.data.shots_per_class} real shots/class, meta {cfg.data.meta_per_class}/class, "
        f"{per_class} synthetic/class ({cfg.synthetic.multiple:g}x), MLCO rounds {cfg.mlco.rounds}, "
        f"evaluation seeds {list(cfg.evaluation.seeds)}"
    )

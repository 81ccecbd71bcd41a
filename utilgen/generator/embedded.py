"""The embedded generator: a small class-conditional pixel-space diffusion model (diffusers).

A ``UNet2DConditionModel`` denoises 1-channel 16x16 images in [-1, 1], conditioned
through cross-attention on learned class embeddings: an ``nn.Embedding(K + 1, L*D)``
whose row k, viewed as (L, D), is class k's prompt and whose last row is the null
prompt used for classifier-free guidance. Sampling is DDIM.

Why 16x16 (measured on the 2-core CI CPU): a 1.1M-parameter UNet at 16x16 trained at
~0.3 s/step (batch 128) and 88% of its samples were recognised after 500 steps;
at 28x28 it was 3x slower per step and 76% recognised.

``load_pretrained()`` loads the weights committed under ``weights/`` (trained by
``python -m utilgen.pretrain``) after checking their SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utilgen.data.fashion_mnist import CLASS_NAMES as FINE_NAMES
from utilgen.data.fashion_mnist import PARENT
from utilgen.generator.base import Generator
from utilgen.io import file_sha256

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_NAME = "embedded.safetensors"
CONFIG_NAME = "embedded.json"
CHECKSUM_NAME = "embedded.safetensors.sha256"
LFS_POINTER_PREFIX = b"version https://git-lfs"


@dataclass(frozen=True)
class EmbeddedConfig:
    num_classes: int = 10
    class_names: tuple[str, ...] = FINE_NAMES  # what each pretrained class is (fine classes or coarse groups)
    image_size: int = 16
    channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 48, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    prompt_tokens: int = 4  # L
    prompt_dim: int = 64  # D (the UNet's cross-attention width)
    num_train_timesteps: int = 1000

    @classmethod
    def from_dict(cls, values: dict) -> EmbeddedConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown EmbeddedConfig keys: {sorted(unknown)}")
        values = dict(values)
        for key in ("block_out_channels", "class_names"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


# A config small enough for unit tests and the pretrain smoke run (~40k parameters).
TINY_CONFIG = EmbeddedConfig(
    image_size=8, block_out_channels=(16, 16), prompt_tokens=2, prompt_dim=16, attention_head_dim=4, norm_num_groups=4
)


def _down_up_blocks(levels: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Full resolution without attention (it is the most expensive level and the
    # class is a global property); cross-attention at every coarser level.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return down, up


def build_unet(config: EmbeddedConfig):
    from diffusers import UNet2DConditionModel

    down, up = _down_up_blocks(len(config.block_out_channels))
    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=config.channels,
        out_channels=config.channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        cross_attention_dim=config.prompt_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
    )


def build_scheduler(config: EmbeddedConfig):
    from diffusers import DDIMScheduler

    # trailing spacing: the first DDIM step starts at t = T-1 (pure noise), which
    # few-step sampling of a small model needs; clip x0 to the pixel range.
    return DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="linear",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        prediction_type="epsilon",
    )


class EmbeddedGenerator(Generator):
    def __init__(
        self,
        config: EmbeddedConfig = EmbeddedConfig(),
        unet: nn.Module | None = None,
        class_embedding: nn.Embedding | None = None,
    ):
        self.config = config
        self.num_classes = config.num_classes
        self.image_size = config.image_size
        self.denoiser = unet if unet is not None else build_unet(config)
        width = config.prompt_tokens * config.prompt_dim
        if class_embedding is None:
            class_embedding = nn.Embedding(config.num_classes + 1, width)
            nn.init.normal_(class_embedding.weight, std=1.0)
            class_embedding.to(self.denoiser.device)
        self.class_embedding = class_embedding  # rows 0..K-1: classes, row K: null prompt
        self.scheduler = build_scheduler(config)

    # ---- shapes ----
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.channels, self.config.image_size, self.config.image_size)

    @property
    def decode_shape(self) -> tuple[int, int, int]:
        return self.latent_shape

    @property
    def prompt_shape(self) -> tuple[int, int]:
        return (self.config.prompt_tokens, self.config.prompt_dim)

    def modules(self) -> list[nn.Module]:
        return [self.denoiser, self.class_embedding]

    def to(self, device: torch.device | str) -> EmbeddedGenerator:
        for module in self.modules():
            module.to(device)
        return self

    # ---- prompts ----
    @property
    def class_tokens(self) -> torch.Tensor:
        return self.class_embedding.weight[: self.num_classes].detach().view(self.num_classes, *self.prompt_shape)

    def set_class_tokens(self, tokens: torch.Tensor) -> None:
        expected = (self.num_classes, *self.prompt_shape)
        if tuple(tokens.shape) != expected:
            raise ValueError(f"class tokens must have shape {expected}, got {tuple(tokens.shape)}")
        with torch.no_grad():
            self.class_embedding.weight[: self.num_classes] = tokens.reshape(self.num_classes, -1)

    def prompt_embeds_from_tokens(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return tokens[labels.to(tokens.device)]  # (N, L, D)

    def null_prompt_embeds(self, n: int) -> torch.Tensor:
        null = self.class_embedding.weight[self.num_classes].view(1, *self.prompt_shape)
        return null.expand(n, *self.prompt_shape)  # (n, L, D)

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, L, D) prompts for labels in [0, K]; K is the null class. Differentiable in the embedding (training)."""
        return self.class_embedding(labels).view(labels.shape[0], *self.prompt_shape)

    # ---- the task's classes ----
    def for_task(self, class_names: tuple[str, ...] | list[str]) -> EmbeddedGenerator:
        """The same network with one class token per task class, each starting from the pretrained token of
        that class or of its coarse group (``task_rows``); the null token is kept. Weights are shared.

        A generator pretrained on the three coarse groups knows "footwear", not "sandal": textual inversion
        starts each fine class at its group and learns the difference from the few shots.
        """
        rows = task_rows(self.config.class_names, class_names)
        weight = self.class_embedding.weight.detach()
        task_embedding = nn.Embedding(len(rows) + 1, weight.shape[1]).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            task_embedding.weight.copy_(weight[[*rows, self.num_classes]])
        task_embedding.requires_grad_(False)
        config = dataclasses.replace(self.config, num_classes=len(rows), class_names=tuple(class_names))
        return EmbeddedGenerator(config, unet=self.denoiser, class_embedding=task_embedding)

    # ---- images ----
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H', W') in [0, 1] -> (N, C, S, S) in [-1, 1], resized (antialiased bilinear) to S."""
        images = images.to(device=self.device, dtype=self.dtype)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1) / 2).clamp(0, 1)

    # ---- persistence ----
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"unet.{k}": v for k, v in self.denoiser.state_dict().items()}
        state["class_embedding.weight"] = self.class_embedding.weight
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        self.denoiser.load_state_dict(unet_state, strict=True)
        with torch.no_grad():
            self.class_embedding.weight.copy_(state["class_embedding.weight"])


def class_key(name: str) -> str:
    """A class name compared without case, spaces or punctuation: "Ankle_Boot" and "ankle boot" agree."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def matching_rows(pretrained: tuple[str, ...], task: tuple[str, ...] | list[str]) -> list[int | None]:
    """For each task class, the pretrained class whose token it starts from: itself, or its coarse group
    (``fashion_mnist.PARENT``); None when neither is known. Names compare without case or punctuation;
    "t-shirt" means "t-shirt/top"."""
    known = {class_key(name): row for row, name in enumerate(pretrained)}
    parent = {class_key(fine): class_key(group) for fine, group in PARENT.items()}
    aliases = {"tshirt": class_key("t-shirt/top")}
    keys = [aliases.get(class_key(name), class_key(name)) for name in task]
    return [known.get(key, known.get(parent.get(key, ""))) for key in keys]


def task_rows(pretrained: tuple[str, ...], task: tuple[str, ...] | list[str]) -> list[int]:
    """``matching_rows``, raising ValueError naming the classes the generator does not know."""
    rows = matching_rows(pretrained, task)
    unknown = [name for name, row in zip(task, rows, strict=True) if row is None]
    if unknown:
        raise ValueError(
            f"the embedded generator knows {', '.join(pretrained)}; it has no token for {', '.join(map(repr, unknown))}"
        )
    return rows


# ---- weights on disk -------------------------------------------------------------------------


def save_weights(generator: EmbeddedGenerator, directory: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write weights (safetensors, floats stored as ``dtype``), config (JSON) and a sha256sum-format checksum.

    Each file is written atomically, the checksum last: a directory with a
    checksum file is complete. Loading casts back to the model's float32.
    """
    from safetensors.torch import save

    from utilgen.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    directory = Path(directory)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in generator.state_dict().items()}
    weights = atomic_write_bytes(directory / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, dataclasses.asdict(generator.config))
    atomic_write_text(directory / CHECKSUM_NAME, f"{file_sha256(weights)}  {WEIGHTS_NAME}\n")
    return directory


class WeightsError(RuntimeError):
    """The embedded generator's weights are missing, an LFS pointer, or fail their checksum."""


def verify_weights(directory: str | Path) -> Path:
    """Path of the verified weights file; raises ``WeightsError`` saying what is wrong and how to fix it."""
    directory = Path(directory)
    weights, checksum = directory / WEIGHTS_NAME, directory / CHECKSUM_NAME
    missing = [p.name for p in (weights, directory / CONFIG_NAME, checksum) if not p.exists()]
    if missing:
        raise WeightsError(
            f"embedded generator weights in {directory} are incomplete: missing {missing}; "
            "train them with `python -m utilgen.pretrain --out DIR`"
        )
    with open(weights, "rb") as handle:
        head = handle.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        raise WeightsError(f"{weights} is a git-LFS pointer, not the weights: fetch them with `git lfs pull`")
    expected = checksum.read_text().split()[0].lower() if checksum.read_text().split() else ""
    actual = file_sha256(weights)
    if actual != expected:
        raise WeightsError(
            f"{weights} fails its checksum (sha256 {actual}, {checksum.name} says {expected or 'nothing'}): "
            "the file is corrupted or does not belong to this checksum; restore it from git or retrain"
        )
    return weights


def load_weights(directory: str | Path, device: torch.device | str = "cpu") -> EmbeddedGenerator:
    """An ``EmbeddedGenerator`` (eval mode, frozen) with the verified weights from ``directory``."""
    from safetensors.torch import load_file

    weights = verify_weights(directory)
    config = EmbeddedConfig.from_dict(json.loads((Path(directory) / CONFIG_NAME).read_text()))
    generator = EmbeddedGenerator(config)
    generator.load_state_dict(load_file(weights))
    generator.to(device).eval().freeze()
    return generator


SHIPPED = ("coarse", "fine")  # weights/<name>/: the default generator; the in-domain preset's


def load_pretrained(device: torch.device | str = "cpu", name: str = "coarse") -> EmbeddedGenerator:
    """Shipped weights (``utilgen/generator/weights/<name>/``), checksum verified: "coarse" knows the three
    groups tops/footwear/other (the default), "fine" the ten Fashion-MNIST classes (in-domain)."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped embedded weights named {name!r}; choose one of {', '.join(SHIPPED)}")
    return load_weights(WEIGHTS_DIR / name, device)

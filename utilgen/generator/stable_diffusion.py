"""The Stable Diffusion backend: UNet, VAE, CLIP text encoder and tokenizer from a local diffusers directory.

No hub access: every part loads with ``local_files_only=True`` from a directory
laid out like a saved ``StableDiffusionPipeline`` (unet/, vae/, text_encoder/,
tokenizer/, scheduler/). The directory is checked first, so a missing file or a
git-LFS pointer in place of weights gives one error that lists every problem.

Class tokens are textual-inversion placeholders ``<class-k>``, added to the
tokenizer and initialised from the class name's word vectors; the class prompt
is ``prompt_template.format("<class-k>")``. Prompt embeddings are computed with
``torch.func.functional_call`` on a token-embedding matrix whose placeholder rows
are the tokens being learned, so gradients reach those rows only and the text
encoder is never modified in place during training.

transformers is imported here only (the embedded generator does not need it).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utilgen.generator.attention import apply_attention
from utilgen.generator.base import Generator

LFS_POINTER_PREFIX = b"version https://git-lfs"

# Per component: files that must all exist, and alternative file sets of which one must be complete
# (weight formats and variants; a slow-tokenizer vocabulary or a fast tokenizer.json).
_WEIGHTS_DIFFUSERS = [
    ("diffusion_pytorch_model.safetensors",),
    ("diffusion_pytorch_model.bin",),
    ("diffusion_pytorch_model.fp16.safetensors",),
]
_REQUIRED = {
    "unet": (["config.json"], _WEIGHTS_DIFFUSERS),
    "vae": (["config.json"], _WEIGHTS_DIFFUSERS),
    "text_encoder": (["config.json"], [("model.safetensors",), ("pytorch_model.bin",), ("model.fp16.safetensors",)]),
    "tokenizer": ([], [("vocab.json", "merges.txt"), ("tokenizer.json",)]),
    "scheduler": (["scheduler_config.json"], []),
}


class StableDiffusionDirectoryError(FileNotFoundError):
    """The local Stable Diffusion directory is incomplete or holds git-LFS pointers."""


def _file_defect(path: Path) -> str | None:
    """Why ``path`` cannot be what its name says, found without loading it (None: it looks whole).

    JSON must parse; a safetensors header must parse and its tensors must end exactly at the end of the
    file (so a file cut short or overwritten is caught here, not as a traceback deep in from_pretrained);
    a ``.bin`` saved by torch >= 1.6 is a zip whose directory, at the very end, must read.
    """
    try:
        if path.suffix == ".json":
            json.loads(path.read_bytes())
        elif path.suffix == ".safetensors":
            return _safetensors_defect(path)
        elif path.suffix == ".bin" and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
    except (ValueError, zipfile.BadZipFile) as error:
        return f"is corrupt ({type(error).__name__}: {error})"
    return None


def _safetensors_defect(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            return f"is not a safetensors file (its header length {length} does not fit its {size} bytes)"
        header = json.loads(handle.read(length))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        return f"is truncated or padded: its tensors need {8 + length + max(ends, default=0)} bytes, it has {size}"
    return None


def _is_lfs_pointer(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def check_directory(path: str | Path) -> Path:
    """``path`` if it holds every file the backend loads; else one error listing all that is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise StableDiffusionDirectoryError(f"{path} is not a directory (expected a saved diffusers pipeline)")
    problems = []
    for component, (all_of, alternatives) in _REQUIRED.items():
        for name in all_of:
            if not (path / component / name).is_file():
                problems.append(f"missing {component}/{name}")
        complete = [names for names in alternatives if all((path / component / n).is_file() for n in names)]
        if alternatives and not complete:
            wanted = " or ".join("+".join(names) for names in alternatives)
            problems.append(f"missing {component}/ files (need {wanted})")
        for name in all_of + [n for names in complete for n in names]:
            file = path / component / name
            if not file.is_file():
                continue
            if _is_lfs_pointer(file):
                problems.append(f"{component}/{name} is a git-LFS pointer, not the file (run `git lfs pull` there)")
            elif defect := _file_defect(file):
                problems.append(f"{component}/{name} {defect} (download or copy it again)")
    if problems:
        raise StableDiffusionDirectoryError(
            f"{path} is not a usable Stable Diffusion directory: "
            + "; ".join(problems)
            + ". --generator takes a pipeline saved in the diffusers layout (StableDiffusionPipeline.save_pretrained)"
        )
    return path


class StableDiffusionGenerator(Generator):
    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        class_names: Sequence[str],
        *,
        prompt_template: str = "a photo of a {}",
        initializer_words: Sequence[str] | None = None,
        attention: str = "auto",
    ):
        self.denoiser, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = scheduler
        self.attention, self.attention_reason = apply_attention(unet, attention)
        apply_attention(vae, self.attention)  # the VAE mid-block attends too
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_size = int(unet.config.sample_size) * self.vae_scale
        self.prompt_template = prompt_template
        self._null_embed = None
        self._add_class_tokens(list(class_names), initializer_words)

    @classmethod
    def from_directory(
        cls,
        path: str | Path,
        class_names: Sequence[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        attention: str = "auto",
        prompt_template: str = "a photo of a {}",
        initializer_words: Sequence[str] | None = None,
    ) -> StableDiffusionGenerator:
        """Load every part from ``path`` (local files only), move to ``device``/``dtype``, freeze, eval."""
        path = check_directory(path)
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as error:
            raise ImportError("the Stable Diffusion backend needs transformers: pip install 'utilgen[sd]'") from error
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

        local = {"local_files_only": True}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **local)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **local)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype, **local)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **local)
        # DDIM from whatever scheduler was saved: the config carries the betas,
        # prediction type and timestep spacing the UNet was trained with.
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **local)
        for module in (unet, vae, text_encoder):
            module.to(device).eval().requires_grad_(False)
        return cls(
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler,
            class_names,
            prompt_template=prompt_template,
            initializer_words=initializer_words,
            attention=attention,
        )

    # ---- shapes ----
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.denoiser.config.sample_size)
        return (int(self.denoiser.config.in_channels), size, size)

    @property
    def decode_shape(self) -> tuple[int, int, int]:
        return (int(self.vae.config.out_channels), self.image_size, self.image_size)

    @property
    def prompt_shape(self) -> tuple[int, int]:
        return (int(self.tokenizer.model_max_length), int(self.text_encoder.config.hidden_size))

    def modules(self) -> list[nn.Module]:
        return [self.denoiser, self.vae, self.text_encoder]

    # ---- text ----
    def _token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.text_encoder.device)

    @property
    def _token_table(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def _add_class_tokens(self, class_names: list[str], initializer_words: Sequence[str] | None) -> None:
        """Placeholders ``<class-k>``, initialised to the mean word vector of the class name (or initializer word)."""
        self.class_names = class_names
        self.num_classes = len(class_names)
        words = list(initializer_words) if initializer_words is not None else class_names
        if len(words) != self.num_classes:
            raise ValueError(f"{len(words)} initializer words for {self.num_classes} classes")
        placeholders = [f"<class-{k}>" for k in range(self.num_classes)]
        added = self.tokenizer.add_tokens(placeholders)
        if added != self.num_classes:
            raise ValueError(f"the tokenizer already holds some of {placeholders}")
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)  # rows set below
        self.class_token_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(placeholders))  # (K,)
        table = self._token_table.weight
        with torch.no_grad():
            for k, word in enumerate(words):
                ids = self.tokenizer(word, add_special_tokens=False).input_ids
                if not ids:
                    raise ValueError(f"initializer word {word!r} tokenizes to nothing")
                table[self.class_token_ids[k]] = table[torch.tensor(ids)].mean(0)
        self.class_prompt_ids = self._token_ids([self.prompt_template.format(p) for p in placeholders])  # (K, L)

    @property
    def class_tokens(self) -> torch.Tensor:
        return self._token_table.weight[self.class_token_ids.to(self._token_table.weight.device)].detach()  # (K, D_tok)

    def set_class_tokens(self, tokens: torch.Tensor) -> None:
        table = self._token_table.weight
        if tuple(tokens.shape) != (self.num_classes, table.shape[1]):
            raise ValueError(
                f"class tokens must have shape {(self.num_classes, table.shape[1])}, got {tuple(tokens.shape)}"
            )
        with torch.no_grad():
            table[self.class_token_ids.to(table.device)] = tokens.to(table)

    def prompt_embeds_from_tokens(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        table = self._token_table.weight
        rows = self.class_token_ids.to(table.device)
        # Out-of-place: differentiable in ``tokens``, the encoder's table untouched.
        new_table = table.detach().index_put((rows,), tokens.to(table.dtype))
        name = next(n for n, p in self.text_encoder.named_parameters() if p is table)
        input_ids = self.class_prompt_ids[labels.to(self.class_prompt_ids.device)]  # (N, L)
        output = torch.func.functional_call(self.text_encoder, {name: new_table}, (input_ids,))
        return output.last_hidden_state  # (N, L, D)

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, L, D) prompt embeddings of free text (placeholders ``<class-k>`` may appear in it)."""
        return self.text_encoder(self._token_ids(prompts)).last_hidden_state

    def null_prompt_embeds(self, n: int) -> torch.Tensor:
        if self._null_embed is None:  # the empty prompt, as in diffusers' pipelines
            self._null_embed = self.encode_text([""])
        return self._null_embed.expand(n, *self._null_embed.shape[1:])

    # ---- images ----
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H', W') in [0, 1] (gray or RGB, any size) -> scaled VAE latents (posterior mean)."""
        images = images.to(device=self.device, dtype=self.dtype)
        if images.shape[1] == 1 and self.vae.config.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        latents = self.vae.encode(images * 2 - 1).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor).sample
        return ((images + 1) / 2).clamp(0, 1)

"""Tiny random generators built in code for the generator tests (no hub, no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from utilgen.generator.embedded import TINY_CONFIG, EmbeddedGenerator

CLASS_NAMES = ("shirt", "shoe", "bag")


def tiny_embedded(dtype: torch.dtype = torch.float32, seed: int = 0) -> EmbeddedGenerator:
    torch.manual_seed(seed)
    generator = EmbeddedGenerator(TINY_CONFIG)
    for module in generator.modules():
        module.to(dtype).eval()
    # Random init leaves the UNet's output convolution at zero (diffusers'
    # zero-init of the last layer); perturb every weight so the tests see a
    # network whose output depends on its inputs.
    with torch.no_grad():
        for parameter in generator.denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    generator.freeze()
    return generator


def _write_clip_tokenizer_files(directory: Path) -> None:
    """A CLIP BPE vocabulary of single characters (plain and word-final) plus a few merges."""
    characters = "abcdefghijklmnopqrstuvwxyz0123456789<>-.,!"
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(characters) + [c + "</w>" for c in characters]
    merges = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("a", "</w>")]
    tokens += ["ph", "pho", "to</w>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges[:3]) + "\n")


def save_tiny_stable_diffusion(directory: Path, prediction_type: str = "epsilon") -> Path:
    """A tiny random SD pipeline (UNet, VAE, CLIP text encoder, tokenizer, scheduler) saved like diffusers does."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    _write_clip_tokenizer_files(directory / "_tokenizer_source")
    tokenizer = CLIPTokenizer(
        str(directory / "_tokenizer_source" / "vocab.json"),
        str(directory / "_tokenizer_source" / "merges.txt"),
        model_max_length=16,
    )
    tokenizer.save_pretrained(directory / "tokenizer")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    text_encoder.save_pretrained(directory / "text_encoder")
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    with torch.no_grad():  # see tiny_embedded: no zero-initialised output layer
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    unet.save_pretrained(directory / "unet")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    vae.save_pretrained(directory / "vae")
    DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    ).save_pretrained(directory / "scheduler")
    return directory

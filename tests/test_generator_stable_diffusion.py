"""The Stable Diffusion backend on a tiny random pipeline saved to a temporary directory (CPU, offline)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers", reason="the SD backend needs transformers (pip install 'utilgen[sd]')")

from _generator_models import CLASS_NAMES, save_tiny_stable_diffusion

from utilgen.generator import attention
from utilgen.generator.stable_diffusion import (
    StableDiffusionDirectoryError,
    StableDiffusionGenerator,
    check_directory,
)
from utilgen.generator.textual_inversion import denoising_loss, learn_class_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def sd(sd_dir):
    return StableDiffusionGenerator.from_directory(sd_dir, CLASS_NAMES)


def test_loads_and_samples_from_prompt_embeddings(sd):
    assert sd.latent_shape == (4, 8, 8)
    assert sd.image_size == 16
    assert sd.prompt_shape == (16, 32)
    prompts = sd.class_prompt_embeds([0, 2])
    assert prompts.shape == (2, 16, 32)
    images = sd.sample(prompts, sd.initial_noise([1, 2]), guidance_scale=3.0, steps=3)
    assert images.shape == (2, 3, 16, 16)
    assert images.min() >= 0
    assert images.max() <= 1
    alone = sd.sample(prompts[1:], sd.initial_noise([2]), guidance_scale=3.0, steps=3)
    torch.testing.assert_close(alone[0], images[1], atol=1e-4, rtol=0)


def test_prompt_embeddings_from_text(sd):
    a, b = sd.encode_text(["a photo of a shirt", "a photo of a bag"])
    assert a.shape == (16, 32)
    assert not torch.allclose(a, b)
    # The class prompt is the template around the placeholder token.
    torch.testing.assert_close(sd.encode_text(["a photo of a <class-1>"])[0], sd.class_prompt_embeds([1])[0])


def test_class_tokens_start_from_the_class_name(sd):
    table = sd.text_encoder.get_input_embeddings().weight
    ids = sd.tokenizer("bag", add_special_tokens=False).input_ids
    torch.testing.assert_close(sd.class_tokens[2], table[torch.tensor(ids)].mean(0))


def test_encode_decode_shapes(sd):
    gray = torch.rand(2, 1, 28, 28)  # Fashion-MNIST-like: expanded to RGB, resized
    latents = sd.encode(gray)
    assert latents.shape == (2, *sd.latent_shape)
    assert sd.decode(latents).shape == (2, *sd.decode_shape)


def test_textual_inversion_trains_only_the_new_token_rows(sd_dir):
    sd = StableDiffusionGenerator.from_directory(sd_dir, CLASS_NAMES)
    table_before = sd.text_encoder.get_input_embeddings().weight.clone()
    unet_before = {k: v.clone() for k, v in sd.denoiser.state_dict().items()}
    torch.manual_seed(0)
    images, labels = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 0, 1, 0, 1])
    latents = sd.encode(images)
    rng = torch.Generator().manual_seed(9)
    timesteps, noise = torch.randint(0, 1000, (6,), generator=rng), torch.randn(6, 4, 8, 8, generator=rng)
    with torch.no_grad():
        before = denoising_loss(sd, sd.class_tokens, latents, labels, timesteps, noise).item()
    tokens = learn_class_tokens(sd, images, labels, steps=40, lr=5e-2, batch_size=6)
    with torch.no_grad():
        after = denoising_loss(sd, tokens, latents, labels, timesteps, noise).item()
    assert after < before
    assert not torch.allclose(tokens[:2], sd.class_tokens[:2])
    torch.testing.assert_close(tokens[2], sd.class_tokens[2])  # no images of class 2
    # Nothing in the text encoder or UNet moved; installing the tokens changes exactly their rows.
    torch.testing.assert_close(sd.text_encoder.get_input_embeddings().weight, table_before, rtol=0, atol=0)
    for key, value in sd.denoiser.state_dict().items():
        assert torch.equal(value, unet_before[key]), key
    sd.set_class_tokens(tokens)
    table_after = sd.text_encoder.get_input_embeddings().weight
    changed = (table_after != table_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sd.class_token_ids[:2].tolist()


def test_missing_file_is_listed(sd_dir, tmp_path):
    import shutil

    broken = tmp_path / "sd"
    shutil.copytree(sd_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(StableDiffusionDirectoryError) as error:
        StableDiffusionGenerator.from_directory(broken, CLASS_NAMES)
    assert "missing vae/ files" in str(error.value)
    assert "missing scheduler/scheduler_config.json" in str(error.value)


def test_lfs_pointer_is_named(sd_dir, tmp_path):
    import shutil

    broken = tmp_path / "sd"
    shutil.copytree(sd_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 3400000000\n"
    )
    with pytest.raises(
        StableDiffusionDirectoryError, match=r"unet/diffusion_pytorch_model\.safetensors is a git-LFS pointer"
    ):
        check_directory(broken)


def test_not_a_directory(tmp_path):
    with pytest.raises(StableDiffusionDirectoryError, match="not a directory"):
        check_directory(tmp_path / "nowhere")


def test_v_prediction_is_converted_to_epsilon(tmp_path):
    sd_dir = save_tiny_stable_diffusion(tmp_path / "v", prediction_type="v_prediction")
    sd = StableDiffusionGenerator.from_directory(sd_dir, CLASS_NAMES)
    x, prompts, t = sd.initial_noise([3]), sd.class_prompt_embeds([0]), 700
    with torch.no_grad():
        v = sd.denoiser(x, torch.tensor([t]), encoder_hidden_states=prompts).sample
        eps = sd.predict_noise(x, t, prompts, 1.0)
    a = sd.alpha_bar(t)
    torch.testing.assert_close(eps, a**0.5 * v + (1 - a) ** 0.5 * x)
    with torch.no_grad():  # per-sample timesteps convert with their own alphas
        both = sd.predict_noise(torch.cat([x, x]), torch.tensor([t, 100]), torch.cat([prompts, prompts]), 1.0)
        at_100 = sd.predict_noise(x, 100, prompts, 1.0)
    torch.testing.assert_close(both, torch.cat([eps, at_100]), atol=1e-5, rtol=1e-5)


# ---- attention choice ----------------------------------------------------------------------


def test_auto_attention_on_cpu_is_sdpa_with_the_reason(sd):
    backend, reason = attention.resolve_attention("auto", "cpu")
    assert backend == "sdpa"
    assert "xformers" in reason
    assert "not installed" in reason or "CUDA tensors" in reason
    assert sd.attention == "sdpa"
    assert sd.attention_reason == reason
    processors = {type(p).__name__ for p in sd.denoiser.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}


def test_explicit_xformers_without_it_is_an_error(sd_dir):
    if attention.resolve_attention("auto", "cpu")[0] == "xformers":  # pragma: no cover - CPU never has it
        pytest.skip("xformers usable on CPU tensors")
    with pytest.raises(RuntimeError, match="attention='xformers' was requested but cannot be used"):
        StableDiffusionGenerator.from_directory(sd_dir, CLASS_NAMES, attention="xformers")


def test_plain_attention_gives_the_same_images(sd_dir, sd):
    plain = StableDiffusionGenerator.from_directory(sd_dir, CLASS_NAMES, attention="plain")
    assert {type(p).__name__ for p in plain.denoiser.attn_processors.values()} == {"AttnProcessor"}
    prompts, noise = sd.class_prompt_embeds([0]), sd.initial_noise([4])
    torch.testing.assert_close(
        plain.sample(prompts, noise, steps=2), sd.sample(prompts, noise, steps=2), atol=1e-4, rtol=0
    )


def test_unknown_attention_is_rejected():
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.resolve_attention("flash", "cpu")


@pytest.mark.parametrize(
    ("file", "damage", "reason"),
    [
        ("unet/diffusion_pytorch_model.safetensors", "truncate", "truncated or padded"),
        ("vae/diffusion_pytorch_model.safetensors", "garbage", "not a safetensors file"),
        ("text_encoder/config.json", "truncate", "is corrupt"),
    ],
)
def test_corrupt_weights_and_configs_are_named_before_loading(sd_dir, tmp_path, file, damage, reason):
    import shutil

    broken = tmp_path / "sd"
    shutil.copytree(sd_dir, broken)
    target = broken / file
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(StableDiffusionDirectoryError, match=rf"{file}.*{reason}.*download or copy it again"):
        check_directory(broken)
    check_directory(sd_dir)  # the intact directory passes

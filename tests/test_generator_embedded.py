"""The embedded generator: sampling contract, determinism, guidance, textual inversion, committed weights."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from _generator_models import tiny_embedded

from utilgen.generator import embedded
from utilgen.generator.textual_inversion import denoising_loss, learn_class_tokens


def test_sample_shapes_and_range():
    gen = tiny_embedded()
    labels = torch.tensor([0, 3, 9, 5, 1])
    images = gen.sample(gen.class_prompt_embeds(labels), gen.initial_noise(range(5)), guidance_scale=2.0, steps=4)
    assert images.shape == (5, *gen.decode_shape) == (5, 1, gen.image_size, gen.image_size)
    assert images.dtype == torch.float32
    assert images.min() >= 0
    assert images.max() <= 1
    assert images.std() > 0  # not a constant image


def test_an_image_depends_on_its_seed_not_on_the_batch():
    gen = tiny_embedded()
    seeds, labels = [11, 12, 13, 14, 15, 16, 17], torch.tensor([0, 1, 2, 3, 4, 5, 6])
    prompts = gen.class_prompt_embeds(labels)
    together = gen.sample(prompts, gen.initial_noise(seeds), guidance_scale=2.0, steps=4, batch_size=7)
    in_threes = gen.sample(prompts, gen.initial_noise(seeds), guidance_scale=2.0, steps=4, batch_size=3)
    alone = gen.sample(prompts[4:5], gen.initial_noise([15]), guidance_scale=2.0, steps=4)
    # Other batches, other convolution blocking: rounding only, up to 9.3e-5 here on an AMD EPYC (tests/test_ilpo.py,
    # CROSS_BATCH_IMAGE_ATOL, has the measurements); a batch leak would move pixels by ~1e-2 or more.
    torch.testing.assert_close(in_threes, together, atol=5e-4, rtol=0)
    torch.testing.assert_close(alone[0], together[4], atol=5e-4, rtol=0)
    # The same batches give the same bits.
    assert torch.equal(
        gen.sample(prompts, gen.initial_noise(seeds), guidance_scale=2.0, steps=4, batch_size=3), in_threes
    )
    assert not torch.allclose(together[0], together[1], atol=1e-2)  # different seeds, different images


def test_initial_noise_is_per_seed():
    gen = tiny_embedded()
    torch.testing.assert_close(gen.initial_noise([3, 4])[1], gen.initial_noise([4])[0], rtol=0, atol=0)
    assert not torch.equal(gen.initial_noise([3])[0], gen.initial_noise([4])[0])


def test_guidance_changes_the_output():
    gen = tiny_embedded()
    prompts, noise = gen.class_prompt_embeds([2, 2]), gen.initial_noise([5, 6])
    unguided = gen.sample(prompts, noise, guidance_scale=1.0, steps=4)
    guided = gen.sample(prompts, noise, guidance_scale=4.0, steps=4)
    assert (guided - unguided).abs().max() > 1e-3


def test_guidance_formula():
    gen = tiny_embedded()
    x, prompts = gen.initial_noise([1, 2]), gen.class_prompt_embeds([0, 1])
    with torch.no_grad():
        cond = gen.predict_noise(x, 500, prompts, 1.0)
        null = gen.predict_noise(x, 500, gen.null_prompt_embeds(2), 1.0)
        guided = gen.predict_noise(x, 500, prompts, 3.0)
    torch.testing.assert_close(guided, null + 3.0 * (cond - null), atol=1e-5, rtol=1e-5)


def test_per_sample_timesteps_match_one_call_per_timestep():
    gen = tiny_embedded()
    x, prompts = gen.initial_noise([1, 2, 3]), gen.class_prompt_embeds([0, 1, 2])
    timesteps = torch.tensor([10, 500, 990])
    with torch.no_grad():
        together = gen.predict_noise(x, timesteps, prompts, 2.0)
        one_by_one = torch.cat(
            [gen.predict_noise(x[i : i + 1], int(t), prompts[i : i + 1], 2.0) for i, t in enumerate(timesteps)]
        )
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)


def test_class_prompt_embeds_rejects_unknown_classes():
    gen = tiny_embedded()
    with pytest.raises(ValueError, match="labels must lie in"):
        gen.class_prompt_embeds([gen.num_classes])


def test_textual_inversion_lowers_the_denoising_loss_and_leaves_the_generator_alone():
    gen = tiny_embedded()
    torch.manual_seed(1)
    images = torch.rand(12, 1, 28, 28) ** 2  # any size: encode resizes to the generator's
    labels = torch.tensor([0, 1, 2] * 4)
    before_state = {k: v.clone() for k, v in gen.state_dict().items()}
    latents = gen.encode(images)
    rng = torch.Generator().manual_seed(123)  # a fixed evaluation draw, not the training one
    timesteps = torch.randint(0, 1000, (48,), generator=rng)
    noise = torch.randn(48, *gen.latent_shape, generator=rng)
    batch = (latents.repeat(4, 1, 1, 1), labels.repeat(4), timesteps, noise)
    with torch.no_grad():
        loss_before = denoising_loss(gen, gen.class_tokens, *batch).item()
    tokens = learn_class_tokens(gen, images, labels, steps=60, lr=5e-2, batch_size=12)
    with torch.no_grad():
        loss_after = denoising_loss(gen, tokens, *batch).item()
    assert loss_after < 0.9 * loss_before
    assert tokens.shape == gen.class_tokens.shape
    torch.testing.assert_close(tokens[3:], gen.class_tokens[3:])  # classes without images keep their tokens
    for key, value in gen.state_dict().items():  # the generator itself is untouched
        assert torch.equal(value, before_state[key]), key
    gen.set_class_tokens(tokens)
    torch.testing.assert_close(gen.class_tokens, tokens)


# ---- weights on disk ----------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    gen = tiny_embedded()
    embedded.save_weights(gen, tmp_path)
    loaded = embedded.load_weights(tmp_path)
    assert loaded.config == gen.config
    noise, prompts = gen.initial_noise([1, 2]), gen.class_prompt_embeds([0, 1])
    torch.testing.assert_close(loaded.sample(prompts, noise, steps=3), gen.sample(prompts, noise, steps=3))


def test_corrupted_weights_fail_the_checksum(tmp_path):
    embedded.save_weights(tiny_embedded(), tmp_path)
    data = bytearray((tmp_path / embedded.WEIGHTS_NAME).read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / embedded.WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(embedded.WeightsError, match="fails its checksum"):
        embedded.load_weights(tmp_path)


def test_lfs_pointer_is_named(tmp_path):
    embedded.save_weights(tiny_embedded(), tmp_path)
    (tmp_path / embedded.WEIGHTS_NAME).write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4000000\n"
    )
    with pytest.raises(embedded.WeightsError, match=r"git-LFS pointer.*git lfs pull"):
        embedded.load_weights(tmp_path)


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(embedded.WeightsError, match=r"utilgen\.pretrain"):
        embedded.load_weights(tmp_path)


@pytest.mark.parametrize(("name", "classes"), [("coarse", 3), ("fine", 10)])
def test_committed_weights_load_and_a_corrupted_copy_is_caught(tmp_path, name, classes):
    gen = embedded.load_pretrained(name=name)
    assert gen.num_classes == classes
    assert gen.latent_shape == (1, gen.image_size, gen.image_size)
    assert not any(p.requires_grad for m in gen.modules() for p in m.parameters())
    copy = tmp_path / "weights"
    shutil.copytree(embedded.WEIGHTS_DIR / name, copy)
    with open(copy / embedded.WEIGHTS_NAME, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(embedded.WeightsError, match="fails its checksum"):
        embedded.load_weights(copy)


def test_task_classes_start_from_their_coarse_group():
    from utilgen.data.fashion_mnist import CLASS_NAMES, COARSE_NAMES

    assert embedded.task_rows(COARSE_NAMES, CLASS_NAMES) == [0, 2, 0, 2, 0, 1, 0, 1, 2, 1]
    assert embedded.task_rows(CLASS_NAMES, ["Ankle_Boot", "t-shirt"]) == [9, 0]  # by name, not position
    with pytest.raises(ValueError, match="no token for 'digit-0'"):
        embedded.task_rows(COARSE_NAMES, ["digit-0", "bag"])
    gen = embedded.EmbeddedGenerator(embedded.TINY_CONFIG)
    gen = embedded.EmbeddedGenerator(
        dataclasses.replace(embedded.TINY_CONFIG, num_classes=3, class_names=COARSE_NAMES),
        unet=gen.denoiser,
    )
    task = gen.for_task(CLASS_NAMES)
    assert task.num_classes == 10
    assert task.denoiser is gen.denoiser  # one network, a token per task class
    assert torch.equal(task.class_tokens[5], gen.class_tokens[1])  # sandal starts at footwear
    assert torch.equal(task.class_tokens[0], task.class_tokens[6])  # t-shirt and shirt: both tops
    assert torch.equal(task.null_prompt_embeds(1), gen.null_prompt_embeds(1))
    pretrained = gen.class_tokens.clone()
    task.set_class_tokens(task.class_tokens + 1)  # learning a fine token leaves the pretrained ones alone
    assert torch.equal(gen.class_tokens, pretrained)

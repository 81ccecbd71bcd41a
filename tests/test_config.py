"""The run configuration: presets, files, --set overrides, type checks, round trips."""

from __future__ import annotations

import dataclasses
import re

import pytest

from utilgen.config import PRESETS, Config, ConfigError, build_config, config_from_dict, load_config_file, valid_keys


def test_defaults_and_every_preset_build():
    assert build_config() == Config()
    for name in PRESETS:
        config = build_config(name)
        assert config.preset == name
    assert build_config("smoke").evaluation.seeds == (0,)
    assert build_config("sd21").generator.kind == "stable-diffusion"


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="smoke") as info:
        build_config("fast")
    assert "default" in str(info.value)
    assert "sd21" in str(info.value)


@pytest.mark.parametrize(
    ("override", "section", "key", "value"),
    [
        ("mlco.rounds=3", "mlco", "rounds", 3),
        ("mlco.lr=5e-5", "mlco", "lr", 5e-5),
        ("mlco.beta=100", "mlco", "beta", 100.0),
        ("evaluation.ablation=true", "evaluation", "ablation", True),
        ("evaluation.seeds=0,1,2,3", "evaluation", "seeds", (0, 1, 2, 3)),
        ("valuation.features=loss,margin", "valuation", "features", ("loss", "margin")),
        ("data.test_per_class=none", "data", "test_per_class", None),
        ("data.test_per_class=50", "data", "test_per_class", 50),
        ("ilpo.noise_strategy=gradient", "ilpo", "noise_strategy", "gradient"),
    ],
)
def test_set_overrides_are_typed(override, section, key, value):
    config = build_config("default", overrides=[override])
    assert getattr(getattr(config, section), key) == value
    assert type(getattr(getattr(config, section), key)) is type(value)


def test_later_overrides_win_over_the_preset():
    config = build_config("smoke", overrides=["tokens.steps=7", "tokens.steps=9"])
    assert config.tokens.steps == 9
    assert config.data.shots_per_class == PRESETS["smoke"]["data"]["shots_per_class"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("mlco.round=2", "unknown config key mlco.round; the keys of \\[mlco\\] are rounds"),
        ("mcloo.rounds=2", "unknown config section 'mcloo'"),
        ("mlco.rounds=two", "expected an integer, got 'two'"),
        ("mlco.rounds=2.5", "expected an integer"),
        ("evaluation.ablation=maybe", "expected true or false"),
        ("evaluation.seeds=0,x", "expected an integer"),
        ("rounds=2", "section.key"),
        ("mlco.rounds", "expected section.key=value"),
    ],
)
def test_bad_overrides_say_what_is_accepted(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("default", overrides=[override])


def test_yaml_and_toml_files(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("mlco:\n  rounds: 2\n  lr: 0.0002\nevaluation:\n  seeds: [3, 4]\n")
    toml_file = tmp_path / "run.toml"
    toml_file.write_text("[mlco]\nrounds = 2\nlr = 0.0002\n\n[evaluation]\nseeds = [3, 4]\n")
    for path in (yaml_file, toml_file):
        config = build_config("default", load_config_file(path))
        assert (config.mlco.rounds, config.mlco.lr, config.evaluation.seeds) == (2, 0.0002, (3, 4))
    # --set wins over the file
    assert build_config("default", load_config_file(toml_file), ["mlco.rounds=5"]).mlco.rounds == 5


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "[mlco\nrounds = 2", "does not parse"),
        ("bad.yaml", "mlco: [1, 2", "does not parse"),
        ("keys.toml", "[mlco]\nroundz = 2\n", "unknown config key mlco.roundz"),
        ("type.yaml", "mlco:\n  rounds: '2'\n", "mlco.rounds: expected an integer, got '2'"),
        ("flat.yaml", "- 1\n- 2\n", "must hold a mapping"),
        ("section.yaml", "mlco: 3\n", "must be a mapping"),
        ("run.ini", "[mlco]\n", "unknown format"),
        ("preset.toml", "preset = 'smoke'\n", "names preset 'smoke'"),
    ],
)
def test_bad_config_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config("default", load_config_file(path))


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")


def test_to_dict_round_trip_is_exact():
    config = build_config("smoke", overrides=["evaluation.seeds=4,5", "data.test_per_class=none", "mlco.lr=3e-5"])
    assert config_from_dict(config.to_dict()) == config
    saved = config.to_dict()
    saved["mlco"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"mlco\.bogus"):
        config_from_dict(saved)


def test_valid_keys_cover_every_field():
    keys = valid_keys()
    assert "mlco.rounds" in keys
    assert "evaluation.seeds" in keys
    assert "run.seed" in keys
    total = sum(
        len(dataclasses.fields(getattr(Config(), f.name))) for f in dataclasses.fields(Config) if f.name != "preset"
    )
    assert len(keys) == total


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generator.kind=sd", "generator.kind must be one of embedded, stable-diffusion"),
        ("data.channels=2", "data.channels must be 1 or 3"),
        ("mlco.candidates_per_class=1", "a pair needs two"),
        ("evaluation.seeds=", "at least one seed"),
        ("synthetic.multiple=0", "synthetic.multiple must be > 0"),
        ("valuation.meta_every=-1", "valuation.meta_every must be >= 0"),
        ("mlco.lr=0", "mlco.lr must be > 0"),
        ("ilpo.drift=clip", "ilpo.drift must be one of l2, class_consistency"),
        ("ilpo.grad_steps=11", r"ilpo.grad_steps \(11\) cannot exceed generator.steps \(10\)"),
    ],
)
def test_out_of_range_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config("default", overrides=[override])


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mlco:\n  lr: 5e-5\n")  # YAML 1.1 (PyYAML) reads this as the string '5e-5'
    assert build_config("default", load_config_file(path)).mlco.lr == 5e-5
    path.write_text("mlco:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="expected a number"):
        build_config("default", load_config_file(path))


def test_each_stage_takes_its_config_section_as_is():
    """One class per stage: the run config's section is the very class the stage function takes."""
    import typing

    from utilgen import adaptation, config, valuation

    for function, section in (
        (valuation.fit_valuation, "valuation"),
        (adaptation.train_dpo_round, "mlco"),
        (adaptation.optimise_instances, "ilpo"),
    ):
        expected = typing.get_type_hints(Config)[section]
        assert typing.get_type_hints(function)["config"] is expected, function.__name__
    assert typing.get_type_hints(adaptation.optimise_instances)["sampler"] is config.GeneratorConfig
    # no same-named twin of a stage config anywhere else in the package
    for module in (adaptation, valuation, adaptation.ilpo, adaptation.mlco):
        for name in ("ILPOConfig", "MLCOConfig", "DPOConfig", "ValuationConfig", "BiLevelConfig"):
            assert getattr(module, name, config.__dict__.get(name)) is config.__dict__.get(name), (module, name)


def test_stage_settings_are_set_like_any_other_key():
    cfg = build_config("default", overrides=["valuation.momentum=0.5", "mlco.reanchor=false", "ilpo.backend=reference"])
    assert cfg.valuation.momentum == 0.5
    assert cfg.mlco.reanchor is False
    assert cfg.ilpo.backend == "reference"


@pytest.mark.parametrize(
    "override",
    [
        "data.test_per_class=0",
        "data.split_seed=-1",
        "data.shots_per_class=0",
        "data.meta_per_class=0",
        "generator.guidance_scale=-5",
        "generator.guidance_scale=0",
        "generator.guidance_scale=nan",
        "generator.batch_size=0",
        "tokens.lr=1e300",
        "tokens.lr=inf",
        "tokens.lr=nan",
        "tokens.lr=0",
        "tokens.steps=-1",
        "tokens.batch_size=0",
        "synthetic.multiple=inf",
        "synthetic.first_pool_per_class=0",
        "valuation.inner_lr=-1",
        "valuation.inner_lr=inf",
        "valuation.meta_lr=0",
        "valuation.momentum=1",
        "valuation.momentum=-0.1",
        "valuation.weight_decay=-1e-4",
        "valuation.meta_weight_decay=nan",
        "valuation.features=",
        "mlco.lr=inf",
        "mlco.beta=nan",
        "mlco.lora_alpha=-8",
        "mlco.min_gap=-0.1",
        "mlco.weight_decay=-1",
        "mlco.max_grad_norm=nan",
        "mlco.target_modules=",
        "mlco.pairs_per_class=0",
        "ilpo.prompt_lr=0",
        "ilpo.prompt_lr=inf",
        "ilpo.noise_lr=-0.05",
        "ilpo.redenoise_high_guidance=-1",
        "ilpo.redenoise_low_guidance=inf",
        "ilpo.drift_weight=-1",
        "ilpo.min_improvement=nan",
        "ilpo.embed_max_distance=inf",
        "ilpo.repair_quantile=nan",
        "ilpo.patience=0",
        "evaluation.lr=1e300",
        "evaluation.lr=-0.05",
        "evaluation.seeds=0,-1",
        "evaluation.batch_size=0",
        "run.seed=-1",
        "run.device=",
        "run.threads=0",
    ],
)
def test_every_range_is_checked_before_the_run_naming_the_key(override):
    """Each of these passed the pre-run checks once and failed stages later (or never): refused up front."""
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        build_config("default", overrides=[override])
    assert str(info.value).startswith(key), str(info.value)  # the message leads with the key, not a neighbour


@pytest.mark.parametrize(
    "override",
    [
        "generator.guidance_scale=1",  # the conditional model alone: no guidance, still the class's images
        "valuation.momentum=0",
        "mlco.max_grad_norm=inf",  # documented: no clipping
        "mlco.min_gap=0",
        "ilpo.redenoise_low_guidance=0",  # an unconditional inversion step
        "tokens.steps=0",
        "ilpo.embed_max_distance=none",
        "data.test_per_class=none",
    ],
)
def test_the_boundaries_that_mean_something_are_accepted(override):
    build_config("default", overrides=[override])

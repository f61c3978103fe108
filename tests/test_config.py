"""Configuration: defaults, validation messages, overrides, plugin parameters, saving."""

from __future__ import annotations

import tomllib

import pytest

from uqsynth.config import SMOKE_OVERRIDES, config_from_dict, dumps_config, load_config, parse_override
from uqsynth.errors import ConfigError, PluginError
from uqsynth.plugins import get_host

ARMS = {"arms": {"mc": {"stochastic_layer": {"name": "mc_dropout", "p": 0.5}}}}


def load(raw: dict, *overrides: str, smoke: bool = False):
    return config_from_dict(raw, source="c.toml", overrides=overrides, smoke=smoke, host=get_host())


def error_of(raw: dict, *overrides: str) -> str:
    with pytest.raises((ConfigError, PluginError)) as info:
        load(raw, *overrides)
    return str(info.value)


def test_defaults_are_the_papers():
    config = load(ARMS)
    assert (config.train.epochs, config.train.batch_size, config.train.lr) == (40, 16, 2e-4)
    assert config.train.betas == [0.5, 0.999]
    assert (config.train.lambda_l1, config.train.lambda_kl) == (100.0, 100.0)
    assert (config.data.image_size, config.data.load_size) == (256, 286)
    assert config.arms["mc"].positions == [2, 3, 4]
    assert config.model.generator.name == "unet" and config.model.adversarial_loss.name == "vanilla"


def test_unknown_key_names_the_path_and_the_close_match():
    message = error_of({**ARMS, "train": {"epoch": 3}})
    assert message == 'c.toml: unknown key train.epoch (did you mean "epochs"?)'


def test_wrong_type_names_expected_and_found():
    assert error_of({**ARMS, "train": {"epochs": "ten"}}) == "c.toml: train.epochs: expected an integer, found a string 'ten'"
    assert "expected an integer, found a boolean True" in error_of({**ARMS, "train": {"batch_size": True}})
    assert "train.betas[1]: expected a number" in error_of({**ARMS, "train": {"betas": [0.5, "x"]}})


def test_integer_accepted_for_float():
    config = load({**ARMS, "train": {"lambda_l1": 10}})
    assert config.train.lambda_l1 == 10.0 and isinstance(config.train.lambda_l1, float)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.epochs", 0, "train.epochs must be >= 1, found 0"),
        ("train.batch_size", -4, "train.batch_size must be >= 1, found -4"),
        ("data.image_size", 0, "data.image_size must be >= 8, found 0"),
        ("sampling.samples", 1, "sampling.samples must be >= 2, found 1"),
        ("train.lr", 0.0, "train.lr must be > 0.0, found 0.0"),
        ("train.ema_decay", 1.0, "train.ema_decay must be < 1.0, found 1.0"),
    ],
)
def test_out_of_range_values_are_refused(key, value, expected):
    section, name = key.split(".")
    assert expected in error_of({**ARMS, section: {name: value}})


def test_no_arms_is_an_error():
    assert error_of({}) == "c.toml: missing key arms (Named variants; at least one.)"
    assert error_of({"arms": {}}) == "c.toml: arms needs at least 1 entry, found 0"


def test_literal_choices_with_close_match():
    assert 'did you mean "bf16"' in error_of({**ARMS, "train": {"precision": "bf61"}})


def test_overrides_parse_toml_literals_and_bare_strings():
    assert parse_override("train.epochs=2") == ("train.epochs", 2)
    assert parse_override("train.betas=[0.9, 0.99]") == ("train.betas", [0.9, 0.99])
    assert parse_override("data.source=phantom") == ("data.source", "phantom")
    assert parse_override('data.root="a b"') == ("data.root", "a b")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("train.epochs")


def test_overrides_reach_plugin_tables_and_are_named_in_errors():
    config = load(ARMS, "model.generator.ngf=8", "arms.mc.stochastic_layer.p=0.25", "train.epochs=2")
    assert config.model.generator.params["ngf"] == 8
    assert config.arms["mc"].stochastic_layer.params["p"] == 0.25
    assert config.train.epochs == 2
    assert error_of(ARMS, "train.epochs=zero").startswith("--set train.epochs=zero: train.epochs: expected an integer")


def test_override_turns_a_plugin_name_into_a_table():
    config = load({**ARMS, "model": {"adversarial_loss": "lsgan", "generator": "unet"}}, "model.generator.ngf=16")
    assert config.model.generator.name == "unet" and config.model.generator.params == {"ngf": 16}


def test_plugin_parameters_are_checked_against_the_factory():
    bad_key = {"arms": {"c": {"stochastic_layer": {"name": "concrete_dropout", "init_pp": 0.2}}}}
    assert error_of(bad_key) == 'c.toml: unknown key arms.c.stochastic_layer.init_pp (did you mean "init_p"?)'
    bad_type = {"arms": {"c": {"stochastic_layer": {"name": "concrete_dropout", "temperature": "hot"}}}}
    assert "arms.c.stochastic_layer.temperature: expected a number, found a string 'hot'" in error_of(bad_type)
    bad_choice = {"arms": {"c": {"stochastic_layer": {"name": "concrete_dropout", "k": "pixels"}}}}
    assert "arms.c.stochastic_layer.k: expected one of 'channels', 'elements'" in error_of(bad_choice)
    bad_value = {"arms": {"c": {"stochastic_layer": {"name": "mc_dropout", "p": 1.5}}}}
    assert error_of(bad_value) == "c.toml: arms.c.stochastic_layer: p must be in [0, 1), got 1.5"


def test_parameters_uqsynth_sets_itself_are_refused():
    message = error_of({**ARMS, "model": {"generator": {"name": "unet", "image_size": 64}}})
    assert "model.generator.image_size is set by uqsynth" in message


def test_unknown_plugin_name_in_model_section():
    message = error_of({**ARMS, "model": {"discriminator": "patchgna"}})
    assert message.startswith('c.toml: model.discriminator: unknown discriminator "patchgna" (did you mean "patchgan"?)')


def test_dataset_tables_are_passed_to_their_plugin():
    config = load({**ARMS, "data": {"source": "phantom", "phantom": {"subjects": 5}}})
    assert config.data.options["phantom"] == {"subjects": 5}
    assert "unknown key data.phantom.subject" in error_of({**ARMS, "data": {"phantom": {"subject": 5}}})
    assert "unknown key data.phantm" in error_of({**ARMS, "data": {"phantm": {"subjects": 5}}})


def test_smoke_applies_defaults_then_the_files_own_table():
    raw = {**ARMS, "profiles": {"smoke": {"train": {"epochs": 2}, "model.generator.ngf": 4}}}
    config = load(raw, smoke=True)
    assert config.data.image_size == SMOKE_OVERRIDES["data.image_size"]
    assert config.train.epochs == 2
    assert config.model.generator.params["ngf"] == 4
    assert load(raw).train.epochs == 40


def test_smoke_derives_the_load_size_again_for_its_own_image_size():
    raw = {**ARMS, "data": {"image_size": 64, "load_size": 64}}
    assert load(raw).data.load_size == 64
    assert load(raw, smoke=True).data.load_size == 36  # 32 * 286/256, not 64 (a zoom of 2)
    assert load(raw, "data.load_size=40", smoke=True).data.load_size == 40


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load({**ARMS, "data": {"phantom": {"subjects": 5}}}, "train.epochs=3")
    path = tmp_path / "config.toml"
    path.write_text(dumps_config(config))
    again = load_config(path, host=get_host())
    assert again == config
    assert tomllib.loads(path.read_text())["data"]["phantom"] == {"subjects": 5}


def test_fallback_profile_applies_only_when_the_files_root_is_missing(tmp_path):
    raw = {
        **ARMS,
        "data": {"source": "brats", "root": str(tmp_path / "absent"), "fallback_profile": "phantom"},
        "profiles": {"phantom": {"data.source": "phantom", "data.image_size": 64}},
    }
    config = load(raw)
    assert (config.data.source, config.data.image_size) == ("phantom", 64)
    assert "does not exist: applied [profiles.phantom]" in config.notes[0]
    (tmp_path / "absent").mkdir()
    assert load(raw).data.source == "brats"
    # A root the user typed on the command line is never silently replaced.
    typed = load(raw, f"data.root={tmp_path / 'typo'}")
    assert typed.data.source == "brats" and not typed.notes


def test_unknown_profile_is_an_error():
    raw = {**ARMS, "data": {"root": "/nonexistent/x", "fallback_profile": "phantm"}, "profiles": {"phantom": {}}}
    assert error_of(raw) == 'c.toml: data.fallback_profile: no [profiles.phantm] table (did you mean "phantom"?)'


def test_load_size_defaults_to_the_papers_ratio():
    assert load(ARMS).data.load_size == 286
    assert load(ARMS, "data.image_size=64").data.load_size == 72
    assert load(ARMS, "data.image_size=128").data.load_size == 143
    assert "data.load_size (100) must be >= data.image_size (128)" in error_of(
        ARMS, "data.image_size=128", "data.load_size=100"
    )


def test_test_fraction_must_leave_training_subjects():
    assert "data.test_fraction must be < 1.0, found 1.0" in error_of({**ARMS, "data": {"test_fraction": 1.0}})


@pytest.mark.parametrize("name", ["../escape", "config.toml/x", ".hidden", "a b"])
def test_arm_names_must_be_safe_folder_names(name):
    raw = {"arms": {name: {"stochastic_layer": "mc_dropout"}}}
    assert f"arms.{name}: an arm name becomes a folder name" in error_of(raw)


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[run]\nname = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(path)


def test_choosing_the_data_on_the_command_line_disables_the_fallback(tmp_path):
    raw = {
        **ARMS,
        "data": {"source": "brats", "root": str(tmp_path / "absent"), "fallback_profile": "phantom"},
        "profiles": {"phantom": {"data.image_size": 64}},
    }
    config = load(raw, "data.source=phantom")
    assert (config.data.source, config.data.image_size, config.notes) == ("phantom", 256, [])

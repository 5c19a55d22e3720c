"""Typed run config: validation messages, YAML round trip, dotted overrides."""

import pytest

from lamina.config import RunConfig, apply_overrides, load_config, to_yaml, validate
from lamina.config.io import parse_value
from lamina.errors import ConfigError


def test_defaults_are_the_default_job():
    cfg = load_config()
    assert cfg.data.name == "digits" and cfg.model.name == "small_cnn"


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["trainer.max_epochs=3", "model.width=32", "optimizer.lr=1e-3"])
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(p)
    assert again == cfg
    assert again.model.options == {"width": 32} and again.optimizer.lr == 1e-3


def test_overrides_nest_and_parse():
    raw = apply_overrides({"trainer": {"max_epochs": 1}}, ["trainer.max_epochs=7", "data.augment=[{name: hflip}]",
                                                          "trainer.max_steps=null"])
    assert raw == {"trainer": {"max_epochs": 7, "max_steps": None}, "data": {"augment": [{"name": "hflip"}]}}
    assert parse_value("1e-3") == 1e-3 and parse_value("-2") == -2 and parse_value("true") is True


@pytest.mark.parametrize("override,message", [
    ("trainer.max_epochs=-1", "config error: trainer.max_epochs: expected a positive integer, got -1"),
    ("trainer.max_epochs=abc", "config error: trainer.max_epochs: expected an integer, got 'abc'"),
    ("optimizer.lr=0", "config error: optimizer.lr: expected a positive number, got 0"),
    ("optimizer.name=rmsprop", "config error: optimizer.name: expected one of 'sgd', 'adam' or 'adamw', got 'rmsprop'"),
    ("trainer.deterministic=maybe", "config error: trainer.deterministic: expected true or false, got 'maybe'"),
    ("schedule.pct_start=1.5", "config error: schedule.pct_start: expected a number < 1.0, got 1.5"),
])
def test_bad_values(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_unknown_key_did_you_mean():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trainer.max_epoch=3"])
    assert str(e.value).startswith("config error: trainer.max_epoch: unknown key (did you mean 'max_epochs'?); valid keys: max_epochs,")


def test_unknown_section():
    with pytest.raises(ConfigError) as e:
        validate({"optimiser": {"lr": 1}})
    assert "optimiser: unknown key (did you mean 'optimizer'?)" in str(e.value)


def test_override_into_value_rejected():
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_model_and_data_sections_keep_free_options():
    cfg = RunConfig.model_validate({"model": {"name": "mlp", "depth": 3}, "data": {"name": "iris", "test_fraction": 0.3}})
    assert cfg.model.options == {"depth": 3} and cfg.data.options == {"test_fraction": 0.3}


def test_trainer_kwargs_validated_like_yaml():
    from lamina.engine import Trainer

    with pytest.raises(ConfigError) as e:
        Trainer(precision="fp8")
    assert str(e.value) == "config error: trainer.precision: expected one of 'fp32', 'bf16' or 'fp16', got 'fp8'"
    with pytest.raises(ConfigError, match="trainer.max_epoch: unknown key"):
        Trainer(max_epoch=3)

import dataclasses

import pytest

from cifar_exp.config import DataConfig, ExperimentConfig, TrainConfig
from cifar_exp.errors import ConfigError


def test_defaults_are_the_seed_recipe():
    cfg = TrainConfig()
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_decay, cfg.momentum) == (
        "seed", 50, 64, 0.1, 0.95, 0.0)
    assert (cfg.norm_mean, cfg.norm_std, cfg.amp, cfg.augment) == (0.5, 0.5, True, "none")
    assert DataConfig().val_size == 5000


@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", 0.0, "lr must be a finite number > 0, got 0.0"),
    ("lr", -0.1, "lr must be a finite number > 0, got -0.1"),
    ("lr_decay", 0.0, r"lr-decay must be in \(0, 1\], got 0.0"),
    ("lr_decay", 1.5, r"lr-decay must be in \(0, 1\], got 1.5"),
    ("epochs", 0, "epochs must be >= 1, got 0"),
    ("batch_size", 0, "batch-size must be >= 1, got 0"),
    ("augment", "mixup", "unknown augment 'mixup'"),
    ("widths", "32,48", "widths must be three positive integers, e.g. 32,48,64; got '32,48'"),
    ("widths", "32,0,64", "widths must be comma-separated positive integers, got '32,0,64'"),
    ("widths", "wide", "widths must be comma-separated positive integers, got 'wide'"),
    ("hidden", -1, r"hidden must be >= 0 \(0: the architecture's own\), got -1"),
])
def test_bad_training_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_decay_of_one_is_allowed():
    assert TrainConfig(lr_decay=1.0).lr_decay == 1.0


def test_config_is_frozen_and_flattens_every_field():
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    flat = cfg.flat()
    assert flat["train.lr"] == 0.1 and flat["data.val_size"] == 5000
    assert len(flat) == sum(len(dataclasses.fields(getattr(cfg, f.name))) for f in dataclasses.fields(cfg))
    assert cfg.registered_model_name == "cifar10-seed"


def test_width_knobs_default_to_the_architectures_own():
    assert TrainConfig().conv_widths() is None and TrainConfig().hidden == 0
    assert TrainConfig(widths=" 32, 48,64").conv_widths() == (32, 48, 64)

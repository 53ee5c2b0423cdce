import dataclasses
import math
import re

import pytest

from cifar_exp.config import BenchmarkConfig, DataConfig, ExperimentConfig, TrackingConfig, TrainConfig, TuneConfig, recipe_config
from cifar_exp.errors import ConfigError


def test_defaults_are_the_seed_recipe():
    # The EE456 report: its 3-conv network, 50 epochs, batch 64, plain SGD at lr 0.1 decayed x0.95 per
    # epoch, inputs normalised with mean = std = 0.5, automatic mixed precision, and nothing else.
    report = dict(recipe="seed", model="seed", widths="", hidden=0, epochs=50, batch_size=64, optimizer="sgd",
                  lr=0.1, schedule="exp", lr_decay=0.95, warmup_epochs=0.0, momentum=0.0, weight_decay=0.0,
                  label_smoothing=0.0, norm_mean=0.5, norm_std=0.5, augment="none", cutout=0, tta=False,
                  teacher="", amp=True, seed=0)
    cfg = TrainConfig()
    assert {name: getattr(cfg, name) for name in report} == report
    # Every other field only changes speed, placement or bookkeeping, never what is trained.
    assert {f.name for f in dataclasses.fields(TrainConfig)} - set(report) == {
        "amp_dtype", "channels_last", "compile", "cuda_graphs", "device", "eval_batch_size",
        "distill_weight", "distill_temperature", "distill_mirror"}  # the last three act only with a teacher
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
    ("widths", "32,0,64", "widths must be comma-separated positive integers, got 0 in '32,0,64'"),
    ("widths", "wide", "widths must be comma-separated positive integers, got 'wide'"),
    ("hidden", -1, r"hidden must be >= 0 \(0: the architecture's own\), got -1"),
    ("lr", math.nan, "lr must be a finite number within float32's range \(up to 3.4e\+38\), got nan"),  # NaN fails no comparison
    ("momentum", math.nan, "momentum must be a finite number within float32's range \(up to 3.4e\+38\), got nan"),
    ("weight_decay", math.inf, "weight-decay must be a finite number within float32's range \(up to 3.4e\+38\), got inf"),
    ("norm_std", math.nan, "norm-std must be a finite number within float32's range \(up to 3.4e\+38\), got nan"),
    ("warmup_epochs", math.nan, "warmup-epochs must be a finite number within float32's range \(up to 3.4e\+38\), got nan"),
    ("warmup_epochs", 60.0, r"warmup-epochs must be in \[0, epochs 50\], got 60.0$"),
    # Finite in Python but not in float32, which training computes in: an overflow deep inside it.
    ("lr", 1e39, r"lr must be a finite number within float32's range \(up to 3.4e\+38\), got 1e\+39"),
    ("norm_mean", -1e300, r"norm-mean must be a finite number within float32's range \(up to 3.4e\+38\), got -1e\+300"),
    ("amp_dtype", "bfloat16", "amp-dtype bfloat16 needs --amp: with --no-amp everything runs in fp32"),
    ("seed", -1, r"seed must be in \[0, 4294967295\], got -1"),
    ("seed", 2**64 - 1, r"seed must be in \[0, 4294967295\], got 18446744073709551615"),
])
def test_bad_training_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value}, **({"amp": False} if field == "amp_dtype" else {}))


@pytest.mark.parametrize(("config", "fields", "message"), [
    # Python callers (a notebook) pass values the CLI's click types would have converted: each failed deep
    # inside training after its run opened (2.5 epochs, seed 1.5), or was silently taken ("false" is true).
    (TrainConfig, {"epochs": 2.5}, r"^epochs must be a whole number, got 2.5 \(float\)$"),
    (TrainConfig, {"seed": 1.5}, r"^seed must be a whole number, got 1.5 \(float\)$"),
    (TrainConfig, {"batch_size": "64"}, r"^batch-size must be a whole number, got '64' \(str\)$"),
    (TrainConfig, {"epochs": True}, r"^epochs must be a whole number, got True \(bool\)$"),
    (TrainConfig, {"tta": "false"}, r"^tta must be True or False, got 'false' \(str\)$"),
    (TrainConfig, {"amp": 1}, r"^amp must be True or False, got 1 \(int\)$"),
    (TrainConfig, {"widths": (32, 48, 64)}, r"^widths must be a string, got \(32, 48, 64\) \(tuple\)$"),
    (TrainConfig, {"lr": 10**40}, r"^lr must be a finite number within float32's range \(up to 3.4e\+38\), got 1e\+40$"),
    (TrainConfig, {"norm_mean": 10**5000},
     r"^norm-mean must be a finite number within float32's range \(up to 3.4e\+38\), got a whole number beyond any "
     r"float$"),
    (DataConfig, {"data_dir": None}, r"^data-dir must be a string, got None \(NoneType\)$"),
    (DataConfig, {"cache_dir": 3}, r"^cache-dir must be a string or None, got 3 \(int\)$"),
    (TuneConfig, {"timeout": "60"}, r"^timeout must be a number or None, got '60' \(str\)$"),
    (TrackingConfig, {"register": "no"}, r"^register must be True or False, got 'no' \(str\)$"),
    (ExperimentConfig, {"train": DataConfig()}, r"^train must be a TrainConfig, got DataConfig\(.*\) \(DataConfig\)$"),
])
def test_values_of_the_wrong_type_are_named(config, fields, message):
    with pytest.raises(ConfigError, match=message):
        config(**fields)


def test_whole_numbers_and_numpy_scalars_are_taken_as_the_declared_type():
    import numpy as np

    cfg = TrainConfig(lr=1, momentum=np.float32(0.5), epochs=np.int64(3), tta=np.bool_(True))
    assert (cfg.lr, cfg.momentum, cfg.epochs, cfg.tta) == (1.0, 0.5, 3, True)
    assert [type(v) for v in (cfg.lr, cfg.momentum, cfg.epochs, cfg.tta)] == [float, float, int, bool]  # 1.0, not 1
    assert TuneConfig(timeout=None).timeout is None and TuneConfig(timeout=60).timeout == 60.0


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


def test_a_recipes_warmup_longer_than_the_epochs_asked_for_names_the_recipe():
    with pytest.raises(ConfigError, match=r"got 10.0 \(--recipe pico warms up for 10 epochs: pass a --warmup-epochs "
                                          r"of at most 5\)"):
        dataclasses.replace(recipe_config("pico"), epochs=5)


def test_a_model_too_large_to_build_is_a_config_error():
    from cifar_exp.train import build_network

    # 1 PB of weights: beyond any machine's address space, so refused even where memory is overcommitted.
    with pytest.raises(ConfigError, match=r"^cannot build model seed \(widths its own, hidden 1000000000000\): .*"
                                          r"can't allocate memory"):
        build_network(TrainConfig(hidden=10**12))


def test_other_configs_refuse_nan_too():
    with pytest.raises(ConfigError, match="lr-min must be a finite number within float32's range \(up to 3.4e\+38\), got nan"):
        TuneConfig(lr_min=math.nan)
    with pytest.raises(ConfigError, match="seconds-per-repeat must be a finite number within float32's range \(up to 3.4e\+38\), got inf"):
        BenchmarkConfig(seconds_per_repeat=math.inf)


@pytest.mark.parametrize(("fields", "message"), [
    ({"experiment_name": " "}, "experiment-name must not be empty"),
    *[({"registered_model_name": name}, f"registered-model-name must not contain '/', ':', '@', '?', '#' or "
       f"control characters, nor be '.' or start with '..', got {name!r}")
      for name in ("a/b", "a:b", "..cifar", ".", "cifar@v2", "q?x", "h#x", "a\nb", "tab\there")],
    ({"registered_model_name": "mine", "register": False},
     "registered-model-name 'mine' needs --register: with --no-register nothing is registered"),
])
def test_tracking_names_mlflow_would_refuse_are_refused_before_training(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrackingConfig(**fields)


@pytest.mark.parametrize("name", ["a/b", "a:b", "..cifar", ".", "cifar10-seed", "my model", ".hidden", "a..b",
                                  "no\u00a0break"])  # a non-breaking space: no control character
def test_registered_model_names_follow_the_registrys_own_check(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        registry_accepts = True
    except MlflowException:
        registry_accepts = False
    try:
        TrackingConfig(registered_model_name=name)
        we_accept = True
    except ConfigError:
        we_accept = False
    assert we_accept == registry_accepts


def test_an_empty_registered_model_name_means_the_default():
    # The MLproject's train entry points pass --registered-model-name "" for "not given".
    assert ExperimentConfig(tracking=TrackingConfig(registered_model_name=" ")).registered_model_name == "cifar10-seed"


def test_an_empty_data_dir_is_refused_not_read_as_the_working_folder():
    with pytest.raises(ConfigError, match="data-dir must not be empty, got ''"):
        DataConfig(data_dir="")

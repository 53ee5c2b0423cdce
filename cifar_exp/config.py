"""Frozen configuration dataclasses: the single source of every setting.

Each field carries its CLI help text in ``metadata`` so that the click commands are generated from
these classes (one option per field) and ``train`` and ``tune`` can never drift apart. The defaults
are the seed report's recipe (EE456, 2023): 50 epochs, batch 64, SGD lr 0.1 decayed x0.95 per
epoch, inputs normalised with mean = std = 0.5, mixed precision.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cifar_exp.errors import ConfigError

AUGMENTATIONS = ("none", "flip", "flip-crop")
AMP_DTYPES = ("auto", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field that also describes its command-line option."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = option(
        "data",
        "Dataset folder: an ImageFolder tree (train/<class>/*, test/<class>/*) or torchvision's "
        "CIFAR-10 python batches (cifar-10-batches-py/).",
    )
    download: bool = option(
        False, "Download the official CIFAR-10 batches into --data-dir when no dataset is found."
    )
    val_size: int = option(
        5000, "Images carved from train (stratified, seeded) for per-epoch validation."
    )
    val_on_test: bool = option(
        False,
        "Seed-report protocol: validate every epoch on the test split (no carved validation set).",
    )
    split_seed: int = option(0, "Seed of the stratified train/validation split.")
    cache_dir: str | None = option(
        None, "Where decoded uint8 tensors are cached (default: ~/.cache/cifar-exp)."
    )

    def __post_init__(self) -> None:
        if self.val_size < 0:
            raise ConfigError(f"val-size must be >= 0, got {self.val_size}")
        if not self.val_on_test and self.val_size == 0:
            raise ConfigError("val-size is 0: pass --val-on-test or a positive --val-size")


@dataclass(frozen=True)
class TrainConfig:
    model: str = option("seed", "Model architecture (see `cifar-exp models`).")
    epochs: int = option(50, "Number of training epochs.")
    batch_size: int = option(64, "Training batch size.")
    lr: float = option(0.1, "Initial SGD learning rate.")
    lr_decay: float = option(0.95, "Learning-rate decay factor applied after every epoch.")
    momentum: float = option(0.0, "SGD momentum (the seed report names none).")
    weight_decay: float = option(0.0, "L2 weight decay.")
    norm_mean: float = option(0.5, "Mean subtracted from every channel of [0, 1] pixels.")
    norm_std: float = option(0.5, "Standard deviation every channel is divided by.")
    augment: str = option("none", "Batched training augmentation.", AUGMENTATIONS)
    amp: bool = option(True, "Automatic mixed precision (bf16 on capable CPUs, fp16/bf16 on CUDA).")
    amp_dtype: str = option("auto", "Autocast dtype; auto picks fp16 on CUDA, bf16 on CPU.", AMP_DTYPES)
    channels_last: bool = option(True, "Use the channels_last memory format.")
    device: str = option("auto", "Training device.", DEVICES)
    seed: int = option(0, "Seed of weights, shuffling and augmentation; equal seeds give equal runs.")
    eval_batch_size: int = option(1000, "Batch size for validation and test evaluation.")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch-size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval-batch-size must be >= 1, got {self.eval_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr-decay must be in (0, 1], got {self.lr_decay}")
        if self.momentum < 0 or self.momentum >= 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight-decay must be >= 0, got {self.weight_decay}")
        if self.norm_std <= 0:
            raise ConfigError(f"norm-std must be > 0, got {self.norm_std}")
        for name in ("augment", "amp_dtype", "device"):
            choices = _field(TrainConfig, name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"unknown {name.replace('_', '-')} {getattr(self, name)!r}; "
                    f"choose one of {', '.join(choices)}"
                )


@dataclass(frozen=True)
class TrackingConfig:
    experiment_name: str = option(
        "cifar-exp", "MLflow experiment (ignored under `mlflow run`, which picks the run)."
    )
    run_name: str | None = option(None, "MLflow run name (default: MLflow's generated name).")
    register: bool = option(True, "Register the trained model in the MLflow Model Registry.")
    registered_model_name: str | None = option(
        None, "Registered model name (default: cifar10-<model>)."
    )


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model_name or f"cifar10-{self.train.model}"

    def flat(self) -> dict[str, Any]:
        """Every field as ``section.name -> value``, as logged to MLflow params."""
        return {
            f"{section.name}.{key}": value
            for section in dataclasses.fields(self)
            for key, value in dataclasses.asdict(getattr(self, section.name)).items()
        }


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)

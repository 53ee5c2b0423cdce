"""Frozen configuration dataclasses: the single source of every setting.

Each field carries its CLI help text in ``metadata`` so that the click commands are generated from
these classes (one option per field) and ``train`` and ``tune`` can never drift apart. The defaults
are the seed report's recipe (EE456, 2023): 50 epochs, batch 64, SGD lr 0.1 decayed x0.95 per
epoch, inputs normalised with mean = std = 0.5, mixed precision.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cifar_exp.errors import ConfigError

AUGMENTATIONS = ("none", "flip", "flip-crop")
AMP_DTYPES = ("auto", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
OBJECTIVES = ("accuracy", "accuracy,latency")
OPTIMIZERS = ("sgd", "nesterov", "adamw")
SCHEDULES = ("exp", "cosine", "onecycle")

# Named training recipes: TrainConfig fields that differ from the defaults (the seed report's recipe).
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {},
    # Our best small-model recipe: the pico network (130k parameters) with BatchNorm-friendly SGD,
    # a one-cycle schedule, label smoothing, flip + crop augmentation and mirror test-time augmentation.
    "pico": {
        "model": "pico",
        "epochs": 50,
        "batch_size": 256,
        "optimizer": "nesterov",
        "lr": 0.4,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "onecycle",
        "warmup_epochs": 10,
        "label_smoothing": 0.1,
        "augment": "flip-crop",
        "tta": True,
    },
}


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
        None, "Where decoded uint8 tensors are cached (default: $XDG_CACHE_HOME/cifar-exp, else ~/.cache/cifar-exp)."
    )

    def __post_init__(self) -> None:
        _require_types(self)
        _require_nonempty(self, "data_dir")
        _require_at_least(self, 0, "val_size")
        _require_seed(self, "split_seed")
        if not self.val_on_test and self.val_size == 0:
            raise ConfigError("val-size is 0: pass --val-on-test or a positive --val-size")


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = option(
        "seed", "Named bundle of training settings; options given explicitly override it.", tuple(RECIPES)
    )
    model: str = option("seed", "Model architecture (see `cifar-exp models`).")
    widths: str = option(
        "", "Channels of the model's three conv stages, e.g. 32,48,64 (empty: the architecture's own)."
    )
    hidden: int = option(
        0, "Width of the hidden linear layer of the seed models (0: the architecture's own, 1024)."
    )
    epochs: int = option(50, "Number of training epochs.")
    batch_size: int = option(64, "Training batch size.")
    optimizer: str = option("sgd", "Optimizer; nesterov is SGD with Nesterov momentum.", OPTIMIZERS)
    lr: float = option(0.1, "Initial (peak, for onecycle) learning rate.")
    schedule: str = option(
        "exp", "Learning-rate schedule: exp (x lr-decay per epoch), cosine, or onecycle.", SCHEDULES
    )
    lr_decay: float = option(0.95, "Learning-rate decay factor applied after every epoch (schedule exp).")
    warmup_epochs: float = option(
        0.0, "Learning-rate warm-up, in epochs: linear up to lr for exp and cosine, whose decay then "
        "begins; the rising phase of onecycle (0 there: 30% of the steps, PyTorch's default)."
    )
    momentum: float = option(0.0, "SGD momentum (the seed report names none); beta1 for adamw (0 there: 0.9).")
    weight_decay: float = option(0.0, "Weight decay, applied to weights only (not to biases or BatchNorm).")
    label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy targets.")
    norm_mean: float = option(0.5, "Mean subtracted from every channel of [0, 1] pixels.")
    norm_std: float = option(0.5, "Standard deviation every channel is divided by.")
    augment: str = option("none", "Batched training augmentation.", AUGMENTATIONS)
    cutout: int = option(0, "Side of a random square cut out of every training image (0: off).")
    tta: bool = option(False, "Evaluate on each image and its mirror image, averaging probabilities.")
    teacher: str = option(
        "", "Knowledge distillation: logged models (comma-separated URIs, e.g. runs:/ID/model; several: "
        "their logits are averaged) whose softened predictions on each training batch the model learns too "
        "(empty: off).",
    )
    distill_weight: float = option(
        0.9, "With --teacher, the distillation term's share of the loss; the rest is the cross-entropy "
        "on the labels.",
    )
    distill_temperature: float = option(4.0, "With --teacher, the temperature of both softmaxes compared.")
    distill_mirror: bool = option(
        False, "With --teacher, the teacher predicts each training image and its mirror image and its "
        "logits are averaged (mirror TTA for the soft labels; one more teacher pass per step).",
    )
    amp: bool = option(True, "Automatic mixed precision (bf16 on capable CPUs, fp16/bf16 on CUDA).")
    amp_dtype: str = option(
        "auto", "Autocast dtype; auto: bf16 on CUDA GPUs that have it (else fp16) and on CPUs with native "
        "bf16, else fp32.", AMP_DTYPES
    )
    channels_last: bool = option(
        True, "Train and evaluate in the channels_last memory format (the logged model ships channels_last "
        "either way)."
    )
    compile: bool = option(False, "torch.compile the training model (pays off on long runs).")
    cuda_graphs: bool = option(
        True, "On CUDA, replay each training step (forward, backward, optimizer) as one CUDA graph: a "
        "small model's step is mostly kernel-launch overhead. Steps run eagerly on CPU, with --compile "
        "and with fp16 autocast (its GradScaler reads the GPU every step).",
    )
    device: str = option("auto", "Device to train (evaluate: to run the model) on; auto: CUDA if present.", DEVICES)
    seed: int = option(
        0, "Seed of weights, shuffling and augmentation; equal seeds give equal runs on the same machine with "
        "the same thread count (on CUDA, up to cuDNN's choice of algorithms).",
    )
    eval_batch_size: int = option(1000, "Batch size for validation and test evaluation.")

    def __post_init__(self) -> None:
        _require_types(self)
        _require_finite(self)
        _require_at_least(self, 1, "epochs", "batch_size", "eval_batch_size")
        _require_seed(self, "seed")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr-decay must be in (0, 1], got {self.lr_decay}")
        if self.momentum < 0 or self.momentum >= 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        _require_at_least(self, 0, "weight_decay")
        if self.norm_std <= 0:
            raise ConfigError(f"norm-std must be > 0, got {self.norm_std}")
        if self.optimizer == "nesterov" and self.momentum <= 0:
            raise ConfigError("optimizer nesterov needs --momentum > 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            # (Whether the recipe or the user set it is not known here: the hint fits either.)
            from_recipe = RECIPES.get(self.recipe, {}).get("warmup_epochs") == self.warmup_epochs
            raise ConfigError(
                f"warmup-epochs must be in [0, epochs {self.epochs}], got {self.warmup_epochs}"
                + (f" (--recipe {self.recipe} warms up for {self.warmup_epochs:g} epochs: pass a --warmup-epochs of "
                   f"at most {self.epochs})" if from_recipe else "")
            )
        if not 0 <= self.cutout <= 32:
            raise ConfigError(f"cutout must be in [0, 32] pixels, got {self.cutout}")
        if not 0 < self.distill_weight <= 1:
            raise ConfigError(f"distill-weight must be in (0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise ConfigError(f"distill-temperature must be > 0, got {self.distill_temperature}")
        if not self.amp and self.amp_dtype != "auto":
            raise ConfigError(f"amp-dtype {self.amp_dtype} needs --amp: with --no-amp everything runs in fp32")
        if not self.teacher_uris():
            for name in ("distill_weight", "distill_temperature", "distill_mirror"):
                if getattr(self, name) != _field(TrainConfig, name).default:
                    raise ConfigError(f"{name.replace('_', '-')} {getattr(self, name)} needs --teacher: "
                                      "without one nothing is distilled")
        self.conv_widths()
        _require_at_least(self, 0, "hidden", note=" (0: the architecture's own)")
        _require_choice(self, "recipe", "optimizer", "schedule", "augment", "amp_dtype", "device")

    def conv_widths(self) -> tuple[int, int, int] | None:
        """``--widths`` as three channel counts; None: the architecture's own."""
        if not self.widths.strip():
            return None
        widths = _positive_ints(self.widths, "widths")
        if len(widths) != 3:
            raise ConfigError(f"widths must be three positive integers, e.g. 32,48,64; got {self.widths!r}")
        return widths[0], widths[1], widths[2]

    def teacher_uris(self) -> tuple[str, ...]:
        """``--teacher`` as model URIs; empty: no distillation."""
        if not self.teacher.strip():
            return ()
        uris = tuple(part.strip() for part in self.teacher.split(","))
        if not all(uris):
            raise ConfigError(f"teacher must be comma-separated model URIs, got {self.teacher!r}")
        if len(set(uris)) < len(uris):
            raise ConfigError(f"teacher names a model twice: {self.teacher!r}")
        return uris


@dataclass(frozen=True)
class TrackingConfig:
    experiment_name: str = option(
        "cifar-exp",
        "MLflow experiment to log into (under `mlflow run`: the run it made, whatever this says); pareto reads it.",
    )
    run_name: str | None = option(
        None, "MLflow run name (default: tune-<study name> for tune, pareto for pareto, MLflow's generated "
        "name for the others).")
    register: bool = option(True, "Register the trained model in the MLflow Model Registry.")
    registered_model_name: str | None = option(
        None, "Registered model name (default: cifar10-<model>)."
    )

    def __post_init__(self) -> None:
        _require_types(self)
        _require_nonempty(self, "experiment_name")
        name = self.registered_model_name
        if name is not None and not name.strip():
            # An empty name (the MLproject's default) means none given: cifar10-<model>.
            object.__setattr__(self, "registered_model_name", None)
        elif name is not None and (any(c in name for c in "/:@?#") or _has_control_characters(name)
                                   or name == "." or name.startswith("..")):
            # The Model Registry's rules (no '/' or ':'; no name that reads as a relative path), checked
            # here, not after the training it would waste; and what models:/NAME@ALIAS cannot address:
            # '@', a URI's query or fragment ('?', '#'), and control characters (the URI parser drops them).
            raise ConfigError(f"registered-model-name must not contain '/', ':', '@', '?', '#' or control "
                              f"characters, nor be '.' or start with '..', got {name!r}")
        if not self.register and self.registered_model_name is not None:
            raise ConfigError(f"registered-model-name {self.registered_model_name!r} needs --register: with "
                              "--no-register nothing is registered")


@dataclass(frozen=True)
class TuneConfig:
    """The Optuna search of ``cifar-exp tune``: lr (log scale) and per-epoch decay around the seed's
    (the decay only with ``--schedule exp``, the one schedule it acts in).

    Every other setting of a trial, ``--epochs`` included, comes from the train/data options; the
    baseline trial (``--lr``, ``--lr-decay``: the seed's 0.1 / 0.95 by default) is enqueued first.
    With ``--objectives accuracy,latency`` the conv widths (and hidden size) are searched too.
    """

    objectives: str = option(
        "accuracy", "What the study optimises: accuracy (max validation accuracy) or accuracy,latency (also "
        "min CPU batch-1 latency, searching conv widths and hidden size too; no pruning).", OBJECTIVES,
    )
    n_trials: int = option(20, "Trials this process runs (N workers on one study run N x this).")
    timeout: float | None = option(
        None, "Stop starting new trials after this many seconds (default: no limit)."
    )
    study_name: str | None = option(
        None, "Optuna study; loaded if it exists, so reruns and workers add to it "
        "(default or empty: cifar10-<model>-<epochs>ep, plus -acc-lat with --objectives accuracy,latency)."
    )
    storage: str | None = option(
        None, "Optuna storage URL (sqlite:///..., postgresql://user:pass@host/db, ...) or a journal "
        "file path, in a folder that exists (default or empty: sqlite:///<tracking store "
        "folder>/mlruns/optuna.db, for one worker at a time; parallel workers: a journal file or a "
        "database server).",
    )
    sampler: str = option("tpe", "Search strategy.", SAMPLERS)
    pruner: str = option("median", "Stops hopeless trials early on validation accuracy.", PRUNERS)
    lr_min: float = option(0.01, "Smallest learning rate searched (log scale).")
    lr_max: float = option(0.5, "Largest learning rate searched (log scale).")
    decay_min: float = option(0.85, "Smallest per-epoch learning-rate decay searched (--schedule exp only).")
    decay_max: float = option(0.99, "Largest per-epoch learning-rate decay searched (--schedule exp only).")
    baseline: bool = option(
        True, "Enqueue the baseline trial (--lr, --lr-decay) first, unless the study has it already."
    )
    grid_size: int = option(3, "Values per parameter with --sampler grid (lr log-spaced, decay linear).")
    tpe_startup_trials: int = option(5, "Random trials before TPE starts modelling the results.")
    prune_startup_trials: int = option(
        3, "Trials that must complete before the median pruner prunes any."
    )
    prune_warmup_epochs: int = option(1, "Epochs every trial trains before it can be pruned.")
    heartbeat_interval: int = option(
        30, "Seconds between a running trial's heartbeats on a database storage; a trial silent for "
        "2x as long (its worker died) is failed and retried once by the next worker. (A journal file "
        "has none: a new worker fails the trials of this machine's dead worker processes.)",
    )
    retrain_best: bool = option(
        False, "After the search, train the best trial's lr/decay with the full `train` pipeline "
        "(test report, registered model, champion rule) as a nested run of the study's run.",
    )
    width_choices: str = option(
        "16,24,32,48,64,80,96,128", "Channel counts each of the three conv stages may take with "
        "--objectives accuracy,latency (comma-separated).",
    )
    hidden_choices: str = option(
        "128,256,512,1024", "Hidden-layer widths searched with --objectives accuracy,latency, for models "
        "that have a hidden layer (the seed family).",
    )
    latency_threads: int = option(
        1, "CPU threads for the batch-1 latency objective (0: all cores); each trial times its trained "
        "model for about 1 s on this machine.",
    )

    def __post_init__(self) -> None:
        _require_types(self)
        _require_finite(self)
        _require_at_least(self, 1, "n_trials")
        if self.timeout is not None and not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        for name in ("lr_min", "lr_max"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name.replace('_', '-')} must be a finite number > 0, got {value}")
        for name in ("decay_min", "decay_max"):  # as --lr-decay: 1 is no decay
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name.replace('_', '-')} must be in (0, 1], got {value}")
        for low, high in (("lr_min", "lr_max"), ("decay_min", "decay_max")):
            if not getattr(self, low) < getattr(self, high):
                raise ConfigError(
                    f"{low.split('_')[0]} range [{getattr(self, low)}, {getattr(self, high)}] is empty "
                    f"or inverted: --{low.replace('_', '-')} must be below --{high.replace('_', '-')}"
                )
        _require_at_least(self, 2, "grid_size")
        if self.grid_size > MAX_GRID_SIZE:  # Optuna lists every point up front: memory, not trials, runs out
            raise ConfigError(f"grid-size must be <= {MAX_GRID_SIZE} ({MAX_GRID_SIZE}² points with the decay), "
                              f"got {self.grid_size}")
        _require_at_least(self, 0, "tpe_startup_trials", "prune_startup_trials", "prune_warmup_epochs")
        _require_at_least(self, 1, "heartbeat_interval", note=" second")
        _require_choice(self, "sampler", "pruner", "objectives")
        for name in ("study_name", "storage"):  # empty: the default; blank: a typo
            if getattr(self, name):
                _require_nonempty(self, name)
        if self.study_name and _has_control_characters(self.study_name):  # names a run, printed on one line
            raise ConfigError(f"study-name must not contain control characters, got {self.study_name!r}")
        self.width_choice_list()
        self.hidden_choice_list()
        _require_at_least(self, 0, "latency_threads", note=" (0: all cores)")
        if self.multi_objective and self.sampler == "grid":
            raise ConfigError("--sampler grid cannot search the conv widths and hidden size of --objectives "
                              "accuracy,latency: use --sampler tpe or random")
        if self.multi_objective and self.retrain_best:
            raise ConfigError("--retrain-best needs a single best trial; with --objectives accuracy,latency pick a "
                              "trial of the Pareto set and run `cifar-exp train` with its --lr, --lr-decay, "
                              "--widths and --hidden")

    @property
    def multi_objective(self) -> bool:
        """Validation accuracy and batch-1 CPU latency, over lr, decay and the width knobs."""
        return self.objectives == "accuracy,latency"

    def width_choice_list(self) -> tuple[int, ...]:
        return tuple(sorted(set(_positive_ints(self.width_choices, "width-choices"))))

    def hidden_choice_list(self) -> tuple[int, ...]:
        return tuple(sorted(set(_positive_ints(self.hidden_choices, "hidden-choices"))))

    def check_baseline(self, lr: float, lr_decay: float | None) -> None:
        """Reject a baseline trial that lies outside the searched ranges (``lr_decay`` None: a study
        that searches no decay)."""
        if not self.baseline:
            return
        if lr_decay is None:
            if not self.lr_min <= lr <= self.lr_max:
                raise ConfigError(f"the baseline trial (--lr {lr}) lies outside the searched range lr "
                                  f"[{self.lr_min}, {self.lr_max}]: widen it, move --lr inside, or pass --no-baseline")
            return
        if not self.lr_min <= lr <= self.lr_max or not self.decay_min <= lr_decay <= self.decay_max:
            raise ConfigError(
                f"the baseline trial (--lr {lr}, --lr-decay {lr_decay}) lies outside the searched ranges "
                f"lr [{self.lr_min}, {self.lr_max}], decay [{self.decay_min}, {self.decay_max}]: widen "
                "them, move --lr/--lr-decay inside, or pass --no-baseline"
            )

    def check_baseline_widths(self, model: str, widths: tuple[int, ...], hidden: int | None) -> None:
        """Reject a baseline trial whose conv widths or hidden size are not among the searched choices."""
        if not self.baseline or not self.multi_objective:
            return
        outside = [w for w in widths if w not in self.width_choice_list()]
        if outside:
            raise ConfigError(
                f"the baseline trial's conv width {outside[0]} (model {model}, widths "
                f"{','.join(map(str, widths))}) is not among --width-choices {self.width_choices}: add it, "
                "or pass --no-baseline"
            )
        if hidden is not None and hidden not in self.hidden_choice_list():
            raise ConfigError(
                f"the baseline trial's hidden size {hidden} (model {model}) is not among --hidden-choices "
                f"{self.hidden_choices}: add it, or pass --no-baseline"
            )


# Ways of running a model that `cifar-exp benchmark` measures; the -cuda ones where a GPU is present.
BACKENDS = ("pytorch-fp32", "pytorch-bf16", "onnxruntime-fp32", "onnxruntime-int8",
            "pytorch-fp32-cuda", "pytorch-bf16-cuda")
EXPORT_FORMATS = ("onnx",)


@dataclass(frozen=True)
class BenchmarkConfig:
    """What ``cifar-exp benchmark`` measures and how long it times each measurement."""

    model_uri: str | None = option(
        None, "Logged or registered model to measure (models:/NAME@champion, runs:/ID/model); "
        "without it, --model is built with untrained weights (speed does not depend on them).",
    )
    backends: str = option(
        "all", f"Comma-separated backends to measure, or all: {', '.join(BACKENDS)}."
    )
    batch_sizes: str = option("1,8,64,256", "Comma-separated batch sizes to time.")
    threads: int = option(0, "CPU threads of every backend (0: all cores).")
    repeats: int = option(
        3, "Timed repeats per backend and batch size; the spread of their p50s is reported."
    )
    seconds_per_repeat: float = option(1.0, "Seconds each repeat keeps timing calls (and at least 3 calls).")
    warmup_seconds: float = option(0.5, "Seconds of untimed calls before each measurement (and at least 3 calls).")
    floor_matmul_size: int = option(
        2048, "Side of the square matrix product whose MAC rate gives the compute floor."
    )
    calibration_images: int = option(
        512, "Training images (at most) that calibrate the int8 model's activation ranges."
    )
    output: str = option("benchmark.json", "Where the JSON report is written.")

    def __post_init__(self) -> None:
        _require_types(self)
        _require_finite(self)
        if self.model_uri is not None and not self.model_uri.strip():
            # An empty --model-uri (the MLproject's default) means none: an untrained --model.
            object.__setattr__(self, "model_uri", None)
        self.batch_size_list()
        self.backend_names()
        _require_at_least(self, 0, "threads", note=" (0: all cores)")
        _require_at_least(self, 1, "repeats", "floor_matmul_size", "calibration_images")
        if not self.seconds_per_repeat > 0:
            raise ConfigError(f"seconds-per-repeat must be > 0, got {self.seconds_per_repeat}")
        _require_at_least(self, 0, "warmup_seconds")

    def batch_size_list(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(_positive_ints(self.batch_sizes, "batch-sizes")))

    def backend_names(self) -> tuple[str, ...]:
        if self.backends.strip() == "all":
            return BACKENDS
        names = tuple(dict.fromkeys(part.strip() for part in self.backends.split(",")))
        unknown = [name for name in names if name not in BACKENDS]
        if unknown:
            raise ConfigError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)} or all")
        return names


@dataclass(frozen=True)
class EvaluateConfig:
    """Which model ``cifar-exp evaluate`` measures (how: the data and train options it shares)."""

    model_uri: str = option(
        "models:/cifar10-seed@champion", "Model to evaluate (models:/NAME@champion, runs:/ID/model, models:/m-ID)."
    )

    def __post_init__(self) -> None:
        _require_types(self)
        _require_nonempty(self, "model_uri")


@dataclass(frozen=True)
class ExportConfig:
    """What ``cifar-exp export`` writes."""

    model_uri: str = option(
        "models:/cifar10-seed@champion", "Logged or registered model to export (models:/..., runs:/.../model)."
    )
    format: str = option("onnx", "Export format (opset chosen by torch.onnx, batch axis dynamic).",
                         EXPORT_FORMATS)
    int8: bool = option(
        False, "Also write a statically quantised int8 model, calibrated on training images."
    )
    output_dir: str = option("export", "Folder the exported files are written to.")
    calibration_images: int = option(
        512, "Training images (at most) that calibrate the int8 model's activation ranges."
    )

    def __post_init__(self) -> None:
        _require_types(self)
        _require_nonempty(self, "model_uri")
        _require_choice(self, "format")
        _require_at_least(self, 1, "calibration_images")
        _require_nonempty(self, "output_dir")


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _require_types(self)

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


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """The TrainConfig of recipe ``name``, with ``overrides`` on top."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES[name], **overrides, "recipe": name})


def _positive_ints(text: str, option_name: str) -> tuple[int, ...]:
    """``"32,48,64"`` -> (32, 48, 64); anything but comma-separated integers >= 1 names the option."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option_name} must be comma-separated positive integers, got {text!r}") from None
    bad = [value for value in values if value < 1]
    if bad:
        raise ConfigError(f"{option_name} must be comma-separated positive integers, got {bad[0]} in {text!r}")
    return values


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the models and optimizers compute in it


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """Each field's allowed types, from its annotation (``str | None`` -> (str, NoneType))."""
    return {name: typing.get_args(hint) or (hint,) for name, hint in typing.get_type_hints(cls).items()}


_KINDS = {bool: "True or False", int: "a whole number", float: "a number", str: "a string"}


def _require_types(config: Any) -> None:
    """Every field must hold the type it is declared with. The CLI's options convert to it; a Python
    caller's value may not: epochs 2.5 or a seed 1.5 failed deep inside training, after a run had
    opened, and tta "false" (a string, so true) turned TTA on. Whole numbers are taken where a float is
    declared (stored as float, so the float checks see them), NumPy scalars as the Python ones."""
    for name, allowed in _field_types(type(config)).items():
        value = getattr(config, name)
        if value is None and type(None) in allowed:
            continue
        kind = next(t for t in allowed if t is not type(None))
        if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            object.__setattr__(config, name, int(value))
        elif kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                object.__setattr__(config, name, float(value))
            except OverflowError:  # an int beyond any float (too long to print, too, past 4,300 digits)
                raise _beyond_float32(name, "a whole number beyond any float") from None
        elif kind is bool and isinstance(value, np.bool_):
            object.__setattr__(config, name, bool(value))
        elif kind in (int, float) or not isinstance(value, kind):  # (int and float: no number, refused above)
            expected = _KINDS.get(kind, f"a {kind.__name__}") + (" or None" if len(allowed) > 1 else "")
            raise ConfigError(f"{name.replace('_', '-')} must be {expected}, got {value!r} ({type(value).__name__})")


def _require_finite(config: Any) -> None:
    """Every float field must be a finite number (NaN passes every comparison check unnoticed) that
    float32 can hold: a larger one fails deep inside training, after a run has opened."""
    for field_ in dataclasses.fields(config):
        value = getattr(config, field_.name)
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise _beyond_float32(field_.name, value)


def _beyond_float32(name: str, value: object) -> ConfigError:
    return ConfigError(f"{name.replace('_', '-')} must be a finite number within float32's range "
                       f"(up to {FLOAT32_MAX:.3g}), got {value}")


def _require_at_least(config: Any, minimum: int, *names: str, note: str = "") -> None:
    """Each field in ``names`` must be >= ``minimum``; else a one-line error naming its option."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ConfigError(f"{name.replace('_', '-')} must be >= {minimum}{note}, got {value}")


MAX_GRID_SIZE = 100
MAX_SEED = 2**32 - 1  # what scikit-learn's and Optuna's (NumPy) random states take


def _require_seed(config: Any, name: str) -> None:
    value = getattr(config, name)
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name.replace('_', '-')} must be in [0, {MAX_SEED}], got {value}")


def _has_control_characters(text: str) -> bool:
    """Whether ``text`` holds a control character (a line break, a tab, ...: Unicode category Cc)."""
    return any(unicodedata.category(c) == "Cc" for c in text)


def _require_nonempty(config: Any, *names: str) -> None:
    """Each string field in ``names`` must hold more than whitespace."""
    for name in names:
        value = getattr(config, name)
        if not value.strip():
            raise ConfigError(f"{name.replace('_', '-')} must not be empty, got {value!r}")


def _require_choice(config: Any, *names: str) -> None:
    """Each field in ``names`` must be one of the choices its ``option`` declares."""
    for name in names:
        choices, value = _field(type(config), name).metadata["choices"], getattr(config, name)
        if value not in choices:
            raise ConfigError(f"unknown {name.replace('_', '-')} {value!r}; choose one of {', '.join(choices)}")


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)

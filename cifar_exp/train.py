"""The training loop: ``fit(cfg, splits) -> FitResult``. Knows nothing of MLflow or Optuna."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifar_exp.config import TrainConfig
from cifar_exp.data import DeviceBatches, ImageSet, Splits
from cifar_exp.errors import ConfigError, TrainingDivergedError, first_line
from cifar_exp.models import NUM_CLASSES, Classifier, build_model, count_parameters, reparameterized, set_training

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float  # at the epoch's first step (cosine, one-cycle and warm-up move it within the epoch)
    epoch_seconds: float
    train_images_per_second: float
    val_accuracy_without_tta: float | None = None  # with mirror TTA: the one-pass accuracy, as served

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k != "epoch" and v is not None}

    @property
    def served_val_accuracy(self) -> float:
        """The validation accuracy of the model as it ships (one pass per image, TTA or not)."""
        return self.val_accuracy if self.val_accuracy_without_tta is None else self.val_accuracy_without_tta


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    labels: np.ndarray  # (N,) int64
    predictions: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, classes) float32
    one_pass_accuracy: float | None = None  # with TTA: the accuracy of the unmirrored pass alone

    @property
    def served_accuracy(self) -> float:
        """The accuracy of the model as it ships (one pass per image, TTA or not)."""
        return self.accuracy if self.one_pass_accuracy is None else self.one_pass_accuracy


@dataclass(frozen=True)
class FitResult:
    model: Classifier  # fp32 weights, eval mode, training-only branches folded (reparameterized), on ``device``
    history: list[EpochStats]
    train_seconds: float  # the epochs' training and validation; on_epoch_end's logging not included
    device: torch.device
    amp_dtype: torch.dtype | None
    peak_memory_bytes: int


EpochCallback = Callable[[EpochStats], None]


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_name() -> str:
    """The processor's model name, e.g. "Intel(R) Xeon(R) Processor @ 2.50GHz"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_supports_bf16() -> bool:
    """True where bf16 matmuls run natively (AVX512-BF16 or AMX), so bf16 autocast pays off."""
    return bool(
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_LARGEST_HEAP_BLOCK = 32 * 2**20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems


@functools.cache
def keep_freed_memory_in_process() -> bool:
    """Have glibc keep freed blocks below 32 MiB for reuse instead of returning them to the OS.

    A CPU training step frees and allocates the same large buffers every step (the seed model's first
    max-pool alone allocates a zeroed 16 MiB input gradient at batch 64). By default glibc serves
    blocks that large from fresh ``mmap`` pages, and the page faults of touching them cost as much as
    the convolutions: the seed model's CPU step ran 1.9x faster with this set (2 cores, 2026-11-26).
    Process-wide, once, and it stays: the process keeps its peak heap, and whatever else runs in it
    afterwards (e.g. a tuning study's latency timing) runs with it too. False where the C library is
    not glibc; under an LD_PRELOADed allocator (tcmalloc, jemalloc) glibc's setting has no effect.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _LARGEST_HEAP_BLOCK)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    log.info("glibc malloc keeps freed blocks up to 32 MiB for reuse: %s", "yes" if applied else "refused")
    return applied


def resolve_amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if not cfg.amp:
        return None
    if cfg.amp_dtype != "auto":
        return getattr(torch, cfg.amp_dtype)
    if device.type == "cuda":
        # bf16 needs no GradScaler, whose step reads the GPU's inf check on the host every step (and
        # cannot be graph-captured); fp16, what the seed's RTX 3060 ran, only where bf16 is missing.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if cpu_supports_bf16():
        return torch.bfloat16
    return None  # no native bf16 here: emulated bf16 is slower than fp32


def build_network(cfg: TrainConfig, num_classes: int = NUM_CLASSES) -> nn.Module:
    """``cfg.model`` with its width knobs (``--widths``, ``--hidden``) applied; no normalisation."""
    try:
        return build_model(cfg.model, num_classes, widths=cfg.conv_widths(), hidden=cfg.hidden or None)
    except (RuntimeError, MemoryError) as error:  # e.g. --hidden 1000000000: weights beyond this machine's memory
        raise ConfigError(f"cannot build model {cfg.model} (widths {cfg.widths.strip() or 'its own'}, hidden "
                          f"{cfg.hidden or 'its own'}): {first_line(error) or type(error).__name__}") from None


def build_classifier(cfg: TrainConfig, num_classes: int) -> Classifier:
    return Classifier(build_network(cfg, num_classes), cfg.norm_mean, cfg.norm_std)


def build_shipped_classifier(cfg: TrainConfig, num_classes: int) -> Classifier:
    """``build_classifier`` in the form ``fit`` returns a trained model in (eval mode, training-only
    branches folded): what an architecture is timed and counted as when it is built by name."""
    return reparameterized(build_classifier(cfg, num_classes))


def parameter_counts(cfg: TrainConfig, num_classes: int) -> tuple[int, int]:
    """(shipped, training) parameter counts of ``cfg``'s model: the training form has more where
    training-only layers fold away (``models.reparameterized``)."""
    return (count_parameters(build_shipped_classifier(cfg, num_classes)),
            count_parameters(build_classifier(cfg, num_classes)))


def parameter_count_tags(cfg: TrainConfig, num_classes: int) -> dict[str, str]:
    """Run tags: the parameters of the model as shipped, and of its training form."""
    shipped, training = parameter_counts(cfg, num_classes)
    return {"parameter_count": str(shipped), "training_parameter_count": str(training)}


def fit(
    cfg: TrainConfig,
    splits: Splits,
    *,
    on_epoch_end: EpochCallback | None = None,
    progress: bool = False,
    teacher: nn.Module | None = None,
) -> FitResult:
    """Train ``cfg.model`` on ``splits.train``, validating on ``splits.val`` after every epoch.

    ``on_epoch_end`` sees each epoch's statistics (for tracking, pruning) and may raise to stop.
    ``teacher``: the loaded models of ``cfg.teacher`` (``experiment.load_teacher``), which the model
    is distilled from; it is moved to the training device and frozen in eval mode.
    Raises ``TrainingDivergedError`` when the training loss turns NaN or infinite.
    """
    if bool(cfg.teacher_uris()) != (teacher is not None):
        raise ValueError("fit needs the loaded teacher exactly when cfg.teacher names one")
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp_dtype(cfg, device)
    torch.manual_seed(cfg.seed)
    with cudnn_autotuning(device):
        return _fit(cfg, splits, device, amp_dtype, on_epoch_end=on_epoch_end, progress=progress, teacher=teacher)


@contextlib.contextmanager
def cudnn_autotuning(device: torch.device) -> Iterator[None]:
    """On CUDA, cuDNN times its algorithms once per shape and keeps the fastest (a training run's shapes
    are fixed); the caller's setting is back afterwards, whether training ends or fails."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _fit(
    cfg: TrainConfig,
    splits: Splits,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    on_epoch_end: EpochCallback | None,
    progress: bool,
    teacher: nn.Module | None,
) -> FitResult:
    reset_peak_memory(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_classifier(cfg, len(splits.classes)).to(device, memory_format=memory_format)
    optimizer = build_optimizer(cfg, model)
    batches = DeviceBatches(
        splits.train,
        cfg.batch_size,
        device=device,
        shuffle=True,
        augment=cfg.augment,
        cutout=cfg.cutout,
        cutout_fill=cfg.norm_mean,
        seed=cfg.seed,
        channels_last=cfg.channels_last,
    )
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=len(batches))
    distillation = None
    if teacher is not None:
        distillation = Distillation(frozen_teacher(teacher, device, memory_format), cfg.distill_weight,
                                    cfg.distill_temperature, cfg.distill_mirror)
    train_step = build_train_step(cfg, model, optimizer, scheduler, amp_dtype, distillation)
    log.info(
        "training %s on %d images (%s, %s), validating on %d %s images",
        cfg.model, len(splits.train), device, f"autocast {amp_dtype}" if amp_dtype else "fp32",
        len(splits.val), splits.val.name,
    )

    history: list[EpochStats] = []
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_accuracy = train_epoch(
            train_step, batches, progress_label=f"epoch {epoch}/{cfg.epochs}" if progress else None
        )
        train_seconds = time.perf_counter() - epoch_start
        if not math.isfinite(train_loss):
            raise TrainingDivergedError(
                f"training loss became {train_loss} in epoch {epoch} (lr {lr:g}); try a lower --lr"
            )
        val = evaluate(
            model, splits.val, batch_size=cfg.eval_batch_size, amp_dtype=amp_dtype,
            channels_last=cfg.channels_last, tta=cfg.tta,
        )
        stats = EpochStats(
            epoch=epoch,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            val_loss=val.loss,
            val_accuracy=val.accuracy,
            lr=lr,
            epoch_seconds=time.perf_counter() - epoch_start,
            train_images_per_second=len(splits.train) / train_seconds,
            val_accuracy_without_tta=val.one_pass_accuracy,
        )
        history.append(stats)
        log.info(
            "epoch %d/%d  train_loss %.4f  train_acc %.4f  val_loss %.4f  val_acc %.4f  lr %.4g  %.1fs",
            epoch, cfg.epochs, stats.train_loss, stats.train_accuracy, stats.val_loss,
            stats.val_accuracy, lr, stats.epoch_seconds,
        )
        if on_epoch_end is not None:
            on_epoch_end(stats)

    optimizer.zero_grad(set_to_none=True)  # frees the gradients (a CUDA graph's pool included)
    return FitResult(
        model=reparameterized(model),  # eval mode, training-only branches folded: the shipped form
        history=history,
        train_seconds=sum(stats.epoch_seconds for stats in history),
        device=device,
        amp_dtype=amp_dtype,
        peak_memory_bytes=peak_memory_bytes(device),
    )


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (plain or Nesterov) or AdamW; weight decay only on weights, never on biases or BatchNorm."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]  # biases, BatchNorm scales and shifts
    groups = [{"params": weights, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}]
    # On CUDA one fused kernel does the whole update, reading the lr (a tensor under --cuda-graphs) on
    # the device; None keeps PyTorch's default (foreach) elsewhere.
    device = next(model.parameters()).device
    fused = True if device.type == "cuda" else None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum or 0.9, 0.999), fused=fused,
                                 capturable=uses_cuda_graphs(cfg, device))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.optimizer == "nesterov",
                           fused=fused)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based)."""
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return one_cycle_factor(step, total_steps, cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs else 0.3)
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if cfg.schedule == "exp":
        # The decay starts once the warm-up has reached lr (as cosine's does) and, as the seed's, steps
        # at epoch starts: the first epoch wholly after the warm-up runs at lr, each later one x decay.
        warmup_epochs_touched = -(-warmup_steps // steps_per_epoch)  # ceil: a fractional warm-up's epoch
        return warmup * cfg.lr_decay ** max(0, step // steps_per_epoch - warmup_epochs_touched)
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    return warmup * 0.5 * (1 + math.cos(math.pi * progress))


def one_cycle_factor(step: int, total_steps: int, rising_fraction: float) -> float:
    """PyTorch's ``OneCycleLR`` (defaults, cosine annealing) as a multiplier of the peak lr.

    Written out because ``OneCycleLR`` divides by zero when a phase is empty: a warm-up of all the
    epochs, or of exactly one step. Here such a phase is simply at its end.
    """
    start, peak, end = 1 / 25, 1.0, 1 / 25 / 1e4  # div_factor 25, final_div_factor 1e4
    rise_end = rising_fraction * total_steps - 1  # the step at which the peak is reached
    if step <= rise_end:
        first_step, last_step, begin, finish = 0.0, rise_end, start, peak
    else:
        first_step, last_step, begin, finish = rise_end, total_steps - 1.0, peak, end
    span = last_step - first_step
    progress = min(1.0, (step - first_step) / span) if span > 0 else 1.0
    return finish + (begin - finish) / 2 * (math.cos(math.pi * progress) + 1)  # cosine from begin to finish


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler stepped after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))


@dataclass(frozen=True)
class Distillation:
    """Knowledge distillation (Hinton et al., 2015): the loss also pulls the model's predictions,
    softened by ``temperature``, toward the teacher's on the same augmented batch."""

    teacher: nn.Module
    weight: float  # share of the distillation term; 1 - weight stays on the labels' cross-entropy
    temperature: float
    # Average the teacher's logits over each image and its mirror image: better soft labels (a teacher
    # scores about a point higher with mirror TTA) for one more teacher pass per step.
    mirror: bool = False

    def loss(self, logits: torch.Tensor, images: torch.Tensor, label_loss: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.mirror:
                both = self.teacher(torch.cat([images, images.flip(-1)]))  # (2B, classes)
                teacher_logits = both.float().unflatten(0, (2, -1)).mean(0)  # (B, classes)
            else:
                teacher_logits = self.teacher(images)  # (B, classes)
        soft_loss = distillation_loss(logits, teacher_logits, self.temperature)
        return (1 - self.weight) * label_loss + self.weight * soft_loss


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || model) between the temperature-T softmaxes, averaged over the batch.

    The T^2 keeps the term's gradients on the scale of the cross-entropy's whatever T is.
    """
    log_p_model = (logits.float() / temperature).log_softmax(1)  # (B, classes)
    log_p_teacher = (teacher_logits.float() / temperature).log_softmax(1)
    kl = F.kl_div(log_p_model, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def frozen_teacher(teacher: nn.Module, device: torch.device, memory_format: torch.memory_format) -> nn.Module:
    """``teacher`` on ``device``, in eval mode, its parameters out of autograd."""
    teacher = teacher.to(device, memory_format=memory_format).requires_grad_(False)
    set_training(teacher, False)  # not .eval(): exported teachers refuse it, being frozen in eval mode
    return teacher


class TrainStep:
    """One optimizer step per call; the epoch's loss sum and correct count accumulate on the device."""

    autocast_cache = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        amp_dtype: torch.dtype | None,
        label_smoothing: float,
        distillation: Distillation | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.amp_dtype = amp_dtype
        self.label_smoothing = label_smoothing
        self.distillation = distillation
        self.device = next(model.parameters()).device
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        # Accumulated on the device: reading them per step would synchronise host and device.
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.int64)

    def reset(self) -> None:
        self.loss_sum.zero_()  # in place: a captured CUDA graph adds into these very tensors
        self.correct.zero_()

    def read(self, count: int) -> tuple[float, float]:
        """(mean loss, accuracy) over the ``count`` images since ``reset``: one host read."""
        return self.loss_sum.item() / count, self.correct.item() / count

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self._step(images, labels)
        self.scheduler.step()

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=self.autocast_cache):
            logits = self.model(images)  # (B, classes)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
            if self.distillation is not None:
                loss = self.distillation.loss(logits, images, loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.loss_sum += loss.detach().float() * len(labels)
        self.correct += (logits.detach().argmax(1) == labels).sum()


class GraphedTrainStep(TrainStep):
    """``TrainStep`` replayed as one CUDA graph per full batch (PyTorch's whole-network capture).

    A small model's step is dozens of kernels of a few microseconds each, so eager training is bound by
    the host launching them (3.3 vs 0.41 ms per seed-model step on an H100); a graph launches them all
    at once. The first ``WARMUP_STEPS`` steps run eagerly on a side stream (cuDNN picks its
    algorithms, the optimizer creates its state), then the step is captured reading from static input
    buffers and writing the parameters, optimizer state and accumulators in place. The learning rate
    lives in device tensors that the graph reads, refreshed from the scheduler's value when it
    changes; a last, smaller batch runs eagerly.
    """

    WARMUP_STEPS = 3
    autocast_cache = False  # cached weight casts would be baked into the graph

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.scaler.is_enabled():
            raise ValueError("a CUDA graph cannot capture GradScaler's host-side inf check: use bf16 or fp32")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False
        self.batch_size: int | None = None
        self.eager_steps = 0
        self.side_stream = torch.cuda.Stream(self.device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.batch_size is None:
            self.batch_size = len(labels)
        if len(labels) != self.batch_size or self.capture_failed:
            super().__call__(images, labels)  # the epoch's last, smaller batch
        elif self.graph is None and self.eager_steps < self.WARMUP_STEPS:
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side_stream):
                super().__call__(images, labels)
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
            self.eager_steps += 1
        else:
            if self.graph is None:
                try:
                    self._capture(images, labels)
                except RuntimeError as error:  # e.g. a model that reads the GPU from the host
                    log.warning("cannot capture the training step as a CUDA graph (%s); training on with "
                                "eager steps", first_line(error))
                    self.capture_failed = True
                    torch.cuda.synchronize(self.device)
                    super().__call__(images, labels)
                    return
            self._refresh_lr()
            self.static_images.copy_(images)
            self.static_labels.copy_(labels)
            self.graph.replay()
            self.scheduler.step()

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.static_images = images.clone()  # keeps channels_last
        self.static_labels = labels.clone()
        groups = self.optimizer.param_groups
        self.graph_lrs = [group["lr"] for group in groups]  # the scheduler's floats the tensors hold
        self.lr_tensors = [torch.tensor(float(lr), device=self.device) for lr in self.graph_lrs]
        for group, lr in zip(groups, self.lr_tensors):
            group["lr"] = lr  # the fused optimizer reads a tensor lr from device memory at replay
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(self.static_images, self.static_labels)  # recorded, not run
        finally:
            for group, lr in zip(groups, self.graph_lrs):
                group["lr"] = lr  # the scheduler and eager steps go on with plain floats
        self.graph = graph
        log.info("captured the training step as a CUDA graph (batch %d)", self.batch_size)

    def _refresh_lr(self) -> None:
        for index, group in enumerate(self.optimizer.param_groups):
            if group["lr"] != self.graph_lrs[index]:
                self.lr_tensors[index].fill_(group["lr"])
                self.graph_lrs[index] = group["lr"]


def uses_cuda_graphs(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether training steps on ``device`` are replayed as CUDA graphs: on CUDA unless turned off, or
    --compile, or fp16 autocast (whose GradScaler reads the GPU from the host every step)."""
    return (cfg.cuda_graphs and device.type == "cuda" and not cfg.compile
            and resolve_amp_dtype(cfg, device) != torch.float16)


def build_train_step(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    amp_dtype: torch.dtype | None,
    distillation: Distillation | None = None,
) -> TrainStep:
    """The step ``cfg`` asks for: replayed as a CUDA graph, on a ``torch.compile``d model, or eager.

    On CPU it also makes the allocator keep freed memory (``keep_freed_memory_in_process``).
    """
    device = next(model.parameters()).device
    if device.type == "cpu":
        keep_freed_memory_in_process()
    if uses_cuda_graphs(cfg, device):
        return GraphedTrainStep(model, optimizer, scheduler, amp_dtype, cfg.label_smoothing, distillation)
    if cfg.cuda_graphs and device.type == "cuda":
        log.info("eager training steps: CUDA graphs do not combine with %s",
                 "--compile" if cfg.compile else "fp16 autocast")
    step_model = torch.compile(model) if cfg.compile else model
    return TrainStep(step_model, optimizer, scheduler, amp_dtype, cfg.label_smoothing, distillation)


def train_epoch(step: TrainStep, batches: DeviceBatches, progress_label: str | None = None) -> tuple[float, float]:
    """One pass over the training set; returns (mean loss, accuracy), read once at the end."""
    step.model.train()
    step.reset()
    steps = batches
    if progress_label is not None:
        from tqdm import tqdm

        steps = tqdm(batches, desc=progress_label, leave=False, file=sys.stderr, unit="batch")
    for images, labels in steps:
        step(images, labels)
    return step.read(len(batches.labels))


def served_validation_accuracy(result: FitResult, val: ImageSet, cfg: TrainConfig) -> float:
    """Validation accuracy of ``result``'s model as it is logged and served: fp32, one pass per image,
    in its shipped form. Measured again: the epochs validated the training form (BatchNorms unfolded,
    perhaps under autocast), which rounds differently."""
    return evaluate(result.model, val, batch_size=cfg.eval_batch_size, channels_last=cfg.channels_last).accuracy


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    batch_size: int = 1000,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    tta: bool = False,
) -> EvalResult:
    """Loss, accuracy, predictions and softmax probabilities of ``model`` on ``data``.

    With ``tta`` the probabilities are the mean over each image and its mirror image, and the result
    also holds the accuracy of the first, unmirrored pass (what an exported model computes).
    """
    device = next(model.parameters()).device
    batches = DeviceBatches(data, batch_size, device=device, channels_last=channels_last)
    log_probabilities, one_pass_predictions = [], []
    with eval_mode(model):
        for images, _ in batches:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # Log-probabilities, not log(softmax): float32 softmax underflows to 0 past a ~100-nat
                # margin, which would cap a confidently wrong image's loss.
                batch_log_probabilities = model(images).float().log_softmax(1)  # (B, classes)
                if tta:
                    one_pass_predictions.append(batch_log_probabilities.argmax(1))
                    mirrored = model(images.flip(-1)).float().log_softmax(1)
                    # log((p + p_mirrored) / 2), computed in log space
                    batch_log_probabilities = torch.logaddexp(batch_log_probabilities, mirrored) - math.log(2)
            log_probabilities.append(batch_log_probabilities)
    log_probabilities = torch.cat(log_probabilities)  # (N, classes)
    labels = batches.labels
    loss = F.nll_loss(log_probabilities, labels).item()
    probabilities = log_probabilities.exp()
    predictions = log_probabilities.argmax(1)
    return EvalResult(
        loss=loss,
        accuracy=(predictions == labels).float().mean().item(),
        labels=labels.cpu().numpy(),
        predictions=predictions.cpu().numpy(),
        probabilities=probabilities.cpu().numpy(),
        one_pass_accuracy=(torch.cat(one_pass_predictions) == labels).float().mean().item() if tta else None,
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the previous mode again."""
    if isinstance(model, torch.fx.GraphModule):  # torch.export'ed: frozen in the mode it was exported in
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring ``peak_memory_bytes`` afresh: each fit of a process (a tuning trial) its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux resets the process's peak resident set (VmHWM) to its current size on "5" (since 4.0).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by PyTorch on CUDA; on CPU the process's peak resident memory since
    ``reset_peak_memory`` (where the system cannot reset it, over the process's lifetime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError, StopIteration, ValueError):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) * 1024  # in kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, the BSDs KiB

"""Inference speed and shipping: latency, MAC counts, ONNX / int8 export and its verification.

Knows nothing of MLflow or Optuna: functions take models and arrays and return values
(``deployment`` tracks them). ONNX, ONNX Runtime and its quantisation tools are imported where
they are used, so that importing this module (``measure_latency`` in tuning) stays cheap.

Every model here takes float images (B, 3, 32, 32) in [0, 1] and returns logits (B, classes):
normalisation is inside the model (``models.Classifier``), so the ONNX files need none either.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import io
import logging
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_exp.config import BenchmarkConfig
from cifar_exp.data import IMAGE_SHAPE, ImageSet
from cifar_exp.errors import ConfigError, DataError, ExportError, TrackingError, first_line
from cifar_exp.interrupts import deferred
from cifar_exp.models import SHIPPED_MEMORY_FORMAT, count_parameters, shipped_copy
from cifar_exp.train import cpu_name, cpu_supports_bf16, eval_mode

log = logging.getLogger(__name__)

MIN_CALLS = 3  # per warm-up and per timed repeat, however slow a call is
EVAL_BATCH_SIZE = 256  # batch of the accuracy / agreement passes over the test split
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# fp32 ONNX Runtime and PyTorch differ only by float rounding (~1e-6 here); a larger gap is a bug.
# Rounding scales with the logits (one float32 step at 1e6 is 0.06): allowed, atol + rtol * max |logit|.
FP32_LOGIT_ATOL, FP32_LOGIT_RTOL = 1e-3, 1e-5
# 2048: a square matrix product this large runs at the GEMM kernels' sustained rate (~17 GFLOP).
MATMUL_SIZE = BenchmarkConfig.floor_matmul_size
# int8 dot-product instructions (AVX512-VNNI vpdpbusd, ARM sdot) multiply 4 bytes at a time, and
# ONNX Runtime's int8 convolutions are only fast when the input channels fill those groups: the
# first conv's 3-channel image gets a 4th, zero channel (and zero weights) before quantisation.
INT8_CHANNEL_GROUP = 4
# Operators quantised: those with int8 kernels in ONNX Runtime's CPU provider, and the layout and
# activation ops between them that int8 tensors pass through. BatchNormalization (left unfused
# where it follows a pool) has none: quantising it would only add dequantise/quantise steps.
INT8_OP_TYPES = ("Conv", "Gemm", "MatMul", "MaxPool", "AveragePool", "Relu", "Clip", "Reshape", "Flatten",
                 "Transpose", "Squeeze", "Unsqueeze")


# --------------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class LatencyStats:
    """Wall-clock time of one forward pass at ``batch_size``, over ``repeats`` timed repeats."""

    batch_size: int
    threads: int
    calls: int  # timed calls, all repeats together
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_second: float  # batch_size x calls / total timed seconds; at batch 1 this is the FPS
    repeat_p50_ms: tuple[float, ...]  # the p50 of each repeat on its own

    @property
    def spread(self) -> float:
        """Run-to-run spread: (largest - smallest) repeat p50, relative to their median."""
        values = np.asarray(self.repeat_p50_ms)
        return float((values.max() - values.min()) / np.median(values))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "repeat_p50_ms": list(self.repeat_p50_ms), "spread": self.spread}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def time_calls(
    call: Callable[[], object],
    *,
    batch_size: int,
    threads: int,
    repeats: int = 3,
    seconds_per_repeat: float = 0.5,
    warmup_seconds: float = 0.2,
    synchronize: Callable[[], None] | None = None,
) -> LatencyStats:
    """Time ``call`` (one forward pass of ``batch_size`` images) after a warm-up.

    Each repeat times calls for ``seconds_per_repeat`` (at least ``MIN_CALLS``); ``synchronize``
    (e.g. ``torch.cuda.synchronize``) runs inside each timed interval for asynchronous devices.
    """
    _check_timing(batch_size, repeats, seconds_per_repeat, warmup_seconds)
    with _no_garbage_collection():
        _run_for(call, warmup_seconds, synchronize)
        per_repeat = [_run_for(call, seconds_per_repeat, synchronize) for _ in range(repeats)]
    return summarize_times(per_repeat, batch_size=batch_size, threads=threads)


def summarize_times(per_repeat: list[list[float]], *, batch_size: int, threads: int) -> LatencyStats:
    """Statistics of call times in ms, one list per repeat."""
    times = np.concatenate(per_repeat)
    return LatencyStats(
        batch_size=batch_size,
        threads=threads,
        calls=len(times),
        p50_ms=float(np.percentile(times, 50)),
        p90_ms=float(np.percentile(times, 90)),
        p99_ms=float(np.percentile(times, 99)),
        mean_ms=float(times.mean()),
        images_per_second=float(batch_size * len(times) / (times.sum() / 1e3)),
        repeat_p50_ms=tuple(float(np.median(t)) for t in per_repeat),
    )


def _run_for(call: Callable[[], object], seconds: float, synchronize: Callable[[], None] | None) -> list[float]:
    """Call times in ms, calling for ``seconds`` and at least ``MIN_CALLS`` times."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_CALLS or time.perf_counter() - start < seconds:
        begin = time.perf_counter_ns()
        call()
        if synchronize is not None:
            synchronize()
        times.append((time.perf_counter_ns() - begin) / 1e6)
    return times


@contextlib.contextmanager
def _no_garbage_collection() -> Iterator[None]:
    """A collection inside a timed call would be measured as model latency."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _check_timing(batch_size: int, repeats: int, seconds_per_repeat: float, warmup_seconds: float) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    if not seconds_per_repeat > 0 or warmup_seconds < 0:
        raise ConfigError(
            f"seconds-per-repeat must be > 0 and warmup-seconds >= 0, got {seconds_per_repeat}, {warmup_seconds}"
        )


def measure_latency(
    model: nn.Module,
    batch_size: int = 1,
    *,
    threads: int | None = None,
    repeats: int = 3,
    seconds_per_repeat: float = 0.5,
    warmup_seconds: float = 0.2,
    backend: str = "pytorch-fp32",
) -> LatencyStats:
    """Latency of ``model`` (float (B, 3, 32, 32) -> logits) on one of the CPU backends.

    ``threads`` defaults to all cores. The PyTorch backends time the model as it ships (``shipped_copy``:
    fp32, channels_last, eval mode), whatever layout and mode ``model`` is in, and leave ``model`` as it
    was. ``onnxruntime-fp32`` exports the model to a temporary ONNX file first; ``onnxruntime-int8`` needs
    calibration images and is measured by ``run_benchmark``.
    """
    threads = threads or available_cores()
    _check_timing(batch_size, repeats, seconds_per_repeat, warmup_seconds)
    timing = dict(repeats=repeats, seconds_per_repeat=seconds_per_repeat, warmup_seconds=warmup_seconds)
    if backend in ("pytorch-fp32", "pytorch-bf16"):
        return _TorchBackend(backend, model, torch.device("cpu"), threads).latency(batch_size, **timing)
    if backend == "onnxruntime-fp32":
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx")
            return _OnnxBackend(backend, path, threads).latency(batch_size, **timing)
    raise ConfigError(
        f"measure_latency cannot measure backend {backend!r}; choose pytorch-fp32, pytorch-bf16 or onnxruntime-fp32"
    )


def measure_matmul_rate(
    precision: str = "fp32", *, threads: int | None = None, size: int = MATMUL_SIZE, seconds: float = 1.0
) -> float | None:
    """Multiply-accumulates per second that this CPU sustains on a ``size`` x ``size`` matrix product.

    ``fp32``: ``torch.mm`` (oneDNN/MKL SGEMM); ``int8``: ``torch._int_mm`` (int8 x int8 -> int32,
    VNNI where the CPU has it). None where this PyTorch build has no CPU int8 matrix product.
    """
    threads = threads or available_cores()
    generator = torch.Generator().manual_seed(0)
    if precision == "fp32":
        a, b = (torch.rand(size, size, generator=generator) for _ in range(2))
        product = lambda: torch.mm(a, b)  # noqa: E731
    elif precision == "int8":
        a, b = (torch.randint(-128, 128, (size, size), generator=generator, dtype=torch.int8) for _ in range(2))
        product = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        raise ConfigError(f"unknown precision {precision!r}; choose fp32 or int8")
    with torch_threads(threads):
        try:
            product()
        except (RuntimeError, NotImplementedError) as error:
            log.warning("no %s matrix product on this CPU: %s", precision, first_line(error))
            return None
        stats = time_calls(product, batch_size=1, threads=threads, repeats=1, seconds_per_repeat=seconds,
                           warmup_seconds=seconds / 4)
    return size**3 / (stats.p50_ms / 1e3)


# --------------------------------------------------------------------------------------------------
# Model facts


def check_classifier(model: nn.Module, name: str, device: torch.device | str = "cpu") -> int:
    """Reject models that do not map (B, 3, 32, 32) images to (B, classes) scores; returns classes.

    Probed at batch 2 and at batch 1 (what latency is timed at): a model exported with a fixed batch
    size fails here, not halfway through a benchmark.
    """
    classes = None
    for batch_size in (2, 1):
        probe = torch.rand(batch_size, *IMAGE_SHAPE, device=device)
        try:
            with torch.inference_mode(), eval_mode(model):
                output = model(probe)
        except Exception as error:
            raise TrackingError(
                f"model {name} does not accept (B, 3, 32, 32) images: {first_line(error)}"
            ) from None
        if (not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != batch_size
                or output.shape[1] < 2 or output.shape[1] != (classes or output.shape[1])):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise TrackingError(f"model {name} is not an image classifier: output {shape} for {batch_size} "
                                f"image{'s' if batch_size > 1 else ''}")
        classes = int(output.shape[1])
    return classes


def check_class_count(classes: int, names: tuple[str, ...], data_dir: str, model: str = "the model") -> None:
    """A model scoring ``classes`` classes must meet a dataset of as many (``names``)."""
    if classes != len(names):
        raise DataError(f"{model} predicts {classes} classes but {data_dir} holds {len(names)}")


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one forward pass of one image, counted by ``torch.utils.flop_counter``.

    The counter records convolutions and matrix products (2 FLOPs per multiply-accumulate) and
    ignores the cheap element-wise work (bias, ReLU, pooling, normalisation).
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(iter(model.parameters()), torch.empty(0)).device
    # Eval mode: a training-mode BatchNorm would fold the zero image into its running statistics.
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), eval_mode(model):
        model(torch.zeros(1, *IMAGE_SHAPE, device=device))
    return counter.get_total_flops() // 2


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the stored weights (initialisers) of an ONNX model: what the file ships."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(tensor).nbytes for tensor in model.graph.initializer)


# --------------------------------------------------------------------------------------------------
# ONNX export and int8 quantisation


def check_writable_folder(folder: Path) -> Path:
    """Prove that ``folder`` can hold new files, before any slow work, without creating it.

    A missing folder is checked through its nearest existing parent (``output_folder`` creates it
    once there is something to write), so that input refused later leaves no empty folder behind.
    """
    folder = Path(folder).expanduser()
    existing = folder
    try:
        while not existing.exists() and existing != existing.parent:
            if existing.is_symlink():  # no folder can be made in its place, nor through it
                raise ExportError(f"cannot write to {folder}: {existing} is a link to {os.readlink(existing)}, "
                                  "which does not exist")
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ExportError(f"cannot write to {folder}: {error.strerror or error}") from None
    return folder


def check_file_targets(folder: Path, names: Iterable[str]) -> None:
    """Refuse, before any slow work, a file name in ``folder`` taken by a folder (no file can replace it)."""
    for name in names:
        target = Path(folder).expanduser() / name
        try:
            taken = target.is_dir()
        except OSError as error:  # e.g. a name too long for the file system
            raise ExportError(f"cannot write {target}: {error.strerror or error}") from None
        if taken:
            raise ExportError(f"cannot write {target}: it is a folder")


@contextlib.contextmanager
def output_folder(folder: Path) -> Iterator[Path]:
    """``folder``, created with its parents if missing (after ``check_writable_folder`` passed); the
    folders it created are removed again if the block fails, which then must leave nothing in them."""
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # innermost first
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ExportError(f"cannot write to {folder}: {error.strerror or error}") from None
        yield folder
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):  # not empty after all: kept
                path.rmdir()
        raise


def export_onnx(model: nn.Module, path: Path) -> Path:
    """Write ``model`` as an ONNX file whose batch dimension is dynamic (input ``images``).

    Works for eager modules and for the ``torch.export`` programs MLflow loads (``GraphModule``).
    """
    path = Path(path)
    # Contiguous: ONNX has no layout of its own, and channels_last weights make torch.export trace
    # shape arithmetic (Shape, Gather, Range) into some graphs, e.g. resnet8's global pooling.
    exported = shipped_copy(model).to(memory_format=torch.contiguous_format)
    example = torch.rand(2, *IMAGE_SHAPE)  # batch >= 2, or torch.export specialises it to 1
    batch = torch.export.Dim("batch")
    chatter = io.StringIO()  # the exporter prints its progress to stdout; only the CLI prints
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            # A loaded torch.export program reports training mode but is frozen as exported (eval).
            warnings.filterwarnings("ignore", "Exporting a model while it is in training mode", UserWarning)
            torch.onnx.export(
                exported, (example,), str(path), dynamo=True, external_data=False,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
            )
    except OSError as error:
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from None
    except Exception as error:
        raise ExportError(f"cannot export the model to ONNX: {first_line(error)}") from None
    log.debug("torch.onnx: %s", chatter.getvalue().strip())
    import onnx

    graph = onnx.load(str(path))
    if _move_relu_before_max_pool(graph) + _trim_padding_no_pool_reads(graph):
        onnx.checker.check_model(graph)
        onnx.save(graph, str(path))
    return path


def _move_relu_before_max_pool(model: Any) -> int:
    """Rewrite every MaxPool -> Relu of the ONNX model as Relu -> MaxPool; returns how many.

    Both orders compute the same values (ReLU is monotonic, so it commutes with max). PyTorch
    trains faster pooling first (ReLU on fewer elements), but ONNX Runtime fuses a Conv -> Relu
    into one kernel, where ReLU costs nothing, and int8 needs it there: quantising the ReLU into
    the conv's output range lets MaxPool run on int8 with an unchanged scale, whereas a ReLU after
    the pool makes the quantiser give the pool's input and output different scales, so the pool
    falls back to dequantise -> fp32 MaxPool -> quantise.
    """
    import onnx

    graph = model.graph
    users = _consumers(graph)
    moved = 0
    for pool in [node for node in graph.node if node.op_type == "MaxPool" and len(node.output) == 1]:
        relu = _sole_reader(graph, users, pool.output[0], "Relu")
        if relu is None:
            continue
        source, pooled, result = pool.input[0], pool.output[0], relu.output[0]
        activated = f"{result}_before_pool"  # unique: relu's output is
        # The two nodes trade contents, not places: the pool's place (first) gets the Relu, reading
        # what the pool read, and the Relu's place the MaxPool, so the nodes stay topologically sorted.
        relu_first, pool_second = onnx.NodeProto(), onnx.NodeProto()
        relu_first.CopyFrom(relu)
        pool_second.CopyFrom(pool)
        relu_first.input[0], relu_first.output[0] = source, activated
        pool_second.input[0], pool_second.output[0] = activated, result
        pool.CopyFrom(relu_first)
        relu.CopyFrom(pool_second)
        for info in [info for info in graph.value_info if info.name == pooled]:
            graph.value_info.remove(info)  # that tensor is gone
        moved += 1
    return moved


def _trim_padding_no_pool_reads(model: Any) -> int:
    """Drop the end padding of a Conv whose extra output rows/columns its MaxPool never reads.

    A MaxPool with stride = kernel k and no padding reads the first ``floor(O / k) * k`` of the
    conv's ``O`` output rows: the seed's MaxPool2d(3) reads 30 of conv1's 32 and 9 of conv2's 10.
    Taking up to ``O mod k`` off the conv's bottom/right zero padding computes fewer of the unread
    rows (31 and 9 here) and changes no value the pool sees (the seed: 5.86 -> 5.05 M MACs per
    image). Handles ``Conv [-> Relu] -> MaxPool`` with nothing else reading the conv; returns how many
    convs changed.
    """
    from onnx import helper

    graph = model.graph
    shapes = _inferred_shapes(model)
    users = _consumers(graph)
    trimmed = 0
    for conv in graph.node:
        shape = shapes.get(conv.output[0]) if conv.op_type == "Conv" else None
        pool = _sole_reader(graph, users, conv.output[0]) if shape else None
        resized = [conv.output[0]]  # the tensors whose recorded shape the trim changes
        if pool is not None and pool.op_type == "Relu":
            resized.append(pool.output[0])
            pool = _sole_reader(graph, users, pool.output[0])
        if pool is None or pool.op_type != "MaxPool" or len(shape) != 4 or None in shape[2:]:
            continue
        kernel = _attribute(pool, "kernel_shape", [])
        pads = list(_attribute(conv, "pads", [0, 0, 0, 0]))
        if (len(kernel) != 2 or list(_attribute(pool, "strides", [1, 1])) != list(kernel)  # ONNX default: 1
                or any(_attribute(pool, "pads", [])) or _attribute(pool, "ceil_mode", 0) or len(pool.output) != 1
                or any(d != 1 for d in _attribute(pool, "dilations", [1, 1]))
                or any(_attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") for node in (conv, pool))
                or len(pads) != 4):
            continue
        unread = [min(pads[2 + axis], shape[2 + axis] % kernel[axis]) for axis in range(2)]  # rows, columns
        if not any(unread):
            continue
        pads[2], pads[3] = pads[2] - unread[0], pads[3] - unread[1]
        for old in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(old)
        conv.attribute.append(helper.make_attribute("pads", pads))
        for info in [info for info in graph.value_info if info.name in resized]:
            graph.value_info.remove(info)  # it records the old shape
        trimmed += 1
    return trimmed


def calibration_images(train: ImageSet, count: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` training images, picked at random (seeded): float32 (N, 3, 32, 32) in [0, 1]."""
    if count < 1:
        raise ConfigError(f"calibration-images must be >= 1, got {count}")
    if len(train) == 0:
        raise ConfigError("no training images to calibrate the int8 model with")
    picks = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    return (train.images[picks].float() / 255).numpy()


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray, batch_size: int = 64) -> Path:
    """Statically quantise an fp32 ONNX model with ONNX Runtime's tools.

    QDQ format, uint8 activations and per-channel int8 weights without range reduction (this CPU
    has VNNI); activation ranges come from running ``calibration`` (float (N, 3, 32, 32)) through
    the model (MinMax). Four rewrites cut the operators a batch-1 call pays for: convolutions get
    their input channels padded to a multiple of ``INT8_CHANNEL_GROUP`` (exact: the added channels
    and weights are zero); a linear head on a 1x1 feature map runs in NHWC, its Gemms as 1x1
    convolutions (exact) but for the last of a head with hidden layers; the logits are written in
    float, not 8-bit (by that last Gemm, or by a one-layer head's conv); and the input normalisation
    is folded into the input's quantisation (on a grid of its own, as fine as the calibrated one).
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.batches, None)
            if start is None:
                return None
            return {INPUT_NAME: np.ascontiguousarray(calibration[start : start + batch_size], dtype=np.float32)}

    int8_path = Path(int8_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred and graph simplified, as the tools advise
        try:
            # ONNX shape inference covers CNNs; the symbolic one (for transformers) fails on global pooling.
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
            model = onnx.load(str(prepared))
            padded = _pad_conv_input_channels(model)
            pointwise = _linear_head_as_pointwise_convs(model)
            onnx.save(onnx.shape_inference.infer_shapes(model), str(prepared))
            quantize_static(
                str(prepared), str(int8_path), Batches(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=False,
                op_types_to_quantize=list(INT8_OP_TYPES),
            )
            quantized = onnx.load(str(int8_path))
            float_logits = _float_logits(quantized)
            folded = _fold_normalisation_into_input_quantisation(quantized)
            if folded or float_logits:
                onnx.save(quantized, str(int8_path))
        except OSError as error:
            raise ExportError(f"cannot write {int8_path}: {error.strerror or error}") from None
        except Exception as error:  # ONNX Runtime's tools refuse a graph: say so in one line
            raise ExportError(f"cannot quantise {Path(fp32_path).name} to int8: {first_line(error)}") from None
    log.info("quantised %s to int8 (%d calibration images; input channels padded to a multiple of %d: %s; "
             "linear layers run as 1x1 convs: %d; float logits: %s; normalisation folded into the input "
             "quantisation: %s)", Path(fp32_path).name, len(calibration), INT8_CHANNEL_GROUP,
             ", ".join(padded) or "none", pointwise, "yes" if float_logits else "no", "yes" if folded else "no")
    return int8_path


def _pad_conv_input_channels(model: Any) -> list[str]:
    """Zero-pad the input channels of every ungrouped Conv to a multiple of ``INT8_CHANNEL_GROUP``.

    A Pad node adds zero channels to the conv's input (B, C, H, W) -> (B, C', H, W) and the weight
    (out, C, kh, kw) gets zero columns to (out, C', kh, kw): the output is unchanged. Returns the
    names of the convs padded.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    users = _consumers(graph)
    padded, nodes = [], []
    padded_inputs: dict[tuple[str, int], str] = {}  # one Pad per tensor, however many convs read it
    for node in graph.node:
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = weights.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if weight is not None and groups == 1 and len(users[node.input[1]]) == 1 and len(weight.dims) == 4:
            values = numpy_helper.to_array(weight)  # (out, in, kh, kw)
            missing = -values.shape[1] % INT8_CHANNEL_GROUP
            if missing:
                channels = values.shape[1] + missing
                padded_input = padded_inputs.get((node.input[0], channels))
                if padded_input is None:
                    padded_input = padded_inputs[node.input[0], channels] = f"{node.input[0]}_{channels}_channels"
                    pads = f"{node.name}_channel_pads"  # ONNX Pad: begins of all 4 axes, then ends
                    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, 0, 0, 0, missing, 0, 0]), pads))
                    nodes.append(helper.make_node("Pad", [node.input[0], pads], [padded_input], mode="constant",
                                                  name=f"{node.name}_pad_channels"))
                _replace_initializer(graph, weight, np.pad(values, ((0, 0), (0, missing), (0, 0), (0, 0))))
                node.input[0] = padded_input
                padded.append(node.name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return padded


def _attribute(node: Any, name: str, default: Any) -> Any:
    """The value of ONNX ``node``'s attribute ``name``, or ``default`` where it has none."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _inferred_shapes(model: Any) -> dict[str, list[int | None]]:
    """Tensor name -> its shape by ONNX shape inference (None for a dynamic dimension)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    return {info.name: [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
            for info in [*inferred.value_info, *inferred.input]}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes of ``graph`` that read it."""
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _sole_reader(graph: Any, users: dict[str, list[Any]], name: str, op_type: str | None = None) -> Any | None:
    """The one node that reads tensor ``name`` (of ``op_type``, if given), where nothing else does and
    it is no graph output: what a rewrite may change together with the node that writes ``name``."""
    found = users.get(name, [])
    if len(found) != 1 or name in {output.name for output in graph.output}:
        return None
    return found[0] if op_type is None or found[0].op_type == op_type else None


def _initializer_value(graph: Any, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    tensor = next((t for t in graph.initializer if t.name == name), None)
    return None if tensor is None else numpy_helper.to_array(tensor)


def _replace_initializer(graph: Any, tensor: Any, value: np.ndarray) -> None:
    from onnx import numpy_helper

    tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    for info in [info for info in graph.value_info if info.name == tensor.name]:
        graph.value_info.remove(info)  # it records the old shape


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def _linear_head_as_pointwise_convs(model: Any) -> int:
    """Run a linear head on a 1x1 feature map in NHWC order; returns how many Gemms became convs.

    ``x (B, C, 1, 1) -> Flatten -> Gemm [-> Relu -> Gemm ...]`` becomes ``x [-> Conv1x1 -> Relu ...]
    -> Transpose to NHWC -> Flatten -> Gemm``, the same values: a (B, N, 1, 1) map holds its N features
    in the same order in NCHW and NHWC. ONNX Runtime runs int8 convolutions in NHWC and puts a
    Transpose back to NCHW before a Flatten; the explicit one to NHWC cancels it. Every Gemm but the
    last becomes a 1x1 convolution (at batch 1 a QLinearConv beats a QGemm: a matrix-vector product
    either way); the last stays a Gemm, the one int8 operator that can write float logits
    (``_float_logits``), unless it is the head's only layer (whose conv then runs in float).
    """
    import onnx
    from onnx import helper

    graph = model.graph
    shapes = _inferred_shapes(model)
    users = _consumers(graph)
    weights = {tensor.name: tensor for tensor in graph.initializer}

    def plain_linear(node: Any) -> bool:  # y = x @ W.T + b with constants W (N, C), b (N,), W used once
        weight = weights.get(node.input[1]) if node.op_type == "Gemm" else None
        if weight is None or len(weight.dims) != 2 or len(users[weight.name]) != 1:
            return False
        bias = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and (bias is None or list(bias.dims) != [weight.dims[0]]):
            return False
        return (_attribute(node, "transA", 0) == 0 and _attribute(node, "transB", 0) == 1
                and _attribute(node, "alpha", 1.0) == 1.0 and _attribute(node, "beta", 1.0) == 1.0)

    replaced: dict[str, list[Any]] = {}  # output of an original node -> the nodes that take its place
    moved = 0
    for flatten in list(graph.node):
        shape, flat = shapes.get(flatten.input[0]), shapes.get(flatten.output[0])
        if flatten.op_type not in ("Flatten", "Reshape") or not shape or len(shape) != 4 or shape[2:] != [1, 1]:
            continue
        if not flat or len(flat) != 2 or flat[1] is None or flat[1] != shape[1]:  # (B, C), nothing else
            continue
        chain, name = [], flatten.output[0]
        while (node := _sole_reader(graph, users, name)) is not None:
            if not (plain_linear(node) or node.op_type == "Relu"):
                break
            chain.append(node)
            name = node.output[0]
        gemms = [i for i, node in enumerate(chain) if node.op_type == "Gemm"]
        if not gemms:
            continue
        # A lone Gemm right after a global pool becomes a conv as well: read by a conv, the pooled
        # map stays int8, where a Flatten -> Gemm would have ONNX Runtime run the pool in float.
        converted = chain[: gemms[-1]] if len(gemms) > 1 else chain
        feature_map, flat_name = flatten.input[0], flatten.output[0]  # (B, C, 1, 1), what follows reads
        replaced[flat_name] = []
        for node in converted:
            output = f"{node.output[0]}_1x1"  # node names derive from (unique) tensor names
            if node.op_type == "Gemm":
                weight = weights[node.input[1]]
                _replace_initializer(graph, weight, _initializer_value(graph, weight.name)[:, :, None, None])
                new = helper.make_node("Conv", [feature_map, *node.input[1:]], [output], kernel_shape=[1, 1],
                                       name=output)
                moved += 1
            else:
                new = helper.make_node("Relu", [feature_map], [output], name=output)
            replaced[node.output[0]] = [new]
            feature_map, flat_name = output, node.output[0]
        nhwc = f"{feature_map}_nhwc"
        replaced[flat_name] += [
            helper.make_node("Transpose", [feature_map], [nhwc], perm=[0, 2, 3, 1], name=nhwc),
            helper.make_node("Flatten", [nhwc], [flat_name], axis=1, name=f"{flat_name}_flatten"),
        ]
    if replaced:
        nodes = [new for node in graph.node for new in replaced.get(node.output[0], [node])]
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_initializers(graph)  # e.g. the Reshapes' target shapes
        onnx.checker.check_model(model)
    return moved


def _float_logits(model: Any) -> bool:
    """Let the Gemm or Conv that computes a graph output write it in float; returns whether the graph
    changed.

    The quantiser ends the graph ``Gemm -> QuantizeLinear -> DequantizeLinear -> logits``: the logits
    rounded to 256 levels, where close classes tie (36 of 5,000 test images for a distilled pico-sep,
    settled by class index). Without that pair ONNX Runtime runs the Gemm as a QGemm with float output: one
    operator less, and logits as precise as its int32 accumulator. A lone linear head run as a 1x1
    conv (``_linear_head_as_pointwise_convs``) is followed by a Transpose and a Flatten, each between
    its own pair: all of them go, and the conv runs in float on the dequantised pooled features
    (C x 10 multiply-adds per image).
    """
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    users = _consumers(graph)
    changed = False
    for output in graph.output:
        pairs, name = [], output.name  # (producer, QuantizeLinear, DequantizeLinear), from the output back
        while (dequantize := producers.get(name)) is not None and dequantize.op_type == "DequantizeLinear":
            quantize = producers.get(dequantize.input[0])
            if (quantize is None or quantize.op_type != "QuantizeLinear"
                    or _sole_reader(graph, users, quantize.output[0]) is None):
                break
            source = producers.get(quantize.input[0])
            if source is None or _sole_reader(graph, users, source.output[0]) is None:
                break
            if pairs and _sole_reader(graph, users, dequantize.output[0]) is None:
                break  # another reader wants the 8-bit value: the chain stops short of a Gemm or Conv
            pairs.append((source, quantize, dequantize))
            if source.op_type in ("Gemm", "Conv"):
                break
            if source.op_type not in ("Transpose", "Flatten", "Reshape"):  # value-preserving moves only
                pairs = []
                break
            name = source.input[0]
        if not pairs or pairs[-1][0].op_type not in ("Gemm", "Conv"):
            continue
        for source, quantize, dequantize in pairs:
            source.output[0] = dequantize.output[0]  # what read the pair now reads the float value
            graph.node.remove(quantize)
            graph.node.remove(dequantize)
        changed = True
    if changed:
        _drop_unused_initializers(graph)
    return changed


def _fold_normalisation_into_input_quantisation(model: Any) -> bool:
    """Quantise the raw image instead of the normalised one; returns whether the graph changed.

    A quantised graph starts ``x -> Sub(mean) -> Div(std) [-> Pad] -> QuantizeLinear(s, z) ->
    DequantizeLinear(s, z) -> Conv``: two float operators before the first int8 one. With the
    normalised image's scale chosen as ``s = mean / (std * n)`` for a whole number ``n``,
    ``round((x - mean) / std / s) + z`` equals ``round(x / (s * std)) + z - n`` (up to ties): the
    QuantizeLinear can read ``x`` itself (scale ``s * std``, zero point ``z - n``) and the
    DequantizeLinear (scale ``s``, zero point ``n``) hands the conv the normalised values on that
    grid. Taking ``z - n = 0`` and the largest ``n`` that keeps ``x`` in [0, 1] within uint8 gives,
    for mean = std = 0.5, ``s = 1/127`` where calibration gave 2/255. A constant Pad now pads the raw
    image, so its value ``c`` becomes ``mean + std * c``.
    """
    from onnx import numpy_helper

    graph = model.graph
    users = _consumers(graph)
    image = graph.input[0].name

    def uniform_constant(name: str) -> float | None:
        value = _initializer_value(graph, name)
        return float(value.flat[0]) if value is not None and value.size and np.all(value == value.flat[0]) else None

    sub = _sole_reader(graph, users, image, "Sub")
    if sub is None or sub.input[0] != image:
        return False
    div = _sole_reader(graph, users, sub.output[0], "Div")
    if div is None or div.input[0] != sub.output[0]:
        return False
    mean, std = uniform_constant(sub.input[1]), uniform_constant(div.input[1])
    pad = _sole_reader(graph, users, div.output[0], "Pad")
    quantize = _sole_reader(graph, users, (pad or div).output[0], "QuantizeLinear")
    dequantize = quantize and _sole_reader(graph, users, quantize.output[0], "DequantizeLinear")
    if mean is None or std is None or not dequantize or std <= 0 or not 0 <= mean < 1:
        return False
    zero_point = _initializer_value(graph, quantize.input[2]) if len(quantize.input) > 2 else None
    if zero_point is None or zero_point.dtype != np.uint8:
        return False
    steps = int(np.floor(255 * mean))  # n: x in [0, 1] -> x / (s * std) = x * n / mean in [0, 255]
    if mean > 0 and steps < 1:
        return False
    if pad is not None:
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        padded_with = _initializer_value(graph, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0.0
        if padded_with is None:
            return False
        if mode == "constant":
            value = f"{pad.output[0]}_raw_value"
            raw_value = np.array(mean + std * float(padded_with), np.float32)
            graph.initializer.append(numpy_helper.from_array(raw_value, value))
            if len(pad.input) > 2:
                pad.input[2] = value  # an axes input, if any, stays 4th
            else:
                pad.input.append(value)
    raw_scale = mean / steps if steps else 1 / 255  # s * std
    stem = f"{image}_raw"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(raw_scale, np.float32), f"{stem}_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), f"{stem}_zero_point"),
        numpy_helper.from_array(np.array(raw_scale / std, np.float32), f"{stem}_normalised_scale"),
        numpy_helper.from_array(np.array(steps, np.uint8), f"{stem}_normalised_zero_point"),
    ])
    quantize.input[1], quantize.input[2] = f"{stem}_scale", f"{stem}_zero_point"
    dequantize.input[1], dequantize.input[2] = f"{stem}_normalised_scale", f"{stem}_normalised_zero_point"
    (pad or quantize).input[0] = image
    graph.node.remove(sub)
    graph.node.remove(div)
    _drop_unused_initializers(graph)
    return True


def onnx_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(error)}") from None


# --------------------------------------------------------------------------------------------------
# Agreement and accuracy


@dataclass(frozen=True)
class Agreement:
    """How a converted model's outputs compare to the reference PyTorch model's on the same images."""

    images: int
    top1_agreement: float  # fraction of images with the same predicted class
    max_abs_logit_diff: float
    accuracy: float | None  # of the converted model, when labels are known
    reference_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_logits(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray | None = None) -> Agreement:
    """``reference`` and ``logits``: (N, classes); ``labels``: (N,) or None."""
    predicted = logits.argmax(1)
    expected = reference.argmax(1)
    return Agreement(
        images=len(logits),
        top1_agreement=float((predicted == expected).mean()),
        max_abs_logit_diff=float(np.abs(logits.astype(np.float64) - reference).max()),
        accuracy=None if labels is None else float((predicted == labels).mean()),
        reference_accuracy=None if labels is None else float((expected == labels).mean()),
    )


def images_as_float(data: ImageSet) -> np.ndarray:
    """(N, 3, 32, 32) uint8 -> float32 in [0, 1], the models' input."""
    return (data.images.float() / 255).numpy()


# --------------------------------------------------------------------------------------------------
# Backends: one way each of running a model


class _TorchBackend:
    def __init__(self, name: str, model: nn.Module, device: torch.device, threads: int) -> None:
        self.name = name
        self.device = device
        self.precision = "bf16" if "bf16" in name else "fp32"
        self.amp_dtype = torch.bfloat16 if self.precision == "bf16" else None
        self.threads = threads
        # The model as it ships (channels_last, eval), whatever form the caller holds: the same network
        # then times the same whether it comes from training, from the registry or from a builder.
        self.model = shipped_copy(model).to(device)
        self.note = ""
        if self.amp_dtype is not None and device.type == "cpu" and not cpu_supports_bf16():
            self.note = "emulated: this CPU has no native bf16 (avx512_bf16 / AMX)"

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with (
            torch_threads(self.threads),
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None),
        ):
            yield

    @contextlib.contextmanager
    def timed_call(self, batch_size: int) -> Iterator[tuple[Callable[[], object], Callable[[], None] | None]]:
        """(one forward pass of a fixed random batch, device synchronisation) for ``time_calls``."""
        images = torch.rand(batch_size, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)).to(self.device)
        synchronize = torch.cuda.synchronize if self.device.type == "cuda" else None
        with self._running():
            yield (lambda: self.model(images)), synchronize

    def latency(self, batch_size: int, **timing: Any) -> LatencyStats:
        with self.timed_call(batch_size) as (call, synchronize):
            return time_calls(call, batch_size=batch_size, threads=self.threads, synchronize=synchronize, **timing)

    def predict(self, images: np.ndarray) -> np.ndarray:
        outputs = []
        with self._running():
            for start in range(0, len(images), EVAL_BATCH_SIZE):
                batch = torch.from_numpy(images[start : start + EVAL_BATCH_SIZE]).to(self.device)
                outputs.append(self.model(batch).float().cpu().numpy())
        return np.concatenate(outputs)


class _OnnxBackend:
    def __init__(self, name: str, path: Path, threads: int) -> None:
        self.name = name
        self.device = torch.device("cpu")
        self.precision = name.rsplit("-", 1)[-1]
        self.threads = threads
        self.session = onnx_session(path, threads)
        self.note = ""

    @contextlib.contextmanager
    def timed_call(self, batch_size: int) -> Iterator[tuple[Callable[[], object], None]]:
        """A call through an I/O binding: the input and the (B, classes) output stay bound to the same
        buffers, as a deployed inference loop keeps them. ``session.run`` wraps the input and
        allocates the output on every call, about 5 µs of the seed model's 75 µs at batch 1."""
        images = np.random.default_rng(0).random((batch_size, *IMAGE_SHAPE), dtype=np.float32)
        logits = self.session.run(None, {INPUT_NAME: images})[0]  # (B, classes): the output's shape
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, images)
        binding.bind_output(OUTPUT_NAME, "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)

        def call() -> np.ndarray:
            self.session.run_with_iobinding(binding)
            return logits

        yield call, None

    def latency(self, batch_size: int, **timing: Any) -> LatencyStats:
        with self.timed_call(batch_size) as (call, synchronize):
            return time_calls(call, batch_size=batch_size, threads=self.threads, synchronize=synchronize, **timing)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([
            self.session.run(None, {INPUT_NAME: np.ascontiguousarray(images[start : start + EVAL_BATCH_SIZE])})[0]
            for start in range(0, len(images), EVAL_BATCH_SIZE)
        ])


# --------------------------------------------------------------------------------------------------
# The benchmark


@dataclass(frozen=True)
class ModelFacts:
    parameters: int
    macs_per_image: int
    weight_bytes_fp32: int  # initialisers of the fp32 ONNX file
    weight_bytes_int8: int | None  # initialisers of the int8 ONNX file (None: not quantised)


@dataclass(frozen=True)
class ComputeFloor:
    """The time a model's MACs would take at the rate a large matrix product sustains here."""

    matmul_size: int
    threads: int
    fp32_macs_per_second: float
    int8_macs_per_second: float | None

    def floor_ms(self, macs: int, precision: str = "fp32") -> float | None:
        rate = self.int8_macs_per_second if precision == "int8" else self.fp32_macs_per_second
        return None if not rate else macs / rate * 1e3


@dataclass(frozen=True)
class BackendResult:
    name: str
    device: str
    precision: str
    latency: dict[int, LatencyStats]  # by batch size
    note: str = ""
    agreement: Agreement | None = None  # vs. PyTorch fp32 on the test split (trained models only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "device": self.device,
            "precision": self.precision,
            "note": self.note,
            "test_accuracy": self.agreement.accuracy if self.agreement else None,
            "agreement": self.agreement.to_dict() if self.agreement else None,
            "latency": {str(b): stats.to_dict() for b, stats in self.latency.items()},
        }


@dataclass(frozen=True)
class BenchmarkReport:
    model: str  # architecture name or model URI
    facts: ModelFacts
    threads: int
    batch_sizes: tuple[int, ...]
    repeats: int
    backends: list[BackendResult]
    skipped: dict[str, str]  # backend -> why it was not measured
    floor: ComputeFloor
    settings: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)

    def best(self, batch_size: int = 1) -> BackendResult:
        """The backend with the lowest p50 latency at ``batch_size``."""
        return min(self.backends, key=lambda b: b.latency[batch_size].p50_ms)

    def floor_ratio(self, result: BackendResult, batch_size: int = 1) -> float | None:
        """Measured p50 per image over the compute floor of its precision (1.0 = at the floor)."""
        precision = "int8" if result.precision == "int8" else "fp32"
        floor = self.floor.floor_ms(self.facts.macs_per_image * batch_size, precision)
        return None if floor is None else result.latency[batch_size].p50_ms / floor

    def to_dict(self) -> dict[str, Any]:
        floor = self.floor
        return {
            "model": {"name": self.model, **asdict(self.facts)},
            "machine": {**self.machine, "threads": self.threads},
            "settings": {**self.settings, "batch_sizes": list(self.batch_sizes), "repeats": self.repeats},
            "backends": [result.to_dict() for result in self.backends],
            "skipped": dict(self.skipped),
            "compute_floor": {
                **asdict(floor),
                "fp32_floor_ms": floor.floor_ms(self.facts.macs_per_image, "fp32"),
                "int8_floor_ms": floor.floor_ms(self.facts.macs_per_image, "int8"),
            },
            "best_batch1": self._best_batch1(),
        }

    def _best_batch1(self) -> dict[str, Any] | None:
        if 1 not in self.batch_sizes:
            return None
        best = self.best(1)
        return {
            "backend": best.name,
            "p50_ms": best.latency[1].p50_ms,
            "ratio_to_fp32_floor": best.latency[1].p50_ms / self.floor.floor_ms(self.facts.macs_per_image),
            "ratio_to_own_floor": self.floor_ratio(best, 1),
        }

    def table(self) -> str:
        facts = self.facts
        int8_size = f" / {facts.weight_bytes_int8 / 1024:,.0f} KiB int8" if facts.weight_bytes_int8 else ""
        lines = [
            f"{self.model}: {facts.parameters:,} parameters, {facts.macs_per_image / 1e6:.2f} M MACs/image, "
            f"weights {facts.weight_bytes_fp32 / 1024:,.0f} KiB fp32{int8_size}; {self.threads} threads, "
            f"{self.repeats} repeats",
            "",
        ]
        header = (f"{'backend':<20}{'accuracy':>9}{'b1 p50 ms':>11}{'p90':>8}{'p99':>8}{'FPS':>8}{'spread':>8}"
                  + "".join(f"{f'img/s b{b}':>12}" for b in self.batch_sizes))
        lines += [header, "-" * len(header)]
        for result in self.backends:
            first = result.latency.get(1)
            accuracy = result.agreement.accuracy if result.agreement and result.agreement.accuracy is not None else None
            lines.append(
                f"{result.name:<20}"
                + (f"{accuracy:>9.2%}" if accuracy is not None else f"{'-':>9}")
                + (f"{first.p50_ms:>11.3f}{first.p90_ms:>8.3f}{first.p99_ms:>8.3f}{first.images_per_second:>8.0f}"
                   f"{first.spread:>8.1%}" if first else f"{'-':>11}{'-':>8}{'-':>8}{'-':>8}{'-':>8}")
                + "".join(f"{result.latency[b].images_per_second:>12,.0f}" for b in self.batch_sizes)
            )
        for name, reason in self.skipped.items():
            lines.append(f"{name:<20}skipped: {reason}")
        for result in self.backends:
            if result.note:
                lines.append(f"note: {result.name} is {result.note}")
        for result in self.backends:
            if result.agreement:
                lines.append(f"{result.name}: top-1 agreement with pytorch-fp32 {result.agreement.top1_agreement:.2%}, "
                             f"max |Δlogit| {result.agreement.max_abs_logit_diff:.3g} "
                             f"({result.agreement.images} test images)")
        lines.append(self._floor_line())
        return "\n".join(lines)

    def _floor_line(self) -> str:
        floor, macs = self.floor, self.facts.macs_per_image
        text = (f"compute floor: {macs / 1e6:.2f} M MACs at {floor.fp32_macs_per_second / 1e9:.1f} G MAC/s fp32 "
                f"({floor.matmul_size}² matmul, {floor.threads} threads) = {floor.floor_ms(macs) * 1e3:.1f} µs")
        if floor.int8_macs_per_second:
            text += f"; {floor.int8_macs_per_second / 1e9:.1f} G MAC/s int8 = {floor.floor_ms(macs, 'int8') * 1e3:.1f} µs"
        if 1 in self.batch_sizes:
            best = self.best(1)
            text += (f"\nbest batch-1: {best.name} p50 {best.latency[1].p50_ms * 1e3:.0f} µs = "
                     f"{best.latency[1].p50_ms / floor.floor_ms(macs):.1f}x the fp32 floor")
            own = self.floor_ratio(best, 1)
            if best.precision == "int8" and own is not None:
                text += f", {own:.1f}x the int8 floor"
        return text


def run_benchmark(
    model: nn.Module,
    *,
    label: str,
    cfg: BenchmarkConfig,
    calibration: np.ndarray | None = None,
    calibration_missing: str = "no calibration images",
    test: ImageSet | None = None,
    work_dir: Path,
) -> BenchmarkReport:
    """Measure ``model`` (on CPU, fp32) on every backend ``cfg`` asks for that applies here.

    ``calibration`` (float (N, 3, 32, 32)) enables the int8 backend; without it, int8 is reported
    as skipped with ``calibration_missing`` as the reason. With ``test``, every backend's test
    accuracy and its agreement with PyTorch fp32 are measured too.
    """
    threads = cfg.threads or available_cores()
    wanted = cfg.backend_names()
    batch_sizes = cfg.batch_size_list()
    skipped: dict[str, str] = {}
    for name in wanted:
        if name.endswith("-cuda") and not torch.cuda.is_available():
            skipped[name] = "no CUDA GPU"
        elif name == "onnxruntime-int8" and calibration is None:
            skipped[name] = calibration_missing
    if len(skipped) == len(wanted):  # found out before the slow export and quantisation
        raise ConfigError("none of the backends can run here: "
                          + "; ".join(f"{name}: {reason}" for name, reason in skipped.items()))
    model = shipped_copy(model)
    fp32_path = export_onnx(model, work_dir / "model.onnx")
    int8_path = None
    if "onnxruntime-int8" in wanted and "onnxruntime-int8" not in skipped:
        int8_path = quantize_int8(fp32_path, work_dir / "model.int8.onnx", calibration)
    facts = ModelFacts(
        parameters=count_parameters(model),
        macs_per_image=count_macs(model),
        weight_bytes_fp32=onnx_weight_bytes(fp32_path),
        weight_bytes_int8=onnx_weight_bytes(int8_path) if int8_path else None,
    )

    backends: list[_TorchBackend | _OnnxBackend] = []
    for name in (name for name in wanted if name not in skipped):
        if name.startswith("pytorch"):
            device = torch.device("cuda" if name.endswith("-cuda") else "cpu")
            backends.append(_TorchBackend(name, model, device, threads))
        else:
            backends.append(_OnnxBackend(name, int8_path if name.endswith("int8") else fp32_path, threads))

    size, seconds = cfg.floor_matmul_size, cfg.seconds_per_repeat
    floor = ComputeFloor(
        matmul_size=size,
        threads=threads,
        fp32_macs_per_second=measure_matmul_rate("fp32", threads=threads, size=size, seconds=seconds),
        int8_macs_per_second=measure_matmul_rate("int8", threads=threads, size=size, seconds=seconds),
    )
    reference_logits = None
    test_images = None
    if test is not None:
        test_images = images_as_float(test)
        reference_logits = _TorchBackend("pytorch-fp32", model, torch.device("cpu"), threads).predict(test_images)

    # Every repeat is a full pass over all batch sizes and backends, with the backends of one batch
    # size timed back to back: a change of machine speed during the run then shows up in the
    # spread of every backend instead of skewing one backend's numbers, and the ratio of two
    # backends within one repeat compares measurements seconds apart.
    times: dict[tuple[int, int], list[list[float]]] = {}
    with _no_garbage_collection():  # one collection up front: each takes ~0.2 s with torch and ONNX loaded
        for repeat in range(cfg.repeats):
            for batch_size in batch_sizes:
                for index, backend in enumerate(backends):
                    with backend.timed_call(batch_size) as (call, synchronize):
                        _run_for(call, cfg.warmup_seconds, synchronize)
                        times.setdefault((index, batch_size), []).append(
                            _run_for(call, cfg.seconds_per_repeat, synchronize))
            log.info("repeat %d/%d of %d batch sizes x %d backends done", repeat + 1, cfg.repeats,
                     len(batch_sizes), len(backends))

    results = []
    for index, backend in enumerate(backends):
        latency = {
            batch_size: summarize_times(times[index, batch_size], batch_size=batch_size, threads=threads)
            for batch_size in batch_sizes
        }
        for batch_size, stats in latency.items():
            log.info("%-18s batch %4d: p50 %.3f ms, %.0f images/s", backend.name, batch_size, stats.p50_ms,
                     stats.images_per_second)
        agreement = None
        if test_images is not None:
            agreement = compare_logits(reference_logits, backend.predict(test_images), test.labels.numpy())
        results.append(BackendResult(backend.name, str(backend.device), backend.precision, latency,
                                     backend.note, agreement))

    return BenchmarkReport(
        model=label,
        facts=facts,
        threads=threads,
        batch_sizes=batch_sizes,
        repeats=cfg.repeats,
        backends=results,
        skipped=skipped,
        floor=floor,
        settings={"seconds_per_repeat": cfg.seconds_per_repeat, "warmup_seconds": cfg.warmup_seconds,
                  "calibration_images": None if calibration is None else len(calibration),
                  "test_images": None if test is None else len(test),
                  # The PyTorch backends' layout (contiguous in reports from before 2026-11-28, 1.4x slower).
                  "pytorch_memory_format": str(SHIPPED_MEMORY_FORMAT)},
        machine=machine_facts(),
    )


def machine_facts() -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cpu": cpu_name(),
        "cores": available_cores(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "python_version": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------
# Export with verification


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    int8_path: Path | None
    onnx_check: Agreement  # fp32 ONNX vs. PyTorch on the test split
    int8_check: Agreement | None
    weight_bytes_fp32: int
    weight_bytes_int8: int | None
    calibration_images: int | None

    def metrics(self) -> dict[str, float]:
        values = {
            "onnxruntime-fp32/top1_agreement": self.onnx_check.top1_agreement,
            "onnxruntime-fp32/max_abs_logit_diff": self.onnx_check.max_abs_logit_diff,
            "onnxruntime-fp32/test_accuracy": self.onnx_check.accuracy,
            "pytorch-fp32/test_accuracy": self.onnx_check.reference_accuracy,
            "weight_bytes_fp32": self.weight_bytes_fp32,
        }
        if self.int8_check is not None:
            values.update({
                "onnxruntime-int8/top1_agreement": self.int8_check.top1_agreement,
                "onnxruntime-int8/max_abs_logit_diff": self.int8_check.max_abs_logit_diff,
                "onnxruntime-int8/test_accuracy": self.int8_check.accuracy,
                "weight_bytes_int8": self.weight_bytes_int8,
            })
        return {k: float(v) for k, v in values.items() if v is not None}


def export_and_verify(
    model: nn.Module,
    out_dir: Path,
    *,
    test: ImageSet,
    calibration: np.ndarray | None = None,
    threads: int | None = None,
    publish: Callable[[ExportResult], Iterable[Path]] | None = None,
) -> ExportResult:
    """``out_dir/model.onnx`` (and ``model.int8.onnx`` with ``calibration``), checked on ``test``.

    Raises ``ExportError`` when the fp32 ONNX model's logits stray from PyTorch's by more than
    float rounding (``FP32_LOGIT_ATOL`` + ``FP32_LOGIT_RTOL`` × the largest |logit|). The files are written and checked in a staging
    folder inside ``out_dir`` and moved into place only when every check passed and ``publish``
    (given the staged result, e.g. to log its files; it returns any files it added beside them,
    which move too) returned, so a failed export leaves ``out_dir`` as it was; an older
    ``model.int8.onnx`` that this export does not replace is removed, since it belongs to another model.
    """
    threads = threads or available_cores()
    model = shipped_copy(model)
    out_dir = check_writable_folder(out_dir)
    check_file_targets(out_dir, EXPORTED_FILES)
    with output_folder(out_dir), tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as staging:
        staged = _export_and_verify_in(model, Path(staging), test=test, calibration=calibration, threads=threads)
        with deferred():  # published (e.g. logged into the model's run) and moved into place, or neither
            extra_files = list(publish(staged)) if publish else []
            _move_exported_files(Path(staging), out_dir, extra_files)
    return replace(
        staged,
        onnx_path=out_dir / "model.onnx",
        int8_path=out_dir / "model.int8.onnx" if staged.int8_path else None,
    )


EXPORTED_FILES = ("model.onnx", "model.int8.onnx")


def _move_exported_files(staging: Path, out_dir: Path, extra_files: list[Path]) -> None:
    """The checked files (and ``extra_files``, staged beside them) into ``out_dir``; an older int8
    file this export did not replace goes."""
    try:
        for name in EXPORTED_FILES:
            source = staging / name
            if source.exists():
                os.replace(source, out_dir / name)
            elif (out_dir / name).exists():
                log.info("removing %s, left by an earlier export with --int8", out_dir / name)
                (out_dir / name).unlink()
        for source in extra_files:
            os.replace(source, out_dir / source.name)
    except OSError as error:
        raise ExportError(f"cannot write to {out_dir}: {error.strerror or error} ({error.filename})") from None


def _export_and_verify_in(
    model: nn.Module, out_dir: Path, *, test: ImageSet, calibration: np.ndarray | None, threads: int,
) -> ExportResult:
    images, labels = images_as_float(test), test.labels.numpy()
    reference = _TorchBackend("pytorch-fp32", model, torch.device("cpu"), threads).predict(images)

    onnx_path = export_onnx(model, out_dir / "model.onnx")
    onnx_check = compare_logits(reference, _OnnxBackend("onnxruntime-fp32", onnx_path, threads).predict(images), labels)
    tolerance = FP32_LOGIT_ATOL + FP32_LOGIT_RTOL * float(np.abs(reference).max(initial=0.0))
    if not onnx_check.max_abs_logit_diff <= tolerance:
        raise ExportError(
            f"the ONNX export disagrees with the PyTorch model (nothing written): max |Δlogit| {onnx_check.max_abs_logit_diff:.3g} "
            f"> {tolerance:.3g} (top-1 agreement {onnx_check.top1_agreement:.2%})"
        )
    log.info("ONNX fp32: top-1 agreement %.2f%%, max |Δlogit| %.3g on %d test images",
             100 * onnx_check.top1_agreement, onnx_check.max_abs_logit_diff, len(labels))

    int8_path = int8_check = None
    if calibration is not None:
        int8_path = quantize_int8(onnx_path, out_dir / "model.int8.onnx", calibration)
        int8_check = compare_logits(
            reference, _OnnxBackend("onnxruntime-int8", int8_path, threads).predict(images), labels
        )
        log.info("ONNX int8: test accuracy %.2f%% (fp32 %.2f%%), top-1 agreement %.2f%%",
                 100 * int8_check.accuracy, 100 * int8_check.reference_accuracy, 100 * int8_check.top1_agreement)
    return ExportResult(
        onnx_path=onnx_path,
        int8_path=int8_path,
        onnx_check=onnx_check,
        int8_check=int8_check,
        weight_bytes_fp32=onnx_weight_bytes(onnx_path),
        weight_bytes_int8=onnx_weight_bytes(int8_path) if int8_path else None,
        calibration_images=None if calibration is None else len(calibration),
    )

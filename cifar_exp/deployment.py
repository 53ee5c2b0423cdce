"""Tracked inference flows: benchmark, export and the accuracy–latency Pareto front as MLflow runs.

As in ``experiment``: the tracking store, the config, the model, the data and the output paths are
checked before a run is opened, and the slow measuring happens before it too, so that bad input
leaves nothing behind; once a run is open, a failure marks it FAILED (``tracking.start_run``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_exp import tracking
from cifar_exp.config import BACKENDS, BenchmarkConfig, DataConfig, ExportConfig, TrackingConfig, TrainConfig
from cifar_exp.data import ImageSet, is_held_out_test_folder, load_dataset, load_test_set
from cifar_exp.errors import ConfigError, DataError, ExportError, TrackingError
from cifar_exp.inference import (
    BenchmarkReport,
    ExportResult,
    calibration_images,
    check_class_count,
    check_classifier,
    check_file_targets,
    check_writable_folder,
    export_and_verify,
    output_folder,
    run_benchmark,
)
from cifar_exp.models import NUM_CLASSES
from cifar_exp.reports import TradeoffPoint, pareto_front, plot_pareto, write_pareto_csv
from cifar_exp.train import build_shipped_classifier

log = logging.getLogger(__name__)

RUN_KIND = "run_kind"  # tag that tells benchmark / export / pareto runs from training runs
EXPORT_CHECKS = "export_checks.json"  # written by `export` beside the ONNX files, and logged with them
EXPORTED_TAG = "onnx_exported"  # on the run that logged an export's files: fp32 or int8


@dataclass(frozen=True)
class BenchmarkOutcome:
    run_id: str
    report: BenchmarkReport
    json_path: Path


@dataclass(frozen=True)
class ExportOutcome:
    run_id: str
    result: ExportResult
    logged_into_source_run: bool  # else into a new run linked by the tag source_run_id


@dataclass(frozen=True)
class ParetoOutcome:
    run_id: str
    points: list[TradeoffPoint]
    front: np.ndarray  # (len(points),) bool: on the accuracy / batch-1 latency front


def load_classifier(model_uri: str) -> tuple[nn.Module, int]:
    """The logged model behind ``model_uri`` on CPU and its number of classes, or a TrackingError."""
    model = tracking.load_model(model_uri)
    return model, check_classifier(model, model_uri)


# --------------------------------------------------------------------------------------------------
# benchmark


def benchmark_and_track(
    train_cfg: TrainConfig, bench: BenchmarkConfig, data_cfg: DataConfig, tracking_cfg: TrackingConfig
) -> BenchmarkOutcome:
    """Benchmark ``bench.model_uri`` (or ``train_cfg``'s model, with its width knobs, untrained) and
    log it as a new run.

    Test accuracy per backend is measured only for a logged model (untrained weights have none
    worth reporting); int8 is calibrated on training images when the dataset can be loaded.
    """
    check_model_choice(train_cfg, bench)
    tracking.check_tracking_store()
    tracking.check_run_target(tracking_cfg.experiment_name)
    json_path = Path(bench.output).expanduser()
    check_writable_folder(json_path.parent)
    check_file_targets(json_path.parent, (json_path.name,))
    source_run_id = None
    if bench.model_uri:
        model, classes = load_classifier(bench.model_uri)
        label = bench.model_uri
        source_run_id = tracking.model_source_run(bench.model_uri)
    else:
        model = build_shipped_classifier(train_cfg, NUM_CLASSES)
        knobs = [f"{name} {value}" for name, value in (("widths", train_cfg.widths), ("hidden", train_cfg.hidden))
                 if value]
        classes, label = NUM_CLASSES, train_cfg.model + (f" ({', '.join(knobs)})" if knobs else "")
    data = _benchmark_data(bench, data_cfg, classes, trained=bench.model_uri is not None, source_run_id=source_run_id)

    with tempfile.TemporaryDirectory() as tmp:
        report = run_benchmark(model, label=label, cfg=bench, calibration=data.calibration,
                               calibration_missing=data.missing, test=data.test, work_dir=Path(tmp))
    document = {**report.to_dict(), "model_uri": bench.model_uri, "source_run_id": source_run_id}
    devices = sorted({torch.device(b.device).type for b in report.backends})  # e.g. ["cpu", "cuda"]
    tags = {
        **tracking.environment_tags(torch.device("cpu"), None),  # device_name: the CPU's
        "device": ",".join(devices),
        # The GPU is named where a CUDA backend was measured.
        **({"cuda_device_name": torch.cuda.get_device_name()} if "cuda" in devices else {}),
        RUN_KIND: "benchmark",
        "model": label,
        "model_uri": bench.model_uri or "none (untrained)",
        "source_run_id": source_run_id or "none",
        "torch_threads": str(report.threads),
        # Eager latencies of reports from before 2026-11-28 (no such tag) were timed contiguous, 1.4x slower.
        "pytorch_memory_format": report.settings["pytorch_memory_format"],
        "best_backend_batch1": report.best(1).name if 1 in report.batch_sizes else "n/a",
    }
    # Written beside --output first, and put in its place once the run is logged: a full disk fails
    # before the run opens, and a failed run leaves no report behind (nor a folder made for it).
    with output_folder(json_path.parent):
        staged = _stage_text(json_path.parent, json_path.name, json.dumps(document, indent=2))
        run_id = None
        try:
            with tracking.start_run(tracking_cfg.experiment_name, tracking_cfg.run_name, tags=tags) as run_id:
                tracking.log_params({**{f"benchmark.{k}": v for k, v in asdict(bench).items()},
                                     **({} if bench.model_uri else {"train.model": train_cfg.model,
                                                                    "train.widths": train_cfg.widths,
                                                                    "train.hidden": train_cfg.hidden}),
                                     "data.data_dir": data_cfg.data_dir})
                tracking.log_datasets(data.datasets(), data.source)  # what the accuracies and int8 came from
                tracking.log_metrics(benchmark_metrics(report))
                tracking.log_dict(document, "benchmark.json")
                tracking.log_text(report.table() + "\n", "benchmark.txt")
                tracking.log_table(benchmark_rows(report), "benchmark_table.json")
        except BaseException:
            if tracking.run_finished(run_id):
                _move_into_place(staged, json_path)  # a signal held back as the run closed FINISHED: kept
            else:
                staged.unlink(missing_ok=True)
            raise
        _move_into_place(staged, json_path)
    return BenchmarkOutcome(run_id, report, json_path)


def _stage_text(folder: Path, name: str, text: str) -> Path:
    """``text`` in a new hidden file of ``folder`` (to be moved to ``folder / name``), or an ExportError."""
    # Opened as any new file is (a temporary file's would be private, 0600), under a name no one else uses.
    staged = folder / f".{name}-{uuid.uuid4().hex}"
    try:
        with open(staged, "x") as file:
            file.write(text)
    except OSError as error:
        staged.unlink(missing_ok=True)
        raise ExportError(f"cannot write {folder / name}: {error.strerror or error}") from None
    return staged


def _move_into_place(staged: Path, path: Path) -> None:
    try:
        os.replace(staged, path)
    except OSError as error:
        staged.unlink(missing_ok=True)
        raise ExportError(f"cannot write {path}: {error.strerror or error}") from None


def check_model_choice(train_cfg: TrainConfig, bench: BenchmarkConfig) -> None:
    """Refuse a logged model (``--model-uri``) together with an architecture to build: another
    ``--model`` than the default (the MLproject's ``benchmark`` entry point always passes one), or
    ``--widths``/``--hidden``."""
    if bench.model_uri and (train_cfg.widths.strip() or train_cfg.hidden):
        raise ConfigError("--widths/--hidden shape an architecture built by name (--model); "
                          f"the model at --model-uri {bench.model_uri} has its own")
    if bench.model_uri and train_cfg.model != TrainConfig().model:
        raise ConfigError(f"--model {train_cfg.model} names an architecture to build, --model-uri "
                          f"{bench.model_uri} a logged model: give one of them")


@dataclass(frozen=True)
class CheckData:
    """The images a benchmark or an export checks a model on, and where they came from."""

    test: ImageSet | None = None  # a trained model's test accuracy is measured on it
    calibration_source: ImageSet | None = None  # the training images int8's calibration images are drawn from
    calibration: np.ndarray | None = None  # float (N, 3, 32, 32): the calibration images
    source: str = ""  # e.g. "imagefolder:/abs/dir"
    missing: str = ""  # why there is no calibration, where it was wanted but the dataset is absent

    def datasets(self) -> dict[str, ImageSet]:
        """The sets to record as the run's dataset inputs (contexts ``testing`` and ``calibration``)."""
        return {split: data for split, data in (("test", self.test), ("calibration", self.calibration_source))
                if data is not None}

    def identity(self) -> dict[str, str | None]:
        """What ``export_checks.json`` records of the data: the folder (absolute) and the sets' digests."""
        return {"data_dir": self.source.split(":", 1)[-1],
                "test_digest": self.test.digest() if self.test is not None else None,
                "calibration_source_digest": self.calibration_source.digest()
                if self.calibration_source is not None else None}


def _benchmark_data(
    bench: BenchmarkConfig, data_cfg: DataConfig, classes: int, *, trained: bool, source_run_id: str | None = None
) -> CheckData:
    """The images the benchmark needs: test images for a logged model's accuracy, training images to
    calibrate int8 on. ``source_run_id``: the run that logged a trained model, as
    ``tracking.model_source_run`` found it."""
    wants_int8 = "onnxruntime-int8" in bench.backend_names()
    if not (wants_int8 or trained):
        return CheckData()
    try:
        train, test, names, source = _load_for_checks(data_cfg, calibrate=wants_int8)
    except DataError as error:
        asked_for = data_cfg.data_dir != DataConfig().data_dir or data_cfg.download
        if asked_for or Path(data_cfg.data_dir).expanduser().exists():  # asked for, or there but broken
            if wants_int8 and is_held_out_test_folder(data_cfg.data_dir):
                raise DataError(f"the int8 backend calibrates on training images (--backends without "
                                f"onnxruntime-int8 measures without them): {error}") from None
            raise
        reason = f"no calibration images ({error})"
        lost = "no test accuracy, " if trained else ""
        log.warning("measuring without the dataset (%s--data-dir to give one): %s", lost, reason)
        return CheckData(missing=reason)
    if trained:  # its accuracy is measured; an untrained architecture only takes calibration images
        check_class_count(classes, names, data_cfg.data_dir)
        tracking.check_trained_classes(bench.model_uri, names, data_cfg.data_dir, source_run_id=source_run_id)
    calibration = calibration_images(train, bench.calibration_images) if wants_int8 else None
    return CheckData(test=test if trained else None, calibration_source=train, calibration=calibration,
                     source=source)


def _load_for_checks(
    data_cfg: DataConfig, *, calibrate: bool
) -> tuple[ImageSet | None, ImageSet, tuple[str, ...], str]:
    """(training images where ``calibrate``, test split, class names, source): without calibration the
    test split alone, so that a held-out test folder shipped without train/ is enough, as for evaluate."""
    if calibrate:
        return load_dataset(data_cfg)
    test, names, source = load_test_set(data_cfg)
    return None, test, names, source


def benchmark_metrics(report: BenchmarkReport) -> dict[str, float]:
    """The report as MLflow metrics: ``<backend>/b<batch>/p50_ms``, ``<backend>/test_accuracy``, ..."""
    facts, floor = report.facts, report.floor
    metrics: dict[str, float | None] = {
        "parameters": facts.parameters,
        "macs_per_image": facts.macs_per_image,
        "weight_bytes_fp32": facts.weight_bytes_fp32,
        "weight_bytes_int8": facts.weight_bytes_int8,
        "matmul_fp32_macs_per_second": floor.fp32_macs_per_second,
        "matmul_int8_macs_per_second": floor.int8_macs_per_second,
        "compute_floor_fp32_ms": floor.floor_ms(facts.macs_per_image, "fp32"),
        "compute_floor_int8_ms": floor.floor_ms(facts.macs_per_image, "int8"),
    }
    for result in report.backends:
        for batch_size, stats in result.latency.items():
            prefix = f"{result.name}/b{batch_size}"
            metrics.update({
                f"{prefix}/p50_ms": stats.p50_ms,
                f"{prefix}/p90_ms": stats.p90_ms,
                f"{prefix}/p99_ms": stats.p99_ms,
                f"{prefix}/mean_ms": stats.mean_ms,
                f"{prefix}/images_per_second": stats.images_per_second,
                f"{prefix}/spread": stats.spread,
            })
        if 1 in result.latency:
            metrics[f"{result.name}/fps"] = result.latency[1].images_per_second
            metrics[f"{result.name}/floor_ratio"] = report.floor_ratio(result, 1)
        if result.agreement is not None:
            metrics.update({
                f"{result.name}/test_accuracy": result.agreement.accuracy,
                f"{result.name}/top1_agreement": result.agreement.top1_agreement,
                f"{result.name}/max_abs_logit_diff": result.agreement.max_abs_logit_diff,
            })
    if 1 in report.batch_sizes:
        metrics["best/b1/p50_ms"] = report.best(1).latency[1].p50_ms
    return {key: float(value) for key, value in metrics.items() if value is not None}


def benchmark_rows(report: BenchmarkReport) -> list[dict[str, Any]]:
    """One row per backend and batch size, for MLflow's table view."""
    return [
        {
            "backend": result.name,
            "batch_size": batch_size,
            "p50_ms": stats.p50_ms,
            "p90_ms": stats.p90_ms,
            "p99_ms": stats.p99_ms,
            "images_per_second": stats.images_per_second,
            "spread": stats.spread,
            "test_accuracy": result.agreement.accuracy if result.agreement else None,
        }
        for result in report.backends
        for batch_size, stats in result.latency.items()
    ]


# --------------------------------------------------------------------------------------------------
# export


def export_and_track(export: ExportConfig, data_cfg: DataConfig, tracking_cfg: TrackingConfig) -> ExportOutcome:
    """Export ``export.model_uri`` to ONNX (and int8), verify it on the test split, log the files.

    The files and checks go into the run that logged the model when that run was tested on the same
    test images; otherwise (and under ``mlflow run``, or when that run is unknown) into a new run tagged
    with the model URI and source run, which records the data as dataset inputs.
    """
    tracking.check_tracking_store()
    out_dir = check_writable_folder(Path(export.output_dir))
    check_file_targets(out_dir, (EXPORT_CHECKS,))
    model, classes = load_classifier(export.model_uri)
    source_run_id = tracking.model_source_run(export.model_uri)
    # MLflow refuses to log into a deleted run: the files then go into a new run, as for an unknown one.
    # So do those of a second export: the first one's files and metrics (int8 among them, perhaps on
    # another test split) would stay beside them, and MLflow cannot remove them.
    into_source_run = (bool(source_run_id) and not tracking.inside_project_run()
                       and tracking.run_is_active(source_run_id) and not _exported_before(source_run_id))
    if not into_source_run:
        tracking.check_run_target(tracking_cfg.experiment_name)
    try:
        train, test, names, source = _load_for_checks(data_cfg, calibrate=export.int8)
    except DataError as error:
        need = "--int8 needs training images to calibrate on" if export.int8 else \
            "export verifies the model on the test split"
        raise DataError(f"{need}: {error}") from None
    check_class_count(classes, names, data_cfg.data_dir)
    tracking.check_trained_classes(export.model_uri, names, data_cfg.data_dir, source_run_id=source_run_id)
    calibration = calibration_images(train, export.calibration_images) if export.int8 else None
    data = CheckData(test=test, calibration_source=train, calibration=calibration, source=source)
    if into_source_run and tracking.dataset_digest(source_run_id, "test") != test.digest():
        # Its test_accuracy would stand beside the files' test accuracies with nothing to tell which
        # images either came from; a new run records its own (as the dataset input `testing`).
        tracking.check_run_target(tracking_cfg.experiment_name)
        log.info("run %s was not tested on the test images of %s: the export is logged into a new run",
                 source_run_id, data_cfg.data_dir)
        into_source_run = False
    tags = {EXPORTED_TAG: "int8" if calibration is not None else "fp32"}
    run_id = source_run_id if into_source_run else None  # a new run's id once it is opened

    def publish(staged: ExportResult) -> list[Path]:
        nonlocal run_id
        # Runs on the checked files while they are still staged: a failure to log them leaves
        # --output-dir as it was (and a new run FAILED).
        checks = staged.onnx_path.parent / EXPORT_CHECKS
        document = json.dumps({
            "model_uri": export.model_uri,
            "onnx_fp32": staged.onnx_check.to_dict(),
            "onnx_int8": staged.int8_check.to_dict() if staged.int8_check else None,
            "weight_bytes_fp32": staged.weight_bytes_fp32,
            "weight_bytes_int8": staged.weight_bytes_int8,
            "calibration_images": staged.calibration_images,
            **data.identity(),
        }, indent=2)
        try:
            checks.write_text(document)
        except OSError as error:
            raise ExportError(f"cannot write {out_dir / EXPORT_CHECKS}: {error.strerror or error}") from None
        files = [path for path in (staged.onnx_path, staged.int8_path, checks) if path is not None]
        if into_source_run:
            unused = [flag for flag, given in (("--experiment-name", tracking_cfg.experiment_name
                                                != TrackingConfig().experiment_name),
                                               ("--run-name", tracking_cfg.run_name)) if given]
            if unused:
                log.warning("%s not used: the files are logged into the model's own run %s",
                            " and ".join(unused), source_run_id)
            tracking.add_to_run(source_run_id, metrics=staged.metrics(), tags=tags,
                                artifacts={path: "onnx" for path in files})
        else:
            run_tags = {**tags, RUN_KIND: "export", "model_uri": export.model_uri,
                        "source_run_id": source_run_id or "unknown"}
            with tracking.start_run(tracking_cfg.experiment_name, tracking_cfg.run_name, tags=run_tags) as run_id:
                tracking.log_params({**{f"export.{k}": v for k, v in asdict(export).items()},
                                     "data.data_dir": data_cfg.data_dir})
                tracking.log_datasets(data.datasets(), data.source)
                tracking.log_metrics(staged.metrics())
                for path in files:
                    tracking.log_artifact(path, "onnx")
        return [checks]

    result = export_and_verify(model, out_dir, test=test, calibration=calibration, publish=publish)
    return ExportOutcome(run_id, result, logged_into_source_run=into_source_run)


def _exported_before(run_id: str) -> bool:
    record = tracking.get_run(run_id)
    if record is not None and EXPORTED_TAG in record.tags:
        log.info("run %s holds an earlier export: this one is logged into a new run", run_id)
        return True
    return False


# --------------------------------------------------------------------------------------------------
# pareto


def tradeoff_points(runs: list[tracking.RunRecord]) -> list[TradeoffPoint]:
    """(accuracy, batch-1 latency, parameters) of every backend of every finished benchmark run.

    Accuracy is the benchmark's own measurement of that backend on the test split; a benchmark run
    without one borrows, for its fp32 backends, the test accuracy of the run that logged the model:
    its one-pass accuracy where that run evaluated with mirror TTA, since the latency beside it is
    one forward pass.
    """
    points = []
    sources: dict[str, tracking.RunRecord | None] = {}
    for run in runs:
        if run.tags.get(RUN_KIND) != "benchmark" or run.status != "FINISHED":
            continue
        source_id = run.tags.get("source_run_id", "none")
        if source_id not in sources:
            sources[source_id] = tracking.get_run(source_id) if source_id != "none" else None
        source = sources[source_id]
        for backend in BACKENDS:
            latency = run.metrics.get(f"{backend}/b1/p50_ms")
            accuracy = run.metrics.get(f"{backend}/test_accuracy")
            if accuracy is None and source is not None and "fp32" in backend:
                # Not an export's metrics in that run: those may come from another test folder.
                accuracy = _one_pass_test_accuracy(source)
            if latency is None or accuracy is None:
                continue
            label = run.tags.get("model", run.run_name)
            if source is not None:
                label = f"{source.run_name} ({source.tags.get('model', label)})"
            points.append(TradeoffPoint(label=label, backend=backend, accuracy=accuracy, latency_ms=latency,
                                        parameters=int(run.metrics["parameters"]), run_id=run.run_id))
    return points


def _one_pass_test_accuracy(run: tracking.RunRecord) -> float | None:
    """A training or evaluate run's test accuracy of one forward pass per image (``--tta`` logs it apart)."""
    return run.metrics.get("test_accuracy_without_tta", run.metrics.get("test_accuracy"))


def pareto_and_track(tracking_cfg: TrackingConfig) -> ParetoOutcome:
    """Accuracy vs. batch-1 latency (and parameters) of an experiment's benchmarked models.

    Logs ``plots/pareto.png`` and ``pareto.csv`` into a new run of the same experiment.
    """
    tracking.check_tracking_store()
    name = tracking_cfg.experiment_name
    points = tradeoff_points(tracking.find_runs(name))
    if not points:
        raise TrackingError(
            f"experiment {name!r} has no finished run with both a test accuracy and a benchmark: "
            "run `cifar-exp benchmark --model-uri ... --data-dir ...` first"
        )
    front = pareto_front([p.accuracy for p in points], [p.latency_ms for p in points])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "plots").mkdir()
        plot_pareto(points, folder / "plots" / "pareto.png")
        write_pareto_csv(points, front, folder / "pareto.csv")
        with tracking.start_run(name, tracking_cfg.run_name or "pareto", tags={RUN_KIND: "pareto"}) as run_id:
            tracking.log_metrics({"points": len(points), "front_points": int(front.sum())})
            tracking.log_artifacts(folder)
    return ParetoOutcome(run_id, points, front)

"""The ``cifar-exp`` command line. Options are generated from the config dataclasses, one per field."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shlex
import signal
import sys
import typing
from collections.abc import Callable, Iterable
from typing import Any

import click
from click.core import ParameterSource

from cifar_exp import interrupts
from cifar_exp.config import (
    RECIPES,
    BenchmarkConfig,
    DataConfig,
    EvaluateConfig,
    ExperimentConfig,
    ExportConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
    recipe_config,
)
from cifar_exp.errors import CifarExpError

if typing.TYPE_CHECKING:
    from cifar_exp.tune import TrialSummary

CONFIG_SECTIONS = {"data": DataConfig, "train": TrainConfig, "tracking": TrackingConfig}
TUNE_SECTIONS = {**CONFIG_SECTIONS, "tune": TuneConfig}  # the options of `tune`
EVALUATE_SECTIONS = {**CONFIG_SECTIONS, "evaluate": EvaluateConfig}
# Loggers kept at WARNING: MLflow and Alembic are chatty at INFO on every store access, the ONNX
# exporter and quantiser on every graph pass they run.
CHATTY_LOGGERS = ("alembic", "mlflow.store", "mlflow.tracking", "mlflow.utils", "mlflow.models",
                  "onnxscript", "onnx_ir", "onnxruntime")


class WholeNumber(click.ParamType):
    """A count: an integer, also written as a whole float (``5.0``), which is how MLflow passes the
    counts an MLproject declares (it has no integer parameter type)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not number.is_integer():  # also NaN and the infinities
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(number)


def _click_option(cls: type, field: dataclasses.Field) -> Callable:
    hint = typing.get_type_hints(cls)[field.name]
    name = field.name.replace("_", "-")
    choices = field.metadata["choices"]
    if field.name == "model":
        from cifar_exp.models import model_names

        choices = model_names()
    kwargs: dict[str, Any] = {"default": field.default, "help": field.metadata["help"], "show_default": True}
    if hint is bool:
        return click.option(f"--{name}/--no-{name}", field.name, **kwargs)
    if choices:
        kwargs["type"] = click.Choice(choices)
    else:
        kwargs["type"] = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        if kwargs["type"] is int:
            kwargs["type"] = WholeNumber()
    return click.option(f"--{name}", field.name, **kwargs)


def config_options(
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    sections: dict[str, type] = CONFIG_SECTIONS,
) -> Callable:
    """Add one click option per config field (optionally only some) to a command."""
    wanted = set(only) if only is not None else None

    def decorate(command: Callable) -> Callable:
        for cls in reversed(sections.values()):
            for field in reversed(dataclasses.fields(cls)):
                if field.name in exclude or (wanted is not None and field.name not in wanted):
                    continue
                command = _click_option(cls, field)(command)
        return command

    return decorate


def build_config(options: dict[str, Any]) -> ExperimentConfig:
    """The ExperimentConfig for parsed options; fields not given keep their defaults.

    A ``--recipe`` supplies the values of the training options not given on the command line.
    """
    values = dict(options)
    recipe = RECIPES.get(values.get("recipe", "seed"), {})
    given = _explicit_options(options)
    values.update({k: v for k, v in recipe.items() if k not in given})
    sections = {
        section: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
        for section, cls in CONFIG_SECTIONS.items()
    }
    return ExperimentConfig(**sections)


def train_command(cfg: ExperimentConfig, trial: TrialSummary) -> str:
    """``cifar-exp train ...`` that trains ``trial`` again: the data and train options of the study's
    ``cfg`` that differ from their defaults (or its recipe's), then the trial's searched settings."""
    words = ["cifar-exp", "train"]
    if cfg.train.recipe != TrainConfig().recipe:
        words += ["--recipe", cfg.train.recipe]
    given_elsewhere = {"recipe", *trial.train_fields()}  # --recipe comes first, the trial's settings last
    for section, defaults in ((cfg.data, DataConfig()), (cfg.train, recipe_config(cfg.train.recipe))):
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if field.name in given_elsewhere or value == getattr(defaults, field.name):
                continue
            name = field.name.replace("_", "-")
            if isinstance(value, bool):
                words.append(f"--{name}" if value else f"--no-{name}")
            else:
                words += [f"--{name}", str(value)]
    return f"{shlex.join(words)} {trial.train_options()}"


def build_tune_config(options: dict[str, Any]) -> TuneConfig:
    return TuneConfig(**{f.name: options[f.name] for f in dataclasses.fields(TuneConfig) if f.name in options})


def _explicit_options(options: dict[str, Any]) -> set[str]:
    """Names of the options set on the command line (or by environment), not left at their default."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return set(options)
    return {
        name for name in options
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    }


def reports_errors(command: Callable) -> Callable:
    """Turn the project's errors into click's one-line ``Error: ...`` and a non-zero exit.

    An interrupt (Ctrl-C, SIGTERM, SIGHUP) prints one line saying so and exits with status 128 + the
    signal's number (130, 143, 129), which ``run`` turns into death by that signal.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except BaseException as error:
            interrupt = interrupts.interrupt_behind(error)
            if interrupt is None and isinstance(error, CifarExpError):
                raise click.ClickException(str(error)) from None
            if interrupt is None:
                raise
        signum = interrupts.signal_of(interrupt)
        click.echo(f"Aborted: {signal.Signals(signum).name}.", err=True)
        raise click.exceptions.Exit(128 + signum) from None

    return wrapper


def _test_accuracy(test: Any) -> str:
    """``test accuracy 0.8123``, and with flip TTA also the one-pass accuracy (what an export computes)."""
    if test.one_pass_accuracy is None:
        return f"test accuracy {test.accuracy:.4f}"
    return f"test accuracy {test.accuracy:.4f} with flip TTA ({test.one_pass_accuracy:.4f} one pass)"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="cifar-exp")
def main(verbose: bool) -> None:
    """Train, track, tune and benchmark small CIFAR-10 CNNs (MLflow + Optuna)."""
    # A terminated process unwinds like Ctrl-C, so its MLflow run is closed as KILLED, not left RUNNING.
    interrupts.install_handlers()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in CHATTY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Plots go to files only: no window, with or without a display. (The library leaves the backend to
    # its Python callers; pyplot, which Optuna's plots draw through, is imported only after this.)
    os.environ["MPLBACKEND"] = "agg"
    # A stale font cache makes every plot warn, font by font, that it falls back to DejaVu Sans.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    if not sys.stderr.isatty():  # MLflow's download progress bars would fill logs (and one-line errors)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@main.command()
@config_options()
@reports_errors
def train(**options: Any) -> None:
    """Train a model (the seed report's recipe by default) as one MLflow run."""
    from cifar_exp.experiment import train_and_track

    cfg = build_config(options)
    outcome = train_and_track(cfg, progress=sys.stderr.isatty())
    click.echo(f"run {outcome.run_id}: {_test_accuracy(outcome.test)} "
               f"(loss {outcome.test.loss:.4f}) after {outcome.fit.train_seconds:.1f}s of training")
    if outcome.model_version:
        status = "champion" if outcome.champion else "not champion"
        click.echo(f"registered models:/{cfg.registered_model_name}/{outcome.model_version} ({status})")
    else:
        click.echo(f"model logged as {outcome.model_uri} (not registered)")


@main.command()
@config_options(sections=EVALUATE_SECTIONS, only=("model_uri", "data_dir", "download", "cache_dir", "device",
                                                   "eval_batch_size", "tta", "experiment_name", "run_name"))
@reports_errors
def evaluate(**options: Any) -> None:
    """Evaluate a logged model on the test split, with the full report, in a new run."""
    from cifar_exp.experiment import evaluate_and_track

    evaluated = _section(EvaluateConfig, options)
    outcome = evaluate_and_track(evaluated, build_config(options))
    click.echo(f"run {outcome.run_id}: {evaluated.model_uri} {_test_accuracy(outcome.test)} "
               f"(macro F1 {outcome.test_metrics.macro()['macro_f1']:.4f}, {len(outcome.test.labels)} images)")


@main.command()
@config_options(sections=TUNE_SECTIONS, exclude=("val_on_test",))
@reports_errors
def tune(**options: Any) -> None:
    """Search lr and its decay with Optuna: one parent MLflow run, a nested run per trial.

    The objective is the validation accuracy (split carved from train, one pass per image even with
    --tta) after --epochs epochs.
    The decay is searched with --schedule exp only (with cosine or onecycle, lr alone is). The
    baseline trial (--lr, and --lr-decay where searched) runs first; every other option is train's. Workers that
    share --storage and --study-name share the study. With --objectives accuracy,latency the conv
    widths (and hidden size) are searched too, the trained model's batch-1 CPU latency is minimised
    as well, and the Pareto set is printed and logged.
    """
    from cifar_exp.tune import tune as run_tune

    cfg = build_config(options)
    tune_cfg = build_tune_config(options)
    outcome = run_tune(cfg, tune_cfg, report=lambda line: click.echo(line, err=True),
                       progress=sys.stderr.isatty())
    states = ", ".join(f"{sum(t.state == s for t in outcome.trials)} {s.lower()}"
                       for s in ("COMPLETE", "PRUNED", "FAIL"))
    click.echo(f"run {outcome.run_id}: study {outcome.study_name} ({outcome.storage}), "
               f"{len(outcome.trials)} trials run here: {states}")
    best, baseline = outcome.best, outcome.baseline
    if best is None:
        click.echo("no trial has completed yet: no best parameters")
    elif tune_cfg.multi_objective:
        click.echo(f"Pareto set: {len(outcome.pareto)} trials, fastest first")
        for trial in outcome.pareto:
            click.echo(f"  trial {trial.number}: val_accuracy {trial.value:.4f}, latency {trial.latency_ms:.3f} ms, "
                       f"{trial.parameter_count:,} parameters; train with "
                       f"{train_command(cfg, trial)}")
    else:
        click.echo(f"best: trial {best.number}, {best.searched()}, val_accuracy {best.value:.4f}")
    if baseline is not None and baseline.value is not None:
        gain = f" ({best.value - baseline.value:+.4f} for the best)" if best and not tune_cfg.multi_objective else ""
        latency = f", latency {baseline.latency_ms:.3f} ms" if baseline.latency_ms is not None else ""
        click.echo(f"baseline: trial {baseline.number}, {baseline.searched()}, "
                   f"val_accuracy {baseline.value:.4f}{latency}{gain}")
    elif baseline is not None:
        click.echo(f"baseline: trial {baseline.number} {baseline.state} {baseline.reason or ''}".rstrip())
    if outcome.retrained is not None:
        retrained = outcome.retrained
        click.echo(f"retrained best as run {retrained.run_id}: {_test_accuracy(retrained.test)}")
        if retrained.model_version:
            status = "champion" if retrained.champion else "not champion"
            click.echo(f"registered models:/{cfg.registered_model_name}/{retrained.model_version} ({status})")


@main.command()
def models() -> None:
    """List the model architectures with their parameter counts (as shipped; and while training, where more)."""
    from cifar_exp.models import NUM_CLASSES, model_names
    from cifar_exp.train import parameter_counts

    for name in model_names():
        shipped, trained = parameter_counts(TrainConfig(model=name), NUM_CLASSES)
        extra = f" ({trained:,} while training)" if trained != shipped else ""
        click.echo(f"{name:<12} {shipped:>10,} parameters{extra}")


# --- Inference: benchmark, export, pareto ---------------------------------------------------------

BENCHMARK_SECTIONS = {"train": TrainConfig, "data": DataConfig, "tracking": TrackingConfig,
                      "benchmark": BenchmarkConfig}
EXPORT_SECTIONS = {"data": DataConfig, "tracking": TrackingConfig, "export": ExportConfig}
DATA_AND_RUN_OPTIONS = ("data_dir", "download", "cache_dir", "experiment_name", "run_name")


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _section(cls: type, options: dict[str, Any]) -> Any:
    return cls(**{name: options[name] for name in _fields(cls) if name in options})


@main.command()
@config_options(sections=BENCHMARK_SECTIONS,
                only=("model", "widths", "hidden", *DATA_AND_RUN_OPTIONS, *_fields(BenchmarkConfig)))
@reports_errors
def benchmark(**options: Any) -> None:
    """Measure a model's inference speed on every backend, as a new MLflow run.

    Batch-1 latency p50/p90/p99 and FPS, throughput at each batch size, parameters, MACs and
    weight bytes, for PyTorch eager fp32 and bf16 autocast, ONNX Runtime fp32 and int8 (calibrated
    on --data-dir's training images) and PyTorch on CUDA where a GPU is present. With --model-uri
    and a dataset, each backend's test accuracy too. Prints a table and writes --output (JSON).
    """
    from cifar_exp.deployment import benchmark_and_track

    cfg = build_config(options)
    outcome = benchmark_and_track(cfg.train, _section(BenchmarkConfig, options), cfg.data, cfg.tracking)
    click.echo(outcome.report.table())
    click.echo(f"run {outcome.run_id}: report written to {outcome.json_path}")


@main.command()
@config_options(sections=EXPORT_SECTIONS, only=(*DATA_AND_RUN_OPTIONS, *_fields(ExportConfig)))
@reports_errors
def export(**options: Any) -> None:
    """Export a logged model to ONNX (dynamic batch axis) and, with --int8, to int8.

    Each file is verified on --data-dir's test split (top-1 agreement with PyTorch, max |Δlogit|,
    test accuracy) and logged under onnx/ in the run that logged the model (in a new run, which records
    the data, where that one was tested on other test images, holds an earlier export, is deleted or
    unknown, or under `mlflow run`).
    """
    from cifar_exp.deployment import export_and_track

    cfg = build_config(options)
    outcome = export_and_track(_section(ExportConfig, options), cfg.data, cfg.tracking)
    result = outcome.result
    for path, check in ((result.onnx_path, result.onnx_check), (result.int8_path, result.int8_check)):
        if path is not None:
            click.echo(f"{path}: test accuracy {check.accuracy:.2%} (PyTorch {check.reference_accuracy:.2%}), "
                       f"top-1 agreement {check.top1_agreement:.2%}, max |Δlogit| {check.max_abs_logit_diff:.3g} "
                       f"on {check.images} test images")
    where = "the model's run" if outcome.logged_into_source_run else "run"
    click.echo(f"logged under onnx/ in {where} {outcome.run_id}")


@main.command()
@config_options(only=("experiment_name", "run_name"))
@reports_errors
def pareto(**options: Any) -> None:
    """Accuracy vs. batch-1 latency and parameters of an experiment's benchmarked models.

    Reads the benchmark runs of --experiment-name (under `mlflow run` too) that have a test accuracy,
    logs plots/pareto.png (Pareto front highlighted) and pareto.csv into a new run there, named
    "pareto" unless --run-name says otherwise, and prints the front.
    """
    from cifar_exp.deployment import pareto_and_track

    outcome = pareto_and_track(build_config(options).tracking)
    front = sorted((p for p, on in zip(outcome.points, outcome.front) if on), key=lambda p: p.latency_ms)
    click.echo(f"{'model':<40}{'backend':<20}{'accuracy':>9}{'b1 p50 ms':>11}{'parameters':>12}")
    for point in front:
        click.echo(f"{point.label[:39]:<40}{point.backend:<20}{point.accuracy:>9.2%}{point.latency_ms:>11.3f}"
                   f"{point.parameters:>12,}")
    click.echo(f"run {outcome.run_id}: {len(front)} of {len(outcome.points)} points on the front, "
               "plot logged as plots/pareto.png")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--allowed-hosts", default=None,
              help="Comma-separated host names (and addresses) the UI answers to besides localhost and private "
                   "addresses, e.g. a public name with --host 0.0.0.0 (MLflow's --allowed-hosts; each name is "
                   "also allowed with :PORT, as a browser sends it).")
@reports_errors
def ui(host: str, port: int, allowed_hosts: str | None) -> None:
    """Start the MLflow UI on the store cifar-exp logs to (MLFLOW_TRACKING_URI or ./mlflow.db)."""
    from cifar_exp import tracking

    uri = tracking.tracking_uri()
    if tracking.is_tracking_server(uri):  # it already serves its own UI
        click.echo(f"MLFLOW_TRACKING_URI is a tracking server: open {tracking.hide_password(uri)} in a browser")
        return
    tracking.check_ui_address(host, port)  # before saying where it serves
    click.echo(f"MLflow UI for {tracking.hide_password(uri)} at http://{host}:{port}")
    sys.exit(tracking.launch_ui(host, port, allowed_hosts))


def run() -> None:
    """The ``cifar-exp`` program: ``main``, and a command an interrupt stopped ends killed by it
    (``interrupts.die_by``), once it has closed its runs and said ``Aborted: SIGINT.``."""
    try:
        main(prog_name="cifar-exp")
    except SystemExit as done:
        stopped_by = done.code - 128 if isinstance(done.code, int) else None
        if stopped_by not in interrupts.STOPPING_SIGNALS:
            raise
        interrupts.die_by(stopped_by)

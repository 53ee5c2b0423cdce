"""The ``cifar-exp`` command line. Options are generated from the config dataclasses, one per field."""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import typing
from collections.abc import Callable, Iterable
from typing import Any

import click

from cifar_exp.config import DataConfig, ExperimentConfig, TrackingConfig, TrainConfig
from cifar_exp.errors import CifarExpError

CONFIG_SECTIONS = {"data": DataConfig, "train": TrainConfig, "tracking": TrackingConfig}


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
    return click.option(f"--{name}", field.name, **kwargs)


def config_options(*, only: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> Callable:
    """Add one click option per config field (optionally only some) to a command."""
    wanted = set(only) if only is not None else None

    def decorate(command: Callable) -> Callable:
        for cls in reversed(CONFIG_SECTIONS.values()):
            for field in reversed(dataclasses.fields(cls)):
                if field.name in exclude or (wanted is not None and field.name not in wanted):
                    continue
                command = _click_option(cls, field)(command)
        return command

    return decorate


def build_config(options: dict[str, Any], **overrides: Any) -> ExperimentConfig:
    """The ExperimentConfig for parsed options; fields not given keep their defaults."""
    values = {**options, **overrides}
    sections = {
        section: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
        for section, cls in CONFIG_SECTIONS.items()
    }
    return ExperimentConfig(**sections)


def reports_errors(command: Callable) -> Callable:
    """Turn the project's errors into click's one-line ``Error: ...`` and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CifarExpError as error:
            raise click.ClickException(str(error)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="cifar-exp")
def main(verbose: bool) -> None:
    """Train, track, tune and benchmark small CIFAR-10 CNNs (MLflow + Optuna)."""
    # A terminated process unwinds like Ctrl-C, so its MLflow run is closed as KILLED, not left RUNNING.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    # MLflow and Alembic are chatty at INFO on every store access.
    for noisy in ("alembic", "mlflow.store", "mlflow.tracking", "mlflow.utils", "mlflow.models"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@main.command()
@config_options()
@reports_errors
def train(**options: Any) -> None:
    """Train a model (the seed report's recipe by default) as one MLflow run."""
    from cifar_exp.experiment import train_and_track

    cfg = build_config(options)
    outcome = train_and_track(cfg, progress=sys.stderr.isatty())
    click.echo(f"run {outcome.run_id}: test accuracy {outcome.test.accuracy:.4f} "
               f"(loss {outcome.test.loss:.4f}) after {outcome.fit.train_seconds:.1f}s of training")
    if outcome.model_version:
        status = "champion" if outcome.champion else "not champion"
        click.echo(f"registered models:/{cfg.registered_model_name}/{outcome.model_version} ({status})")
    else:
        click.echo(f"model logged as {outcome.model_uri} (not registered)")


@main.command()
@click.option("--model-uri", required=True,
              help="Model to evaluate, e.g. models:/cifar10-seed@champion or runs:/<id>/model.")
@config_options(only=("data_dir", "download", "cache_dir", "device", "eval_batch_size",
                      "experiment_name", "run_name"))
@reports_errors
def evaluate(model_uri: str, **options: Any) -> None:
    """Evaluate a logged model on the test split, with the full report, in a new run."""
    from cifar_exp.experiment import evaluate_and_track

    cfg = build_config(options)
    outcome = evaluate_and_track(model_uri, cfg.data, cfg.tracking, device_name=cfg.train.device,
                                 batch_size=cfg.train.eval_batch_size)
    click.echo(f"run {outcome.run_id}: {model_uri} test accuracy {outcome.test.accuracy:.4f} "
               f"(macro F1 {outcome.test_metrics.macro()['macro_f1']:.4f}, {len(outcome.test.labels)} images)")


@main.command()
def models() -> None:
    """List the model architectures with their parameter counts."""
    from cifar_exp.models import build_model, count_parameters, model_names

    for name in model_names():
        click.echo(f"{name:<12} {count_parameters(build_model(name)):>10,} parameters")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=5000, show_default=True, type=int, help="Port to listen on.")
def ui(host: str, port: int) -> None:
    """Start the MLflow UI on the store cifar-exp logs to (MLFLOW_TRACKING_URI or ./mlflow.db)."""
    from cifar_exp import tracking

    click.echo(f"MLflow UI for {tracking.tracking_uri()} at http://{host}:{port}")
    sys.exit(tracking.launch_ui(host, port))

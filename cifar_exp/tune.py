"""Optuna sweeps of the learning rate and its per-epoch decay, each trial a nested MLflow run.

The only module that imports optuna. One ``tune`` invocation is one parent MLflow run; each trial it
runs is a child run ``trial-<n>`` holding the trial's params, the per-epoch metrics ``train`` logs
and its Optuna state as a tag. The objective is the validation accuracy after the last epoch, on
the split carved from train; the test split is never looked at during the search.

Studies live in an Optuna storage: by default a SQLite file ``mlruns/optuna.db`` next to the
tracking store (fine for one process at a time); ``--storage postgresql://...`` lets N workers on N
machines share one study (same ``--study-name``). On a database storage every running trial sends
heartbeats; the trial of a worker that died (SIGKILL, lost machine) is marked FAIL by the next
worker that starts a trial, and its parameters are retried once.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import sqlalchemy.exc  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from cifar_exp import tracking  # noqa: E402
from cifar_exp.config import ExperimentConfig, TuneConfig  # noqa: E402
from cifar_exp.data import Splits, load_splits  # noqa: E402
from cifar_exp.errors import ConfigError, StorageError, TrainingDivergedError  # noqa: E402
from cifar_exp.experiment import TrainingOutcome, train_and_track  # noqa: E402
from cifar_exp.models import build_model, count_parameters  # noqa: E402
from cifar_exp.train import EpochStats, fit, resolve_amp_dtype, resolve_device  # noqa: E402

log = logging.getLogger(__name__)

OBJECTIVE = "val_accuracy"
DEFAULT_STORAGE_FILE = "optuna.db"
# A study only takes trials that agree on every setting that changes what a trial's value means:
# all training settings but the searched ones and those that only change speed or where it runs.
NOT_STUDY_SETTINGS = {"lr", "lr_decay", "device", "amp_dtype", "channels_last", "compile",
                      "eval_batch_size", "recipe"}
DATA_STUDY_SETTINGS = ("val_size", "split_seed")


@dataclass(frozen=True)
class TrialSummary:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None  # validation accuracy after the last epoch, for COMPLETE trials
    params: dict[str, float]
    epochs: int  # epochs it reported
    baseline: bool
    reason: str | None  # why it was pruned or failed

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialSummary:
        return cls(
            number=trial.number,
            state=trial.state.name,
            value=trial.value if trial.state == TrialState.COMPLETE else None,
            params=dict(trial.params),
            epochs=len(trial.intermediate_values),
            baseline=bool(trial.user_attrs.get("baseline")),
            reason=trial.user_attrs.get("reason"),
        )

    def describe(self) -> str:
        params = ", ".join(f"{k} {v:.4g}" for k, v in self.params.items())
        if self.state == TrialState.COMPLETE.name:
            result = f"{OBJECTIVE} {self.value:.4f}"
        else:
            result = self.reason or ""
        tag = " (baseline)" if self.baseline else ""
        return f"trial {self.number}{tag} {self.state} {result} [{params}]".replace("  ", " ")


@dataclass(frozen=True)
class TuneOutcome:
    study_name: str
    storage: str  # the storage URL with any password hidden
    run_id: str  # the parent MLflow run
    trials: list[TrialSummary]  # the trials this invocation ran
    best: TrialSummary | None  # the study's best COMPLETE trial (any worker, any invocation)
    baseline: TrialSummary | None  # the study's baseline trial, if it has one
    retrained: TrainingOutcome | None


def tune(
    cfg: ExperimentConfig,
    tune_cfg: TuneConfig,
    *,
    report: Callable[[str], None] = log.info,
    progress: bool = False,
) -> TuneOutcome:
    """Search lr and decay for ``cfg`` as one parent MLflow run; ``report`` gets a line per trial.

    Everything that can be checked is checked before a run is opened or a model trained: the
    config, the tracking store, the device, the model name, the Optuna storage and study, the data.
    """
    if cfg.data.val_on_test:
        raise ConfigError("tune optimises validation accuracy on a split carved from train; "
                          "--val-on-test would tune on the test split")
    schedule = getattr(cfg.train, "schedule", "exp")
    if schedule != "exp":
        raise ConfigError(f"tune searches --lr and --lr-decay, and lr-decay only acts with --schedule exp "
                          f"(got {schedule})")
    tune_cfg.check_baseline(cfg.train.lr, cfg.train.lr_decay)
    tracking.check_tracking_store()
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp_dtype(cfg.train, device)
    parameter_count = count_parameters(build_model(cfg.train.model))  # also rejects unknown names
    study_name = tune_cfg.study_name or default_study_name(cfg)
    storage_url = tune_cfg.storage or default_storage()
    shown_url = hide_password(storage_url)
    study = open_study(cfg, tune_cfg, study_name, storage_url)
    splits = load_splits(cfg.data)  # once: every trial trains on the same tensors

    before = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    if tune_cfg.baseline:
        if _is_database_server(storage_url):
            # Workers started together would all find no baseline and each queue one: spread them out.
            time.sleep(random.uniform(0, 3))
        study.enqueue_trial({"lr": cfg.train.lr, "lr_decay": cfg.train.lr_decay},
                            user_attrs={"baseline": True}, skip_if_exists=True)
    parent_tags = {
        **tracking.environment_tags(device, amp_dtype),
        "model": cfg.train.model,
        "parameter_count": str(parameter_count),
        "run_kind": "tune-study",
        "optuna_study_name": study_name,
        "optuna_storage": shown_url,
        "optuna_sampler": tune_cfg.sampler,
        "optuna_pruner": tune_cfg.pruner,
        "objective": f"{OBJECTIVE} after the last epoch (maximise)",
    }
    ran: list[TrialSummary] = []
    run_name = cfg.tracking.run_name or f"tune-{study_name}"
    with tracking.start_run(cfg.tracking.experiment_name, run_name, tags=parent_tags) as run_id:
        tracking.log_params({**cfg.flat(), **{f"tune.{k}": v for k, v in dataclasses.asdict(tune_cfg).items()
                                              if k != "storage"}})
        tracking.log_datasets({"train": splits.train, "val": splits.val}, splits.source)
        report(f"study {study_name} on {shown_url}: {tune_cfg.n_trials} trials of {cfg.train.epochs} "
               f"epochs; {before} finished trials in the study before this run")

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            summary = TrialSummary.of(trial)
            ran.append(summary)
            best = best_trial(study)
            report(f"{summary.describe()} | best: "
                   + (f"trial {best.number} {OBJECTIVE} {best.value:.4f}" if best else "none yet"))
            if summary.value is not None:
                tracking.log_metrics({f"trial_{OBJECTIVE}": summary.value}, step=trial.number)
            if best is not None:  # the final best_val_accuracy is logged once the study is done
                tracking.log_metrics({f"best_so_far_{OBJECTIVE}": best.value}, step=trial.number)

        objective = _Objective(cfg, tune_cfg, splits, study_name, progress)
        with _quiet_optuna():
            study.optimize(objective, n_trials=tune_cfg.n_trials, timeout=tune_cfg.timeout,
                           callbacks=[after_trial], gc_after_trial=True)
        best, baseline = best_trial(study), baseline_trial(study)
        _log_study_summary(study, best, baseline, ran, tune_cfg)
        if best is None:
            report(f"no trial of study {study_name} has completed yet")
        retrained = None
        if tune_cfg.retrain_best and best is not None:
            report(f"retraining trial {best.number} (lr {best.params['lr']:.4g}, "
                   f"lr_decay {best.params['lr_decay']:.4g}) with the full train pipeline")
            best_cfg = dataclasses.replace(
                cfg,
                train=dataclasses.replace(cfg.train, **best.params),
                tracking=dataclasses.replace(cfg.tracking, run_name=f"retrain-trial-{best.number}"),
            )
            retrained = train_and_track(
                best_cfg, splits=splits, progress=progress, nested=True,
                tags={"run_kind": "tune-retrain", "tune_parent_run_id": run_id,
                      "optuna_study_name": study_name, "optuna_trial_number": str(best.number)},
            )
            tracking.set_tags({"retrained_run_id": retrained.run_id})
    return TuneOutcome(study_name, shown_url, run_id, ran, best, baseline, retrained)


class _Objective:
    """One trial: train the suggested lr/decay as a nested MLflow run, reporting every epoch."""

    def __init__(self, cfg: ExperimentConfig, tune_cfg: TuneConfig, splits: Splits, study_name: str,
                 progress: bool) -> None:
        self.cfg, self.tune_cfg, self.splits = cfg, tune_cfg, splits
        self.study_name, self.progress = study_name, progress
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", self.tune_cfg.lr_min, self.tune_cfg.lr_max, log=True)
        lr_decay = trial.suggest_float("lr_decay", self.tune_cfg.decay_min, self.tune_cfg.decay_max)
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, lr=lr, lr_decay=lr_decay))
        baseline = bool(trial.user_attrs.get("baseline"))
        trial.set_user_attr("worker", self.worker)
        tags = {"run_kind": "tune-trial", "optuna_study_name": self.study_name,
                "optuna_trial_number": str(trial.number), "optuna_state": "RUNNING",
                "baseline": str(baseline).lower(), "worker": self.worker}
        pruned: optuna.TrialPruned | None = None
        try:
            with tracking.start_run(cfg.tracking.experiment_name, f"trial-{trial.number}", tags=tags,
                                    nested=True) as run_id:
                trial.set_user_attr("mlflow_run_id", run_id)
                tracking.log_params(cfg.flat())
                try:
                    result = fit(cfg.train, self.splits, progress=self.progress,
                                 on_epoch_end=lambda stats: self._epoch_end(trial, stats))
                except optuna.TrialPruned as error:
                    pruned = error  # raised below, once the run is closed as FINISHED
                    self._finish(trial, "PRUNED", str(error))
                except TrainingDivergedError as error:
                    self._finish(trial, "FAIL", str(error))
                    raise
                except KeyboardInterrupt:
                    self._finish(trial, "FAIL", "interrupted")
                    raise
                else:
                    value = result.history[-1].val_accuracy
                    tracking.log_metrics({
                        "train_seconds": result.train_seconds,
                        "peak_memory_bytes": result.peak_memory_bytes,
                        "best_val_accuracy": max(s.val_accuracy for s in result.history),
                    })
                    self._finish(trial, "COMPLETE", None)
        except TrainingDivergedError:
            return math.nan  # Optuna marks the trial FAIL (reason in its user attrs); the study goes on
        if pruned is not None:
            raise pruned
        return value

    def _epoch_end(self, trial: optuna.Trial, stats: EpochStats) -> None:
        tracking.log_metrics(stats.metrics(), step=stats.epoch)
        trial.report(stats.val_accuracy, stats.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned after epoch {stats.epoch}: {OBJECTIVE} {stats.val_accuracy:.4f}"
            )

    @staticmethod
    def _finish(trial: optuna.Trial, state: str, reason: str | None) -> None:
        tags = {"optuna_state": state}
        if reason:
            trial.set_user_attr("reason", reason)
            tags["optuna_reason"] = reason
        tracking.set_tags(tags)


def default_study_name(cfg: ExperimentConfig) -> str:
    return f"cifar10-{cfg.train.model}-{cfg.train.epochs}ep"


def default_storage() -> str:
    """A SQLite file under ``mlruns/`` beside the tracking store (the working directory by default)."""
    path = tracking.local_store_folder() / "mlruns" / DEFAULT_STORAGE_FILE
    return f"sqlite:///{path}"


def hide_password(url: str) -> str:
    if "://" not in url:
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: hide whatever sits between user: and @
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def open_study(cfg: ExperimentConfig, tune_cfg: TuneConfig, study_name: str, storage_url: str) -> optuna.Study:
    """Create the study or load it; a storage that cannot be used fails here, before any training."""
    shown = hide_password(storage_url)
    seed = sampler_seed(cfg.train.seed, storage_url)
    for attempt in range(3):
        try:
            with _quiet_optuna():
                storage = _storage(storage_url, tune_cfg.heartbeat_interval)
                study = optuna.create_study(
                    storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
                    sampler=_sampler(tune_cfg, seed), pruner=_pruner(tune_cfg, cfg.train.epochs),
                )
            break
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.InternalError) as error:
            # Workers that start at once race to create the tables or the study: look again.
            if attempt == 2:
                raise StorageError(f"Optuna storage {shown} cannot be used: {_first_line(error)}") from None
            time.sleep(0.5 + random.random())
        except Exception as error:
            raise StorageError(f"Optuna storage {shown} cannot be used: {_first_line(error)}") from None
    directions = [d.name.lower() for d in study.directions]
    if directions != ["maximize"]:
        raise StorageError(
            f"study {study_name!r} in {shown} exists with direction {', '.join(directions)}; tune "
            f"maximises {OBJECTIVE}: pass another --study-name"
        )
    _check_study_settings(study, cfg, study_name)
    return study


def _check_study_settings(study: optuna.Study, cfg: ExperimentConfig, study_name: str) -> None:
    settings = {f"train.{k}": v for k, v in dataclasses.asdict(cfg.train).items() if k not in NOT_STUDY_SETTINGS}
    settings.update({f"data.{k}": getattr(cfg.data, k) for k in DATA_STUDY_SETTINGS})
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("objective", OBJECTIVE)
        study.set_user_attr("settings", settings)
        return
    # Settings the study has no record of (added to cifar-exp since) are taken to agree.
    differ = {k: (stored[k], v) for k, v in settings.items() if k in stored and stored[k] != v}
    if differ:
        changes = ", ".join(f"{k.split('.')[1].replace('_', '-')} {old} -> {new}"
                            for k, (old, new) in differ.items())
        raise StorageError(
            f"study {study_name!r} holds trials trained with other settings ({changes}); their values "
            "are not comparable: pass another --study-name"
        )


def sampler_seed(seed: int, storage_url: str) -> int:
    """``--seed``, mixed with the process id on a database server shared by several workers.

    Workers that share a study and a seed would otherwise propose the same random trials.
    """
    if _is_database_server(storage_url):
        return (seed * 1_000_003 + os.getpid()) % 2**32
    return seed


def _is_database_server(storage_url: str) -> bool:
    """A storage that workers on several machines share (not a local file)."""
    return storage_url.split(":", 1)[0].split("+")[0] in ("postgresql", "mysql")


def _storage(url: str, heartbeat_interval: int) -> optuna.storages.BaseStorage:
    if "://" not in url:  # a journal file, as optuna-dashboard also reads them
        path = Path(url).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql://"):
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver cifar-exp installs is psycopg2.
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_interval,
        grace_period=2 * heartbeat_interval,
        heartbeat_stale_trial_callback=_stale_trial,
    )


with warnings.catch_warnings():
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    _retry_stale_trial = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)


def _stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose worker died (no heartbeat): Optuna marked it FAIL; run it again, once.

    Its MLflow run and the dead worker's parent run are closed as KILLED instead of staying RUNNING.
    """
    _retry_stale_trial(study, trial)
    closed = []
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        try:
            closed = tracking.kill_stale_run(run_id)
        except Exception as error:  # the tracking store of a dead worker may be out of reach
            log.warning("could not close MLflow run %s of stale trial %d: %s", run_id, trial.number,
                        _first_line(error))
    log.warning("trial %d of study %s lost its worker (no heartbeat): marked FAIL and queued again%s",
                trial.number, study.study_name, f"; MLflow runs {', '.join(closed)} closed as KILLED"
                if closed else "")


def _sampler(tune_cfg: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    if tune_cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune_cfg.sampler == "grid":
        n = tune_cfg.grid_size
        space = {
            "lr": [float(f"{v:.6g}") for v in np.geomspace(tune_cfg.lr_min, tune_cfg.lr_max, n)],
            "lr_decay": [float(f"{v:.6g}") for v in np.linspace(tune_cfg.decay_min, tune_cfg.decay_max, n)],
        }
        return optuna.samplers.GridSampler(space, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune_cfg.tpe_startup_trials)


def _pruner(tune_cfg: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if tune_cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune_cfg.prune_startup_trials,
                                           n_warmup_steps=tune_cfg.prune_warmup_epochs)
    if tune_cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, min(tune_cfg.prune_warmup_epochs, epochs)),
                                              max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def best_trial(study: optuna.Study) -> TrialSummary | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return TrialSummary.of(max(complete, key=lambda t: t.value)) if complete else None


def baseline_trial(study: optuna.Study) -> TrialSummary | None:
    """The study's baseline trial: its first COMPLETE one, else its first one in any state."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    chosen = complete or trials
    return TrialSummary.of(chosen[0]) if chosen else None


def _log_study_summary(
    study: optuna.Study,
    best: TrialSummary | None,
    baseline: TrialSummary | None,
    ran: list[TrialSummary],
    tune_cfg: TuneConfig,
) -> None:
    """Into the parent run: best params and value, the baseline's value, trials.csv and the plots."""
    counts = {state: sum(t.state == state for t in ran) for state in ("COMPLETE", "PRUNED", "FAIL")}
    tracking.log_metrics({f"trials_{state.lower()}": n for state, n in counts.items()})
    tracking.log_metrics({"study_trials": len(study.trials)})
    if best is not None:
        tracking.log_params({f"best.{k}": v for k, v in best.params.items()})
        tracking.set_tags({"best_trial_number": str(best.number)})
        tracking.log_metrics({f"best_{OBJECTIVE}": best.value})
    if baseline is not None:
        tracking.set_tags({"baseline_trial_number": str(baseline.number), "baseline_state": baseline.state})
        if baseline.value is not None:
            tracking.log_metrics({f"baseline_{OBJECTIVE}": baseline.value})
            if best is not None:
                tracking.log_metrics({f"best_minus_baseline_{OBJECTIVE}": best.value - baseline.value})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_trials_csv(study, folder / "trials.csv")
        write_study_plots(study, folder / "plots", intermediate=tune_cfg.pruner != "none",
                          bounds=((tune_cfg.lr_min, tune_cfg.lr_max), (tune_cfg.decay_min, tune_cfg.decay_max)))
        tracking.log_artifacts(folder)


TRIAL_COLUMNS = ("number", "state", OBJECTIVE, "lr", "lr_decay", "epochs", "baseline", "duration_s",
                 "reason", "worker", "mlflow_run_id")


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, TRIAL_COLUMNS)
        writer.writeheader()
        for trial in study.get_trials(deepcopy=False):
            summary = TrialSummary.of(trial)
            duration = trial.duration.total_seconds() if trial.duration else None
            writer.writerow({
                "number": trial.number, "state": summary.state, OBJECTIVE: summary.value,
                "lr": trial.params.get("lr"), "lr_decay": trial.params.get("lr_decay"),
                "epochs": summary.epochs, "baseline": summary.baseline, "duration_s": duration,
                "reason": summary.reason, "worker": trial.user_attrs.get("worker"),
                "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
            })


def write_study_plots(
    study: optuna.Study,
    folder: Path,
    *,
    intermediate: bool,
    bounds: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> list[Path]:
    """Optuna's matplotlib plots of the study, plus a scatter of every trial over lr x decay.

    ``bounds`` ((lr_min, lr_max), (decay_min, decay_max)) frames the scatter on the searched space.
    A plot the study cannot support yet (importances need two completed trials) is skipped.
    """
    from optuna.visualization import matplotlib as oplt

    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: oplt.plot_optimization_history(study),
        "param_importances": lambda: oplt.plot_param_importances(study),
        "lr_decay_contour": lambda: oplt.plot_contour(study, params=["lr", "lr_decay"]),
        "lr_decay_scatter": lambda: _plot_scatter(study, bounds),
        "timeline": lambda: oplt.plot_timeline(study),
    }
    if intermediate:
        plots["intermediate_values"] = lambda: oplt.plot_intermediate_values(study)
    written = []
    for name, plot in plots.items():
        path = folder / f"{name}.png"
        try:
            # Optuna's plots switch matplotlib's global style: keep that from leaking into other reports.
            with warnings.catch_warnings(), matplotlib.rc_context():
                warnings.simplefilter("ignore")  # ExperimentalWarning, too few trials, ...
                axes = plot()
                figure = np.ravel(axes)[0].figure
                figure.set_size_inches(max(figure.get_figwidth(), 7), max(figure.get_figheight(), 5))
                figure.tight_layout()
                figure.savefig(path, dpi=100)
                plt.close(figure)
            written.append(path)
        except Exception as error:  # a plot is a report, never a reason to lose the study's run
            log.warning("plot %s skipped: %s", name, _first_line(error))
            plt.close("all")
    return written


def _plot_scatter(study: optuna.Study, bounds: tuple[tuple[float, float], tuple[float, float]] | None) -> plt.Axes:
    """Every trial at its (lr, decay): colour = validation accuracy; pruned and failed trials marked."""
    figure, ax = plt.subplots(figsize=(7, 5))
    trials = [t for t in study.get_trials(deepcopy=False) if {"lr", "lr_decay"} <= t.params.keys()]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        points = ax.scatter([t.params["lr"] for t in complete], [t.params["lr_decay"] for t in complete],
                            c=[t.value for t in complete], cmap="viridis", s=60, edgecolors="k")
        figure.colorbar(points, ax=ax, label=OBJECTIVE)
        best = max(complete, key=lambda t: t.value)
        ax.scatter([best.params["lr"]], [best.params["lr_decay"]], marker="*", s=300, c="red",
                   edgecolors="k", label=f"best: trial {best.number}")
    for state, marker in ((TrialState.PRUNED, "x"), (TrialState.FAIL, "X")):
        chosen = [t for t in trials if t.state == state]
        if chosen:
            ax.scatter([t.params["lr"] for t in chosen], [t.params["lr_decay"] for t in chosen],
                       marker=marker, c="grey", s=50, label=state.name.lower())
    for t in trials:
        if t.user_attrs.get("baseline"):
            ax.annotate("baseline", (t.params["lr"], t.params["lr_decay"]), textcoords="offset points",
                        xytext=(6, 6))
    ax.set_xscale("log")
    if bounds is not None:  # the searched space, widened to any trial outside it (another worker's)
        (lr_min, lr_max), (decay_min, decay_max) = bounds
        lr_min = min([lr_min, *(t.params["lr"] for t in trials)])
        lr_max = max([lr_max, *(t.params["lr"] for t in trials)])
        decay_min = min([decay_min, *(t.params["lr_decay"] for t in trials)])
        decay_max = max([decay_max, *(t.params["lr_decay"] for t in trials)])
        lr_pad, decay_pad = (lr_max / lr_min) ** 0.03, (decay_max - decay_min) * 0.03
        ax.set_xlim(lr_min / lr_pad, lr_max * lr_pad)
        ax.set_ylim(decay_min - decay_pad, decay_max + decay_pad)
    ax.set(xlabel="lr (log scale)", ylabel="lr_decay", title=f"{study.study_name}: trials over lr x decay")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return ax


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's own INFO lines repeat ours; its warnings stay."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

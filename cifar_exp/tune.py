"""Optuna sweeps of the learning rate and its per-epoch decay, each trial a nested MLflow run.

The decay is searched with ``--schedule exp`` (the seed's), the only schedule it acts in; a study
of a cosine or one-cycle schedule (``--recipe pico``) searches the (peak) learning rate alone.

The only module that imports optuna. One ``tune`` invocation is one parent MLflow run; each trial it
runs is a child run ``trial-<n>`` holding the trial's params, the per-epoch metrics ``train`` logs
and its Optuna state as a tag. The objective is the validation accuracy after the last epoch, on
the split carved from train; the test split is never looked at during the search.

With ``--objectives accuracy,latency`` the study has two objectives: validation accuracy (maximised)
and the trained model's batch-1 CPU latency p50 on this machine (minimised), and each trial also
picks the model's three conv widths and, for the seed family, its hidden size. Optuna cannot prune
such studies; the parent run logs the Pareto set of the study's trials (``pareto.csv``,
``plots/pareto.png``).

Studies live in an Optuna storage: by default a SQLite file ``mlruns/optuna.db`` next to the
tracking store (fine for one process at a time); ``--storage postgresql://...`` lets N workers on N
machines share one study (same ``--study-name``). On a database storage every running trial sends
heartbeats; the trial of a worker that died (SIGKILL, lost machine) is marked FAIL by the next
worker that starts a trial, and its parameters are retried once. A journal file has no heartbeats:
a new worker does the same for the trials of this machine's workers whose process is gone.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import socket
import sqlite3
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
import matplotlib.pyplot as plt  # Optuna's plots draw through it: the CLI picks the Agg backend
import numpy as np
import optuna
import sqlalchemy.engine
import sqlalchemy.exc
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from cifar_exp import tracking
from cifar_exp.config import ExperimentConfig, TrainConfig, TuneConfig
from cifar_exp.data import Splits, load_splits
from cifar_exp.errors import CifarExpError, ConfigError, StorageError, TrainingDivergedError, first_line
from cifar_exp.interrupts import deferred
from cifar_exp.experiment import (
    Teacher,
    TrainingOutcome,
    load_teacher,
    teacher_may_know_validation,
    train_and_track,
)
from cifar_exp.inference import available_cores, measure_latency
from cifar_exp.models import SHIPPED_MEMORY_FORMAT, architecture, count_parameters
from cifar_exp.reports import TradeoffPoint, as_written, pareto_front, plot_pareto, write_pareto_csv
from cifar_exp.train import (
    EpochStats,
    build_network,
    cpu_name,
    fit,
    parameter_count_tags,
    resolve_amp_dtype,
    resolve_device,
    served_validation_accuracy,
)

log = logging.getLogger(__name__)

# The validation accuracy of the model as it is served and its latency timed: fp32 (evaluated again
# after training under autocast), one pass per image (with --tta, not the mirror-TTA val_accuracy).
OBJECTIVE = "val_accuracy"
LATENCY_OBJECTIVE = "latency_ms"  # batch-1 CPU latency p50 of the trained model (accuracy,latency studies)
MULTI_OBJECTIVE_STUDY_SUFFIX = "-acc-lat"  # default study names of the two modes never collide
WIDTH_PARAMS = ("width1", "width2", "width3")  # channels of the three conv stages
HIDDEN_PARAM = "hidden"
DECAY_PARAM = "lr_decay"  # searched where it acts: with the exp schedule
INTERRUPTED = "interrupted"  # the reason a trial stopped by Ctrl-C or SIGTERM is marked FAIL with
# Timing of the latency objective. A batch-1 call of these models takes about 0.1-2 ms, so each
# 0.3 s repeat takes hundreds of calls; 3 repeats and the warm-up add about 1 s to a trial, little
# next to its training.
LATENCY_REPEATS = 3
LATENCY_SECONDS_PER_REPEAT = 0.3
LATENCY_WARMUP_SECONDS = 0.1
LATENCY_BACKEND = "pytorch-fp32"  # eager PyTorch, fp32, on the CPU: what measure_latency times here
DEFAULT_STORAGE_FILE = "optuna.db"
# A study only takes trials that agree on every setting that changes what a trial's value means:
# all training settings but the searched ones and those that only change speed or where it runs.
SETTINGS_CLAIM = "settings_claim:"  # study attribute prefix: the settings a worker starting the study brings
CLAIM_SECONDS = 600  # a claim this old was left by a worker that died while starting the study
NOT_STUDY_SETTINGS = {"lr", "lr_decay", "device", "amp_dtype", "channels_last", "compile", "cuda_graphs",
                      "eval_batch_size", "recipe"}
HEARTBEAT_SETTING = "tune.heartbeat_interval"  # a study setting on database storages (with heartbeats)
# accuracy,latency studies: the memory format their models' latency is timed in
LATENCY_MEMORY_FORMAT_SETTING = "tune.latency_memory_format"
SEARCHED_WIDTH_SETTINGS = {"widths", "hidden"}  # searched, not fixed, in accuracy,latency studies
DATA_STUDY_SETTINGS = ("val_size", "split_seed")


@dataclass(frozen=True)
class TrialSummary:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    value: float | None  # validation accuracy after the last epoch, for COMPLETE trials
    latency_ms: float | None  # batch-1 CPU latency p50, for COMPLETE trials of an accuracy,latency study
    parameter_count: int | None  # of the trial's model, in an accuracy,latency study
    params: dict[str, float | int]  # lr, lr_decay (exp schedule) and, in an accuracy,latency study, width1-3, hidden
    epochs: int  # epochs it trained
    baseline: bool
    reason: str | None  # why it was pruned or failed

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialSummary:
        values = trial.values if trial.state == TrialState.COMPLETE else None
        return cls(
            number=trial.number,
            state=trial.state.name,
            value=values[0] if values else None,
            latency_ms=values[1] if values and len(values) > 1 else None,
            parameter_count=trial.user_attrs.get("parameter_count"),
            params=dict(trial.params),
            # Multi-objective trials have no intermediate values: they count their epochs themselves.
            epochs=trial.user_attrs.get("epochs", len(trial.intermediate_values)),
            baseline=bool(trial.user_attrs.get("baseline")),
            reason=trial.user_attrs.get("reason"),
        )

    def searched(self) -> str:
        """``lr 0.1, lr_decay 0.95``: the trial's searched settings, as this module's lines show them."""
        return ", ".join(f"{k} {v:.4g}" for k, v in self.params.items())

    def describe(self) -> str:
        params = self.searched()
        if self.state == TrialState.COMPLETE.name:
            result = f"{OBJECTIVE} {self.value:.4f}"
            if self.latency_ms is not None:
                result += f" {LATENCY_OBJECTIVE} {self.latency_ms:.3f}"
        else:
            result = self.reason or ""
        tag = " (baseline)" if self.baseline else ""
        return f"trial {self.number}{tag} {self.state} {result} [{params}]".replace("  ", " ")

    def train_fields(self) -> set[str]:
        """The TrainConfig fields that ``train_options`` sets."""
        fields = {"lr", DECAY_PARAM, HIDDEN_PARAM} & set(self.params)
        return fields | ({"widths"} if WIDTH_PARAMS[0] in self.params else set())

    def train_options(self) -> str:
        """The ``cifar-exp train`` options that give this trial's searched settings (full precision)."""
        options = [f"--lr {self.params['lr']!r}"]
        if DECAY_PARAM in self.params:
            options.append(f"--lr-decay {self.params[DECAY_PARAM]!r}")
        if WIDTH_PARAMS[0] in self.params:
            options.append("--widths " + ",".join(str(self.params[name]) for name in WIDTH_PARAMS))
        if HIDDEN_PARAM in self.params:
            options.append(f"--hidden {self.params[HIDDEN_PARAM]}")
        return " ".join(options)


@dataclass(frozen=True)
class TuneOutcome:
    study_name: str
    storage: str  # the storage URL with any password hidden
    run_id: str  # the parent MLflow run
    trials: list[TrialSummary]  # the trials this invocation ran
    best: TrialSummary | None  # the study's most accurate COMPLETE trial (any worker, any invocation)
    baseline: TrialSummary | None  # the study's baseline trial, if it has one
    retrained: TrainingOutcome | None
    # accuracy,latency studies: the study's Pareto set, fastest first (empty for accuracy studies)
    pareto: list[TrialSummary]


def tune(
    cfg: ExperimentConfig,
    tune_cfg: TuneConfig,
    *,
    report: Callable[[str], None] = log.info,
    progress: bool = False,
) -> TuneOutcome:
    """Search lr and decay (decay with the exp schedule only; for accuracy,latency, the width knobs
    too) for ``cfg`` as one parent MLflow run; ``report`` gets a line per trial.

    Everything that can be checked is checked before a run is opened or a model trained: the
    config, the tracking store, the device, the model name, the Optuna storage, the data, the
    teachers and the study.
    """
    if cfg.data.val_on_test:
        raise ConfigError("tune optimises validation accuracy on a split carved from train; "
                          "--val-on-test would tune on the test split")
    decay = searches_decay(cfg.train)
    tune_cfg.check_baseline(cfg.train.lr, cfg.train.lr_decay if decay else None)
    build_network(cfg.train)  # rejects unknown names and knobs before anything slow
    baseline_params: dict[str, float | int] = {"lr": cfg.train.lr}
    if decay:
        baseline_params[DECAY_PARAM] = cfg.train.lr_decay
    if tune_cfg.multi_objective:
        width_params = baseline_width_params(cfg.train)
        tune_cfg.check_baseline_widths(cfg.train.model, tuple(width_params[name] for name in WIDTH_PARAMS),
                                       width_params.get(HIDDEN_PARAM))
        baseline_params.update(width_params)
        _check_two_objective_search(cfg.train, tune_cfg)
    tracking.check_tracking_store()
    tracking.check_run_target(cfg.tracking.experiment_name)  # before the study is created
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp_dtype(cfg.train, device)
    study_name = tune_cfg.study_name or default_study_name(cfg, tune_cfg)
    storage_url = tune_cfg.storage or default_storage()
    shown_url = tracking.hide_password(storage_url)
    check_storage(storage_url, tune_cfg.heartbeat_interval, default=not tune_cfg.storage)  # before the data
    splits = load_splits(cfg.data)  # once: every trial trains on the same tensors
    teacher = load_teacher(cfg.train, splits.classes, cfg.data.data_dir, device)  # once, for every trial
    leak = teacher_may_know_validation(teacher, splits) if teacher else None
    if leak:  # its soft labels carry those images into every trial: the objective reads high
        log.warning("%s: the trials' validation accuracies may be inflated", leak)
    # After the data and teachers: a study is created (with its settings) only for input that works.
    study = open_study(cfg, tune_cfg, study_name, storage_url, data=splits, teacher=teacher)
    fail_trials_of_dead_workers(study)
    close_runs_of_dead_workers(cfg.tracking.experiment_name, study)

    before = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    grid = grid_space(tune_cfg, decay=decay) if tune_cfg.sampler == "grid" else None
    if _is_shared_storage(storage_url) and (tune_cfg.baseline or grid):
        # Workers started together would all find no baseline and each queue one: spread them out.
        time.sleep(random.uniform(0, 3))
    if tune_cfg.baseline and baseline_needed(study, baseline_params):
        with deferred():
            study.enqueue_trial(baseline_params, user_attrs={"baseline": True})
    for stopped in grid_trials_to_retry(study, grid) if grid else ():
        with deferred():
            _queue_interrupted(study, stopped)
        log.info("trial %d (%s) was interrupted in an earlier run: queued again", stopped.number, stopped.params)
    parent_tags = {
        **tracking.environment_tags(device, amp_dtype),
        "model": cfg.train.model,
        **parameter_count_tags(cfg.train, len(splits.classes)),
        "run_kind": "tune-study",
        "optuna_study_name": study_name,
        **_worker_process_tag(),
        "optuna_storage": shown_url,
        "optuna_sampler": tune_cfg.sampler,
        "optuna_pruner": "none (multi-objective)" if tune_cfg.multi_objective else tune_cfg.pruner,
        "objective": f"{OBJECTIVE} (fp32, one pass per image) after the last epoch (maximise)" + (
            f", {LATENCY_OBJECTIVE} batch-1 CPU p50 (minimise)" if tune_cfg.multi_objective else ""),
        **(teacher.tags() if teacher else {}),
        **({tracking.NOT_CANDIDATE: leak} if leak else {}),
    }
    ran: list[TrialSummary] = []
    run_name = cfg.tracking.run_name or f"tune-{study_name}"
    with tracking.start_run(cfg.tracking.experiment_name, run_name, tags=parent_tags) as run_id:
        tune_params = {k: v for k, v in dataclasses.asdict(tune_cfg).items() if k != "storage"}
        tune_params["study_name"] = study_name  # the default one too, not None
        if tune_cfg.multi_objective:
            tune_params["pruner"] = "none"  # Optuna cannot prune multi-objective trials
        tracking.log_params({**_params_of_run(cfg, tracking.active_run_name(), registers=tune_cfg.retrain_best),
                             **{f"tune.{k}": v for k, v in tune_params.items()}})
        tracking.log_datasets({"train": splits.train, "val": splits.val}, splits.source)
        report(f"study {study_name} on {shown_url}: {tune_cfg.n_trials} trial{'s' * (tune_cfg.n_trials != 1)} of "
               f"{cfg.train.epochs} epoch{'s' * (cfg.train.epochs != 1)}; {before} finished trials in the study "
               "before this run")

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            summary = TrialSummary.of(trial)
            ran.append(summary)
            best = best_trial(study)
            if tune_cfg.multi_objective:
                front = [t.number for t in pareto_trials(study)]
                report(f"{summary.describe()} | Pareto set: "
                       + (f"trials {', '.join(map(str, front))}" if front else "none yet"))
            else:
                report(f"{summary.describe()} | best: "
                       + (f"trial {best.number} {OBJECTIVE} {best.value:.4f}" if best else "none yet"))
            if summary.value is not None:
                tracking.log_metrics({f"trial_{OBJECTIVE}": summary.value}, step=trial.number)
            if summary.latency_ms is not None:
                tracking.log_metrics({f"trial_{LATENCY_OBJECTIVE}": summary.latency_ms}, step=trial.number)
            if best is not None:  # the final best_val_accuracy is logged once the study is done
                tracking.log_metrics({f"best_so_far_{OBJECTIVE}": best.value}, step=trial.number)

        objective = _Objective(cfg, tune_cfg, splits, study_name, progress, teacher.model if teacher else None)
        with _quiet_optuna():
            if grid:  # what optimize() would do first: a dead worker's trial is failed (and queued again)
                with deferred():
                    optuna.storages.fail_stale_trials(study)
            # A finished grid with nothing queued: Optuna would run one of its points again, at random.
            finished_grid = grid and study.sampler.is_exhausted(study) and not study.get_trials(
                deepcopy=False, states=(TrialState.WAITING,))
            try:
                if not finished_grid:
                    study.optimize(objective, n_trials=tune_cfg.n_trials, timeout=tune_cfg.timeout,
                                   callbacks=[after_trial], gc_after_trial=True)
            except Exception as error:
                lost = objective.lost_trial(study, error)
                if lost is None:
                    raise
                raise StorageError(lost) from None
        if grid and len(ran) < tune_cfg.n_trials and study.sampler.is_exhausted(study):
            report(f"every point of the {math.prod(map(len, grid.values()))}-point grid has run: "
                   f"stopped after {len(ran)} of {tune_cfg.n_trials} trials")
        best, baseline = best_trial(study), baseline_trial(study, baseline_params)
        pareto = pareto_trials(study) if tune_cfg.multi_objective else []
        _log_study_summary(study, best, baseline, ran, tune_cfg, pareto, decay=decay)
        if best is None:
            report(f"no trial of study {study_name} has completed yet")
        retrained = None
        if tune_cfg.retrain_best and best is not None:
            report(f"retraining trial {best.number} ({best.searched()}) with the full train pipeline")
            best_cfg = dataclasses.replace(
                cfg,
                train=dataclasses.replace(cfg.train, **best.params),
                tracking=dataclasses.replace(cfg.tracking, run_name=f"retrain-trial-{best.number}"),
            )
            retrained = train_and_track(
                best_cfg, splits=splits, progress=progress, nested=True, teacher=teacher,
                tags={"run_kind": "tune-retrain", "tune_parent_run_id": run_id, **_worker_process_tag(),
                      "optuna_study_name": study_name, "optuna_trial_number": str(best.number)},
            )
            tracking.set_tags({"retrained_run_id": retrained.run_id})
    return TuneOutcome(study_name, shown_url, run_id, ran, best, baseline, retrained,
                       [TrialSummary.of(t) for t in pareto])


def searches_decay(train: TrainConfig) -> bool:
    """Whether a study of ``train`` searches the lr decay: the exp schedule is the one it acts in."""
    return train.schedule == "exp"


def baseline_width_params(train: TrainConfig) -> dict[str, int]:
    """The baseline trial's width knobs: ``--widths`` / ``--hidden``, else the architecture's own."""
    arch = architecture(train.model)
    params = dict(zip(WIDTH_PARAMS, train.conv_widths() or arch.widths))
    if arch.hidden is not None:
        params[HIDDEN_PARAM] = train.hidden or arch.hidden
    return params


class _Objective:
    """One trial: train the suggested settings as a nested MLflow run, reporting every epoch.

    Returns the validation accuracy, or (validation accuracy, batch-1 CPU latency in ms) in an
    accuracy,latency study.
    """

    def __init__(self, cfg: ExperimentConfig, tune_cfg: TuneConfig, splits: Splits, study_name: str,
                 progress: bool, teacher: nn.Module | None) -> None:
        self.cfg, self.tune_cfg, self.splits = cfg, tune_cfg, splits
        self.study_name, self.progress, self.teacher = study_name, progress, teacher
        self.multi_objective = tune_cfg.multi_objective
        self.has_hidden = architecture(cfg.train.model).hidden is not None
        self.searches_decay = searches_decay(cfg.train)
        self.worker = f"{os.uname().nodename}:{os.getpid()}"
        self.process = worker_process()
        self.trial: optuna.Trial | None = None  # the trial running or run last
        self.failed_on_its_own = False  # that trial diverged or crashed (before any interrupt)

    def lost_trial(self, study: optuna.Study, error: Exception) -> str | None:
        """Why ``error`` (raised by ``study.optimize``) means that another worker failed this worker's
        trial as stale (its heartbeat silent past the grace period, e.g. in a network outage), or None."""
        told_too_late = isinstance(error, optuna.exceptions.UpdateFinishedTrialError) or (
            isinstance(error, ValueError) and str(error) == "Cannot tell a FAIL trial.")  # Optuna's own tell
        if self.trial is None or not told_too_late:
            return None
        state = study.get_trials(deepcopy=False)[self.trial.number].state
        if state != TrialState.FAIL:
            return None
        return (f"trial {self.trial.number} of study {self.study_name} was failed by another worker: no heartbeat "
                f"from this one for over {2 * self.tune_cfg.heartbeat_interval} s (a stall or a network outage); "
                "this worker stops")

    def _suggest(self, trial: optuna.Trial) -> TrainConfig:
        searched: dict[str, Any] = {
            "lr": trial.suggest_float("lr", self.tune_cfg.lr_min, self.tune_cfg.lr_max, log=True)}
        if self.searches_decay:
            searched[DECAY_PARAM] = trial.suggest_float(DECAY_PARAM, self.tune_cfg.decay_min,
                                                        self.tune_cfg.decay_max)
        if self.multi_objective:
            choices = self.tune_cfg.width_choice_list()
            widths = [trial.suggest_categorical(name, choices) for name in WIDTH_PARAMS]
            searched["widths"] = ",".join(map(str, widths))
            if self.has_hidden:
                searched["hidden"] = trial.suggest_categorical(HIDDEN_PARAM, self.tune_cfg.hidden_choice_list())
        return dataclasses.replace(self.cfg.train, **searched)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            # Wherever it struck (also as the trial's run opened or closed), the trial is recorded as
            # interrupted: Optuna marks it FAIL, and an interrupted baseline is queued again. Not one
            # that failed on its own first (the interrupt held back while that was recorded): it keeps
            # its reason, and a diverged baseline is not queued again to diverge once more.
            with deferred():
                if not self.failed_on_its_own and trial.user_attrs.get("reason") != INTERRUPTED:
                    trial.set_user_attr("reason", INTERRUPTED)
            raise

    def _run(self, trial: optuna.Trial) -> float | tuple[float, float]:
        self.trial = trial
        self.failed_on_its_own = False
        with deferred():  # each suggestion and attribute is a write to the Optuna storage
            trial.set_user_attr("worker", self.worker)
            trial.set_user_attr("worker_process", self.process)
            cfg = dataclasses.replace(self.cfg, train=self._suggest(trial))
        baseline = bool(trial.user_attrs.get("baseline"))
        tags = {"run_kind": "tune-trial", "optuna_study_name": self.study_name,
                "optuna_trial_number": str(trial.number), "optuna_state": "RUNNING",
                "baseline": str(baseline).lower(), "worker": self.worker}
        pruned: optuna.TrialPruned | None = None
        finishing: str | None = None  # the state the trial's run is tagged with, from the tag's write on
        run_id = ""
        try:
            with tracking.start_run(cfg.tracking.experiment_name, f"trial-{trial.number}", tags=tags,
                                    nested=True) as run_id:
                with deferred():
                    trial.set_user_attr("mlflow_run_id", run_id)
                try:
                    tracking.log_params(_params_of_run(cfg, f"trial-{trial.number}", registers=False))
                    result = fit(cfg.train, self.splits, progress=self.progress, teacher=self.teacher,
                                 on_epoch_end=lambda stats: self._epoch_end(trial, stats))
                    # fp32, one pass per image: the model as it ships, and as latency is timed
                    value = served_validation_accuracy(result, self.splits.val, cfg.train)
                    metrics = {
                        "served_val_accuracy": value,
                        "train_seconds": result.train_seconds,
                        "peak_memory_bytes": result.peak_memory_bytes,
                        "best_val_accuracy": max(s.val_accuracy for s in result.history),
                    }
                    if self.multi_objective:
                        latency_ms = self._latency_ms(result.model, trial)
                        parameter_count = count_parameters(result.model)  # the trained network's, as shipped
                        with deferred():
                            trial.set_user_attr("parameter_count", parameter_count)  # for the Pareto reports
                        metrics.update({LATENCY_OBJECTIVE: latency_ms, "parameter_count": parameter_count})
                    tracking.log_metrics(metrics)
                except optuna.TrialPruned as error:
                    pruned = error  # raised below, once the run is closed as FINISHED
                    finishing = "PRUNED"
                    self._finish(trial, "PRUNED", str(error))
                except TrainingDivergedError as error:
                    self.failed_on_its_own = True
                    self._finish(trial, "FAIL", str(error))
                    raise
                except BaseException as error:  # Ctrl-C, SIGTERM or a bug: Optuna marks the trial FAIL
                    self.failed_on_its_own = not isinstance(error, KeyboardInterrupt)
                    self._finish(trial, "FAIL", INTERRUPTED if isinstance(error, KeyboardInterrupt)
                                 else f"{type(error).__name__}: {first_line(error)}")
                    raise
                else:
                    finishing = "COMPLETE"
                    self._finish(trial, "COMPLETE", None)
        except KeyboardInterrupt:
            if finishing:  # held back while the run was tagged or closed: Optuna fails the trial, so must the run
                try:
                    tracking.mark_killed(run_id, {"optuna_state": "FAIL", "optuna_reason": INTERRUPTED})
                except Exception as error:  # the interrupt still ends the trial as interrupted
                    log.warning("could not mark MLflow run %s of interrupted trial %d KILLED: %s", run_id,
                                trial.number, first_line(error))
            raise
        except TrainingDivergedError:
            # NaN values make Optuna mark the trial FAIL (reason in its user attrs); the study goes on.
            return (math.nan, math.nan) if self.multi_objective else math.nan
        if pruned is not None:
            raise pruned
        return (value, latency_ms) if self.multi_objective else value

    def _latency_ms(self, model: nn.Module, trial: optuna.Trial) -> float:
        """Batch-1 latency p50 of an fp32, eval-mode CPU copy of the trained model, as it ships.

        An architecture (widths, hidden) that a COMPLETE trial of the study has timed already keeps
        that time: latency does not depend on lr or decay, and timing the same network again gave
        it another value (0.80 vs 1.20 ms in one study), which would rank equal networks apart.
        """
        knobs = {name: value for name, value in trial.params.items() if name in (*WIDTH_PARAMS, HIDDEN_PARAM)}
        for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if len(other.values) > 1 and {name: other.params.get(name) for name in knobs} == knobs:
                with deferred():
                    trial.set_user_attr("latency_timed_in_trial", other.number)
                tracking.set_tags({"latency_timed_in_trial": str(other.number)})
                return other.values[1]
        stats = measure_latency(model, 1, threads=self.tune_cfg.latency_threads, repeats=LATENCY_REPEATS,
                                seconds_per_repeat=LATENCY_SECONDS_PER_REPEAT,
                                warmup_seconds=LATENCY_WARMUP_SECONDS, backend=LATENCY_BACKEND)
        return stats.p50_ms

    def _epoch_end(self, trial: optuna.Trial, stats: EpochStats) -> None:
        tracking.log_metrics(stats.metrics(), step=stats.epoch)
        with deferred():  # Optuna's storage writes, like MLflow's, must not be cut off halfway
            if self.multi_objective:
                # Optuna takes no intermediate values (and prunes nothing) in multi-objective studies.
                trial.set_user_attr("epochs", stats.epoch)
                return
            trial.report(stats.served_val_accuracy, stats.epoch)
        if stats.epoch < self.cfg.train.epochs and trial.should_prune():  # a finished trial has its value
            # Named as the trial's run logs the value the pruner saw (with --tta: the one-pass accuracy).
            metric = OBJECTIVE if stats.val_accuracy_without_tta is None else "val_accuracy_without_tta"
            raise optuna.TrialPruned(f"pruned after epoch {stats.epoch}: {metric} {stats.served_val_accuracy:.4f}")

    @staticmethod
    def _finish(trial: optuna.Trial, state: str, reason: str | None) -> None:
        tags = {"optuna_state": state}
        if reason:
            with deferred():
                trial.set_user_attr("reason", reason)
            tags["optuna_reason"] = reason
        tracking.set_tags(tags)


def default_study_name(cfg: ExperimentConfig, tune_cfg: TuneConfig) -> str:
    suffix = MULTI_OBJECTIVE_STUDY_SUFFIX if tune_cfg.multi_objective else ""
    return f"cifar10-{cfg.train.model}-{cfg.train.epochs}ep{suffix}"


def default_storage() -> str:
    """A SQLite file under ``mlruns/`` beside the tracking store (the working directory by default)."""
    path = tracking.local_store_folder() / "mlruns" / DEFAULT_STORAGE_FILE
    return f"sqlite:///{path}"


def check_storage(storage_url: str, heartbeat_interval: int, *, default: bool = False) -> None:
    """Fail in one line, before the data loads, on a storage that cannot be used.

    A database server is connected to (a new database gets its tables, not a study): it may be out
    of reach. A URL's database driver must exist, and a storage file's folder must exist and be
    writable, unless it is the ``default`` storage, whose folder is made. A local file (SQLite,
    journal) is opened by ``open_study`` only, which creates the study once the data and the
    teachers have loaded, so that refused input leaves no new file behind.
    """
    if _is_database_server(storage_url):
        _with_storage_retries(storage_url, lambda: _storage(storage_url, heartbeat_interval))
        return
    if not _is_journal_file(storage_url):
        try:
            sqlalchemy.engine.make_url(storage_url).get_dialect().import_dbapi()
        except Exception as error:  # an unknown scheme or driver
            raise _unusable(storage_url, error) from None
    path = _storage_file(storage_url)
    if path is None or default:
        return
    if not path.parent.is_dir():
        problem = "is not a folder" if path.parent.exists() else "does not exist"
        raise _unusable(storage_url, f"{path.parent} {problem}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise _unusable(storage_url, f"{path.parent} is not writable")
    problem = _not_an_optuna_file(path, journal=_is_journal_file(storage_url))
    if problem:  # Optuna would write into it (its tables, a journal line) before it failed
        raise _unusable(storage_url, problem)


JOURNAL_FIRST_BYTES = b'{"op_code":'  # how Optuna's JournalFileBackend starts every entry
ENTRY_WRITE_SECONDS = 1.0  # how long another worker may take to finish writing the journal's last entry


def _ends_with_a_whole_entry(path: Path) -> bool:
    """Whether the journal at ``path`` ends with a line break, as each whole entry does; an entry
    another worker is writing right now is given ``ENTRY_WRITE_SECONDS`` to end."""
    deadline = time.monotonic() + ENTRY_WRITE_SECONDS
    while True:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            if size == 0 or file.seek(size - 1) >= 0 and file.read(1) == b"\n":
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _not_an_optuna_file(path: Path, *, journal: bool) -> str | None:
    """Why the existing file at ``path`` is not an Optuna storage of its kind, or None (new, empty, or one)."""
    if path.exists() and not path.is_file():
        return f"{path} is not a file"
    if not path.exists() or path.stat().st_size == 0:
        return None
    if journal:
        try:
            with open(path, "rb") as file:
                first = file.readline(1 << 20)
            if first.endswith(b"\n") or first[:len(JOURNAL_FIRST_BYTES)] != JOURNAL_FIRST_BYTES[:len(first)]:
                try:  # (else a first entry being written, judged by its end below)
                    entry = json.loads(first)
                except ValueError:
                    entry = None
                if not (isinstance(entry, dict) and "op_code" in entry):
                    return f"{path} is not an Optuna journal file (its first line is not a journal entry)"
            if not _ends_with_a_whole_entry(path):
                # Optuna skips a cut-off last entry when it reads, but appends its next one to it: the
                # joined line, then in the middle of the file, makes the journal unreadable for good.
                return (f"{path} ends in a cut-off entry (a worker stopped while writing it): delete the text "
                        "after its last line break, then run again")
        except OSError as error:
            return f"{path} cannot be read ({error.strerror})"
        return None
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not writable"
    try:
        with contextlib.closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=1)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as error:
        if error.sqlite_errorcode == sqlite3.SQLITE_NOTADB:
            return f"{path} is not a SQLite database ({error})"
        return None  # e.g. locked, or a hot journal to roll back (read-only cannot): Optuna's to judge
    if tables and "studies" not in tables:
        owner = "MLflow's tracking database" if {"experiments", "runs"} <= tables else "another program's database"
        return f"{path} is {owner}, not an Optuna storage: give the study a file of its own"
    return None


def open_study(cfg: ExperimentConfig, tune_cfg: TuneConfig, study_name: str, storage_url: str, *,
               data: Splits | None = None, teacher: Teacher | None = None) -> optuna.Study:
    """Create the study or load it; a storage that cannot be used fails here, before any training.

    ``data``: the images the trials train and validate on, which a study records (as digests) with
    its other settings, so that a worker on other images cannot add trials to it.
    """
    shown = tracking.hide_password(storage_url)
    wanted = study_directions(tune_cfg)

    def create() -> tuple[optuna.Study, int]:
        study = optuna.create_study(
            storage=_storage(storage_url, tune_cfg.heartbeat_interval, make_folder=not tune_cfg.storage),
            study_name=study_name,
            directions=wanted, load_if_exists=True, pruner=_pruner(tune_cfg, cfg.train.epochs),
        )
        return study, len(study.get_trials(deepcopy=False))

    study, trials_so_far = _with_storage_retries(storage_url, create)
    study.sampler = _sampler(tune_cfg, sampler_seed(cfg.train.seed, storage_url, trials_so_far),
                             decay=searches_decay(cfg.train), study_seed=cfg.train.seed)
    directions = [d.name.lower() for d in study.directions]
    if directions != wanted:
        aims = (f"--objectives accuracy,latency maximises {OBJECTIVE} and minimises {LATENCY_OBJECTIVE}"
                if tune_cfg.multi_objective else f"maximises {OBJECTIVE}")
        raise StorageError(
            f"study {study_name!r} in {shown} exists with direction{'s' if len(directions) > 1 else ''} "
            f"{', '.join(directions)}; tune {aims}: pass another --study-name"
        )
    if tune_cfg.multi_objective:
        with _quiet_optuna():  # set_metric_names is experimental
            study.set_metric_names([OBJECTIVE, LATENCY_OBJECTIVE])  # names the plots' objectives
    _check_study_settings(study, cfg, tune_cfg, study_name, data, teacher)
    return study


T = TypeVar("T")


def _with_storage_retries(storage_url: str, action: Callable[[], T]) -> T:
    """``action()`` on the storage, with a one-line ``StorageError`` if the storage cannot be used."""
    for attempt in range(3):
        try:
            with _quiet_optuna():
                return action()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.InternalError) as error:
            # Workers that start at once race to create the tables or the study: look again. (A
            # missing privilege raises these too, and fails the same way on the third look.)
            if attempt == 2:
                raise _unusable(storage_url, error) from None
            time.sleep(0.5 + random.random())
        except Exception as error:
            raise _unusable(storage_url, error) from None
    raise AssertionError("unreachable")


def _unusable(storage_url: str, problem: BaseException | str) -> StorageError:
    why = first_line(problem) if isinstance(problem, BaseException) else problem
    return StorageError(f"Optuna storage {tracking.hide_password(storage_url)} cannot be used: {why}")


def study_directions(tune_cfg: TuneConfig) -> list[str]:
    return ["maximize", "minimize"] if tune_cfg.multi_objective else ["maximize"]


def study_settings(cfg: ExperimentConfig, tune_cfg: TuneConfig, data: Splits | None = None,
                   teacher: Teacher | None = None) -> dict[str, Any]:
    """The settings every trial of the study must share, as ``section.name -> value``; with ``data``,
    the digests of its training and validation images too (the same data folder, elsewhere, agrees),
    and with ``teacher`` the runs its ``--teacher`` URIs resolved to (an alias moves between workers)."""
    not_settings = NOT_STUDY_SETTINGS | (SEARCHED_WIDTH_SETTINGS if tune_cfg.multi_objective else set())
    settings = {f"train.{k}": v for k, v in dataclasses.asdict(cfg.train).items() if k not in not_settings}
    settings.update({f"data.{k}": getattr(cfg.data, k) for k in DATA_STUDY_SETTINGS})
    if data is not None:
        settings.update({"data.train_digest": data.train.digest(), "data.val_digest": data.val.digest()})
    if teacher is not None:
        settings["train.teacher_run_ids"] = ",".join(teacher.source_run_ids)
    if not _is_journal_file(tune_cfg.storage or default_storage()):
        # Optuna judges a trial stale by the checking worker's grace period, not its runner's: a worker
        # with a shorter interval would fail the live trials of the others.
        settings[HEARTBEAT_SETTING] = tune_cfg.heartbeat_interval
    if tune_cfg.sampler == "grid":
        # Optuna's grid sampler counts a point as run only by trials of the very same grid: resumed with
        # another grid, it would run the points the two grids share again.
        grid = grid_space(tune_cfg, decay=searches_decay(cfg.train))
        settings["tune.grid"] = ", ".join(f"{name} {len(values)} points {values[0]:g}..{values[-1]:g}"
                                          for name, values in grid.items())
    if tune_cfg.multi_objective:
        # What else its values depend on: the choices searched (Optuna refuses other categorical
        # choices for a parameter within a study), the threads latency is timed with, the CPU it is
        # timed on (latencies from two kinds of machine cannot share one Pareto front) and the layout
        # the model is timed in (channels_last runs 1.4x faster than contiguous at batch 1).
        settings.update({
            "tune.width_choices": ",".join(map(str, tune_cfg.width_choice_list())),
            "tune.latency_threads": tune_cfg.latency_threads,
            "tune.latency_cpu": cpu_name(),
            LATENCY_MEMORY_FORMAT_SETTING: str(SHIPPED_MEMORY_FORMAT),
        })
        if architecture(cfg.train.model).hidden is not None:  # the others ignore --hidden-choices
            settings["tune.hidden_choices"] = ",".join(map(str, tune_cfg.hidden_choice_list()))
    return settings


def _check_study_settings(study: optuna.Study, cfg: ExperimentConfig, tune_cfg: TuneConfig,
                          study_name: str, data: Splits | None, teacher: Teacher | None = None) -> None:
    settings = study_settings(cfg, tune_cfg, data, teacher)
    stored = study.user_attrs.get("settings")
    if stored is None:
        _claim_new_study(study, settings, study_name)
        return
    # A setting the study has no record of was added to cifar-exp since: its trials ran with its default.
    # (Not so the grid, which holds its own search space: a grid study from before it was recorded is
    # taken to have run this grid.)
    defaults = study_settings(ExperimentConfig(), tune_cfg)
    defaults.pop("tune.grid", None)
    # Studies from before the layout was recorded timed their models contiguous.
    defaults[LATENCY_MEMORY_FORMAT_SETTING] = str(torch.contiguous_format)
    recorded = {k: stored.get(k, defaults.get(k, v)) for k, v in settings.items()}
    differ = {k: (recorded[k], v) for k, v in settings.items() if recorded[k] != v}
    if HEARTBEAT_SETTING in differ and len(differ) == 1:
        raise StorageError(
            f"study {study_name!r} runs with --heartbeat-interval {differ[HEARTBEAT_SETTING][0]}: every worker "
            "of a study must use the same (a shorter one would fail the other workers' live trials)"
        )
    if differ:
        changes = ", ".join(f"{k.split('.')[1].replace('_', '-')} {old} -> {new}"
                            for k, (old, new) in differ.items())
        raise StorageError(
            f"study {study_name!r} holds trials trained with other settings ({changes}); their values "
            "are not comparable: pass another --study-name"
        )
    unrecorded = {k: v for k, v in settings.items() if k not in stored}
    if unrecorded:  # from now on they are checked too (the image digests, for a study from before them)
        with deferred():
            study.set_user_attr("settings", {**stored, **unrecorded})
        log.info("study %s now also records %s", study_name, ", ".join(unrecorded))


def _claim_new_study(study: optuna.Study, settings: dict[str, Any], study_name: str) -> None:
    """Record the settings of a study that has none yet, or refuse if another worker is recording other ones.

    Workers started together all find no settings. Each first writes a claim of its own (its settings
    and the time), then reads every claim: of two workers with different settings, whichever reads last
    sees the other's and refuses, so two never both go on. A refused or failed worker withdraws its own
    claim; a claim older than ``CLAIM_SECONDS`` (a worker killed in between) no longer counts.
    """
    mine = f"{SETTINGS_CLAIM}{uuid.uuid4().hex}"
    with deferred():
        study.set_user_attr(mine, {"settings": settings, "time": time.time()})
    try:
        recent = time.time() - CLAIM_SECONDS
        others = [claim["settings"] for key, claim in study.user_attrs.items()
                  if key.startswith(SETTINGS_CLAIM) and key != mine and claim and claim["time"] > recent
                  and claim["settings"] != settings]
        if others:
            differ = sorted(k for k in settings.keys() | others[0].keys() if settings.get(k) != others[0].get(k))
            raise StorageError(
                f"study {study_name!r} is being started by another worker with other settings "
                f"({', '.join(k.split('.')[1].replace('_', '-') for k in differ)}): start the workers with the "
                "same settings, or pass another --study-name"
            )
        with deferred():
            study.set_user_attr("objective", ",".join(study_objective_names(study)))
            study.set_user_attr("settings", settings)
    except BaseException:
        with deferred():
            study.set_user_attr(mine, None)
        raise


def sampler_seed(seed: int, storage_url: str, trials_so_far: int) -> int:
    """The sampler's seed: ``--seed`` itself for a new study in a local database.

    A sampler seeded alike would propose the same random trials again, so the seed is mixed with the
    number of trials the study already holds (a resumed study) and, on a storage that several workers
    share (a database server, a journal file), with the host name and process id.
    """
    parts: list[object] = [seed, trials_so_far]
    if _is_shared_storage(storage_url):
        parts += [socket.gethostname(), os.getpid()]
    if parts == [seed, 0]:
        return seed
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def _is_shared_storage(storage_url: str) -> bool:
    """A storage that several workers may use at once: a database server or a journal file."""
    return _is_journal_file(storage_url) or _is_database_server(storage_url)


def _is_database_server(storage_url: str) -> bool:
    """A storage that workers on several machines share (not a local file)."""
    return storage_url.split(":", 1)[0].split("+")[0] in ("postgresql", "mysql")


def _is_journal_file(storage_url: str) -> bool:
    """A path, not a URL: a journal file, as optuna-dashboard also reads them."""
    return "://" not in storage_url


def _storage_file(url: str) -> Path | None:
    """The file of a local storage: a journal file path (``~`` expanded), or a SQLite URL's database file."""
    if not _is_journal_file(url):
        return tracking.sqlite_file(url)
    try:
        return Path(url).expanduser()
    except RuntimeError as error:  # ~user of no such user
        raise _unusable(url, error) from None


def _storage(url: str, heartbeat_interval: int, make_folder: bool = False) -> optuna.storages.BaseStorage:
    """The Optuna storage at ``url``; ``make_folder`` creates its file's folder (the default storage's)."""
    path = _storage_file(url)
    if make_folder and path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if _is_journal_file(url):
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql://"):
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver cifar-exp installs is psycopg2.
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_interval,
        grace_period=2 * heartbeat_interval,
        heartbeat_stale_trial_callback=_stale_trial,
    )


LOST_WORKER = "worker lost"  # the reason of a trial whose worker died
WORKER_ATTRS = ("worker", "worker_process", "mlflow_run_id", "reason")  # what a trial's worker records


def worker_process(pid: int | None = None) -> str | None:
    """``pid`` (default: this process) as ``boot/pid-namespace/pid/start-time``, unique on a machine.

    A process id alone is not: it is reused, and containers on one host (sharing its host name with
    ``--network host``) number their processes each in a namespace of their own. None off Linux.
    """
    pid = os.getpid() if pid is None else pid
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino  # the reader's: pid must be in the same one
        started = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]  # field 22, after comm
    except (OSError, IndexError):
        return None
    return f"{boot}/{namespace}/{pid}/{started}"


def _worker_is_gone(recorded: str, mine: str) -> bool:
    """Whether the process ``worker_process`` described as ``recorded`` has ended: only decidable for a
    process of ``mine``'s (this process') boot and pid namespace."""
    parts = recorded.split("/")  # boot, namespace, pid, start time
    if len(parts) != 4 or not parts[2].isdigit() or parts[:2] != mine.split("/")[:2]:
        return False
    pid = int(parts[2])
    current = worker_process(pid)
    if current is None:  # no such process, or one /proc does not show us (another user's, under hidepid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's: whether it is the same process cannot be told
        return False
    return current != recorded  # ended, and its id reused since


def fail_trials_of_dead_workers(study: optuna.Study) -> list[int]:
    """Fail (and retry once) the RUNNING trials of this machine's dead workers.

    A worker killed without a word (SIGKILL, out of memory) leaves its trial RUNNING: for good on a
    journal file, which has no heartbeats, and on a database until its heartbeat is older than the
    grace period (while the worker's own runs are closed at once, ``close_runs_of_dead_workers``).
    Each trial records its worker process (``worker_process``); a trial whose process, on this machine
    and in this pid namespace, is gone is marked FAIL and handled like a stale trial on a database
    (``_stale_trial``). Other machines' workers cannot be checked from here: on a database, Optuna's
    heartbeats find them. Returns the trials failed.
    """
    mine = worker_process()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        recorded = trial.user_attrs.get("worker_process")
        if mine is None or not recorded or not _worker_is_gone(recorded, mine):
            continue
        why = f"process {recorded.split('/')[2]} is gone"
        try:
            with deferred():  # failed, queued again and its runs closed, or none of it
                study._storage.set_trial_user_attr(trial._trial_id, "reason", f"{LOST_WORKER} ({why})")
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                _stale_trial(study, trial, why=why)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker starting now got to it first
        failed.append(trial.number)
    return failed


STUDY_RUN_KINDS = ("tune-study", "tune-retrain")  # the runs of a worker that no trial records


def _worker_process_tag() -> dict[str, str]:
    process = worker_process()
    return {"worker_process": process} if process else {}


def close_runs_of_dead_workers(experiment_name: str, study: optuna.Study) -> list[str]:
    """Close as KILLED the RUNNING study and retrain runs of ``study`` whose worker process, on this
    machine, is gone (killed by SIGKILL or out of memory between trials, where no trial's cleanup finds
    them), then every RUNNING trial run of the study whose study run is closed; returns the runs closed.
    Other machines' workers cannot be checked from here."""
    study_name = study.study_name
    mine = worker_process()
    closed = []
    for run_id, tags in tracking.running_runs(experiment_name, STUDY_RUN_KINDS) if mine else []:
        recorded = tags.get("worker_process")
        if tags.get("optuna_study_name") != study_name or not recorded or not _worker_is_gone(recorded, mine):
            continue
        # kill_stale_run defers signals itself: a run is closed with its tag, or not at all.
        closed += tracking.kill_stale_run(run_id, tags={"killed_because": f"process {recorded.split('/')[2]} is gone"})
    # A trial runs inside its study's run, so one left RUNNING under a closed study run has no worker:
    # its end could not be recorded (a tracking server down as the trial failed), while Optuna recorded
    # the trial's. Found by its parent, this holds for any machine's workers. (A trial still RUNNING in
    # Optuna is its stale-trial cleanup's, which records why: heartbeat or process gone.)
    states = {str(t.number): t.state.name for t in study.get_trials(deepcopy=False)}
    for run_id, tags in tracking.running_runs(experiment_name, ("tune-trial",)):
        parent, state = tags.get("mlflow.parentRunId"), states.get(tags.get("optuna_trial_number", ""))
        if tags.get("optuna_study_name") != study_name or not parent or state == "RUNNING":
            continue
        parent_status = tracking.run_status(parent)
        if parent_status == "RUNNING":
            continue
        why = f"its study run {parent} " + (f"was closed {parent_status}" if parent_status else "is gone")
        # By trial number: a same-named study of another Optuna storage logging into this experiment would be
        # read as this one (trial runs do not record the storage), its trial skipped or tagged with ours' state.
        recorded_state = {"optuna_state": state} if state else {}
        closed += tracking.kill_stale_run(run_id, tags={"killed_because": why, **recorded_state})
    if closed:
        log.warning("study %s: MLflow runs %s of dead workers closed as KILLED", study_name, ", ".join(closed))
    return closed


def _queue_again(study: optuna.Study, trial: FrozenTrial, max_retry: int = 1) -> None:
    """Queue a dead worker's trial again (at most ``max_retry`` times over), as Optuna's
    ``RetryHeartbeatStaleTrialCallback`` does, but without what its dead worker recorded (its process,
    MLflow run): a retry carrying them could pass for the dead worker's trial until its new worker
    records its own."""
    system_attrs = {"failed_trial": trial.number, "retry_history": [], **trial.system_attrs}
    system_attrs["retry_history"] = [*system_attrs["retry_history"], trial.number]
    if len(system_attrs["retry_history"]) > max_retry:
        return
    _queue_copy(study, trial, system_attrs)


def _queue_copy(study: optuna.Study, trial: FrozenTrial, system_attrs: dict[str, Any]) -> None:
    """Queue ``trial``'s parameters to run again, with ``system_attrs``, its user attributes but not
    what its worker recorded (``WORKER_ATTRS``)."""
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k not in WORKER_ATTRS},
        system_attrs=system_attrs,
    ))


def _stale_trial(study: optuna.Study, trial: FrozenTrial, why: str = "no heartbeat") -> None:
    """A trial whose worker died: Optuna (or ``fail_trials_of_dead_workers``) marked it FAIL; run it
    again, once.

    Its MLflow run and the dead worker's parent run are closed as KILLED instead of staying RUNNING.
    """
    with deferred():
        _queue_again(study, trial)
    closed = []
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        try:
            closed = tracking.kill_stale_run(
                run_id, tags={"optuna_state": "FAIL", "optuna_reason": f"{LOST_WORKER} ({why})"}
            )
        except Exception as error:  # the tracking store of a dead worker may be out of reach
            log.warning("could not close MLflow run %s of stale trial %d: %s", run_id, trial.number,
                        first_line(error))
    log.warning("trial %d of study %s lost its worker (%s): marked FAIL and queued again%s",
                trial.number, study.study_name, why, f"; MLflow runs {', '.join(closed)} closed as KILLED"
                if closed else "")


def grid_space(tune_cfg: TuneConfig, *, decay: bool = True) -> dict[str, list[float]]:
    """``--sampler grid``'s points: ``--grid-size`` lrs (log-spaced) by as many decays (``decay``)."""
    n = tune_cfg.grid_size
    space = {"lr": [float(f"{v:.6g}") for v in np.geomspace(tune_cfg.lr_min, tune_cfg.lr_max, n)]}
    if decay:
        space[DECAY_PARAM] = [float(f"{v:.6g}") for v in np.linspace(tune_cfg.decay_min, tune_cfg.decay_max, n)]
    return space


def _sampler(tune_cfg: TuneConfig, seed: int, *, decay: bool, study_seed: int) -> optuna.samplers.BaseSampler:
    """The sampler for ``seed`` (``sampler_seed``); ``study_seed``: the study's ``--seed``, which orders a grid."""
    if tune_cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune_cfg.sampler == "grid":
        # A trial records only its grid id, an index into the grid as the seed shuffled it: every worker
        # and every resumed run must shuffle alike, or an id would name another point in each (points run
        # twice, others never). Which unvisited point comes next may differ: in a resumed study or on a
        # shared storage the sampler's generator is reseeded (from the OS), so workers pick apart.
        sampler = _GridSampler(grid_space(tune_cfg, decay=decay), seed=study_seed)
        if seed != study_seed:
            sampler.reseed_rng()
        return sampler
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune_cfg.tpe_startup_trials)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, for trials queued outside the grid too (the baseline, a dead worker's
    baseline queued again): those have no grid id, which its ``after_trial`` reads once one grid
    point is left (a KeyError out of ``optimize``). For them the study stops once the grid is done."""

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        if "grid_id" in study._storage.get_trial_system_attrs(trial._trial_id):
            super().after_trial(study, trial, state, values)
        elif self.is_exhausted(study):
            study.stop()


def _pruner(tune_cfg: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    if tune_cfg.multi_objective:
        return optuna.pruners.NopPruner()  # Optuna cannot prune multi-objective trials
    if tune_cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune_cfg.prune_startup_trials,
                                           n_warmup_steps=tune_cfg.prune_warmup_epochs)
    if tune_cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, min(tune_cfg.prune_warmup_epochs, epochs)),
                                              max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def study_objective_names(study: optuna.Study) -> list[str]:
    return [OBJECTIVE, LATENCY_OBJECTIVE][: len(study.directions)]


def validation_accuracy(trial: FrozenTrial) -> float:
    """The first objective of a COMPLETE trial, in studies of one or two objectives."""
    return trial.values[0]


def best_trial(study: optuna.Study) -> TrialSummary | None:
    """The most accurate COMPLETE trial (in an accuracy,latency study: of the equally accurate ones, the
    fastest, which is on the Pareto set: the first of them could be beaten on latency)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    if len(study.directions) > 1:
        return TrialSummary.of(max(complete, key=lambda t: (t.values[0], -t.values[1])))
    return TrialSummary.of(max(complete, key=validation_accuracy))


def _check_two_objective_search(train_cfg: TrainConfig, tune_cfg: TuneConfig) -> None:
    """Refuse, before any study or run, width choices a trial could not build (its weights beyond this
    machine's memory), and a latency thread count beyond its cores (oversubscribed, the timings
    would measure thread contention)."""
    if tune_cfg.latency_threads > available_cores():
        raise ConfigError(f"latency-threads {tune_cfg.latency_threads} is more than the {available_cores()} cores "
                          "here (0: all cores)")
    widest = max(tune_cfg.width_choice_list())
    largest = dataclasses.replace(train_cfg, widths=f"{widest},{widest},{widest}")
    if architecture(train_cfg.model).hidden is not None:
        largest = dataclasses.replace(largest, hidden=max(tune_cfg.hidden_choice_list()))
    try:
        build_network(largest)
    except ConfigError as error:
        raise ConfigError(f"--width-choices/--hidden-choices: the largest choices are too large: {error}") from None


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The COMPLETE trials of an accuracy,latency study that no other trial beats, fastest first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    front = pareto_front([t.values[0] for t in complete], [t.values[1] for t in complete])
    return sorted((t for t, on in zip(complete, front) if on), key=lambda t: (t.values[1], t.number))


def tradeoff_point(trial: FrozenTrial) -> TradeoffPoint:
    """A COMPLETE trial of an accuracy,latency study, as the Pareto reports take it."""
    label = f"trial-{trial.number} w=" + ",".join(str(trial.params[name]) for name in WIDTH_PARAMS)
    if HIDDEN_PARAM in trial.params:
        label += f" h={trial.params[HIDDEN_PARAM]}"
    return TradeoffPoint(
        label=label,
        backend=LATENCY_BACKEND,
        accuracy=trial.values[0],
        latency_ms=trial.values[1],
        parameters=trial.user_attrs.get("parameter_count", 0),
        run_id=trial.user_attrs.get("mlflow_run_id", ""),
    )


def _is_baseline(trial: FrozenTrial, params: dict[str, Any]) -> bool:
    """Whether ``trial`` is a baseline trial of ``params`` (a queued one holds them as fixed_params)."""
    return bool(trial.user_attrs.get("baseline")) and (trial.system_attrs.get("fixed_params") or trial.params) == params


def baseline_needed(study: optuna.Study, params: dict[str, Any]) -> bool:
    """Whether to queue the baseline trial of ``params``: the study holds none, or only ones that were
    interrupted (a baseline of other settings, from an earlier run with other --lr/--lr-decay, is not it).

    A baseline that ran (or is queued, or running on another worker) is not queued again; one that
    failed on its own (its loss diverged) would fail again. One stopped by Ctrl-C or SIGTERM is.
    """
    return not any(
        _is_baseline(t, params) and not (t.state == TrialState.FAIL and t.user_attrs.get("reason") == INTERRUPTED)
        for t in study.get_trials(deepcopy=False)
    )


def grid_trials_to_retry(study: optuna.Study, grid: dict[str, list[float]]) -> list[FrozenTrial]:
    """Trials of grid points that Ctrl-C or SIGTERM stopped and that no other trial has run, runs or
    waits to run, one per point: Optuna's grid sampler counts a failed trial's point as visited for good.
    Baselines are ``baseline_needed``'s."""
    def point(params: dict[str, Any]) -> tuple | None:
        if set(params) != set(grid) or any(params[name] not in values for name, values in grid.items()):
            return None  # not (all of) a point of this grid, or stopped before its suggestions
        return tuple(sorted(params.items()))

    trials = study.get_trials(deepcopy=False)
    interrupted = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("reason") == INTERRUPTED
                   and not t.user_attrs.get("baseline")]
    stopped = {t.number for t in interrupted}
    # A trial queued by enqueue_trial holds its point as fixed_params until it runs.
    settled = {point(t.system_attrs.get("fixed_params") or t.params) for t in trials if t.number not in stopped}
    retry: dict[tuple, FrozenTrial] = {}
    for trial in interrupted:
        if (key := point(trial.params)) is not None and key not in settled:
            retry.setdefault(key, trial)
    return list(retry.values())


def _queue_interrupted(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue an interrupted grid trial again: its point and grid id (the grid sampler reads the id of
    every trial it sees finish), not what its worker recorded."""
    _queue_copy(study, trial, {k: v for k, v in trial.system_attrs.items() if k in ("grid_id", "search_space")})


def baseline_trial(study: optuna.Study, params: dict[str, Any]) -> TrialSummary | None:
    """The study's baseline trial of ``params``: its first COMPLETE one, else its first one in any state."""
    trials = [t for t in study.get_trials(deepcopy=False) if _is_baseline(t, params)]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    chosen = complete or trials
    return TrialSummary.of(chosen[0]) if chosen else None


def _log_study_summary(
    study: optuna.Study,
    best: TrialSummary | None,
    baseline: TrialSummary | None,
    ran: list[TrialSummary],
    tune_cfg: TuneConfig,
    pareto: list[FrozenTrial],
    *,
    decay: bool,
) -> None:
    """Into the parent run: best params and value, the baseline's value, trials.csv and the plots
    (``decay``: the study searches the lr decay); for an accuracy,latency study the Pareto set too
    (``pareto.csv``, ``plots/pareto.png``)."""
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
        write_study_plots(study, folder / "plots", decay=decay,
                          intermediate=not tune_cfg.multi_objective and tune_cfg.pruner != "none",
                          bounds=((tune_cfg.lr_min, tune_cfg.lr_max), (tune_cfg.decay_min, tune_cfg.decay_max)))
        if tune_cfg.multi_objective:
            tracking.log_metrics({"pareto_size": len(pareto)})
            write_pareto_report(study, pareto, folder)
        tracking.log_artifacts(folder)


def _params_of_run(cfg: ExperimentConfig, run_name: str, *, registers: bool) -> dict[str, Any]:
    """``cfg.flat()`` as the run it is logged into uses it: under the run's own name (under ``mlflow run``
    the name that run was made with), and registering only where it may: a trial never does, a study's
    run only through --retrain-best (which retrains once a trial completes)."""
    tracking_cfg = dataclasses.replace(cfg.tracking, run_name=run_name)
    if not (registers and cfg.tracking.register):
        tracking_cfg = dataclasses.replace(tracking_cfg, register=False, registered_model_name=None)
    return dataclasses.replace(cfg, tracking=tracking_cfg).flat()


def write_pareto_report(study: optuna.Study, pareto: list[FrozenTrial], folder: Path) -> None:
    """``pareto.csv`` (every COMPLETE trial, ``on_front`` marking the Pareto set) and ``plots/pareto.png``."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    on_front = {t.number for t in pareto}
    points = [tradeoff_point(t) for t in complete]
    write_pareto_csv(points, np.array([t.number in on_front for t in complete]), folder / "pareto.csv")
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    try:
        plot_pareto(points, folder / "plots" / "pareto.png", accuracy_label="validation accuracy")
    except Exception as error:  # a plot is a report, never a reason to lose the study's run
        log.warning("plot pareto skipped: %s", first_line(error))


TRIAL_COLUMNS = ("number", "state", OBJECTIVE, "lr", "lr_decay", "epochs", "baseline", "duration_s",
                 "reason", "worker", "mlflow_run_id")
# accuracy,latency studies: their second objective, the model's size and the searched width knobs too
MULTI_OBJECTIVE_TRIAL_COLUMNS = ("number", "state", OBJECTIVE, LATENCY_OBJECTIVE, "parameter_count", "lr",
                                 "lr_decay", *WIDTH_PARAMS, HIDDEN_PARAM, "epochs", "baseline", "duration_s",
                                 "reason", "worker", "mlflow_run_id")


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    multi_objective = len(study.directions) > 1
    columns = MULTI_OBJECTIVE_TRIAL_COLUMNS if multi_objective else TRIAL_COLUMNS
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for trial in study.get_trials(deepcopy=False):
            summary = TrialSummary.of(trial)
            duration = trial.duration.total_seconds() if trial.duration else None
            row = {
                "number": trial.number, "state": summary.state, OBJECTIVE: summary.value,
                "lr": trial.params.get("lr"), "lr_decay": trial.params.get("lr_decay"),
                "epochs": summary.epochs, "baseline": summary.baseline, "duration_s": duration,
                "reason": summary.reason, "worker": trial.user_attrs.get("worker"),
                "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
            }
            if multi_objective:
                row.update({LATENCY_OBJECTIVE: summary.latency_ms, "parameter_count": summary.parameter_count,
                            **{name: trial.params.get(name) for name in (*WIDTH_PARAMS, HIDDEN_PARAM)}})
            writer.writerow(row)


def write_study_plots(
    study: optuna.Study,
    folder: Path,
    *,
    intermediate: bool,
    decay: bool = True,
    bounds: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> list[Path]:
    """Optuna's matplotlib plots of the study, plus a scatter of every trial over lr x decay (a study
    that searches no decay, ``decay`` False, gets Optuna's slice plot over lr instead of both lr x
    decay plots).

    ``bounds`` ((lr_min, lr_max), (decay_min, decay_max)) frames the scatter on the searched space.
    A plot the study cannot support yet (importances need two completed trials) is skipped. In an
    accuracy,latency study the history and contour show validation accuracy; the importances both.
    """
    from optuna.visualization import matplotlib as oplt

    # Optuna's plots of one objective need it named in a multi-objective study.
    accuracy: dict[str, Any] = (
        {"target": validation_accuracy, "target_name": OBJECTIVE} if len(study.directions) > 1 else {}
    )
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: oplt.plot_optimization_history(study, **accuracy),
        "param_importances": lambda: oplt.plot_param_importances(study),
    }
    if decay:
        plots["lr_decay_contour"] = lambda: oplt.plot_contour(study, params=["lr", DECAY_PARAM], **accuracy)
        plots["lr_decay_scatter"] = lambda: _plot_scatter(study, bounds)
    else:
        plots["lr_slice"] = lambda: oplt.plot_slice(study, params=["lr"], **(accuracy or {"target_name": OBJECTIVE}))
    plots["timeline"] = lambda: oplt.plot_timeline(study)
    if intermediate:
        plots["intermediate_values"] = lambda: oplt.plot_intermediate_values(study)
    written = []
    with _optuna_verbosity(optuna.logging.ERROR):  # e.g. "Param lr unique value length is less than 2"
        for name, plot in plots.items():
            path = folder / f"{name}.png"
            if _write_plot(plot, path, name):
                written.append(path)
    return written


def _write_plot(plot: Callable[[], Any], path: Path, name: str) -> bool:
    """Save the figure ``plot`` draws as ``path``; False (and a warning) where it cannot be drawn."""
    open_before = set(plt.get_fignums())  # a caller's own pyplot figures (a notebook's) stay open
    try:
        # Optuna's plots switch matplotlib's global style: keep that from leaking into other reports.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")  # ExperimentalWarning, too few trials, ...
            axes = plot()
            figure = np.ravel(axes)[0].figure
            figure.set_size_inches(max(figure.get_figwidth(), 7), max(figure.get_figheight(), 5))
            figure.tight_layout()
            figure.savefig(path, dpi=100)
        return True
    except Exception as error:  # a plot is a report, never a reason to lose the study's run
        log.warning("plot %s skipped: %s", name, first_line(error))
        return False
    finally:
        for number in set(plt.get_fignums()) - open_before:
            plt.close(number)


def _plot_scatter(study: optuna.Study, bounds: tuple[tuple[float, float], tuple[float, float]] | None) -> Axes:
    """Every trial at its (lr, decay): colour = validation accuracy; pruned and failed trials marked."""
    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    trials = [t for t in study.get_trials(deepcopy=False) if {"lr", "lr_decay"} <= t.params.keys()]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        points = ax.scatter([t.params["lr"] for t in complete], [t.params["lr_decay"] for t in complete],
                            c=[validation_accuracy(t) for t in complete], cmap="viridis", s=60, edgecolors="k")
        figure.colorbar(points, ax=ax, label=OBJECTIVE)
        best = max(complete, key=validation_accuracy)
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
    ax.set(xlabel="lr (log scale)", ylabel="lr_decay",
           title=f"{as_written(study.study_name)}: trials over lr x decay")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return ax


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's own INFO lines repeat ours; its warnings stay, but for a trial that an interrupt stopped
    or whose loss diverged.

    Optuna logs such a trial as failed, twice (for an interrupt with the ``KeyboardInterrupt``'s
    traceback): the trial's run and user attributes record why, and the report line says it once.
    """
    trial_failures = logging.getLogger("optuna.study._optimize")
    repeated = _RepeatedTrialLines()
    trial_failures.addFilter(repeated)
    try:
        with _optuna_verbosity(optuna.logging.WARNING), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        trial_failures.removeFilter(repeated)


@contextmanager
def _optuna_verbosity(level: int) -> Iterator[None]:
    """Optuna's log level set to ``level`` for the block, the previous one restored after."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


class _RepeatedTrialLines(logging.Filter):
    """Drops Optuna's two lines about a trial an interrupt stopped ("Trial N failed with parameters:
    ... because of ... KeyboardInterrupt", with the traceback, then "Trial N failed with value None."),
    or one that failed with one of our one-line errors, which the command then ends with (a tracking
    server lost mid-trial), or one the objective gave NaN, which it does only for a diverged loss
    ("... because of the following error: The value nan is not acceptable.", then "Trial N failed with
    value nan." or "(nan, nan).")."""

    def __init__(self) -> None:
        super().__init__()
        self.next_line_start: str | None = None  # the second line's start, expected next

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        stopped = record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, CifarExpError))
        if stopped or " because of the following error: The value nan is not acceptable" in message:
            self.next_line_start = message.split(" failed with parameters")[0] + " failed with value "
            return False
        if self.next_line_start and message.startswith(self.next_line_start):
            self.next_line_start = None
            return False
        return True

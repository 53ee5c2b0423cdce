"""Optuna sweeps: a parent run with a child per trial, pruning, NaN trials, bad input, many workers."""

import csv
import dataclasses
import logging
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cifar_exp import tracking
from cifar_exp.cli import main, train_command
from cifar_exp.config import DataConfig, ExperimentConfig, TrackingConfig, TrainConfig, TuneConfig, recipe_config
from cifar_exp.data import ImageSet, Splits, load_splits
from cifar_exp.errors import ConfigError, StorageError, TrackingError
from cifar_exp.experiment import Teacher
from cifar_exp.models import build_model, count_parameters
from cifar_exp.train import evaluate, fit
from cifar_exp.tune import SETTINGS_CLAIM, TrialSummary, baseline_width_params, default_study_name, open_study, study_settings, tune
from conftest import signal_cli_mid_training, with_last_epoch

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--epochs", "2", "--batch-size", "32", "--val-size", "50", "--eval-batch-size", "100"]
# Two objectives, few width choices: the seed's own 64,64,64 and 1024 among them (its baseline trial).
ACC_LAT = ["--objectives", "accuracy,latency", "--width-choices", "16,32,64", "--hidden-choices", "128,1024"]
PER_EPOCH = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
             "train_images_per_second")


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def all_runs(client=None):
    client = client or MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def tiny_config(data_dir, cache_dir, epochs=3, **train):
    return ExperimentConfig(
        data=DataConfig(data_dir=str(data_dir), val_size=50, cache_dir=cache_dir),
        train=TrainConfig(**{"epochs": epochs, "batch_size": 32, "eval_batch_size": 100, **train}),
        tracking=TrackingConfig(experiment_name="tests"),
    )


def train_config_of(command):
    """The ExperimentConfig that the ``cifar-exp train ...`` line ``command`` would train."""
    from cifar_exp.cli import build_config, train

    words = shlex.split(command)
    assert words[:2] == ["cifar-exp", "train"]
    with train.make_context("train", words[2:]) as context:
        return build_config(context.params)


def children_of(parent_id, client=None):
    return [r for r in all_runs(client) if r.data.tags.get("mlflow.parentRunId") == parent_id]


def test_tune_has_help_for_every_option():
    from cifar_exp.cli import tune as tune_command

    result = run_cli("tune", "--help")
    assert result.exit_code == 0 and "--n-trials" in result.output and "--retrain-best" in result.output
    for param in tune_command.params:
        assert param.help, param.name
    # Tuning never sees the test split: the seed's validate-on-test protocol is not offered.
    assert "--val-on-test" not in result.output


def test_three_trial_study(tiny_data, tracking_store, cache_dir, tmp_path):
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS,
                     "--n-trials", "3", "--sampler", "random", "--pruner", "none")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("trial 0 (baseline) COMPLETE val_accuracy ") for line in lines), result.output
    assert sum(line.startswith("trial ") and "| best: trial" in line for line in lines) == 3
    assert any(line.startswith("best: trial ") for line in lines)

    client = MlflowClient()
    runs = all_runs(client)
    parents = [r for r in runs if r.data.tags.get("run_kind") == "tune-study"]
    assert len(parents) == 1 and len(runs) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tune-cifar10-seed-2ep"
    children = children_of(parent.info.run_id, client)
    assert sorted(r.info.run_name for r in children) == ["trial-0", "trial-1", "trial-2"]
    # Params say what each run did: named as it is, and no registration (neither run registers anything).
    assert (parent.data.params["tracking.run_name"], parent.data.params["tracking.register"]) == (
        "tune-cifar10-seed-2ep", "False")
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["optuna_state"] == "COMPLETE"
        assert child.data.params["train.epochs"] == "2"
        assert (child.data.params["tracking.run_name"], child.data.params["tracking.register"],
                child.data.params["tracking.registered_model_name"]) == (child.info.run_name, "False", "None")
        for name in PER_EPOCH:
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, name))
            assert steps == [1, 2], (child.info.run_name, name)

    # The baseline (the seed's lr 0.1, decay 0.95) runs first.
    baseline = next(r for r in children if r.info.run_name == "trial-0")
    assert baseline.data.tags["baseline"] == "true"
    assert (baseline.data.params["train.lr"], baseline.data.params["train.lr_decay"]) == ("0.1", "0.95")

    # The parent: best params and value, the baseline's value, trials.csv and the plots.
    study = optuna.load_study(study_name="cifar10-seed-2ep", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    metrics, params = parent.data.metrics, parent.data.params
    assert metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert params["tune.study_name"] == "cifar10-seed-2ep"  # the default name, as the study has it
    assert float(params["best.lr"]) == pytest.approx(study.best_params["lr"])
    assert float(params["best.lr_decay"]) == pytest.approx(study.best_params["lr_decay"])
    assert metrics["baseline_val_accuracy"] == pytest.approx(study.trials[0].value)
    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, dst_path=str(tmp_path / "a")))
    with open(folder / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [0, 1, 2]
    assert {r["mlflow_run_id"] for r in rows} == {c.info.run_id for c in children}
    for plot in ("optimization_history", "param_importances", "lr_decay_contour", "lr_decay_scatter"):
        assert (folder / "plots" / f"{plot}.png").stat().st_size > 5000, plot

    # Running again adds to the same study; the baseline is not queued twice.
    again = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--n-trials", "1",
                    "--sampler", "random", "--pruner", "none")
    assert again.exit_code == 0, again.output
    assert "3 finished trials in the study before this run" in again.output
    study = optuna.load_study(study_name="cifar10-seed-2ep", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len(study.trials) == 4 and not study.trials[3].user_attrs.get("baseline")


def test_timeout_stops_starting_trials(tiny_data, tracking_store, cache_dir, tmp_path):
    # Optuna checks the time between trials: the first trial runs to its end, no second one starts.
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--n-trials", "20",
                     "--timeout", "0.01", "--sampler", "random", "--pruner", "none")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="cifar10-seed-2ep", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    parent = next(r for r in all_runs() if r.data.tags.get("run_kind") == "tune-study")
    assert parent.info.status == "FINISHED" and parent.data.params["tune.timeout"] == "0.01"
    assert len(children_of(parent.info.run_id)) == 1


def test_a_study_of_another_schedule_searches_lr_alone(tiny_data, tracking_store, cache_dir, tmp_path):
    # The decay acts only in the exp schedule: a cosine study searches the learning rate alone.
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--schedule", "cosine",
                     "--n-trials", "3", "--sampler", "grid", "--grid-size", "2", "--pruner", "none")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="cifar10-seed-2ep", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.params for t in study.trials][0] == {"lr": 0.1}  # the baseline
    assert sorted(t.params["lr"] for t in study.trials[1:]) == [0.01, 0.5]  # the grid: lr alone
    assert all(t.params.keys() == {"lr"} and t.state == TrialState.COMPLETE for t in study.trials)
    best = study.best_trial
    assert f"best: trial {best.number}, lr {best.params['lr']:.4g}, val_accuracy {best.value:.4f}" in result.output
    assert "baseline: trial 0, lr 0.1, val_accuracy " in result.output and "lr_decay" not in result.output

    client = MlflowClient()
    parent = next(r for r in all_runs(client) if r.data.tags.get("run_kind") == "tune-study")
    assert {r.data.params["train.schedule"] for r in children_of(parent.info.run_id, client)} == {"cosine"}
    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, dst_path=str(tmp_path / "a")))
    plots = {p.stem for p in (folder / "plots").glob("*.png")}
    assert "lr_slice" in plots and not plots & {"lr_decay_contour", "lr_decay_scatter"}
    with open(folder / "trials.csv") as f:
        assert {row["lr_decay"] for row in csv.DictReader(f)} == {""}
    summary = TrialSummary.of(best)
    assert summary.train_options() == f"--lr {best.params['lr']!r}"


def test_a_tta_study_ranks_trials_on_one_pass_accuracy(tiny_data, tracking_store, cache_dir, tmp_path):
    # The registered model and the latency objective run one pass per image: so does the objective,
    # not the mirror-TTA accuracy that the trial's val_accuracy logs under --tta.
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--tta",
                     "--n-trials", "2", "--sampler", "random")
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    study = optuna.load_study(study_name="cifar10-seed-2ep", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        history = {name: [m.value for m in sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)]
                   for name in ("val_accuracy", "val_accuracy_without_tta")}
        # fp32 after the last epoch (the same as the one-pass validation unless it ran under autocast)
        assert trial.value == client.get_run(run_id).data.metrics["served_val_accuracy"]
        assert list(trial.intermediate_values.values()) == history["val_accuracy_without_tta"]
        assert len(history["val_accuracy"]) == 2  # the TTA accuracy is still logged beside it


def test_the_objective_of_a_trial_trained_under_autocast_is_its_fp32_accuracy(tiny_data, tracking_store, cache_dir,
                                                                              tmp_path, monkeypatch):
    import cifar_exp.tune as tuning

    trained = []

    def fit_with_an_autocast_validation_that_must_not_count(cfg, splits, **options):
        result = fit(cfg, splits, **options)
        trained.append(result.model)
        return with_last_epoch(result, val_accuracy=0.0)

    monkeypatch.setattr(tuning, "fit", fit_with_an_autocast_validation_that_must_not_count)
    cfg = tiny_config(tiny_data, cache_dir, epochs=1, amp=True, amp_dtype="bfloat16")
    tune_cfg = TuneConfig(n_trials=1, study_name="amp", storage=f"sqlite:///{tmp_path / 'study.db'}", pruner="none")
    outcome = tune(cfg, tune_cfg, report=lambda line: None)

    (trial,) = outcome.trials
    splits = load_splits(cfg.data)
    expected = evaluate(trained[0], splits.val, batch_size=100).accuracy  # fp32, one pass
    assert trial.value == expected > 0.1
    run = MlflowClient().get_run(optuna.load_study(study_name="amp", storage=tune_cfg.storage)
                                 .trials[0].user_attrs["mlflow_run_id"])
    assert run.data.metrics["served_val_accuracy"] == expected


@pytest.mark.parametrize("warmup_epochs, tta", [(0, False), (2, True)])
def test_pruner_stops_a_hopeless_trial(tiny_data, tracking_store, cache_dir, tmp_path, warmup_epochs, tta):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    study.enqueue_trial({"lr": 0.08, "lr_decay": 0.95})
    study.enqueue_trial({"lr": 0.12, "lr_decay": 0.95})
    study.enqueue_trial({"lr": 1e-5, "lr_decay": 0.9})  # learns nothing: hopeless from epoch 1 on
    cfg = tiny_config(tiny_data, cache_dir, epochs=3, tta=tta)
    tune_cfg = TuneConfig(n_trials=4, study_name="prune", storage=storage, sampler="random", lr_min=1e-5,
                          pruner="median", prune_startup_trials=2, prune_warmup_epochs=warmup_epochs)
    lines = []
    outcome = tune(cfg, tune_cfg, report=lines.append)

    states = [t.state for t in outcome.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"], lines
    pruned = outcome.trials[2]
    stopped = max(1, warmup_epochs)  # trains its warm-up epochs before it can be pruned
    assert pruned.epochs == stopped and pruned.reason.startswith(f"pruned after epoch {stopped}: val_accuracy")
    if tta:  # the pruner saw the one-pass accuracy: the reason names the metric of the trial's run that holds it
        run = MlflowClient().get_run(optuna.load_study(study_name="prune", storage=storage)
                                     .trials[2].user_attrs["mlflow_run_id"])
        [seen] = [m.value for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy_without_tta")
                  if m.step == stopped]
        assert pruned.reason == f"pruned after epoch {stopped}: val_accuracy_without_tta {seen:.4f}"
    if warmup_epochs:
        return
    assert outcome.baseline.number == 3 and outcome.baseline.state == "COMPLETE"  # the study went on
    client = MlflowClient()
    child = next(r for r in children_of(outcome.run_id, client) if r.info.run_name == "trial-2")
    assert child.data.tags["optuna_state"] == "PRUNED" and child.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1]
    names = {a.path for a in client.list_artifacts(outcome.run_id, "plots")}
    assert "plots/intermediate_values.png" in names
    assert client.get_run(outcome.run_id).data.metrics["trials_pruned"] == 1


def test_a_trial_is_not_pruned_after_its_last_epoch(tiny_data, tracking_store, cache_dir, tmp_path):
    # Pruning then saves nothing and would throw the trained trial's value away.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="last", storage=storage, direction="maximize")
    for lr in (0.08, 0.12, 1e-5):  # the last one learns nothing: the median pruner's pick at any epoch
        study.enqueue_trial({"lr": lr, "lr_decay": 0.95})
    tune_cfg = TuneConfig(n_trials=3, study_name="last", storage=storage, sampler="random", lr_min=1e-5,
                          pruner="median", prune_startup_trials=2, prune_warmup_epochs=0, baseline=False)
    outcome = tune(tiny_config(tiny_data, cache_dir, epochs=1), tune_cfg, report=lambda line: None)
    assert [t.state for t in outcome.trials] == ["COMPLETE"] * 3
    # Below the median of the other two at its one epoch: pruned, were the last epoch not spared.
    assert outcome.trials[2].value < min(outcome.trials[0].value, outcome.trials[1].value)


def test_ctrl_c_ends_a_study_in_one_line_killed_by_sigint(tiny_data, tracking_store, cache_dir, tmp_path):
    # tracking_store: the CLI it starts logs into tmp_path's store, not the repository's mlflow.db
    # Optuna would log the interrupted trial as failed, with the KeyboardInterrupt's traceback.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    returncode, output = signal_cli_mid_training(
        ["tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--val-size", 50, "--batch-size", 32,
         "--epochs", 500, "--n-trials", 1, "--storage", storage], epochs=500, sig=signal.SIGINT)
    assert returncode == -signal.SIGINT, output  # killed by it, after closing its runs
    assert "Traceback" not in output and "failed with" not in output, output
    assert output.strip().endswith("Aborted: SIGINT."), output
    trial = optuna.load_study(study_name="cifar10-seed-500ep", storage=storage).trials[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "interrupted"


def test_a_tracking_store_lost_mid_trial_ends_the_study_in_one_error_and_closes_its_runs(
        tiny_data, tracking_store, cache_dir, caplog, monkeypatch):
    # Optuna logged the failed trial with its traceback before the command's own one-line error.
    lost = "API request to http://server:5000/api/2.0/mlflow/runs/log-batch failed with exception ConnectionError"

    def log_metrics(metrics, step=None):
        raise MlflowException(lost)

    monkeypatch.setattr(tracking, "log_metrics", log_metrics)
    with pytest.raises(TrackingError, match=f"^the tracking store failed during run [0-9a-f]+: {lost}$"):
        tune(tiny_config(tiny_data, cache_dir, epochs=1), TuneConfig(n_trials=2, pruner="none"),
             report=lambda line: None)
    assert "Traceback" not in caplog.text and "failed with" not in caplog.text, caplog.text
    runs = {run.info.run_name: run.info.status for run in all_runs(MlflowClient())}
    assert runs == {"tune-cifar10-seed-1ep": "FAILED", "trial-0": "FAILED"}


def test_nan_trial_fails_cleanly_and_the_study_goes_on(tiny_data, tracking_store, cache_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="nan", storage=storage, direction="maximize")
    study.enqueue_trial({"lr": 1e6, "lr_decay": 0.9})
    cfg = tiny_config(tiny_data, cache_dir, epochs=2, amp=False)
    tune_cfg = TuneConfig(n_trials=2, study_name="nan", storage=storage, lr_max=1e7, pruner="none")
    optuna_lines = []
    collect = logging.Handler()
    collect.emit = lambda record: optuna_lines.append(record.getMessage())
    logging.getLogger("optuna").addHandler(collect)
    try:
        outcome = tune(cfg, tune_cfg, report=lambda line: None)
    finally:
        logging.getLogger("optuna").removeHandler(collect)
    assert not [line for line in optuna_lines if "failed with" in line]  # the trial's reason says it once

    failed, baseline = outcome.trials
    assert failed.state == "FAIL" and "training loss became" in failed.reason
    assert baseline.state == "COMPLETE" and baseline.baseline
    assert outcome.best.number == baseline.number
    client = MlflowClient()
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    child = next(r for r in children_of(outcome.run_id, client) if r.info.run_name == "trial-0")
    assert child.info.status == "FAILED"
    assert child.data.tags["optuna_state"] == "FAIL" and "training loss became" in child.data.tags["optuna_reason"]
    assert optuna.load_study(study_name="nan", storage=storage).trials[0].user_attrs["reason"] == failed.reason


def test_a_trial_that_crashes_is_failed_in_optuna_and_mlflow(tiny_data, tracking_store, cache_dir, tmp_path,
                                                            monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("cifar_exp.tune.fit", crash)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(RuntimeError, match="boom"):
        tune(tiny_config(tiny_data, cache_dir, epochs=1), TuneConfig(n_trials=1, study_name="crash", storage=storage),
             report=lambda line: None)
    assert [t.state for t in optuna.load_study(study_name="crash", storage=storage).trials] == [TrialState.FAIL]
    runs = {r.info.run_name: r for r in all_runs()}
    assert {r.info.status for r in runs.values()} == {"FAILED"}
    assert runs["trial-0"].data.tags["optuna_state"] == "FAIL"
    assert runs["trial-0"].data.tags["optuna_reason"] == "RuntimeError: boom"


@pytest.mark.parametrize("where", ["complete tag", "run close", "diverged"])
def test_an_interrupt_held_back_while_a_trial_is_finished_fails_it_in_both(tiny_data, tracking_store, cache_dir,
                                                                           tmp_path, monkeypatch, where):
    # Ctrl-C during the write of optuna_state=COMPLETE, or of the run's FINISHED status, takes effect
    # once it is written: Optuna then marks the trial FAIL, and its run must say so too.
    from cifar_exp import tracking

    set_tags, end_run = tracking.set_tags, mlflow.end_run

    def interrupted_after_tag(tags):
        set_tags(tags)
        if tags.get("optuna_state") == ("FAIL" if where == "diverged" else "COMPLETE"):
            raise KeyboardInterrupt

    def interrupted_after_close(status="FINISHED"):
        end_run(status)
        if status == "FINISHED":  # the trial's run: the first to finish
            raise KeyboardInterrupt

    if where == "run close":
        monkeypatch.setattr(mlflow, "end_run", interrupted_after_close)
    else:
        monkeypatch.setattr(tracking, "set_tags", interrupted_after_tag)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = tiny_config(tiny_data, cache_dir, epochs=1, amp=False, lr=1e6 if where == "diverged" else 0.1)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, TuneConfig(n_trials=1, study_name="late", storage=storage, lr_max=1e7), report=lambda line: None)
    [trial] = optuna.load_study(study_name="late", storage=storage).trials
    runs = {r.info.run_name: r for r in all_runs()}
    assert trial.state == TrialState.FAIL
    assert runs["trial-0"].info.status == runs["tune-late"].info.status == "KILLED"
    assert runs["trial-0"].data.tags["optuna_state"] == "FAIL"
    # A trial that diverged before the interrupt keeps that reason (its baseline is not queued again).
    reason = trial.user_attrs["reason"]
    assert reason.startswith("training loss became") if where == "diverged" else reason == "interrupted"
    assert runs["trial-0"].data.tags["optuna_reason"] == reason


def test_every_trial_distils_from_the_teacher_loaded_once(tiny_data, tracking_store, cache_dir, tmp_path,
                                                        monkeypatch):
    import torch

    from cifar_exp import tune as tune_module

    # What a teacher teaches is tested in test_train (the palette teacher); here: it reaches every trial.
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    loads, teachers_seen, fit = [], [], tune_module.fit

    def spying_fit(*args, teacher, **kwargs):
        teachers_seen.append(teacher)
        return fit(*args, teacher=teacher, **kwargs)

    monkeypatch.setattr(tune_module, "load_teacher",
                        lambda train_cfg, *args: loads.append(train_cfg.teacher) or Teacher(teacher, ("abc",)))
    monkeypatch.setattr(tune_module, "fit", spying_fit)
    cfg = tiny_config(tiny_data, cache_dir, epochs=1, teacher="runs:/abc/model")
    outcome = tune(cfg, TuneConfig(n_trials=2, study_name="kd", storage=f"sqlite:///{tmp_path / 'study.db'}"),
                   report=lambda line: None)
    assert [trial.state for trial in outcome.trials] == ["COMPLETE", "COMPLETE"]
    assert loads == ["runs:/abc/model"] and teachers_seen == [teacher, teacher]
    tags = MlflowClient().get_run(outcome.run_id).data.tags
    assert tags["teacher_run_ids"] == "abc"
    # Run "abc" logged no training split: its teacher may have seen the images the trials validate on.
    assert tags["no_champion_candidate"].startswith("teacher run abc trained on other images than this run's")


def test_retrain_best_is_a_full_training_run_linked_to_the_study(tiny_data, tracking_store, cache_dir):
    cfg = tiny_config(tiny_data, cache_dir, epochs=2)
    outcome = tune(cfg, TuneConfig(n_trials=1, pruner="none", retrain_best=True), report=lambda line: None)
    retrained = outcome.retrained
    assert retrained is not None and retrained.model_version == "1" and retrained.champion
    run = MlflowClient().get_run(retrained.run_id)
    assert run.data.tags["mlflow.parentRunId"] == outcome.run_id
    assert run.data.tags["tune_parent_run_id"] == outcome.run_id
    assert run.data.tags["optuna_trial_number"] == "0"
    assert run.data.params["train.lr"] == "0.1" and "test_accuracy" in run.data.metrics
    assert run.data.params["tracking.run_name"] == "retrain-trial-0"
    # The study's run registers through its retrain; its trial never does.
    parent, [trial] = MlflowClient().get_run(outcome.run_id), [
        r for r in MlflowClient().search_runs([run.info.experiment_id]) if r.info.run_name == "trial-0"]
    assert (parent.data.params["tracking.register"], trial.data.params["tracking.register"]) == ("True", "False")


def test_under_mlflow_run_the_study_run_records_the_name_it_was_made_with(tiny_data, tracking_store, cache_dir,
                                                                          monkeypatch):
    # `mlflow run` names the run it makes; the study logs into it, and its param said tune-<study>.
    client = MlflowClient()
    made = client.create_run(client.create_experiment("project"), run_name="mlflow-made-name").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", made)
    outcome = tune(tiny_config(tiny_data, cache_dir, epochs=1), TuneConfig(n_trials=1, pruner="none"),
                   report=lambda line: None)
    run = client.get_run(made)
    assert outcome.run_id == made and run.info.run_name == "mlflow-made-name"
    assert (run.data.params["tracking.run_name"], run.data.params["tracking.register"]) == ("mlflow-made-name", "False")


@pytest.mark.parametrize(("args", "message"), [
    (["--lr-min", "0"], "lr-min must be a finite number > 0, got 0.0"),
    (["--lr-max", "-1"], "lr-max must be a finite number > 0, got -1.0"),
    (["--lr-min", "0.5", "--lr-max", "0.1"], "lr range [0.5, 0.1] is empty or inverted"),
    (["--lr-min", "0.2", "--lr-max", "0.2"], "lr range [0.2, 0.2] is empty or inverted"),
    (["--decay-min", "0.99", "--decay-max", "0.9"], "decay range [0.99, 0.9] is empty or inverted"),
    (["--decay-max", "1.01"], "decay-max must be in (0, 1], got 1.01"),
    (["--decay-min", "0"], "decay-min must be in (0, 1], got 0.0"),
    (["--study-name", "a\nb"], "study-name must not contain control characters, got 'a\\nb'"),
    (["--n-trials", "0"], "n-trials must be >= 1, got 0"),
    (["--lr", "0.9"], "the baseline trial (--lr 0.9, --lr-decay 0.95) lies outside the searched ranges"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (["--schedule", "cosine", "--lr", "0.9"],
     "the baseline trial (--lr 0.9) lies outside the searched range lr [0.01, 0.5]: widen it"),
    (["--storage", "postgresql://who:secret@127.0.0.1:9/db"],
     "Optuna storage postgresql://who:***@127.0.0.1:9/db cannot be used: "),
    (["--storage", "nosuch://host/db"], "Optuna storage nosuch://host/db cannot be used: "),
    (["--objectives", "accuracy,latency", "--sampler", "grid"],
     "--sampler grid cannot search the conv widths and hidden size of --objectives accuracy,latency"),
    (["--objectives", "accuracy,latency", "--retrain-best"],
     "--retrain-best needs a single best trial; with --objectives accuracy,latency pick a trial of the Pareto "
     "set and run `cifar-exp train` with its --lr, --lr-decay, --widths and --hidden"),
    (["--objectives", "accuracy,latency", "--width-choices", "16,32"],
     "the baseline trial's conv width 64 (model seed, widths 64,64,64) is not among --width-choices 16,32"),
    (["--objectives", "accuracy,latency", "--hidden-choices", "128,256"],
     "the baseline trial's hidden size 1024 (model seed) is not among --hidden-choices 128,256"),
    (["--width-choices", "16,x"], "width-choices must be comma-separated positive integers, got '16,x'"),
    (["--latency-threads", "-1"], "latency-threads must be >= 0 (0: all cores), got -1"),
    (["--study-name", "  "], "study-name must not be empty, got '  '"),
    (["--storage", " "], "storage must not be empty, got ' '"),
    (["--model", "pico", "--hidden", "128"], "model pico has no hidden layer (--hidden 128)"),
    (["--widths", "32,48"], "widths must be three positive integers, e.g. 32,48,64; got '32,48'"),
    (["--teacher", "runs:/0123456789abcdef/model"], "cannot load model runs:/0123456789abcdef/model"),
])
def test_bad_input_is_one_line_before_any_training(tiny_data, tracking_store, cache_dir, args, message):
    start = time.perf_counter()
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, *args)
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [result.output.strip()]
    assert result.output.startswith("Error: ") and "secret" not in result.output
    assert all_runs() == [] and time.perf_counter() - start < 30


def test_the_study_run_counts_the_parameters_of_the_datasets_classes(tiny_data, tracking_store, cache_dir, tmp_path):
    three = tmp_path / "three-classes"
    for split in ("train", "test"):
        for name in ("airplane", "bird", "cat"):
            shutil.copytree(tiny_data / split / name, three / split / name)
    result = run_cli("tune", "--data-dir", three, "--cache-dir", cache_dir, *TINY_ARGS, "--val-size", "15",
                     "--n-trials", "1", "--epochs", "1")
    assert result.exit_code == 0, result.output
    parent = next(r for r in all_runs() if r.data.tags.get("run_kind") == "tune-study")
    assert parent.data.tags["parameter_count"] == str(count_parameters(build_model("seed", 3)))  # not 10 outputs


def test_an_unusable_storage_is_reported_before_the_data_loads(tiny_data, tracking_store, cache_dir,
                                                              tmp_path, monkeypatch):
    from cifar_exp import tune as tune_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded before the storage was checked")

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # no newline: not a journal line being written either
    mlflow_like = tmp_path / "tracking.db"  # e.g. --storage given MLflow's database by mistake
    with sqlite3.connect(mlflow_like) as db:
        db.executescript("CREATE TABLE experiments (id INTEGER); CREATE TABLE runs (id INTEGER);")
    others = {path: path.read_bytes() for path in (blocker, mlflow_like)}
    monkeypatch.setattr(tune_module, "load_splits", no_loading)
    for storage, problem in [
        (f"sqlite:///{mlflow_like}", f"{mlflow_like} is MLflow's tracking database, not an Optuna storage"),
        (f"sqlite:///{blocker}", f"{blocker} is not a SQLite database (file is not a database)"),
        (str(blocker), f"{blocker} is not an Optuna journal file (its first line is not a journal entry)"),
        (str(tmp_path), f"{tmp_path} is not a file"),
        ("postgresql://who:secret@127.0.0.1:9/db", ""),  # nothing listens on port 9
        ("foo://bar", "Can't load plugin: sqlalchemy.dialects:foo"),
        ("mssql+pymssql://who@host/db", "No module named 'pymssql'"),  # a driver not installed
        (f"sqlite:///{blocker}/optuna.db", f"{blocker} is not a folder"),
        (f"sqlite:///{tmp_path}/typo/optuna.db", f"{tmp_path}/typo does not exist"),
        (f"{tmp_path}/typo/journal.log", f"{tmp_path}/typo does not exist"),  # a journal file
        ("~no-such-user-of-cifar-exp/journal.log", "Could not determine home directory"),
        ("sqlite:///~/optuna.db", "~ does not exist"),  # SQLite opens ./~/optuna.db: it expands no ~
    ]:
        result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--storage", storage)
        shown = storage.replace("secret", "***")
        assert result.exit_code == 1 and f"Error: Optuna storage {shown} cannot be used: {problem}" \
            in result.output, result.output
    assert all_runs() == [] and not (tmp_path / "typo").exists()
    assert {path: path.read_bytes() for path in others} == others  # Optuna wrote nothing into them


def test_a_storage_file_being_written_or_locked_is_left_to_optuna(tmp_path, monkeypatch):
    from cifar_exp.tune import _not_an_optuna_file

    journal = tmp_path / "studies.log"
    journal.write_bytes(b'{"op_code": 0, "worker_id": "a"')  # another worker's first line, half written...

    def end_the_line():
        with journal.open("ab") as file:
            file.write(b', "x": 1}\n')

    finish = threading.Timer(0.3, end_the_line)
    finish.start()  # ... and ended a moment later
    assert _not_an_optuna_file(journal, journal=True) is None
    finish.join()
    for other in (b"hello\n", b"hello"):  # a text file, with or without its newline
        journal.write_bytes(other)
        assert "not an Optuna journal file" in _not_an_optuna_file(journal, journal=True)
    database = tmp_path / "optuna.db"
    optuna.create_study(storage=f"sqlite:///{database}")
    assert _not_an_optuna_file(database, journal=False) is None
    with monkeypatch.context() as patched:  # (root may write read-only files)
        patched.setattr(os, "access", lambda path, mode: Path(path) != database)
        assert _not_an_optuna_file(database, journal=False) == f"{database} is not writable"
    assert "not an Optuna journal file" in _not_an_optuna_file(database, journal=True)  # a path, not sqlite:///
    with sqlite3.connect(database, isolation_level=None) as writer:
        writer.execute("BEGIN EXCLUSIVE")  # a worker writing: not readable now, but no reason to refuse
        assert _not_an_optuna_file(database, journal=False) is None
        writer.execute("ROLLBACK")


def test_a_journal_cut_off_mid_entry_or_unreadable_is_refused(tmp_path, monkeypatch):
    # Optuna skips a cut-off last entry when it reads the journal, but appends its next entry to it:
    # the joined line, then in the middle of the file, would make the whole study unreadable.
    from cifar_exp import tune as tune_module

    journal = tmp_path / "studies.log"
    optuna.create_study(study_name="s", storage=_optuna_storage(str(journal)))
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker')  # a worker that died writing (disk full, power cut)
    assert tune_module._not_an_optuna_file(journal, journal=True) == (
        f"{journal} ends in a cut-off entry (a worker stopped while writing it): delete the text after its last "
        "line break, then run again")
    journal.write_bytes(whole)
    assert tune_module._not_an_optuna_file(journal, journal=True) is None

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tune_module, "open", unreadable, raising=False)  # (root reads any file)
    assert tune_module._not_an_optuna_file(journal, journal=True) == f"{journal} cannot be read (Permission denied)"


def test_study_with_another_direction_or_other_settings_is_refused(tiny_data, tracking_store, cache_dir, tmp_path):
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"  # the default storage
    (tmp_path / "mlruns").mkdir()
    optuna.create_study(study_name="losses", storage=storage, direction="minimize")
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--study-name", "losses")
    assert result.exit_code == 1
    assert "Error: study 'losses' in " in result.output
    assert "exists with direction minimize; tune maximises val_accuracy: pass another --study-name" in result.output

    other = optuna.create_study(study_name="five-epochs", storage=storage, direction="maximize")
    other.set_user_attr("settings", {"train.epochs": 5})
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS,
                     "--study-name", "five-epochs")
    assert result.exit_code == 1
    assert "holds trials trained with other settings (epochs 5 -> 2" in result.output
    assert all_runs() == []

    # Optuna judges a trial stale by the checking worker's heartbeat grace period: all must share it.
    args = ["--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--study-name", "heartbeats",
            "--n-trials", "1", "--no-baseline"]
    assert run_cli("tune", *args).exit_code == 0
    assert optuna.load_study(study_name="heartbeats", storage=storage).user_attrs["settings"][
        "tune.heartbeat_interval"] == 30  # the default
    runs = len(all_runs())
    result = run_cli("tune", *args, "--heartbeat-interval", "5")
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        "Error: study 'heartbeats' runs with --heartbeat-interval 30: every worker of a study must use the same "
        "(a shorter one would fail the other workers' live trials)"]
    assert len(all_runs()) == runs
    # With other settings differing too, the usual message names them all.
    result = run_cli("tune", *args, "--heartbeat-interval", "5", "--epochs", "3")
    assert result.exit_code == 1
    assert "other settings (epochs 2 -> 3, heartbeat-interval 30 -> 5)" in result.output
    assert optuna.load_study(study_name="heartbeats", storage=storage).user_attrs["objective"] == "val_accuracy"
    journal = f"{tmp_path}/journal.log"  # no heartbeats there: nothing to share
    assert "tune.heartbeat_interval" not in study_settings(ExperimentConfig(), TuneConfig(storage=journal))


def test_tune_into_a_deleted_experiment_fails_before_creating_the_study(tiny_data, tracking_store, cache_dir,
                                                                         tmp_path):
    MlflowClient().delete_experiment(MlflowClient().create_experiment("gone"))
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS,
                     "--experiment-name", "gone")
    assert result.exit_code == 1
    assert "Error: experiment 'gone' was deleted: restore it" in result.output
    assert not (tmp_path / "mlruns" / "optuna.db").exists()  # no study, no storage file
    assert all_runs() == []


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask and tell, without optimize
def test_a_resumed_study_samples_new_trials(tmp_path):
    lr = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)

    def sample(storage: str, name: str, count: int) -> list[float]:
        study = open_study(ExperimentConfig(), TuneConfig(sampler="random"), name, storage)
        values = []
        for _ in range(count):
            trial = study.ask({"lr": lr})
            study.tell(trial, 0.5)
            values.append(trial.params["lr"])
        return values

    local = f"sqlite:///{tmp_path}/optuna.db"
    first = sample(local, "resumed", 2)
    assert sample(local, "fresh", 2) == first  # a new study follows --seed
    assert set(sample(local, "resumed", 2)).isdisjoint(first)  # a resumed one does not repeat it
    # A journal file may be shared by several workers: each samples its own trials.
    assert set(sample(str(tmp_path / "studies.log"), "journal", 2)).isdisjoint(first)


def test_a_grid_study_resumed_or_shared_runs_every_point_once(tmp_path):
    # A trial records only a grid id: each run (a resumed study, another worker) must read the ids as
    # the same points, or some points run twice and others never.
    space = {"lr": optuna.distributions.FloatDistribution(0.01, 0.5, log=True),
             "lr_decay": optuna.distributions.FloatDistribution(0.85, 0.99)}

    def run(storage: str, count: int) -> optuna.Study:
        study = open_study(ExperimentConfig(), TuneConfig(sampler="grid", grid_size=3), "grid", storage)
        for _ in range(count):
            trial = study.ask(space)
            study.tell(trial, 0.5)
        return study

    for storage in (f"sqlite:///{tmp_path}/optuna.db", str(tmp_path / "studies.log")):  # local; shared
        run(storage, 4)
        study = run(storage, 4)  # not the 9th: the grid sampler would stop the study, outside optimize()
        points = [(t.params["lr"], t.params["lr_decay"]) for t in study.trials]
        assert len(set(points)) == len(points) == 8 and not study.sampler.is_exhausted(study)


def test_a_finished_grid_still_fails_and_reruns_a_dead_workers_trial(tiny_data, tracking_store, cache_dir, tmp_path):
    # A run on a finished grid skips optimize(), where Optuna fails trials whose heartbeat stopped:
    # it must do that first, or a dead worker's trial would stay RUNNING for good.
    url = f"sqlite:///{tmp_path}/optuna.db"
    cfg = tiny_config(tiny_data, cache_dir, epochs=1)
    tune_cfg = TuneConfig(n_trials=5, sampler="grid", grid_size=2, pruner="none", storage=url, study_name="grid",
                          heartbeat_interval=1)
    tune(cfg, tune_cfg, report=lambda line: None)  # the baseline and the four points
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1)
    study = optuna.load_study(study_name="grid", storage=storage)
    study.enqueue_trial({"lr": 0.1, "lr_decay": 0.95}, user_attrs={"baseline": True})
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.5, log=True),
                      "lr_decay": optuna.distributions.FloatDistribution(0.85, 0.99)})
    storage.record_heartbeat(dead._trial_id)  # its worker's last sign of life
    # Longer than the grace period (twice the interval, 2 s) in SQLite's whole-second timestamps:
    # stale once the two readings differ by 3 s, which 4 s of real time always gives.
    time.sleep(4)
    again = tune(cfg, tune_cfg, report=lambda line: None)
    states = [t.state for t in optuna.load_study(study_name="grid", storage=url).trials]
    assert states[dead.number] == TrialState.FAIL and TrialState.RUNNING not in states
    assert [t.state for t in again.trials] == ["COMPLETE"]  # its retry, and nothing else: the grid is done


def test_a_baseline_that_finishes_with_one_grid_point_left_does_not_stop_the_grid(tmp_path):
    # The baseline is queued outside the grid (no grid id); Optuna's grid sampler read one from every
    # trial that finished with a single grid point left, and raised KeyError out of optimize().
    study = open_study(ExperimentConfig(), TuneConfig(sampler="grid", grid_size=2), "grid",
                       f"sqlite:///{tmp_path}/optuna.db")

    def objective(trial):
        return trial.suggest_float("lr", 0.01, 0.5, log=True) * trial.suggest_float("lr_decay", 0.85, 0.99)

    study.optimize(objective, n_trials=3)  # three of the four points
    study.enqueue_trial({"lr": 0.1, "lr_decay": 0.95}, user_attrs={"baseline": True})
    study.optimize(objective, n_trials=1)  # the baseline, with one point left
    study.optimize(objective, n_trials=5)  # the last point, then the study stops: the grid is done
    points = {(t.params["lr"], t.params["lr_decay"]) for t in study.trials if not t.user_attrs.get("baseline")}
    assert len(study.trials) == 5 and points == {(lr, d) for lr in (0.01, 0.5) for d in (0.85, 0.99)}


def test_interrupted_grid_points_are_queued_again_once():
    from cifar_exp.tune import _queue_interrupted, grid_trials_to_retry

    grid = {"lr": [0.01, 0.5], "lr_decay": [0.85, 0.99]}
    distributions = {"lr": optuna.distributions.FloatDistribution(0.01, 0.5),
                     "lr_decay": optuna.distributions.FloatDistribution(0.85, 0.99)}
    study = optuna.create_study(direction="maximize")

    def add(lr, decay, state, reason=None, **attrs):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "lr_decay": decay}, distributions=distributions,
            value=0.5 if state == TrialState.COMPLETE else None, state=state,
            user_attrs={**({"reason": reason} if reason else {}), "worker": "host:1"}, system_attrs=attrs))

    add(0.01, 0.85, TrialState.FAIL, "interrupted", grid_id=3, search_space=grid)
    add(0.01, 0.85, TrialState.FAIL, "interrupted", grid_id=3, search_space=grid)  # the same point: once
    add(0.5, 0.85, TrialState.FAIL, "interrupted", grid_id=1, search_space=grid)
    add(0.5, 0.85, TrialState.COMPLETE)  # that point ran since
    add(0.5, 0.99, TrialState.FAIL, "training diverged")  # would diverge again
    study.add_trial(optuna.trial.create_trial(  # a baseline on a grid point: baseline_needed's business
        params={"lr": 0.01, "lr_decay": 0.99}, distributions=distributions, state=TrialState.FAIL,
        user_attrs={"baseline": True, "reason": "interrupted"}))
    [stopped] = grid_trials_to_retry(study, grid)
    assert stopped.number == 0
    _queue_interrupted(study, stopped)
    queued = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.params, t.system_attrs, t.user_attrs) for t in queued] == [
        ({"lr": 0.01, "lr_decay": 0.85}, {"grid_id": 3, "search_space": grid}, {})]  # not its worker or reason
    assert grid_trials_to_retry(study, grid) == []


def test_a_two_objective_study_refuses_a_worker_on_another_cpu(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="acc-lat", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("settings", {"tune.latency_cpu": "Some Other CPU @ 1.00GHz"})
    with pytest.raises(StorageError, match=r"other settings \(latency-cpu Some Other CPU @ 1.00GHz -> "):
        open_study(ExperimentConfig(), TuneConfig(objectives="accuracy,latency"), "acc-lat", storage)


def test_a_two_objective_study_from_before_the_layout_was_recorded_refuses_channels_last_timings(tmp_path):
    # Its latencies were timed contiguous, 1.4x slower than the channels_last models ship in now: the
    # two cannot share one Pareto front, and its timings must not be reused for new trials.
    storage = f"sqlite:///{tmp_path}/optuna.db"
    tune_cfg = TuneConfig(objectives="accuracy,latency")
    settings = study_settings(ExperimentConfig(), tune_cfg)
    assert settings["tune.latency_memory_format"] == "torch.channels_last"
    del settings["tune.latency_memory_format"]
    study = optuna.create_study(study_name="old", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("settings", settings)
    with pytest.raises(StorageError, match=r"other settings \(latency-memory-format torch.contiguous_format -> "
                                           r"torch.channels_last\)"):
        open_study(ExperimentConfig(), tune_cfg, "old", storage)
    study.set_user_attr("settings", {**settings, "tune.latency_memory_format": "torch.channels_last"})
    open_study(ExperimentConfig(), tune_cfg, "old", storage)
    # One-objective studies time nothing: no layout is recorded or compared.
    assert "tune.latency_memory_format" not in study_settings(ExperimentConfig(), TuneConfig())


def test_a_setting_a_study_never_recorded_counts_as_its_default(tmp_path):
    # A study from before --teacher existed trained its trials without one: a distilling worker differs.
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    settings = study_settings(ExperimentConfig(), TuneConfig())
    del settings["train.teacher"]
    study.set_user_attr("settings", settings)
    open_study(ExperimentConfig(), TuneConfig(), "old", storage)  # the default agrees
    distilled = ExperimentConfig(train=TrainConfig(teacher="runs:/abc/model"))
    with pytest.raises(StorageError, match=r"other settings \(teacher  -> runs:/abc/model\)"):
        open_study(distilled, TuneConfig(), "old", storage)
    # The distilling worker first: the missing record still reads as the default, not as its value.
    older = optuna.create_study(study_name="older", storage=storage, direction="maximize")
    older.set_user_attr("settings", settings)
    with pytest.raises(StorageError, match=r"other settings \(teacher  -> runs:/abc/model\)"):
        open_study(distilled, TuneConfig(), "older", storage)


def test_hidden_choices_count_only_for_a_model_with_a_hidden_layer(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    two = dict(objectives="accuracy,latency", width_choices="16,32")
    pico = ExperimentConfig(train=recipe_config("pico"))
    # pico has none: the choices are ignored, and a worker with other ones joins the study.
    open_study(pico, TuneConfig(**two, hidden_choices="64"), "pico", storage)
    open_study(pico, TuneConfig(**two), "pico", storage)
    open_study(ExperimentConfig(), TuneConfig(**two, hidden_choices="64"), "seed", storage)
    with pytest.raises(StorageError, match=r"other settings \(hidden-choices 64 -> 128,256,512,1024\)"):
        open_study(ExperimentConfig(), TuneConfig(**two), "seed", storage)


def test_two_workers_starting_a_study_with_other_settings_do_not_both_go_on(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    race = optuna.create_study(study_name="race", storage=storage, direction="maximize")
    # Another worker has written its claim, but not yet the study's settings: it reads the claims next.
    theirs = study_settings(ExperimentConfig(train=TrainConfig(epochs=2)), TuneConfig())
    race.set_user_attr(f"{SETTINGS_CLAIM}theirs", {"settings": theirs, "time": time.time()})
    with pytest.raises(StorageError, match=r"study 'race' is being started by another worker with other settings "
                                           r"\(epochs\)"):
        open_study(ExperimentConfig(), TuneConfig(), "race", storage)
    attrs = race.user_attrs
    assert "settings" not in attrs  # nothing recorded: the refused worker's claim is withdrawn
    assert [v["settings"] for k, v in attrs.items() if k.startswith(SETTINGS_CLAIM) and v] == [theirs]
    # A worker with their settings goes on, and records them.
    open_study(ExperimentConfig(train=TrainConfig(epochs=2)), TuneConfig(), "race", storage)
    assert race.user_attrs["settings"] == theirs


def test_a_refused_worker_withdraws_only_its_own_claim(tmp_path):
    from cifar_exp.tune import CLAIM_SECONDS, _claim_new_study

    study = optuna.create_study(study_name="three", storage=f"sqlite:///{tmp_path}/optuna.db")
    x, y = {"train.epochs": 5}, {"train.epochs": 2}
    _claim_new_study(study, x, "three")  # worker C goes on with X
    study.set_user_attr(f"{SETTINGS_CLAIM}b", {"settings": y, "time": time.time()})  # B has claimed Y
    with pytest.raises(StorageError, match=r"other settings \(epochs\)"):
        _claim_new_study(study, x, "three")  # A (X) reads B's claim and steps back...
    with pytest.raises(StorageError, match=r"other settings \(epochs\)"):
        _claim_new_study(study, y, "three")  # ...which leaves C's claim: a worker with Y still sees it
    assert study.user_attrs["settings"] == x
    # A claim older than CLAIM_SECONDS was left by a worker that died starting the study: it no longer counts.
    stale = optuna.create_study(study_name="stale", storage=f"sqlite:///{tmp_path}/optuna.db")
    stale.set_user_attr(f"{SETTINGS_CLAIM}dead", {"settings": x, "time": time.time() - CLAIM_SECONDS - 1})
    _claim_new_study(stale, y, "stale")
    assert stale.user_attrs["settings"] == y


def test_a_study_records_the_runs_its_teacher_resolved_to(tmp_path):
    # models:/NAME@champion names another run once the alias moves: a worker distilling from it differs.
    storage = f"sqlite:///{tmp_path}/optuna.db"
    distilled = ExperimentConfig(train=TrainConfig(teacher="models:/teacher@champion"))
    open_study(distilled, TuneConfig(), "kd", storage, teacher=Teacher(torch.nn.Identity(), ("run-a",)))
    open_study(distilled, TuneConfig(), "kd", storage, teacher=Teacher(torch.nn.Identity(), ("run-a",)))
    with pytest.raises(StorageError, match=r"other settings \(teacher-run-ids run-a -> run-b\)"):
        open_study(distilled, TuneConfig(), "kd", storage, teacher=Teacher(torch.nn.Identity(), ("run-b",)))


def test_a_study_refuses_trials_on_other_images(tmp_path):
    # Same settings, same study name, but another data folder (here: other labels): not comparable.
    def splits(label_shift: int) -> Splits:
        labels = (torch.arange(40) + label_shift) % 10
        images = ImageSet("train", torch.arange(40 * 3 * 32 * 32, dtype=torch.int32).reshape(40, 3, 32, 32)
                          .remainder(256).to(torch.uint8), labels)
        return Splits(images, images, images, tuple("abcdefghij"), "synthetic", val_is_test=False)

    storage = f"sqlite:///{tmp_path}/optuna.db"
    open_study(ExperimentConfig(), TuneConfig(), "data", storage, data=splits(0))
    open_study(ExperimentConfig(), TuneConfig(), "data", storage, data=splits(0))  # the same images agree
    with pytest.raises(StorageError, match=r"other settings \(train-digest [0-9a-f]{16} -> [0-9a-f]{16}, val-digest "):
        open_study(ExperimentConfig(), TuneConfig(), "data", storage, data=splits(1))
    # cuda_graphs only changes how a CUDA step is launched: a worker may differ in it.
    open_study(ExperimentConfig(train=TrainConfig(cuda_graphs=False)), TuneConfig(), "data", storage, data=splits(0))
    # A study from before the digests were recorded takes the first worker's and then checks them.
    open_study(ExperimentConfig(), TuneConfig(), "older", storage)
    open_study(ExperimentConfig(), TuneConfig(), "older", storage, data=splits(1))
    with pytest.raises(StorageError, match="train-digest"):
        open_study(ExperimentConfig(), TuneConfig(), "older", storage, data=splits(0))


def test_a_two_objective_study_of_another_schedule_searches_no_decay(tiny_data, cache_dir):
    from cifar_exp.tune import _Objective

    cfg = tiny_config(tiny_data, cache_dir, schedule="onecycle")
    tune_cfg = TuneConfig(objectives="accuracy,latency", width_choices="16,32", hidden_choices="128")
    objective = _Objective(cfg, tune_cfg, load_splits(cfg.data), "study", False, None)
    # A FixedTrial refuses to suggest a parameter it was not given: lr_decay must not be asked for.
    trial = optuna.trial.FixedTrial({"lr": 0.2, "width1": 16, "width2": 32, "width3": 16, "hidden": 128})
    train = objective._suggest(trial)
    assert (train.lr, train.lr_decay, train.widths, train.hidden) == (0.2, cfg.train.lr_decay, "16,32,16", 128)


def test_a_teacher_that_does_not_load_leaves_no_study(tiny_data, tracking_store, cache_dir, tmp_path):
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS,
                     "--teacher", "runs:/0123456789abcdef/model", "--study-name", "typo")
    assert result.exit_code == 1 and "cannot load model runs:/0123456789abcdef/model" in result.output
    storage = tmp_path / "mlruns" / "optuna.db"
    assert not storage.exists() or "typo" not in optuna.get_all_study_names(f"sqlite:///{storage}")


def test_single_objective_study_is_not_reopened_with_two_objectives(tiny_data, tracking_store, cache_dir,
                                                                   tmp_path):
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"  # the default storage
    (tmp_path / "mlruns").mkdir()
    optuna.create_study(study_name="lr-decay", storage=storage, direction="maximize")
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, *ACC_LAT,
                     "--study-name", "lr-decay")
    assert result.exit_code == 1
    assert "Error: study 'lr-decay' in " in result.output
    assert ("exists with direction maximize; tune --objectives accuracy,latency maximises val_accuracy and "
            "minimises latency_ms: pass another --study-name") in result.output

    optuna.create_study(study_name="acc-lat", storage=storage, directions=["maximize", "minimize"])
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--study-name", "acc-lat")
    assert result.exit_code == 1
    assert "exists with directions maximize, minimize; tune maximises val_accuracy: pass another" in result.output
    assert all_runs() == []
    # Left to their defaults, the two kinds of study never share a name.
    cfg = ExperimentConfig(train=TrainConfig(epochs=5))
    assert default_study_name(cfg, TuneConfig()) == "cifar10-seed-5ep"
    assert default_study_name(cfg, TuneConfig(objectives="accuracy,latency")) == "cifar10-seed-5ep-acc-lat"


@pytest.fixture
def quick_latency(monkeypatch):
    """A short latency measurement: these tests check that it is measured and logged, not its precision."""
    monkeypatch.setattr("cifar_exp.tune.LATENCY_SECONDS_PER_REPEAT", 0.05)
    monkeypatch.setattr("cifar_exp.tune.LATENCY_WARMUP_SECONDS", 0.02)


def test_accuracy_latency_study_logs_its_pareto_set(tiny_data, tracking_store, cache_dir, tmp_path, quick_latency):
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--epochs", "1",
                     *ACC_LAT, "--n-trials", "4", "--sampler", "random")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="cifar10-seed-1ep-acc-lat", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    front = sorted(t.number for t in study.best_trials)  # Optuna's own Pareto set, to check ours against

    # The CLI prints the Pareto set, one trial a line with the train options that reproduce it.
    pareto_lines = [line for line in result.output.splitlines() if line.startswith("  trial ")]
    assert f"Pareto set: {len(front)} trials, fastest first" in result.output
    assert sorted(int(line.split()[1].rstrip(":")) for line in pareto_lines) == front
    for line in pareto_lines:
        number = int(line.split()[1].rstrip(":"))
        params = study.trials[number].params
        widths = ",".join(str(params[f"width{i}"]) for i in (1, 2, 3))
        assert f"val_accuracy {study.trials[number].values[0]:.4f}, latency " in line
        assert line.endswith(f" --lr {params['lr']!r} --lr-decay {params['lr_decay']!r} "
                             f"--widths {widths} --hidden {params['hidden']}")
        # The printed command trains the trial's network with the study's other settings.
        retrained = train_config_of(line.split("; train with ", 1)[1])
        assert retrained.train == dataclasses.replace(
            TrainConfig(epochs=1, batch_size=32, eval_batch_size=100), lr=params["lr"], lr_decay=params["lr_decay"],
            widths=widths, hidden=params["hidden"])
        assert retrained.data == DataConfig(data_dir=str(tiny_data), cache_dir=cache_dir, val_size=50)

    client = MlflowClient()
    parents = [r for r in all_runs(client) if r.data.tags.get("run_kind") == "tune-study"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "tune-cifar10-seed-1ep-acc-lat" and parent.info.status == "FINISHED"
    assert parent.data.tags["optuna_pruner"] == "none (multi-objective)"
    assert parent.data.metrics["pareto_size"] == len(front)
    children = {r.info.run_name: r for r in children_of(parent.info.run_id, client)}  # nested under the parent
    assert sorted(children) == ["trial-0", "trial-1", "trial-2", "trial-3"]
    for trial in study.trials:
        child = children[f"trial-{trial.number}"]
        assert child.data.tags["optuna_state"] == "COMPLETE"
        assert child.data.metrics["latency_ms"] == pytest.approx(trial.values[1]) and trial.values[1] > 0
        assert child.data.metrics["val_accuracy"] == pytest.approx(trial.values[0])
        widths = tuple(int(w) for w in child.data.params["train.widths"].split(","))
        hidden = int(child.data.params["train.hidden"])
        assert set(widths) <= {16, 32, 64} and hidden in (128, 1024)
        assert widths == tuple(trial.params[f"width{i}"] for i in (1, 2, 3)) and hidden == trial.params["hidden"]
        assert child.data.metrics["parameter_count"] == count_parameters(build_model("seed", widths=widths,
                                                                                     hidden=hidden))
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [1]

    # The baseline trial is the seed as it is: lr 0.1, decay 0.95, its own widths and hidden size.
    assert study.trials[0].user_attrs["baseline"]
    assert study.trials[0].params == {"lr": 0.1, "lr_decay": 0.95, "width1": 64, "width2": 64, "width3": 64,
                                      "hidden": 1024}
    assert children["trial-0"].data.params["train.widths"] == "64,64,64"

    folder = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, dst_path=str(tmp_path / "a")))
    with open(folder / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    on_front = sorted(int(r["label"].split()[0].removeprefix("trial-")) for r in rows if r["on_front"] == "True")
    assert on_front == front
    for row in rows:
        trial = study.trials[int(row["label"].split()[0].removeprefix("trial-"))]
        assert row["run_id"] == children[f"trial-{trial.number}"].info.run_id
        assert row["backend"] == "pytorch-fp32" and row["label"].endswith(f"h={trial.params['hidden']}")
        assert float(row["accuracy"]) == pytest.approx(trial.values[0])
        assert float(row["latency_ms"]) == pytest.approx(trial.values[1])
    assert (folder / "plots" / "pareto.png").stat().st_size > 5000
    with open(folder / "trials.csv") as f:
        trial_rows = list(csv.DictReader(f))
    assert [float(r["latency_ms"]) for r in trial_rows] == pytest.approx([t.values[1] for t in study.trials])
    assert [int(r["width1"]) for r in trial_rows] == [t.params["width1"] for t in study.trials]


def test_diverged_trial_fails_and_the_two_objective_study_goes_on(tiny_data, tracking_store, cache_dir, tmp_path,
                                                                   quick_latency):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="nan", storage=storage, directions=["maximize", "minimize"])
    study.enqueue_trial({"lr": 1e6, "lr_decay": 0.9, "width1": 16, "width2": 16, "width3": 16, "hidden": 128})
    cfg = tiny_config(tiny_data, cache_dir, epochs=1, amp=False)
    tune_cfg = TuneConfig(objectives="accuracy,latency", n_trials=2, study_name="nan", storage=storage,
                          lr_max=1e7, width_choices="16,64", hidden_choices="128,1024")
    outcome = tune(cfg, tune_cfg, report=lambda line: None)

    failed, baseline = outcome.trials
    assert failed.state == "FAIL" and "training loss became" in failed.reason and failed.latency_ms is None
    assert baseline.state == "COMPLETE" and baseline.baseline and baseline.latency_ms > 0
    assert [t.number for t in outcome.pareto] == [baseline.number] and outcome.best.number == baseline.number
    child = next(r for r in children_of(outcome.run_id) if r.info.run_name == "trial-0")
    assert child.info.status == "FAILED" and child.data.tags["optuna_state"] == "FAIL"


def test_an_architecture_is_timed_once_per_study(tiny_data, tracking_store, cache_dir, tmp_path, quick_latency):
    """Latency depends on the network, not on lr/decay: equal networks get equal latencies."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="twice", storage=storage, directions=["maximize", "minimize"])
    for lr in (0.05, 0.2):  # the same architecture, trained with two learning rates
        study.enqueue_trial({"lr": lr, "lr_decay": 0.9, "width1": 16, "width2": 16, "width3": 16, "hidden": 128})
    cfg = tiny_config(tiny_data, cache_dir, epochs=1, amp=False)
    tune_cfg = TuneConfig(objectives="accuracy,latency", n_trials=2, study_name="twice", storage=storage,
                          width_choices="16,64", hidden_choices="128,1024", baseline=False)
    outcome = tune(cfg, tune_cfg, report=lambda line: None)

    first, second = optuna.load_study(study_name="twice", storage=storage).trials
    assert [t.params["lr"] for t in (first, second)] == [0.05, 0.2]
    assert first.values[1] > 0 and second.values[1] == first.values[1]
    assert "latency_timed_in_trial" not in first.user_attrs and second.user_attrs["latency_timed_in_trial"] == 0
    runs = {r.info.run_name: r for r in children_of(outcome.run_id)}
    assert runs["trial-1"].data.tags["latency_timed_in_trial"] == "0"
    assert runs["trial-1"].data.metrics["latency_ms"] == pytest.approx(first.values[1])


def test_an_interrupted_baseline_is_queued_again_a_diverged_one_is_not():
    from cifar_exp.tune import baseline_needed

    def study_of(*baselines):
        study = optuna.create_study(direction="maximize")
        for state, reason in baselines:
            study.add_trial(optuna.trial.create_trial(
                params={"lr": 0.1}, distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1)},
                value=0.5 if state == TrialState.COMPLETE else None, state=state,
                user_attrs={"baseline": True, **({"reason": reason} if reason else {})}))
        return study

    baseline = {"lr": 0.1}
    assert baseline_needed(study_of(), baseline)
    interrupted = study_of((TrialState.FAIL, "interrupted"))  # Ctrl-C in an earlier invocation
    assert baseline_needed(interrupted, baseline)
    interrupted.enqueue_trial({"lr": 0.2})  # queued, but not the baseline
    assert baseline_needed(interrupted, baseline)
    interrupted.enqueue_trial({"lr": 0.1}, user_attrs={"baseline": True})  # another worker queued it
    assert not baseline_needed(interrupted, baseline)
    assert not baseline_needed(study_of((TrialState.FAIL, "training diverged: loss nan")), baseline)  # would again
    assert not baseline_needed(study_of((TrialState.FAIL, "interrupted"), (TrialState.COMPLETE, None)), baseline)
    assert not baseline_needed(study_of((TrialState.PRUNED, None)), baseline)
    # Resumed with another --lr: the study's baseline is not this run's.
    assert baseline_needed(study_of((TrialState.COMPLETE, None)), {"lr": 0.2})


def test_a_study_resumed_with_another_baseline_runs_and_reports_that_one(tiny_data, tracking_store, cache_dir,
                                                                          tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    tune_cfg = TuneConfig(n_trials=1, study_name="moved", storage=storage)
    first = tune(tiny_config(tiny_data, cache_dir, epochs=1), tune_cfg, report=lambda line: None)
    assert first.baseline.params == {"lr": 0.1, "lr_decay": 0.95}
    moved = tiny_config(tiny_data, cache_dir, epochs=1, lr=0.2, lr_decay=0.9)
    second = tune(moved, tune_cfg, report=lambda line: None)
    assert [(t.baseline, t.params) for t in second.trials] == [(True, {"lr": 0.2, "lr_decay": 0.9})]
    assert second.baseline.number == second.trials[0].number == 1


def test_a_baseline_interrupted_before_its_run_opened_is_queued_again(tiny_data, tracking_store, cache_dir,
                                                                      tmp_path, monkeypatch):
    from cifar_exp import tune as tune_module
    from cifar_exp.tune import baseline_needed

    def interrupted(self, trial):
        raise KeyboardInterrupt("signal SIGTERM")  # as the trial's parameters are drawn

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with monkeypatch.context() as patched:
        patched.setattr(tune_module._Objective, "_suggest", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tune(tiny_config(tiny_data, cache_dir, epochs=1), TuneConfig(n_trials=1, study_name="s", storage=storage),
                 report=lambda line: None)
    study = optuna.load_study(study_name="s", storage=storage)
    [trial] = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "interrupted"
    assert trial.user_attrs["baseline"] and "mlflow_run_id" not in trial.user_attrs  # no run was opened
    assert baseline_needed(study, trial.system_attrs["fixed_params"])
    outcome = tune(tiny_config(tiny_data, cache_dir, epochs=1), TuneConfig(n_trials=1, study_name="s", storage=storage),
                   report=lambda line: None)
    assert [(t.baseline, t.state) for t in outcome.trials] == [(True, "COMPLETE")]


def test_baseline_widths_are_the_models_own_unless_given():
    assert baseline_width_params(TrainConfig()) == {"width1": 64, "width2": 64, "width3": 64, "hidden": 1024}
    assert baseline_width_params(TrainConfig(model="pico")) == {"width1": 24, "width2": 48, "width3": 80}
    assert baseline_width_params(TrainConfig(widths="16,32,64", hidden=256)) == {
        "width1": 16, "width2": 32, "width3": 64, "hidden": 256}
    tune_cfg = TuneConfig(objectives="accuracy,latency", width_choices="64, 16,32,16")
    assert tune_cfg.width_choice_list() == (16, 32, 64)


def test_config_rejects_unknown_sampler_and_bad_counts():
    with pytest.raises(ConfigError, match="unknown sampler 'cmaes'"):
        TuneConfig(sampler="cmaes")
    with pytest.raises(ConfigError, match="grid-size must be >= 2"):
        TuneConfig(grid_size=1)
    TuneConfig(grid_size=100)
    with pytest.raises(ConfigError, match=r"^grid-size must be <= 100 \(100² points with the decay\), got 100000$"):
        TuneConfig(grid_size=100_000)  # Optuna would list 10^10 points before the first trial
    with pytest.raises(ConfigError, match="timeout must be > 0"):
        TuneConfig(timeout=0)
    assert TuneConfig().lr_min == 0.01 and TuneConfig().decay_max == 0.99


@pytest.mark.slow
def test_grid_sampler_and_hyperband(tiny_data, tracking_store, cache_dir, monkeypatch):
    cfg = tiny_config(tiny_data, cache_dir, epochs=2)
    created = []
    create_study = optuna.create_study
    monkeypatch.setattr(optuna, "create_study", lambda **kwargs: created.append(kwargs) or create_study(**kwargs))
    outcome = tune(cfg, TuneConfig(n_trials=3, sampler="grid", grid_size=2, pruner="hyperband"),
                   report=lambda line: None)
    assert [type(c["pruner"]) for c in created] == [optuna.pruners.HyperbandPruner]
    grid = [t.params for t in outcome.trials if not t.baseline]
    assert len(outcome.trials) == 3 and outcome.trials[0].baseline
    for params in grid:
        assert params["lr"] in (0.01, 0.5) and params["lr_decay"] in (0.85, 0.99)
    # Run again: the grid's two other points, each once, and the study says why it stopped early.
    lines = []
    resumed = tune(cfg, TuneConfig(n_trials=5, sampler="grid", grid_size=2, pruner="hyperband"), report=lines.append)
    points = {(p["lr"], p["lr_decay"]) for p in grid + [t.params for t in resumed.trials]}
    assert len(resumed.trials) == 2 and points == {(lr, d) for lr in (0.01, 0.5) for d in (0.85, 0.99)}
    assert "every point of the 4-point grid has run: stopped after 2 of 5 trials" in lines


def test_a_grid_point_interrupted_in_one_run_runs_in_the_next(tiny_data, tracking_store, cache_dir, monkeypatch):
    from cifar_exp import tune as tune_module

    fit_calls = []

    def interrupted_at_the_fourth(*args, **kwargs):
        fit_calls.append(1)
        if len(fit_calls) == 4:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    cfg = tiny_config(tiny_data, cache_dir, epochs=1)
    tune_cfg = TuneConfig(n_trials=9, sampler="grid", grid_size=2, pruner="none")
    monkeypatch.setattr(tune_module, "fit", interrupted_at_the_fourth)  # only the fourth call: once
    with pytest.raises(KeyboardInterrupt):  # the baseline and two grid points ran; the third is stopped
        tune(cfg, tune_cfg, report=lambda line: None)
    lines = []
    resumed = tune(cfg, tune_cfg, report=lines.append)  # the stopped point (a grid id), then the last one
    assert [t.state for t in resumed.trials] == ["COMPLETE", "COMPLETE"]
    study = optuna.load_study(study_name=resumed.study_name, storage=f"sqlite:///{Path.cwd()}/mlruns/optuna.db")
    complete = [(t.params["lr"], t.params["lr_decay"]) for t in study.trials
                if t.state == TrialState.COMPLETE and not t.user_attrs.get("baseline")]
    assert sorted(complete) == [(lr, d) for lr in (0.01, 0.5) for d in (0.85, 0.99)]
    assert "every point of the 4-point grid has run: stopped after 2 of 9 trials" in lines
    lines.clear()
    again = tune(cfg, tune_cfg, report=lines.append)  # a finished grid: no point runs again
    assert again.trials == [] and "every point of the 4-point grid has run: stopped after 0 of 9 trials" in lines


@pytest.mark.slow
@pytest.mark.parametrize("where", ["journal", "database", "database, another machine"])
def test_worker_killed_mid_trial_does_not_leave_it_running(tiny_data, tracking_store, cache_dir, tmp_path, where):
    """SIGKILL: no handler runs. The next worker finds the trial's process gone (a worker of this
    machine), or its heartbeat stale (another machine's, on a database), fails and retries it."""
    journal = where == "journal"
    storage = str(tmp_path / "study.log") if journal else f"sqlite:///{tmp_path / 'study.db'}"
    common = ["--data-dir", tiny_data, "--cache-dir", cache_dir, "--val-size", "50", "--batch-size", "32",
              "--storage", storage, "--study-name", "killed", "--heartbeat-interval", "1", "--pruner", "none"]
    # 10 epochs: the killed worker is many epochs from done; the next one trains them all.
    common += ["--epochs", "10", "--n-trials", "1"]
    returncode, _ = signal_cli_mid_training(["tune", *common], epochs=10, sig=signal.SIGKILL)  # mid first trial
    assert returncode == -signal.SIGKILL
    study = optuna.load_study(study_name="killed", storage=_optuna_storage(storage))
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    dead_pid = study.trials[0].user_attrs["worker"].rpartition(":")[2]
    why = f"process {dead_pid} is gone"
    if where == "database, another machine":  # its process cannot be checked from here: its heartbeat tells
        study._storage.set_trial_user_attr(study.trials[0]._trial_id, "worker_process", "another-boot/1/1/1")
        time.sleep(3)  # > 2 heartbeat intervals
        why = "no heartbeat"

    result = run_cli("tune", *common)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="killed", storage=_optuna_storage(storage))
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].system_attrs["failed_trial"] == 0  # the dead worker's trial, run again
    assert study.trials[1].params == study.trials[0].params
    # Its MLflow runs (trial and parent) are closed too, not left RUNNING.
    assert "RUNNING" not in {r.info.status for r in all_runs()}
    dead = [r for r in all_runs() if r.info.status == "KILLED"]
    assert sorted(r.info.run_name for r in dead) == ["trial-0", "tune-killed"]
    trial_run = next(r for r in dead if r.info.run_name == "trial-0")
    assert trial_run.data.tags["optuna_state"] == "FAIL"
    assert trial_run.data.tags["optuna_reason"] == f"worker lost ({why})"
    if where != "database, another machine":  # (a heartbeat fails a trial before cifar-exp sees it)
        assert study.trials[0].user_attrs["reason"] == f"worker lost ({why})"  # trials.csv's reason column


def _optuna_storage(storage):
    if "://" in storage:
        return storage
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))


def test_only_trials_of_dead_workers_on_this_machine_are_failed(tracking_store, tmp_path):
    from cifar_exp import tracking
    from cifar_exp.tune import fail_trials_of_dead_workers, worker_process

    storage = str(tmp_path / "study.log")
    study = optuna.create_study(study_name="workers", storage=_optuna_storage(storage), direction="maximize")
    ended = subprocess.Popen(["sleep", "60"])
    ended_process = worker_process(ended.pid)
    ended.kill()
    ended.wait()
    me = worker_process()
    boot, namespace, pid, started = me.split("/")
    workers = {
        "ended": ended_process,
        "alive": me,
        "pid reused": f"{boot}/{namespace}/{pid}/{int(started) - 1}",  # this pid, but another process
        "other namespace": f"{boot}/1/{ended.pid}/1",  # a container's: cannot be checked from here
        "other boot": f"another-boot/{namespace}/{ended.pid}/1",
    }
    run_ids = {}
    for name, process in workers.items():
        trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.5)})
        trial.set_user_attr("worker", f"{os.uname().nodename}:{process.split('/')[2]}")
        trial.set_user_attr("worker_process", process)
        with tracking.start_run("tests", name) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            run_ids[name] = run_id
    client = MlflowClient()
    for run_id in run_ids.values():  # the runs as their workers left them: RUNNING
        client.update_run(run_id, status="RUNNING")

    assert fail_trials_of_dead_workers(study) == [0, 2]
    assert fail_trials_of_dead_workers(study) == []  # done once
    trials = study.get_trials()
    assert [t.user_attrs.get("reason") for t in trials[:3]] == [
        f"worker lost (process {ended.pid} is gone)", None, f"worker lost (process {pid} is gone)"]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.FAIL, TrialState.RUNNING,
                                         TrialState.RUNNING, TrialState.WAITING, TrialState.WAITING]
    retry = trials[5]
    assert retry.params == trials[0].params and retry.system_attrs["failed_trial"] == 0
    assert not {"worker", "worker_process", "mlflow_run_id"} & set(retry.user_attrs)  # the dead worker's
    statuses = {name: client.get_run(run_id).info.status for name, run_id in run_ids.items()}
    assert statuses == {"ended": "KILLED", "alive": "RUNNING", "pid reused": "KILLED", "other namespace": "RUNNING",
                        "other boot": "RUNNING"}


def test_study_and_retrain_runs_of_dead_workers_are_closed(tracking_store):
    # A worker killed between trials (or while retraining the best) leaves no RUNNING trial for the
    # trial cleanup to find: its runs are found by their tags instead, by the study's next worker here.
    from cifar_exp.tune import close_runs_of_dead_workers, worker_process

    ended = subprocess.Popen(["sleep", "60"])
    dead = worker_process(ended.pid)
    ended.kill()
    ended.wait()
    client = MlflowClient()
    experiment = client.create_experiment("tests")

    def running(kind, process, study="s", parent=None):
        tags = {"run_kind": kind, "optuna_study_name": study, "worker_process": process}
        return client.create_run(experiment, tags={**tags, **({"mlflow.parentRunId": parent} if parent else {})}
                                 ).info.run_id

    parent = running("tune-study", dead)
    retrain = running("tune-retrain", dead, parent=parent)
    alive = running("tune-study", worker_process())
    other_study = running("tune-study", dead, study="other")
    trial = running("tune-trial", dead)  # Optuna's trial cleanup closes those
    # Trials whose end a tracking server that had gone did not record (Optuna recorded the trial's FAIL):
    # under the dead worker's study run, and under one an earlier worker closed already.
    lost = running("tune-trial", "", parent=parent)
    client.set_tag(lost, "optuna_trial_number", "0")
    earlier = running("tune-study", dead)
    client.set_terminated(earlier, "KILLED")
    lost_before = running("tune-trial", "", parent=earlier)
    live = running("tune-trial", "", parent=alive)  # its study is running: left alone
    stale = running("tune-trial", "", parent=parent)  # RUNNING in Optuna: its stale-trial cleanup's, which says why
    client.set_tag(stale, "optuna_trial_number", "1")
    study = optuna.create_study(study_name="s")
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.ask()
    assert sorted(close_runs_of_dead_workers("tests", study)) == sorted([parent, retrain, lost, lost_before])
    status = {run: client.get_run(run).info.status for run in (parent, retrain, alive, other_study, trial, live, stale)}
    assert status == {parent: "KILLED", retrain: "KILLED", alive: "RUNNING", other_study: "RUNNING", trial: "RUNNING",
                      live: "RUNNING", stale: "RUNNING"}
    assert client.get_run(parent).data.tags["killed_because"] == f"process {ended.pid} is gone"
    lost_tags, before_tags = client.get_run(lost).data.tags, client.get_run(lost_before).data.tags
    assert (client.get_run(lost).info.status, lost_tags["optuna_state"]) == ("KILLED", "FAIL")
    assert lost_tags["killed_because"] == f"its study run {parent} was closed KILLED"
    assert before_tags["killed_because"] == f"its study run {earlier} was closed KILLED"
    assert close_runs_of_dead_workers("no-such-experiment", study) == []


def test_under_mlflow_run_the_study_cleans_the_experiment_of_the_run_it_was_given(tracking_store, monkeypatch):
    # `mlflow run` puts its runs into its own experiment: the one --experiment-name names was searched.
    from cifar_exp.tune import close_runs_of_dead_workers

    client = MlflowClient()
    project = client.create_experiment("project")
    earlier = client.create_run(project, tags={"run_kind": "tune-study", "optuna_study_name": "s"}).info.run_id
    client.set_terminated(earlier, "FAILED")
    lost = client.create_run(project, tags={"run_kind": "tune-trial", "optuna_study_name": "s",
                                            "mlflow.parentRunId": earlier}).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", client.create_run(project).info.run_id)  # this `mlflow run`'s
    assert close_runs_of_dead_workers("cifar-exp", optuna.create_study(study_name="s")) == [lost]
    assert client.get_run(lost).data.tags["killed_because"] == f"its study run {earlier} was closed FAILED"



@pytest.mark.slow
def test_mlflow_run_tune_entry_point(tiny_data, tracking_store, cache_dir, tmp_path):
    """`mlflow run . -e tune`: the study's parent is the run mlflow run created."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "tune", "--env-manager", "local",
         "--experiment-name", "project", "-P", "n_trials=2", "-P", "epochs=1", "-P", f"data_dir={tiny_data}",
         "-P", "val_size=50", "-P", f"cache_dir={cache_dir}", "-P", f"storage={tmp_path / 'study.log'}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = all_runs()
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(top) == 1 and top[0].data.tags["run_kind"] == "tune-study"
    assert top[0].data.tags["mlflow.project.entryPoint"] == "tune"
    assert sorted(r.info.run_name for r in children_of(top[0].info.run_id)) == ["trial-0", "trial-1"]
    assert (tmp_path / "study.log").stat().st_size > 0  # a journal-file storage


# -- many workers on one PostgreSQL study ----------------------------------------------------------


@pytest.fixture
def postgres_url():
    """The test server of .ci/postgres.sh; required under CI, where this test must run."""
    url = os.environ.get("CIFAR_EXP_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # CI=false is a developer's machine
            pytest.fail("CIFAR_EXP_TEST_POSTGRES_URL is not set: .ci/run must start PostgreSQL for this test")
        pytest.skip("no PostgreSQL: run `source .ci/postgres.sh` first (CIFAR_EXP_TEST_POSTGRES_URL)")
    return url


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on loopback: the shared tracking server of a distributed sweep."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not start:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_two_workers_share_one_postgresql_study(postgres_url, tiny_data, cache_dir, tmp_path, mlflow_server,
                                                monkeypatch):
    url = postgres_url
    study_name = f"workers-{uuid.uuid4().hex[:8]}"
    per_worker = 3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    command = [sys.executable, "-m", "cifar_exp", "tune", "--storage", url, "--study-name", study_name,
               "--n-trials", str(per_worker), "--data-dir", str(tiny_data), "--cache-dir", cache_dir,
               "--epochs", "1", "--batch-size", "32", "--val-size", "50", "--pruner", "none"]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
    assert url.split("@")[0] not in "".join(outputs)  # the password is never shown

    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; cifar-exp picks psycopg2 itself.
    study = optuna.load_study(study_name=study_name, storage=url.replace("postgresql://", "postgresql+psycopg2://", 1))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(2 * per_worker))  # every trial once, none lost or doubled
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both workers ran trials
    assert any(t.user_attrs.get("baseline") for t in study.trials)

    client = MlflowClient(mlflow_server)
    runs = [r for r in all_runs(client) if r.data.tags.get("optuna_study_name") == study_name]
    parents = [r for r in runs if r.data.tags["run_kind"] == "tune-study"]
    trials = [r for r in runs if r.data.tags["run_kind"] == "tune-trial"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.info.run_name for r in trials) == [f"trial-{n}" for n in sorted(numbers)]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {p.info.run_id for p in parents}
    for parent in parents:
        assert parent.data.metrics["study_trials"] >= per_worker
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.csv", "plots"}


def test_a_worker_whose_trial_another_worker_failed_stops_in_one_line(tiny_data, tracking_store, cache_dir,
                                                                      tmp_path, monkeypatch):
    # As another worker does when this one's heartbeat stays silent past the grace period (a stall, a
    # network outage): after epoch 1 the running trial is marked FAIL in the storage behind its back.
    from cifar_exp import tracking

    storage = f"sqlite:///{tmp_path}/optuna.db"
    log_metrics = tracking.log_metrics

    def log_then_lose_the_trial(metrics, step=None):
        log_metrics(metrics, step=step)
        if step == 1:
            other_worker = optuna.load_study(study_name="lost", storage=storage)
            [running] = other_worker.get_trials(states=(TrialState.RUNNING,))
            other_worker._storage.set_trial_state_values(running._trial_id, TrialState.FAIL)

    monkeypatch.setattr(tracking, "log_metrics", log_then_lose_the_trial)
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--storage", storage,
                     "--study-name", "lost", "--n-trials", "1", "--no-baseline", "--pruner", "none")
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.startswith("Error")] == [
        "Error: trial 0 of study lost was failed by another worker: no heartbeat from this one for over 60 s "
        "(a stall or a network outage); this worker stops"]
    assert {run.info.status for run in all_runs()} == {"FAILED"}  # the trial's run and the study's, none RUNNING


def test_the_train_command_of_a_trial_keeps_the_studys_recipe_and_settings():
    study = ExperimentConfig(data=DataConfig(data_dir="/data/cifar 10", val_size=500),
                             train=recipe_config("pico", epochs=12, warmup_epochs=0, tta=False, widths="32,64,96"))
    trial = TrialSummary(number=3, state="COMPLETE", value=0.8, latency_ms=0.1, parameter_count=1000,
                         params={"lr": 0.123, "width1": 16, "width2": 24, "width3": 40}, epochs=12,
                         baseline=False, reason=None)
    command = train_command(study, trial)
    assert shlex.split(command).count("--widths") == 1  # the trial's, not the study's as well
    assert command.startswith("cifar-exp train --recipe pico ") and command.endswith(" --lr 0.123 --widths 16,24,40")
    retrained = train_config_of(command)
    assert retrained.train == dataclasses.replace(study.train, lr=0.123, widths="16,24,40")
    assert retrained.data == study.data


def test_a_dead_workers_trial_is_queued_again_once():
    from cifar_exp.tune import _queue_again

    study = optuna.create_study(direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.01, 0.5, log=True)})
    study.tell(trial, state=TrialState.FAIL)
    _queue_again(study, study.trials[0])
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and retry.params == study.trials[0].params
    assert retry.system_attrs["retry_history"] == [0]
    study.tell(study.ask(), state=TrialState.FAIL)  # the retry's worker dies as well
    _queue_again(study, study.trials[1])
    assert len(study.trials) == 2  # no third try


def test_a_grid_study_resumed_with_another_grid_is_refused(tmp_path):
    # Optuna's grid sampler counts a point as run only by trials of the same grid: another grid would
    # run the points both grids hold again.
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cfg = ExperimentConfig()
    open_study(cfg, TuneConfig(sampler="grid", grid_size=2), "grid", storage)
    open_study(cfg, TuneConfig(sampler="grid", grid_size=2), "grid", storage)  # the same grid: resumed
    with pytest.raises(StorageError, match=r"other settings \(grid lr 2 points 0\.01\.\.0\.5, lr_decay 2 points "
                                           r"0\.85\.\.0\.99 -> lr 3 points 0\.01\.\.0\.5, lr_decay 3 points"):
        open_study(cfg, TuneConfig(sampler="grid", grid_size=3), "grid", storage)
    with pytest.raises(StorageError, match=r"other settings \(grid lr 2 points 0\.01\.\.0\.5, .* -> lr 2 points "
                                           r"0\.02\.\.0\.5"):
        open_study(cfg, TuneConfig(sampler="grid", grid_size=2, lr_min=0.02), "grid", storage)
    open_study(cfg, TuneConfig(sampler="tpe"), "grid", storage)  # other samplers may sample any point again
    # A grid study from before the grid was recorded (here over lr alone: a cosine schedule has no decay
    # to search) resumes, taken to have run this grid, which it records from then on.
    cosine = ExperimentConfig(train=TrainConfig(schedule="cosine"))
    study = open_study(cosine, TuneConfig(sampler="grid", grid_size=2), "older-grid", storage)
    study.set_user_attr("settings", {k: v for k, v in study.user_attrs["settings"].items() if k != "tune.grid"})
    study = open_study(cosine, TuneConfig(sampler="grid", grid_size=2), "older-grid", storage)
    assert study.user_attrs["settings"]["tune.grid"] == "lr 2 points 0.01..0.5"


def test_a_worker_that_proc_hides_is_not_taken_for_dead(monkeypatch):
    # Under hidepid, /proc shows no other user's processes: such a worker, alive, must keep its trial.
    from cifar_exp import tune as tune_module

    mine = tune_module.worker_process()
    boot, namespace, _, _ = mine.split("/")
    recorded = f"{boot}/{namespace}/4242/123"
    monkeypatch.setattr(tune_module, "worker_process", lambda pid=None: None if pid else mine)

    def kill(pid, sig, error):
        raise error

    monkeypatch.setattr(tune_module.os, "kill", lambda pid, sig: kill(pid, sig, PermissionError(1, "not yours")))
    assert not tune_module._worker_is_gone(recorded, mine)  # alive: another user's
    monkeypatch.setattr(tune_module.os, "kill", lambda pid, sig: kill(pid, sig, ProcessLookupError(3, "no such")))
    assert tune_module._worker_is_gone(recorded, mine)


@pytest.mark.parametrize(("extra", "message"), [
    # A width no trial could build (36 TB of weights) failed mid-study with a traceback.
    (["--width-choices", "16,64,1000000"], "--width-choices/--hidden-choices: the largest choices are too large: "
                                           "cannot build model seed (widths 1000000,1000000,1000000, hidden "),
    (["--latency-threads", "4096"], "latency-threads 4096 is more than the "),  # oversubscribed timings
])
def test_two_objective_choices_that_cannot_run_are_refused_before_the_study(tiny_data, tracking_store, cache_dir,
                                                                            tmp_path, extra, message):
    result = run_cli("tune", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, *ACC_LAT, *extra,
                     "--study-name", "refused")
    assert result.exit_code == 1 and result.output.splitlines()[-1].startswith(f"Error: {message}"), result.output
    assert all_runs() == [] and not (tmp_path / "mlruns" / "optuna.db").exists()


def test_the_best_of_two_equally_accurate_trials_is_the_faster_one(tmp_path):
    # The first of them is dominated (as accurate, slower): named best, it was off its own Pareto set.
    from cifar_exp.tune import best_trial, pareto_trials

    study = optuna.create_study(directions=["maximize", "minimize"])
    for values in ([0.5, 0.4], [0.5, 0.2], [0.3, 0.1]):
        study.add_trial(optuna.trial.create_trial(values=values, params={"lr": 0.1},
                                                  distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1)}))
    assert best_trial(study).number == 1 and 1 in [t.number for t in pareto_trials(study)]


def test_a_study_named_with_dollars_keeps_its_scatter_plot(tmp_path):
    # The study name titles the lr x decay scatter; in a pair of $ matplotlib read maths and, on what is
    # no valid maths, the plot was skipped.
    from cifar_exp.tune import write_study_plots

    study = optuna.create_study(study_name=r"price $\bad$", direction="maximize")
    for lr, decay, value in ((0.1, 0.95, 0.5), (0.05, 0.9, 0.6), (0.2, 0.97, 0.4)):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "lr_decay": decay}, value=value,
            distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True),
                           "lr_decay": optuna.distributions.FloatDistribution(0.8, 1.0)}))
    written = write_study_plots(study, tmp_path, intermediate=False)
    assert tmp_path / "lr_decay_scatter.png" in written


def test_study_plots_leave_the_callers_pyplot_figures_open_and_none_of_their_own(tmp_path, monkeypatch):
    # A plot that failed closed every pyplot figure of the process: a notebook's own among them.
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    from cifar_exp.tune import write_study_plots

    def timeline_failing_halfway(study):
        plt.figure()
        raise ValueError("drawn halfway")

    monkeypatch.setattr(oplt, "plot_timeline", timeline_failing_halfway)

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 0.1, "lr_decay": 0.95}, value=0.5,
        distributions={"lr": optuna.distributions.FloatDistribution(0.01, 1.0, log=True),
                       "lr_decay": optuna.distributions.FloatDistribution(0.8, 1.0)}))
    plt.close("all")
    mine = plt.figure()
    try:
        written = write_study_plots(study, tmp_path, intermediate=False)
        assert tmp_path / "optimization_history.png" in written and tmp_path / "timeline.png" not in written
        assert plt.get_fignums() == [mine.number]
    finally:
        plt.close("all")

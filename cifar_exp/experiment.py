"""A whole tracked experiment: data -> fit -> test report -> MLflow run with the registered model.

Order matters for bad input: the tracking store, the config and the data are checked before a run
is opened, so a mistake leaves nothing behind; once a run is open, any failure marks it FAILED.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cifar_exp import tracking
from cifar_exp.config import EvaluateConfig, ExperimentConfig, TrainConfig
from cifar_exp.data import Splits, load_splits, load_test_set
from cifar_exp.errors import ConfigError
from cifar_exp.inference import check_class_count, check_classifier
from cifar_exp.models import Ensemble
from cifar_exp.reports import ClassMetrics, class_metrics, write_evaluation_report, write_training_report
from cifar_exp.train import (
    EvalResult,
    FitResult,
    build_network,
    evaluate,
    fit,
    parameter_count_tags,
    resolve_amp_dtype,
    resolve_device,
    served_validation_accuracy,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingOutcome:
    run_id: str
    fit: FitResult
    test: EvalResult
    test_metrics: ClassMetrics
    model_uri: str
    model_version: str | None  # None when not registered
    champion: bool
    served_val_accuracy: float  # the logged model's, in fp32 and one pass per image: what the champion rule compares


@dataclass(frozen=True)
class EvaluationOutcome:
    run_id: str
    test: EvalResult
    test_metrics: ClassMetrics


def train_and_track(
    cfg: ExperimentConfig,
    *,
    splits: Splits | None = None,
    tags: Mapping[str, str] | None = None,
    progress: bool = False,
    nested: bool = False,
    teacher: Teacher | None = None,
) -> TrainingOutcome:
    """Train ``cfg`` and log every deliverable of the seed report into one MLflow run.

    ``nested`` makes that run a child of the active run (``tune --retrain-best`` uses it);
    ``teacher``: ``cfg.train.teacher`` already loaded (else it is loaded here).
    """
    tracking.check_tracking_store()
    if not nested:
        tracking.check_run_target(cfg.tracking.experiment_name)
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp_dtype(cfg.train, device)
    build_network(cfg.train)  # rejects unknown names and knobs before the data loads
    if splits is None:
        splits = load_splits(cfg.data)
    if teacher is None:
        teacher = load_teacher(cfg.train, splits.classes, cfg.data.data_dir, device)

    run_tags = {
        **tracking.environment_tags(device, amp_dtype),
        "model": cfg.train.model,
        **parameter_count_tags(cfg.train, len(splits.classes)),
        "validation_split": "test (seed-report protocol)" if splits.val_is_test else "carved from train",
        **(teacher.tags() if teacher else {}),
        **(tags or {}),
    }
    registered_name = cfg.registered_model_name if cfg.tracking.register else None
    run_id, version = None, None
    try:
        with tracking.start_run(cfg.tracking.experiment_name, cfg.tracking.run_name, tags=run_tags,
                                nested=nested) as run_id:
            tracking.log_params({**cfg.flat(), tracking.CLASSES_PARAM: tracking.classes_param(splits.classes)})
            tracking.log_datasets(_distinct_sets(splits), splits.source)
            result = fit(
                cfg.train,
                splits,
                on_epoch_end=lambda stats: tracking.log_metrics(stats.metrics(), step=stats.epoch),
                progress=progress,
                teacher=teacher.model if teacher else None,
            )
            test, test_metrics = _evaluate_and_report(result.model, splits, cfg.train.eval_batch_size,
                                                      cfg.train.channels_last, result, tta=cfg.train.tta,
                                                      train_objective=_training_objective(cfg.train))
            served_val_accuracy = served_validation_accuracy(result, splits.val, cfg.train)
            tracking.log_metrics({
                "served_val_accuracy": served_val_accuracy,
                "train_seconds": result.train_seconds,
                "peak_memory_bytes": result.peak_memory_bytes,
                "best_val_accuracy": max(s.val_accuracy for s in result.history),
            })
            leak = teacher_may_know_validation(teacher, splits) if teacher else None
            if leak:
                log.warning("%s: the validation accuracy may be optimistic", leak)
                tracking.set_tags({"validation_leak": leak})
            model_uri, version = tracking.log_model(result.model, registered_name)
            # Chosen on validation, never on test: the champion is a selection among versions, of the
            # model as it is served (one pass per image: a run's mirror TTA does not ship with it).
            champion = bool(version) and tracking.promote_if_champion(
                registered_name, version, val_accuracy=served_val_accuracy,
                test_accuracy=test.served_accuracy,
                validation_digest=None if splits.val_is_test else splits.val.digest(), not_candidate=leak,
                classes=splits.classes,
            )
    except BaseException:
        # A run that failed or was interrupted, up to its close, leaves no registered version pointing
        # at its model (a signal held back while the run closed FINISHED is raised after it: kept).
        if version and not tracking.run_finished(run_id):
            tracking.delete_model_version(registered_name, version)
        raise
    return TrainingOutcome(run_id, result, test, test_metrics, model_uri, version, champion, served_val_accuracy)


def evaluate_and_track(evaluate: EvaluateConfig, cfg: ExperimentConfig) -> EvaluationOutcome:
    """Evaluate ``evaluate.model_uri`` on the test split of ``cfg.data`` and log the report into a new run.

    Of ``cfg.train`` only the device, ``eval_batch_size`` and ``tta`` apply. With ``tta`` the reported
    accuracy is that of mirror test-time augmentation (two forward passes per image); the one-pass
    accuracy is logged too.
    """
    model_uri, data_cfg, tracking_cfg = evaluate.model_uri, cfg.data, cfg.tracking
    batch_size, tta = cfg.train.eval_batch_size, cfg.train.tta
    tracking.check_tracking_store()
    tracking.check_run_target(tracking_cfg.experiment_name)
    device = resolve_device(cfg.train.device)
    model = tracking.load_model(model_uri).to(device)
    class_count = check_classifier(model, model_uri, device)
    test_set, classes, source = load_test_set(data_cfg)
    check_class_count(class_count, classes, data_cfg.data_dir)
    source_run_id = tracking.check_trained_classes(model_uri, classes, data_cfg.data_dir)
    splits = Splits(test_set, test_set, test_set, classes, source, val_is_test=True)
    tags = {"model_uri": model_uri, "source_run_id": source_run_id or "unknown",
            **tracking.environment_tags(device, None)}
    with tracking.start_run(tracking_cfg.experiment_name, tracking_cfg.run_name, tags=tags) as run_id:
        tracking.log_params({"model_uri": model_uri, "data.data_dir": data_cfg.data_dir,
                             "eval_batch_size": batch_size, "tta": tta})
        tracking.log_datasets({"test": test_set}, source)
        test, test_metrics = _evaluate_and_report(model, splits, batch_size, False, None, tta=tta)
    return EvaluationOutcome(run_id, test, test_metrics)


@dataclass(frozen=True)
class Teacher:
    """The loaded models of ``--teacher`` (several as one ``Ensemble``) and the runs that logged them."""

    model: torch.nn.Module
    source_run_ids: tuple[str, ...]  # "unknown" where a URI names no run

    def tags(self) -> dict[str, str]:
        # The URIs are logged as a param; an alias (models:/NAME@champion) moves, the run ids do not.
        return {"teacher_run_ids": ",".join(self.source_run_ids)}


def load_teacher(
    cfg: TrainConfig, classes: tuple[str, ...], data_dir: str, device: torch.device
) -> Teacher | None:
    """The models ``--teacher`` names, loaded onto ``device`` and checked against the dataset;
    None without distillation."""
    members, source_run_ids, uri_of = [], [], {}
    for model_uri in cfg.teacher_uris():
        model = tracking.load_model(model_uri).to(device)
        class_count = check_classifier(model, model_uri, device)
        check_class_count(class_count, classes, data_dir, model=f"teacher {model_uri}")
        source_run_id, identity = tracking.model_origin(model_uri)
        if identity in uri_of:  # one model under two names would count twice in the ensemble's mean
            raise ConfigError(f"teacher names one model twice: {uri_of[identity]} and {model_uri}")
        uri_of[identity] = model_uri
        source_run_ids.append(tracking.check_trained_classes(model_uri, classes, data_dir,
                                                             source_run_id=source_run_id) or "unknown")
        members.append(model)
    if not members:
        return None
    if len(members) > 1:
        log.info("distilling from an ensemble of %d models", len(members))
    return Teacher(Ensemble(members) if len(members) > 1 else members[0], tuple(source_run_ids))


def teacher_may_know_validation(teacher: Teacher, splits: Splits) -> str | None:
    """Why the teachers may have trained on this run's validation images (whose soft labels then
    carry them into the student), or None: each teacher's run must have trained on exactly this
    run's training images (the digest of its ``training`` dataset input)."""
    if splits.val_is_test:
        return None  # validated on the test split: no champion candidate anyway
    train_digest = splits.train.digest()
    # A run id "unknown" (a URI that names no run) has no digest either: it counts as other images.
    others = [run for run in teacher.source_run_ids if tracking.dataset_digest(run, "train") != train_digest]
    if others:
        return (f"teacher run{'s' if len(others) > 1 else ''} {', '.join(others)} trained on other images than "
                "this run's training split (another --val-size, --split-seed or data folder, or unknown), which "
                "may include its validation images")
    # The same split, so the same validation images: a teacher's own teachers may have seen them.
    taught = [run for run in teacher.source_run_ids
              if (record := tracking.get_run(run)) is not None and record.tags.get("validation_leak")]
    if taught:
        return (f"teacher run{'s' if len(taught) > 1 else ''} {', '.join(taught)} learned from teachers that may "
                "know this run's validation images (tagged validation_leak)")
    return None


def _evaluate_and_report(
    model: torch.nn.Module,
    splits: Splits,
    batch_size: int,
    channels_last: bool,
    result: FitResult | None,
    *,
    tta: bool,
    train_objective: str = "cross-entropy",
) -> tuple[EvalResult, ClassMetrics]:
    """Test-split metrics and report files, logged into the active run.

    Evaluated in fp32, the model as it is logged and exported, whatever autocast trained and
    validated it; ``tta``: mirror test-time augmentation, and then the accuracy of one forward pass
    per image, what the exported model computes, is logged as well.
    """
    test = evaluate(model, splits.test, batch_size=batch_size, channels_last=channels_last, tta=tta)
    metrics = class_metrics(test.labels, test.predictions, splits.classes)
    tracking.log_metrics({"test_loss": test.loss, "test_accuracy": test.accuracy, **metrics.macro()})
    if test.one_pass_accuracy is not None:
        tracking.log_metrics({"test_accuracy_without_tta": test.one_pass_accuracy})
    log.info("test accuracy %.4f, test loss %.4f on %d images", test.accuracy, test.loss, len(test.labels))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        if result is not None:
            write_training_report(out_dir, result.history,
                                  val_label="test (--val-on-test)" if splits.val_is_test else "validation",
                                  train_objective=train_objective)
        write_evaluation_report(out_dir, test, metrics, splits.test.images.numpy())
        tracking.log_artifacts(out_dir)
    tracking.log_table(metrics.per_class_rows(), "metrics/per_class.json")
    return test, metrics


def _training_objective(cfg: TrainConfig) -> str:
    """What ``train_loss`` measures, for the loss curves' legend."""
    objective = "cross-entropy" + (f" (label smoothing {cfg.label_smoothing:g})" if cfg.label_smoothing else "")
    if cfg.teacher_uris():
        return f"{cfg.distill_weight:g} × distillation + {1 - cfg.distill_weight:g} × {objective}"
    return objective


def _distinct_sets(splits: Splits) -> dict[str, object]:
    if splits.val_is_test:
        return {"train": splits.train, "test": splits.test}
    return {"train": splits.train, "val": splits.val, "test": splits.test}


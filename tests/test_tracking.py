"""End to end: a tracked training run holds every deliverable, and the registry behaves."""

import concurrent.futures
import contextlib
import csv
import dataclasses
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

from cifar_exp import experiment, tracking
from cifar_exp.config import DataConfig, ExperimentConfig, TrackingConfig, TrainConfig
from cifar_exp.data import load_splits
from cifar_exp.errors import ConfigError, DataError, TrackingError, TrainingDivergedError
from cifar_exp.experiment import train_and_track
from cifar_exp.models import Ensemble, shipped_copy
from cifar_exp.train import build_classifier, evaluate
from conftest import with_last_epoch

EPOCHS = 3


def tiny_config(data_dir, cache_dir, **train):
    return ExperimentConfig(
        data=DataConfig(data_dir=str(data_dir), val_size=50, cache_dir=cache_dir),
        train=TrainConfig(**{"epochs": EPOCHS, "batch_size": 32, "lr": 0.05, "eval_batch_size": 64, **train}),
        tracking=TrackingConfig(experiment_name="tests"),
    )


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One tracked training run in a module-wide store: (outcome, splits, client)."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        cfg = tiny_config(tiny_data, str(root / "cache"))
        splits = load_splits(cfg.data)
        outcome = train_and_track(cfg, splits=splits)
        yield outcome, splits, MlflowClient()


def test_run_finished_with_params_and_tags(trained):
    outcome, _, client = trained
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.05" and run.data.params["train.model"] == "seed"
    assert run.data.params["data.val_size"] == "50"
    tags = run.data.tags
    assert tags["parameter_count"] == tags["training_parameter_count"] == "152458"  # seed: nothing to fold
    assert tags["device"] == "cpu" and tags["torch_version"] == torch.__version__
    assert tags["git_commit"] and tags["amp_dtype"]
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["testing", "training", "validation"]


@pytest.mark.parametrize("package_folder", [".", "site"])
def test_git_commit_is_the_packages_own_checkouts(tmp_path, monkeypatch, package_folder):
    # A copy of the package inside some other repository (or an installed copy in a virtualenv inside
    # a checkout) must not be tagged with that repository's HEAD: that commit describes other code.
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout.strip()

    module = tmp_path / package_folder / "cifar_exp" / "tracking.py"
    module.parent.mkdir(parents=True)
    module.write_text("# the code\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "code")
    monkeypatch.setattr(tracking, "__file__", str(module))  # the module as if imported from there
    assert tracking._git_commit() == (git("rev-parse", "HEAD") if package_folder == "." else "unknown")
    module.write_text("# changed\n")
    assert tracking._git_commit() == (git("rev-parse", "HEAD") + "-dirty" if package_folder == "." else "unknown")


def test_per_epoch_metrics_are_logged_with_epoch_steps(trained):
    outcome, _, client = trained
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds",
                 "train_images_per_second"):
        history = client.get_metric_history(outcome.run_id, name)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), name
    val = sorted(client.get_metric_history(outcome.run_id, "val_accuracy"), key=lambda m: m.step)
    assert [m.value for m in val] == pytest.approx([s.val_accuracy for s in outcome.fit.history])


def test_final_metrics_match_the_outcome(trained):
    outcome, splits, client = trained
    metrics = client.get_run(outcome.run_id).data.metrics
    assert metrics["test_accuracy"] == pytest.approx(outcome.test.accuracy)
    assert metrics["test_accuracy"] > 0.5
    labels, predictions = outcome.test.labels, outcome.test.predictions
    for name, score in (("macro_precision", precision_score), ("macro_recall", recall_score), ("macro_f1", f1_score)):
        assert metrics[name] == pytest.approx(score(labels, predictions, average="macro", zero_division=0)), name
    assert metrics["test_loss"] == pytest.approx(outcome.test.loss) and 0 < metrics["test_loss"] < math.log(10)
    for name in ("train_seconds", "peak_memory_bytes"):
        assert math.isfinite(metrics[name]) and metrics[name] > 0, name


def test_artifacts_hold_real_reports(trained, tmp_path):
    outcome, splits, client = trained
    names = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"plots", "metrics", "history.csv"} <= names
    folder = mlflow.artifacts.download_artifacts(run_id=outcome.run_id, dst_path=str(tmp_path))
    for plot in ("loss_curves", "accuracy_curves", "confusion_matrix", "sample_predictions"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 5000, plot
    with open(tmp_path / "metrics" / "confusion_matrix.csv") as f:
        rows = list(csv.reader(f))
    matrix = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert matrix.shape == (10, 10) and matrix.sum() == len(splits.test)
    assert np.trace(matrix) / matrix.sum() == pytest.approx(outcome.test.accuracy)
    # rows: true classes, columns: predicted ones, as scikit-learn counts them
    labels, predictions = outcome.test.labels, outcome.test.predictions
    np.testing.assert_array_equal(matrix, confusion_matrix(labels, predictions, labels=list(range(10))))
    assert (matrix.sum(1) == np.bincount(labels, minlength=10)).all()
    with open(tmp_path / "metrics" / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [row["class"] for row in per_class] == list(splits.classes)
    ids = list(range(10))
    sk_precision = precision_score(labels, predictions, labels=ids, average=None, zero_division=0)
    sk_recall = recall_score(labels, predictions, labels=ids, average=None, zero_division=0)
    sk_f1 = f1_score(labels, predictions, labels=ids, average=None, zero_division=0)
    for k, row in enumerate(per_class):
        assert float(row["precision"]) == pytest.approx(sk_precision[k])
        assert float(row["recall"]) == pytest.approx(sk_recall[k])
        assert float(row["f1"]) == pytest.approx(sk_f1[k])
        assert int(row["support"]) == int((labels == k).sum())
    with open(tmp_path / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == EPOCHS
    assert "macro avg" in (tmp_path / "metrics" / "classification_report.txt").read_text()
    assert Path(folder) == tmp_path


def test_registered_model_loads_by_alias_and_predicts_the_same(trained):
    outcome, splits, _ = trained
    assert outcome.model_version == "1" and outcome.champion
    loaded = tracking.load_model("models:/cifar10-seed@champion")
    images = splits.test.images.float() / 255
    with torch.inference_mode():
        predictions = loaded(images).argmax(1).numpy()
    np.testing.assert_array_equal(predictions, outcome.test.predictions)
    # The batch dimension is dynamic: a single image works too.
    assert loaded(images[:1]).shape == (1, 10)
    # It loads channels_last, the layout PyTorch's CPU convolutions run it fastest in.
    convs = [p for p in loaded.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)



def test_pyfunc_serves_the_model_on_the_cpu_of_a_cuda_machine_as_readme_says(trained, monkeypatch):
    # With CUDA, pyfunc picks the GPU and MLflow refuses to move a pt2 program logged on the CPU;
    # README's two ways round it must keep working (CUDA simulated: no GPU here).
    outcome, splits, _ = trained
    images = (splits.test.images[:8].float() / 255).numpy()
    with torch.inference_mode():
        expected = tracking.load_model("models:/cifar10-seed@champion")(torch.from_numpy(images)).numpy()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(mlflow.exceptions.MlflowException, match="can't be loaded on 'cuda' device"):
        mlflow.pyfunc.load_model("models:/cifar10-seed@champion")
    served = mlflow.pyfunc.load_model("models:/cifar10-seed@champion", model_config={"device": "cpu"})
    np.testing.assert_allclose(served.predict(images), expected, rtol=0, atol=1e-5)
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu")
    np.testing.assert_allclose(mlflow.pyfunc.load_model("models:/cifar10-seed@champion").predict(images), expected,
                               rtol=0, atol=1e-5)

def test_a_model_logs_channels_last_without_a_warning_and_loads_back_whole(tracking_store, recwarn):
    # torch.export's packer takes channels_last weights for slices and warns that this "may cause issues
    # when your weights are not on CPU": they are on the CPU and whole, and every train printed it.
    model = build_classifier(TrainConfig(model="resnet8"), 10)
    with tracking.start_run("layout"):
        uri, _ = tracking.log_model(model, None)
    assert not [w for w in recwarn if "No complete tensor" in str(w.message)]
    loaded = tracking.load_model(uri)
    images = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), shipped_copy(model)(images))


def test_every_form_of_model_uri_names_its_source_run(trained):
    outcome, _, _ = trained
    assert outcome.model_uri.startswith("models:/m-")  # MLflow 3's logged-model URI, as train prints it
    for uri in (outcome.model_uri, f"runs:/{outcome.run_id}/model", "models:/cifar10-seed/1",
                "models:/cifar10-seed@champion", "models:/cifar10-seed/latest"):
        assert tracking.model_source_run(uri) == outcome.run_id, uri
    # A registry lookup that fails is no unknown run: callers check the run's classes and images.
    for missing in ("models:/m-0000", "models:/no-such-model/1", "models:/cifar10-seed@nobody"):
        with pytest.raises(TrackingError, match=f"cannot find the run behind {missing}: "):
            tracking.model_source_run(missing)
    assert tracking.model_source_run("/srv/models/cifar10") is None  # a local folder: no run logged it


def test_champion_moves_only_to_a_better_version(trained):
    # Chosen by validation accuracy; the test accuracy is kept as a tag but decides nothing.
    outcome, splits, client = trained
    name = "cifar10-seed"
    first = client.get_model_version(name, "1").tags
    base = float(first["val_accuracy"])
    assert base == pytest.approx(client.get_run(outcome.run_id).data.metrics["served_val_accuracy"], abs=1e-6)
    assert base == pytest.approx(evaluate(outcome.fit.model, splits.val).accuracy, abs=1e-6)  # fp32, one pass
    assert float(first["test_accuracy"]) == pytest.approx(outcome.test.accuracy, abs=1e-6)
    val = first["validation_digest"]
    assert val == splits.val.digest()  # the images its val_accuracy was measured on
    validation_input = next(i.dataset for i in client.get_run(outcome.run_id).inputs.dataset_inputs
                            if i.tags[0].value == "validation")
    assert validation_input.digest == val
    worse = client.create_model_version(name, outcome.model_uri, run_id=outcome.run_id)
    assert not tracking.promote_if_champion(name, worse.version, val_accuracy=base - 0.1, test_accuracy=1.0,
                                            validation_digest=val)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    # Better numbers on other validation images, or on the test split (--val-on-test), do not compare.
    elsewhere = client.create_model_version(name, outcome.model_uri, run_id=outcome.run_id)
    assert not tracking.promote_if_champion(name, elsewhere.version, val_accuracy=1.0, test_accuracy=1.0,
                                            validation_digest="0123456789abcdef")
    on_test = client.create_model_version(name, outcome.model_uri, run_id=outcome.run_id)
    assert not tracking.promote_if_champion(name, on_test.version, val_accuracy=1.0, test_accuracy=1.0,
                                            validation_digest=None)
    assert client.get_model_version(name, on_test.version).tags["validation_digest"] == "test split"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    better = client.create_model_version(name, outcome.model_uri, run_id=outcome.run_id)
    assert tracking.promote_if_champion(name, better.version, val_accuracy=base + 0.01, test_accuracy=0.0,
                                        validation_digest=val)
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(better.version)
    assert float(client.get_model_version(name, worse.version).tags["val_accuracy"]) == pytest.approx(base - 0.1)


def test_a_distilled_run_learns_from_the_logged_teachers_it_records(trained, tiny_data, cache_dir, monkeypatch):
    outcome, splits, client = trained
    untracked = TrackingConfig(experiment_name="tests", register=False)
    other = train_and_track(dataclasses.replace(tiny_config(tiny_data, cache_dir, epochs=1, seed=1),
                                                tracking=untracked), splits=splits)
    teachers = f"{outcome.model_uri},runs:/{other.run_id}/model"  # a logged model's URI, and a run's
    seen = {}

    def spying_fit(*args, teacher, **kwargs):
        seen["teacher"] = teacher
        return fit(*args, teacher=teacher, **kwargs)

    fit = experiment.fit
    monkeypatch.setattr(experiment, "fit", spying_fit)
    cfg = dataclasses.replace(tiny_config(tiny_data, cache_dir, epochs=1, teacher=teachers), tracking=untracked)
    distilled = train_and_track(cfg, splits=splits)
    run = client.get_run(distilled.run_id)
    assert run.data.params["train.teacher"] == teachers
    assert run.data.tags["teacher_run_ids"] == f"{outcome.run_id},{other.run_id}"
    teacher = seen["teacher"]
    assert isinstance(teacher, Ensemble) and len(teacher.members) == 2
    images = splits.test.images[:8].float() / 255
    with torch.inference_mode():
        mean = (outcome.fit.model.cpu()(images) + other.fit.model.cpu()(images)) / 2  # the members' logits averaged
        torch.testing.assert_close(teacher(images), mean, rtol=1e-4, atol=1e-4)


def test_one_model_named_twice_as_teacher_is_refused_before_any_run(trained, tiny_data, cache_dir, tmp_path):
    # It would count twice in the ensemble's mean (the same URI twice is refused by the config already).
    outcome, splits, client = trained
    runs_before = len(client.search_runs([client.get_experiment_by_name("tests").experiment_id]))
    folder = mlflow.artifacts.download_artifacts(outcome.model_uri, dst_path=str(tmp_path))
    for second in (f"runs:/{outcome.run_id}/model", folder):
        cfg = tiny_config(tiny_data, cache_dir, epochs=1, teacher=f"{outcome.model_uri},{second}")
        with pytest.raises(ConfigError) as raised:
            train_and_track(cfg, splits=splits)
        assert str(raised.value) == f"teacher names one model twice: {outcome.model_uri} and {second}"
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == runs_before


def test_a_teacher_given_as_its_folder_is_known_by_the_run_that_logged_it(trained, tiny_data, cache_dir, tmp_path):
    outcome, splits, client = trained
    folder = mlflow.artifacts.download_artifacts(outcome.model_uri, dst_path=str(tmp_path))
    # its MLmodel file names the run: the class names that run trained on are checked ...
    with pytest.raises(DataError, match=re.escape(f"{folder} was trained on classes {tracking.classes_param(splits.classes)}; ")):
        tracking.check_trained_classes(folder, splits.classes[::-1], "reversed")
    # ... and a student on the teacher's own split is recorded as such (no false validation leak)
    cfg = dataclasses.replace(tiny_config(tiny_data, cache_dir, epochs=1, teacher=folder),
                              tracking=TrackingConfig(experiment_name="tests", register=False))
    tags = client.get_run(train_and_track(cfg, splits=splits).run_id).data.tags
    assert tags["teacher_run_ids"] == outcome.run_id and "validation_leak" not in tags


def test_a_teacher_trained_on_another_split_makes_no_champion(trained, tiny_data, cache_dir):
    # The teacher (split seed 0) trained on images this student (split seed 1) validates on: its soft
    # labels carry them into the student, whose validation accuracy is then no fair comparison.
    outcome, _, client = trained
    cfg = tiny_config(tiny_data, cache_dir, epochs=1, teacher=f"runs:/{outcome.run_id}/model")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_seed=1),
                              tracking=TrackingConfig(experiment_name="tests", registered_model_name="leaky"))
    student = train_and_track(cfg)
    assert student.model_version == "1" and not student.champion  # even with no champion to beat
    leak = client.get_run(student.run_id).data.tags["validation_leak"]
    assert leak.startswith(f"teacher run {outcome.run_id} trained on other images than this run's training split")
    assert client.get_model_version("leaky", "1").tags["no_champion_candidate"] == leak
    # Taught by that student on its own split: its teacher's teacher may know these validation images.
    grandchild = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, teacher=student.model_uri))
    grandchild = train_and_track(grandchild)
    assert grandchild.model_version == "2" and not grandchild.champion
    assert client.get_run(grandchild.run_id).data.tags["validation_leak"] == (
        f"teacher run {student.run_id} learned from teachers that may know this run's validation images "
        "(tagged validation_leak)")
    # The same split as the teacher's: a candidate as any run.
    same = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_seed=0))
    assert train_and_track(same).champion


def test_an_unloadable_teacher_is_a_one_line_error_before_any_run(tiny_data, tracking_store, cache_dir):
    cfg = tiny_config(tiny_data, cache_dir, epochs=1, teacher="runs:/0123456789abcdef/model")
    with pytest.raises(TrackingError, match="cannot load model runs:/0123456789abcdef/model") as raised:
        train_and_track(cfg)
    assert "\n" not in str(raised.value)
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_diverged_training_leaves_a_failed_run(tiny_data, tracking_store, cache_dir):
    cfg = tiny_config(tiny_data, cache_dir, lr=1e6, amp=False)
    with pytest.raises(TrainingDivergedError):
        train_and_track(cfg)
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_deleted_experiment_is_a_one_line_error_and_no_run(tracking_store):
    client = MlflowClient()
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(TrackingError, match="cannot start a run in experiment 'gone': .*deleted") as raised:
        with tracking.start_run("gone"):
            pass
    assert "\n" not in str(raised.value)
    assert mlflow.active_run() is None


def test_an_unusable_store_is_one_line_without_its_password(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://who:secret@127.0.0.1:9/db")
    with pytest.raises(TrackingError, match=r"MLflow tracking store postgresql://who:\*\*\*@127.0.0.1:9/db cannot be used"
                       ) as raised:
        tracking.check_tracking_store()
    assert "secret" not in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(("layout", "target", "reason"), [
    ("folder-is-a-file", "{tmp}/a-file", "File exists"),  # the database's folder taken by a file
    ("database-is-a-folder", "{tmp}/mlflow.db", "Is a directory"),
])
def test_a_sqlite_store_that_cannot_be_written_is_one_line_at_once(tmp_path, monkeypatch, layout, target, reason):
    # MLflow itself retries for a minute and a half, logging a warning each time, before it gives up.
    if layout == "folder-is-a-file":
        (tmp_path / "a-file").write_text("")
        database = tmp_path / "a-file" / "mlflow.db"
    else:
        (tmp_path / "mlflow.db").mkdir()
        database = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    started = time.monotonic()
    with pytest.raises(TrackingError) as raised:
        tracking.check_tracking_store()
    assert str(raised.value) == (f"MLflow tracking store sqlite:///{database} cannot be used: cannot write "
                                 f"{target.format(tmp=tmp_path)}: {reason}")
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("amp_dtype", [None, "bfloat16"])
def test_test_accuracy_is_measured_as_validation_was(tiny_data, tracking_store, cache_dir, monkeypatch, amp_dtype):
    # With --tta, validation used mirror TTA: so does the test accuracy; the one-pass accuracy (what
    # the exported model computes) is logged beside it. Test accuracy and the champion's validation
    # accuracy are those of the fp32 model, as logged and exported, even after autocast training.
    autocast_evaluations = []
    monkeypatch.setattr(experiment, "evaluate", lambda *args, **kwargs: autocast_evaluations.append(
        kwargs.get("amp_dtype")) or evaluate(*args, **kwargs))

    def fit_whose_autocast_validation_must_not_count(*args, **kwargs):
        result = experiment_fit(*args, **kwargs)
        if result.amp_dtype is None:
            return result  # the last epoch's one-pass validation is the served model's own
        return with_last_epoch(result, val_accuracy_without_tta=0.0)

    experiment_fit = experiment.fit
    monkeypatch.setattr(experiment, "fit", fit_whose_autocast_validation_must_not_count)
    cfg = tiny_config(tiny_data, cache_dir, epochs=2, tta=True, amp=amp_dtype is not None,
                      amp_dtype=amp_dtype or "auto")
    splits = load_splits(cfg.data)
    outcome = train_and_track(dataclasses.replace(cfg, tracking=TrackingConfig(experiment_name="tests",
                                                                               registered_model_name="tta")),
                              splits=splits)
    assert outcome.fit.amp_dtype == (amp_dtype and torch.bfloat16)
    assert autocast_evaluations == [None]  # the test split, in fp32
    model = outcome.fit.model
    with_tta = evaluate(model, splits.test, batch_size=64, tta=True).accuracy
    one_pass = evaluate(model, splits.test, batch_size=64).accuracy
    assert outcome.test.accuracy == with_tta and outcome.test.one_pass_accuracy == one_pass
    client = MlflowClient()
    metrics = client.get_run(outcome.run_id).data.metrics
    assert metrics["test_accuracy"] == with_tta and metrics["test_accuracy_without_tta"] == one_pass
    # The registered model runs one pass per image: the champion is chosen on that accuracy.
    val_one_pass = evaluate(model, splits.val, batch_size=64).accuracy
    if amp_dtype is None:
        assert [m.value for m in client.get_metric_history(outcome.run_id, "val_accuracy_without_tta")][-1] == val_one_pass
    assert metrics["served_val_accuracy"] == val_one_pass > 0  # after autocast training: evaluated again in fp32
    tags = client.get_model_version("tta", outcome.model_version).tags
    assert (tags["val_accuracy"], tags["test_accuracy"]) == (f"{val_one_pass:.6f}", f"{one_pass:.6f}")


def test_a_run_validated_on_the_test_split_never_becomes_champion(tiny_data, tracking_store, cache_dir):
    # --val-on-test (the seed report's protocol) chooses nothing: its validation accuracy is a test
    # accuracy. Not even a registered model without any champion gets the alias from it.
    cfg = tiny_config(tiny_data, cache_dir, epochs=1)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_on_test=True))
    outcome = train_and_track(cfg)
    client = MlflowClient()
    assert outcome.model_version == "1" and not outcome.champion
    version = client.get_model_version("cifar10-seed", "1")
    assert version.aliases == [] and version.tags["validation_digest"] == "test split"
    assert client.get_run(outcome.run_id).data.tags["validation_split"] == "test (seed-report protocol)"


def test_a_run_failing_after_registration_leaves_no_registered_version(tiny_data, tracking_store, cache_dir,
                                                                       monkeypatch):
    def locked(*args, **kwargs):
        raise TrackingError("database is locked")

    monkeypatch.setattr(tracking, "promote_if_champion", locked)
    with pytest.raises(TrackingError, match="database is locked"):
        train_and_track(tiny_config(tiny_data, cache_dir, epochs=1))
    client = MlflowClient()
    assert [r.info.status for r in client.search_runs([client.get_experiment_by_name("tests").experiment_id])] == [
        "FAILED"]
    assert client.search_model_versions("name='cifar10-seed'") == []
    assert client.search_registered_models() == []  # this run's registration created the name: gone too


def test_a_champion_from_before_validation_decided_is_compared_with_nothing(tracking_store):
    client = MlflowClient()
    mlflow.set_experiment("old-rule")  # this store's, not one an earlier test left active
    with mlflow.start_run() as run:
        # pip_requirements given: inferring them starts a subprocess that takes ~15 s
        info = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", input_example=np.zeros((2, 2), np.float32),
                                        pip_requirements=[])
    client.create_registered_model("old")
    old = client.create_model_version("old", info.model_uri, run_id=run.info.run_id)
    client.set_model_version_tag("old", old.version, "test_accuracy", "0.9")  # how the old rule tagged it
    client.set_registered_model_alias("old", "champion", old.version)
    new = client.create_model_version("old", info.model_uri, run_id=run.info.run_id)
    # Its only score is a test accuracy, and the test split never chooses: however good the new
    # version's validation accuracy, the alias stays until moved by hand.
    for val_accuracy in (0.5, 0.95):
        assert not tracking.promote_if_champion("old", new.version, val_accuracy=val_accuracy, test_accuracy=0.5,
                                                validation_digest="0123456789abcdef")
    assert client.get_model_version_by_alias("old", "champion").version == old.version


def _bare_versions(name: str, count: int) -> list[str]:
    """``count`` versions of a new registered model ``name``, pointing at a run with no model."""
    client = MlflowClient()
    client.create_registered_model(name)
    with mlflow.start_run() as run:
        pass
    return [client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version
            for _ in range(count)]


def test_a_tie_keeps_the_champion(tracking_store):
    # A float32 accuracy (111/300 = 0.37000000477) kept as the tag "0.370000" and compared unrounded
    # would beat itself; a deterministic rerun must not move the alias.
    mlflow.set_experiment("tie")
    first, second = _bare_versions("tie", 2)
    accuracy = float(np.float32(111 / 300))
    assert tracking.promote_if_champion("tie", first, val_accuracy=accuracy, test_accuracy=0.5, validation_digest="v")
    assert not tracking.promote_if_champion("tie", second, val_accuracy=accuracy, test_accuracy=0.9,
                                            validation_digest="v")
    assert MlflowClient().get_model_version_by_alias("tie", "champion").version == first


def test_two_runs_finishing_together_leave_the_alias_on_the_better_one(tracking_store, monkeypatch):
    # Both read the holder (0.5) before either writes, and the worse one writes last: without the
    # store's lock around the rule the 0.8 version would end up champion over the 0.9 one.
    mlflow.set_experiment("race")
    first, better, worse = _bare_versions("race", 3)
    assert tracking.promote_if_champion("race", first, val_accuracy=0.5, test_accuracy=0.5, validation_digest="v")
    both_read = threading.Barrier(2, timeout=2)  # broken (and passed) when the lock keeps one reader waiting
    read_model, set_alias = MlflowClient.get_registered_model, MlflowClient.set_registered_model_alias

    def read_together(self, name):
        model = read_model(self, name)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait()
        return model

    def worse_writes_last(self, name, alias, version):
        if str(version) == str(worse):
            time.sleep(0.5)
        return set_alias(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "get_registered_model", read_together)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", worse_writes_last)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(tracking.promote_if_champion, "race", version, val_accuracy=accuracy,
                                   test_accuracy=0.5, validation_digest="v")
                       for version, accuracy in ((better, 0.9), (worse, 0.8))]:
            future.result()
    assert MlflowClient().get_model_version_by_alias("race", "champion").version == better


def test_a_registry_error_while_reading_the_champion_fails_instead_of_crowning(tracking_store, monkeypatch):
    mlflow.set_experiment("unavailable")
    first, second = _bare_versions("busy", 2)
    assert tracking.promote_if_champion("busy", first, val_accuracy=0.9, test_accuracy=0.9, validation_digest="v")

    def locked(*args, **kwargs):
        raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)

    class AliasesLocked:  # the registered model, but its aliases cannot be read
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return locked() if name == "aliases" else getattr(self.model, name)

    read_model = MlflowClient.get_registered_model
    with monkeypatch.context() as patch:  # every way of reading the alias fails, the rest works
        patch.setattr(MlflowClient, "get_registered_model", lambda *a, **k: AliasesLocked(read_model(*a, **k)))
        patch.setattr(MlflowClient, "get_model_version_by_alias", locked)
        with pytest.raises(MlflowException, match="database is locked"):
            tracking.promote_if_champion("busy", second, val_accuracy=0.5, test_accuracy=0.5, validation_digest="v")
    assert MlflowClient().get_model_version_by_alias("busy", "champion").version == first


def test_a_stale_run_and_its_parent_are_closed_as_killed(tracking_store):
    client = MlflowClient()
    experiment = client.create_experiment("stale")
    parent = client.create_run(experiment).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
    assert tracking.kill_stale_run(child) == [child, parent]  # no tags to set: the default
    assert [client.get_run(r).info.status for r in (child, parent)] == ["KILLED", "KILLED"]
    assert tracking.kill_stale_run(child, tags={"why": "gone"}) == []  # closed runs stay as they are
    assert "why" not in client.get_run(child).data.tags
    # A trial's run closed already, its study run still open: the study run closes, without the trial's tags.
    parent = client.create_run(experiment).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(child)
    assert tracking.kill_stale_run(child, tags={"optuna_state": "FAIL"}) == [parent]
    assert "optuna_state" not in client.get_run(parent).data.tags


@pytest.mark.parametrize(("name", "registered_before"),
                         [("interrupted-model", False), ("interrupted-model", True), ("it's-a-model", False)])
def test_a_signal_while_the_model_is_logged_leaves_no_registered_version(tracking_store, monkeypatch,
                                                                              project_signal_handlers, name,
                                                                              registered_before):
    import os
    import signal

    client = MlflowClient()
    if registered_before:  # the user's name, created before the run: it stays, even with no version
        client.create_registered_model(name, description="the user's")

    log_model = mlflow.pytorch.log_model

    def log_then_signal(*args, **kwargs):  # Ctrl-C arrives as the model is registered
        info = log_model(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return info

    monkeypatch.setattr(mlflow.pytorch, "log_model", log_then_signal)
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("interrupted") as run_id:
            tracking.log_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), name)
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.search_model_versions() == []
    assert [m.description for m in client.search_registered_models()] == (["the user's"] if registered_before else [])


def _a_champion_any_run_beats(tiny_data, cache_dir, name):
    """(config, outcome, client): a first run registered as ``name``'s champion, whose recorded
    validation accuracy the next run of ``config`` beats."""
    cfg = dataclasses.replace(tiny_config(tiny_data, cache_dir, epochs=1),
                              tracking=TrackingConfig(experiment_name="tests", registered_model_name=name))
    first = train_and_track(cfg)
    client = MlflowClient()
    client.set_model_version_tag(name, first.model_version, "val_accuracy", "-1")
    return cfg, first, client


def test_an_interrupt_as_a_version_becomes_champion_gives_the_alias_back(tiny_data, cache_dir, tracking_store,
                                                                         monkeypatch, project_signal_handlers):
    import os
    import signal

    cfg, first, client = _a_champion_any_run_beats(tiny_data, cache_dir, "alias")
    set_alias = MlflowClient.set_registered_model_alias

    def set_then_signal(self, *args):  # SIGTERM arrives just as the alias has moved
        set_alias(self, *args)
        if str(args[2]) != first.model_version:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_then_signal)
    with pytest.raises(KeyboardInterrupt):
        train_and_track(cfg)
    versions = client.search_model_versions("name='alias'")
    assert [str(v.version) for v in versions] == [first.model_version]  # the interrupted run's is gone
    assert str(client.get_model_version_by_alias("alias", "champion").version) == first.model_version
    experiment_id = client.get_run(first.run_id).info.experiment_id
    assert sorted(r.info.status for r in client.search_runs([experiment_id])) == ["FINISHED", "KILLED"]


@pytest.mark.parametrize("closed", [False, True])
def test_an_interrupt_as_the_run_closes_leaves_run_and_version_agreeing(tiny_data, cache_dir, tracking_store,
                                                                       monkeypatch, project_signal_handlers, closed):
    import os
    import signal

    cfg, first, client = _a_champion_any_run_beats(tiny_data, cache_dir, "closing")
    end_run = mlflow.end_run

    def interrupted_end_run(status="FINISHED"):
        if status == "FINISHED":
            if not closed:  # Ctrl-C just before the run is closed
                raise KeyboardInterrupt
            end_run(status)
            os.kill(os.getpid(), signal.SIGTERM)  # as it is closed: held back until it is
            return
        end_run(status)

    monkeypatch.setattr(mlflow, "end_run", interrupted_end_run)
    with pytest.raises(KeyboardInterrupt):
        train_and_track(cfg)
    experiment_id = client.get_run(first.run_id).info.experiment_id
    second = next(r for r in client.search_runs([experiment_id]) if r.info.run_id != first.run_id)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='closing'"))
    champion = client.get_model_version_by_alias("closing", "champion")
    if closed:  # a finished run: its version stays, champion
        assert second.info.status == "FINISHED" and versions == [1, 2] and champion.run_id == second.info.run_id
    else:  # an interrupted run: no version of it, the alias back where it was
        assert second.info.status == "KILLED" and versions == [1] and champion.run_id == first.run_id


@pytest.mark.slow
def test_processes_opening_a_new_store_together_all_succeed(tmp_path):
    # MLflow creates and migrates the schema on first use: unlocked, two of three processes failed
    # ("duplicate column name: step"), as tune workers started together on a new store did.
    probe = (  # after the slow imports, each announces itself and waits for the others: then all at once
        "import pathlib, sys, time\n"
        "from cifar_exp import tracking\n"
        "ready = pathlib.Path(sys.argv[1])\n"
        "(ready / sys.argv[2]).touch()\n"
        "while len(list(ready.iterdir())) < 3:\n"
        "    time.sleep(0.001)\n"
        "tracking.check_tracking_store()\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"}
    (tmp_path / "ready").mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", probe, str(tmp_path / "ready"), str(worker)], env=env,
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for worker in range(3)]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], outputs


@pytest.mark.parametrize("message, retried", [
    ("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest", True),
    ('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "datasets_pk"', True),
    ("(sqlite3.OperationalError) database is locked", False),
])
def test_a_dataset_stored_by_another_run_at_the_same_moment_is_linked_again(tracking_store, tiny_data, cache_dir,
                                                                           monkeypatch, message, retried):
    # What a second tune worker met in CI: both stored the new dataset, the slower insert broke the key.
    splits = load_splits(DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=cache_dir))
    calls = []
    log_input = mlflow.log_input

    def lose_the_race_once(dataset, context=None, **kwargs):
        calls.append(context)
        if len(calls) == 1:
            log_input(dataset, context=context, **kwargs)  # the other run's insert, which won
            raise MlflowException(f"BAD_REQUEST: {message}")
        return log_input(dataset, context=context, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", lose_the_race_once)
    with tracking.start_run("race") as run_id:
        if not retried:
            with pytest.raises(MlflowException, match="database is locked"):
                tracking.log_datasets({"train": splits.train}, splits.source)
            return
        tracking.log_datasets({"train": splits.train, "val": splits.val}, splits.source)
    assert calls == ["training", "training", "validation"]
    inputs = MlflowClient().get_run(run_id).inputs.dataset_inputs
    assert sorted(i.tags[0].value for i in inputs) == ["training", "validation"]


def test_an_artifact_that_cannot_be_written_is_a_one_line_error(tracking_store, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlflow, "log_text", disk_full)
    with pytest.raises(TrackingError, match=r"^cannot write an artifact of the active run: \[Errno 28\] No space left"):
        with tracking.start_run("full"):
            tracking.log_text("report", "report.txt")
    assert MlflowClient().search_runs([MlflowClient().get_experiment_by_name("full").experiment_id])[0].info.status \
        == "FAILED"


def test_a_class_list_mlflow_cut_short_is_compared_as_far_as_it_was_kept(tracking_store):
    classes = tuple(f"n{i:08d}" for i in range(700))  # 6,299 characters joined: MLflow keeps 6,000
    mlflow.set_experiment("many-classes")
    with mlflow.start_run() as run:
        mlflow.log_param(tracking.CLASSES_PARAM, ",".join(classes))
    assert len(MlflowClient().get_run(run.info.run_id).data.params[tracking.CLASSES_PARAM]) == 6000
    uri = f"runs:/{run.info.run_id}/model"
    assert tracking.check_trained_classes(uri, classes, "imagenet32") == run.info.run_id
    reordered = (classes[1], classes[0], *classes[2:])
    with pytest.raises(DataError, match=f"^{uri} was trained on classes n00000000,n00000001,"):
        tracking.check_trained_classes(uri, reordered, "imagenet32")

    # Recorded as runs do now, a JSON list, cut short by MLflow too, and compared as far as kept
    with mlflow.start_run() as run:
        mlflow.log_param(tracking.CLASSES_PARAM, tracking.classes_param(classes))
    uri = f"runs:/{run.info.run_id}/model"
    assert tracking.check_trained_classes(uri, classes, "imagenet32") == run.info.run_id
    with pytest.raises(DataError, match=re.escape(f'{uri} was trained on classes ["n00000000","n00000001",')):
        tracking.check_trained_classes(uri, reordered, "imagenet32")


def test_class_names_with_commas_are_told_apart(tracking_store):
    # Joined by commas, "a,b" + "c" and "a" + "b,c" were one string: a model evaluated with every
    # label swapped, unrefused.
    mlflow.set_experiment("commas")
    with mlflow.start_run() as run:
        mlflow.log_param(tracking.CLASSES_PARAM, tracking.classes_param(("a,b", "c")))
    uri = f"runs:/{run.info.run_id}/model"
    assert tracking.check_trained_classes(uri, ("a,b", "c"), "same") == run.info.run_id
    with pytest.raises(DataError, match=re.escape(f'{uri} was trained on classes ["a,b","c"]; swapped holds ["a","b,c"]')):
        tracking.check_trained_classes(uri, ("a", "b,c"), "swapped")
    # The format is read, not guessed: a run of the comma era whose first class starts with ["
    with mlflow.start_run() as run:
        mlflow.log_param(tracking.CLASSES_PARAM, ",".join(('["a', "b")))
    assert tracking.check_trained_classes(f"runs:/{run.info.run_id}/model", ('["a', "b"), "own") == run.info.run_id
    with pytest.raises(DataError, match=re.escape('was trained on classes ["a,b; other holds ["a,c')):
        tracking.check_trained_classes(f"runs:/{run.info.run_id}/model", ('["a', "c"), "other")  # said as recorded
    # ... and a JSON list is no comma-joined list of other names
    assert tracking.other_classes(tracking.classes_param(("a", "b")), ('["a"', '"b"]'))


def test_a_store_that_cannot_answer_is_no_run_without_data(tracking_store, monkeypatch):
    # "database is locked" read as "no testing input" sent an export into a new run, saying the model's
    # run was tested on other images; as "no such run" it would decide the champion on nothing.
    mlflow.set_experiment("locked")
    with mlflow.start_run() as run:
        pass
    assert tracking.dataset_digest(run.info.run_id, "test") is None  # a run that recorded none
    assert tracking.dataset_digest("0123456789abcdef0123456789abcdef", "test") is None  # no such run
    assert tracking.dataset_digest("no/run", "test") is None  # no run id at all

    def locked(self, run_id):
        raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(MlflowClient, "get_run", locked)
    with pytest.raises(TrackingError, match=f"^cannot read run {run.info.run_id}: .*database is locked"):
        tracking.dataset_digest(run.info.run_id, "test")


def test_a_version_trained_on_other_class_names_does_not_take_the_champion(tracking_store, caplog):
    # Renamed class folders hold the same images and label numbers, so the same validation digest: the
    # version became champion, and the default commands then refused the data the old one knew.
    mlflow.set_experiment("renamed")
    client = MlflowClient()
    client.create_registered_model("renamed")
    versions = []
    for recorded in (",".join(("cat", "dog")),  # a run logged before the JSON list: compared as written
                     tracking.classes_param(("kitten", "puppy")), tracking.classes_param(("cat", "dog"))):
        with mlflow.start_run() as run:
            mlflow.log_param(tracking.CLASSES_PARAM, recorded)
        versions.append(client.create_model_version("renamed", f"runs:/{run.info.run_id}/model",
                                                    run_id=run.info.run_id).version)
    first, renamed, same = versions
    assert tracking.promote_if_champion("renamed", first, val_accuracy=0.5, test_accuracy=0.5, validation_digest="v",
                                        classes=("cat", "dog"))
    assert not tracking.promote_if_champion("renamed", renamed, val_accuracy=0.9, test_accuracy=0.9,
                                            validation_digest="v", classes=("kitten", "puppy"))
    assert (f"renamed champion stays version {first}: it was trained on other class names (or another order) "
            f"than version {renamed}") in caplog.text
    assert tracking.promote_if_champion("renamed", same, val_accuracy=0.9, test_accuracy=0.9, validation_digest="v",
                                        classes=("cat", "dog"))
    assert client.get_model_version_by_alias("renamed", "champion").version == same

def test_run_targets_that_cannot_take_a_new_run_are_refused_up_front(tracking_store, monkeypatch):
    client = MlflowClient()
    tracking.check_run_target("fresh")  # a new experiment: fine
    gone = client.create_experiment("gone")
    client.delete_experiment(gone)
    with pytest.raises(TrackingError, match="^experiment 'gone' was deleted: restore it"):
        tracking.check_run_target("gone")
    # Under `mlflow run` the run it opened is the target, whatever the experiment name.
    live = client.create_run(client.create_experiment("project")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", live)
    tracking.check_run_target("gone")
    client.set_terminated(live, "FINISHED")  # the variable left over in a shell: no longer mlflow run's run
    with pytest.raises(TrackingError, match=f"^cannot log into MLFLOW_RUN_ID {live}: the run is FINISHED, not "
                                            "running .* unset it to log a new run$"):
        tracking.check_run_target("project")
    client.delete_run(live)
    with pytest.raises(TrackingError, match=f"^cannot log into MLFLOW_RUN_ID {live}: the run was deleted$"):
        tracking.check_run_target("project")
    monkeypatch.setenv("MLFLOW_RUN_ID", "deadbeef")
    with pytest.raises(TrackingError, match="^cannot log into MLFLOW_RUN_ID deadbeef: "):
        tracking.check_run_target("project")


def test_a_run_the_caller_left_open_is_named_before_the_data_loads(tracking_store, tmp_path):
    # In a notebook a run left open by an earlier cell made MLflow raise a bare Exception, after the data
    # had loaded. Now a one-line TrackingError comes first (the missing folder is never looked at), the
    # caller's run stays theirs and open, and nested=True logs under it.
    mlflow.set_experiment("mine")
    with mlflow.start_run() as mine:
        cfg = ExperimentConfig(data=DataConfig(data_dir=str(tmp_path / "absent")),
                               tracking=TrackingConfig(register=False))
        for call in (lambda: train_and_track(cfg),
                     lambda: experiment.evaluate_and_track(experiment.EvaluateConfig(), cfg)):
            with pytest.raises(TrackingError, match=f"^MLflow run {mine.info.run_id} is already active in this "
                                                    r"process: end it first \(mlflow.end_run\(\)\)$"):
                call()
            assert mlflow.active_run().info.run_id == mine.info.run_id
        with pytest.raises(DataError):  # nested: on to the data
            train_and_track(cfg, nested=True)
    assert MlflowClient().get_run(mine.info.run_id).info.status == "FINISHED"


def test_a_tracking_server_lost_mid_run_is_one_line_naming_the_run_left_open(tracking_store, monkeypatch, caplog):
    # A server killed mid-run: MLflow's exception came out as a traceback of hundreds of lines, the one
    # of ending the run replacing it, and nothing said the run stayed RUNNING.
    lost = "API request to http://server:5000/api/2.0/mlflow/runs/log-batch failed with exception ConnectionError"
    with pytest.raises(TrackingError) as failed:
        with tracking.start_run("lost") as run_id:
            raise MlflowException(lost)
    assert str(failed.value) == f"the tracking store failed during run {run_id}: {lost}"
    assert MlflowClient().get_run(run_id).info.status == "FAILED"  # the store came back for the end

    def refused(self, run_id, status=None, end_time=None):
        raise MlflowException("API request to http://server:5000/api/2.0/mlflow/runs/update failed")

    set_terminated = MlflowClient.set_terminated
    monkeypatch.setattr(MlflowClient, "set_terminated", refused)
    with pytest.raises(TrackingError) as failed:
        with tracking.start_run("lost") as run_id:
            raise MlflowException(lost)
    assert str(failed.value) == (f"{lost}; run {run_id} is left RUNNING: the tracking store did not take its end "
                                 "(API request to http://server:5000/api/2.0/mlflow/runs/update failed)")
    assert mlflow.active_run() is None  # the process is free for the next run
    with pytest.raises(KeyboardInterrupt):  # an interrupt stays one: the command still ends by its signal
        with tracking.start_run("lost") as run_id:
            raise KeyboardInterrupt
    assert f"run {run_id} is left RUNNING" in caplog.text
    with pytest.raises(TrackingError) as failed:  # the body went well, only its end was lost
        with tracking.start_run("lost") as run_id:
            pass
    assert str(failed.value) == (f"run {run_id} is left RUNNING: the tracking store did not take its end "
                                 "(API request to http://server:5000/api/2.0/mlflow/runs/update failed)")
    monkeypatch.setattr(MlflowClient, "set_terminated", set_terminated)
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"


def test_an_interrupt_during_a_lost_end_still_says_the_run_is_left_running(tracking_store, monkeypatch, caplog,
                                                                          project_signal_handlers):
    # MLflow retries a lost server for minutes: a Ctrl-C then, held back until the end's write failed,
    # replaced that failure, and nothing said the run stayed RUNNING.
    import os
    import signal

    def refused(self, run_id, status=None, end_time=None):
        os.kill(os.getpid(), signal.SIGTERM)
        raise MlflowException("API request to http://server:5000/api/2.0/mlflow/runs/update failed")

    monkeypatch.setattr(MlflowClient, "set_terminated", refused)
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("lost") as run_id:
            pass
    assert f"run {run_id} is left RUNNING: the tracking store did not take its end (API request" in caplog.text


def test_a_name_a_failed_registration_created_goes_only_if_no_other_version_came(tracking_store):
    mlflow.set_experiment("names")
    client = MlflowClient()
    [alone] = _bare_versions("alone", 1)
    first, second = _bare_versions("shared", 2)  # another run registered version 2 meanwhile
    for name, version in (("alone", alone), ("shared", first)):
        client.set_model_version_tag(name, version, tracking.CREATED_NAME, "true")
        tracking.delete_model_version(name, version)
    assert [m.name for m in client.search_registered_models()] == ["shared"]
    assert [v.version for v in client.search_model_versions("name='shared'")] == [second]


@pytest.mark.parametrize("settings, legend", [
    ({}, "cross-entropy"),
    ({"label_smoothing": 0.1}, "cross-entropy (label smoothing 0.1)"),
    ({"teacher": "runs:/abc/model", "distill_weight": 0.9, "label_smoothing": 0.1},
     "0.9 × distillation + 0.1 × cross-entropy (label smoothing 0.1)"),
])
def test_the_training_loss_legend_names_the_objective_and_its_weights(settings, legend):
    assert experiment._training_objective(TrainConfig(**settings)) == legend


def test_a_version_registered_as_a_second_ctrl_c_stopped_log_model_is_removed(tracking_store, monkeypatch):
    # deferred() does not hold back a second Ctrl-C: it may stop MLflow's log_model after the version
    # exists but before log_model says which. No version may point at the run that will be KILLED.
    real_log_model = mlflow.pytorch.log_model

    def stopped_after_registering(*args, **kwargs):
        real_log_model(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.pytorch, "log_model", stopped_after_registering)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(KeyboardInterrupt), tracking.start_run("tests", "twice-interrupted"):
        tracking.log_model(model, "cifar10-twice")
    assert MlflowClient().search_model_versions("name = 'cifar10-twice'") == []
    assert MlflowClient().search_registered_models() == []  # the name it created goes too

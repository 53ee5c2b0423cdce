"""The benchmark scripts' own logic (their timings are not tested: see benchmarks/)."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from cifar_exp.config import recipe_config
from cifar_exp.train import build_shipped_classifier
from conftest import signal_cli_mid_training

ACCURACY = Path(__file__).parent.parent / "benchmarks" / "accuracy.py"
THROUGHPUT = Path(__file__).parent.parent / "benchmarks" / "train_throughput.py"
SHORT = ["--recipe", "pico", "--epochs", "1", "--set", "warmup_epochs=0", "--skip-latency", "--val-size", "50"]
TEACHER = ["--teacher-set", "model=pico-res", "--teacher-set", "widths=8,16,16", "--teacher-set", "epochs=1",
           "--teacher-set", "warmup_epochs=0"]


def load_script(path: Path, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    return script


def run_accuracy(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ACCURACY), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache)})


@pytest.mark.slow
def test_accuracy_distils_each_seed_from_its_own_tracked_teacher(tiny_data, tracking_store, tmp_path):
    saved = tmp_path / "models"
    # distill_mirror: the teacher, exported by MLflow for batches of the training batch size, predicts twice as many
    result = run_accuracy(*SHORT, *TEACHER, "--set", "distill_mirror=true", "--seeds", "0", "1",
                          "--data-dir", str(tiny_data), "--save-dir", str(saved), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "seed 0 teacher: val" in result.stdout and "seed 1 teacher: val" in result.stdout
    assert "teachers (model=pico-res widths=8,16,16 epochs=1 warmup_epochs=0, " in result.stdout

    client = MlflowClient()
    runs = {run.info.run_name: run for run in client.search_runs(
        [client.get_experiment_by_name("accuracy").experiment_id])}
    assert set(runs) == {"pico-pico-seed0", "pico-pico-seed0-teacher", "pico-pico-seed1", "pico-pico-seed1-teacher"}
    for seed in (0, 1):
        student, teacher = runs[f"pico-pico-seed{seed}"], runs[f"pico-pico-seed{seed}-teacher"]
        # the student learnt from its own seed's teacher, loaded from MLflow as `train --teacher` loads it
        assert student.data.params["train.teacher"] == f"runs:/{teacher.info.run_id}/model"
        assert student.data.tags["teacher_run_ids"] == teacher.info.run_id
        assert student.data.params["train.distill_mirror"] == "True"
        assert teacher.data.params["train.model"] == "pico-res" and teacher.data.params["train.seed"] == str(seed)
        assert teacher.data.params["train.teacher"] == ""

    # --save-dir keeps weights that load into each run's architecture, in the shipped form (BN folded)
    teacher = build_shipped_classifier(recipe_config("pico", model="pico-res", widths="8,16,16"), 10)
    teacher.load_state_dict(torch.load(saved / "pico-pico-seed1-teacher.pt", weights_only=True))
    student = build_shipped_classifier(recipe_config("pico"), 10)
    student.load_state_dict(torch.load(saved / "pico-pico-seed1.pt", weights_only=True))


def test_accuracy_trains_the_teacher_for_the_students_epochs_unless_told_otherwise(tiny_data, tmp_path):
    teacher = [arg for arg in TEACHER if arg not in ("--teacher-set", "epochs=1")]  # SHORT's --epochs 1 only
    teacher = [word for setting in teacher for word in ("--teacher-set", setting)]
    result = run_accuracy(*SHORT, *teacher, "--seeds", "0", "--untracked", "--data-dir", str(tiny_data),
                          cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("epoch 1/1 ") == 2 and "epoch 1/50" not in result.stderr  # teacher, then student


@pytest.mark.slow
def test_accuracy_distils_from_saved_teachers_as_from_trained_ones(tiny_data, tmp_path):
    common = [*SHORT, *TEACHER, "--set", "distill_mirror=true", "--seeds", "0", "1", "--untracked",
              "--data-dir", str(tiny_data)]
    saved = tmp_path / "models"
    trained = run_accuracy(*common, "--save-dir", str(saved), cache=tmp_path / "cache")
    assert trained.returncode == 0, trained.stderr
    loaded = run_accuracy(*common, "--teacher-dir", str(saved), cache=tmp_path / "cache")
    assert loaded.returncode == 0, loaded.stderr
    assert "epoch 1/1 " in loaded.stderr and loaded.stderr.count("epoch 1/1 ") == trained.stderr.count("epoch 1/1 ") // 2

    def results(stdout: str, seed: int, who: str) -> list[str]:  # ["seed N: val …", "test …", time, run]
        return next(line for line in stdout.splitlines() if line.startswith(f"seed {seed}{who}: ")).split("  ")

    for seed in (0, 1):
        # the same teachers on the test split (a loaded one's val is evaluated in fp32, a trained one's is
        # its last epoch's); the students trained from them are the same on this CPU
        assert results(loaded.stdout, seed, " teacher")[1] == results(trained.stdout, seed, " teacher")[1]
        assert results(loaded.stdout, seed, "")[:2] == results(trained.stdout, seed, "")[:2]
        assert f"loaded from {saved / f'pico-pico-seed{seed}-teacher.pt'}" in loaded.stdout
    assert "test accuracy (mirror TTA: two passes per image): " in loaded.stdout
    assert f"; loaded from {saved}\n" in loaded.stdout and "training time per teacher" in trained.stdout


@pytest.mark.slow
def test_accuracy_distils_every_student_from_the_ensemble_of_all_tracked_teachers(tiny_data, tracking_store,
                                                                                     tmp_path):
    result = run_accuracy(*SHORT, *TEACHER, "--set", "distill_mirror=true", "--seeds", "0", "1",
                          "--teacher-ensemble", "--data-dir", str(tiny_data), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    lines = [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("seed ")]
    assert lines == ["seed 0 teacher", "seed 1 teacher", "seed 0", "seed 1"]  # every teacher before a student
    assert "each student learned from all 2 (logits averaged: test accuracy " in result.stdout
    assert "teacher ensemble: val " in result.stdout

    client = MlflowClient()
    runs = {run.info.run_name: run for run in client.search_runs(
        [client.get_experiment_by_name("accuracy").experiment_id])}
    teachers = [runs[f"pico-pico-seed{seed}-teacher"].info.run_id for seed in (0, 1)]
    for seed in (0, 1):
        # both teachers, loaded from MLflow as `train --teacher runs:/A/model,runs:/B/model` loads them
        student = runs[f"pico-pico-seed{seed}"]
        assert student.data.params["train.teacher"] == ",".join(f"runs:/{run}/model" for run in teachers)
        assert student.data.tags["teacher_run_ids"] == ",".join(teachers)
        # the validation accuracy variants are chosen on: the logged model's, fp32 and one pass
        served = student.data.metrics["served_val_accuracy"]
        assert f"seed {seed}: val {student.data.metrics['val_accuracy']:.4f} (served {served:.4f})  " in result.stdout
    assert "validation accuracy as served (fp32, one pass; choose variants on this): " in result.stdout


@pytest.mark.slow
def test_accuracy_teacher_ensemble_changes_what_the_student_learns(tiny_data, tmp_path):
    common = [*SHORT, *TEACHER, "--seeds", "0", "1", "--untracked", "--data-dir", str(tiny_data)]
    teachers = tmp_path / "teach,ers"  # a comma, as in the comma-separated list of teachers a student learns from
    trained = run_accuracy(*common, "--teacher-ensemble", "--save-dir", str(teachers), cache=tmp_path / "cache")
    assert trained.returncode == 0, trained.stderr
    own, ensemble = tmp_path / "own", tmp_path / "ensemble"
    for extra, folder in (([], own), (["--teacher-ensemble"], ensemble)):
        loaded = run_accuracy(*common, *extra, "--teacher-dir", str(teachers), "--save-dir", str(folder),
                              cache=tmp_path / "cache")
        assert loaded.returncode == 0, loaded.stderr

    def weights(folder: Path, seed: int) -> dict[str, torch.Tensor]:
        return torch.load(folder / f"pico-pico-seed{seed}.pt", weights_only=True)

    # the ensemble's own test accuracy, as printed, is that of the two teachers' averaged logits
    from cifar_exp.config import DataConfig
    from cifar_exp.data import load_splits
    from cifar_exp.models import Ensemble
    from cifar_exp.train import evaluate

    members = []
    for seed in (0, 1):
        members.append(build_shipped_classifier(recipe_config("pico", model="pico-res", widths="8,16,16"), 10))
        members[-1].load_state_dict(torch.load(teachers / f"pico-pico-seed{seed}-teacher.pt", weights_only=True))
    test = load_splits(DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=str(tmp_path / "cache"))).test
    expected = evaluate(Ensemble(members), test, channels_last=True, tta=True)
    assert f"test {expected.accuracy:.4f} (one pass {expected.one_pass_accuracy:.4f})" in next(
        line for line in trained.stdout.splitlines() if line.startswith("teacher ensemble: "))

    for seed in (0, 1):
        # from the loaded teachers the same students as from the trained ones (deterministic on this CPU) ...
        assert all(torch.equal(tensor, weights(teachers, seed)[name])
                   for name, tensor in weights(ensemble, seed).items())
        # ... and not the students of each seed's own teacher
        assert not all(torch.equal(tensor, weights(own, seed)[name]) for name, tensor in weights(ensemble, seed).items())


def test_accuracy_refuses_a_teacher_ensemble_without_teachers(tmp_path):
    result = run_accuracy(*SHORT, "--teacher-ensemble", "--data-dir", str(tmp_path / "missing"), cache=tmp_path)
    assert result.returncode == 2
    assert "--teacher-ensemble needs --teacher-set (the teachers to train)" in result.stderr
    assert "missing" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_accuracy_run_is_closed_as_killed(tiny_data, tracking_store, tmp_path, sig):
    returncode, rest = signal_cli_mid_training(
        ["--recipe", "seed", "--epochs", "30", "--seeds", "0", "--val-size", "50", "--skip-latency",
         "--data-dir", tiny_data], epochs=30, sig=sig, program=(str(ACCURACY),),
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    # Killed by the signal once its run is closed, as a `cifar-exp` command ends.
    assert returncode == -sig and rest.strip().splitlines()[-1] == f"Aborted: {sig.name}.", rest
    assert "Traceback" not in rest
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("accuracy").experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.parametrize("extra, message", [
    (["--untracked"], "--teacher-dir: no teacher for seed 0: {dir}/pico-pico-seed0-teacher.pt is not a file"),
    ([], "--teacher-dir needs --teacher-set (the teachers' architecture) and --untracked"),
])
def test_accuracy_refuses_missing_saved_teachers_before_loading_data(tmp_path, extra, message):
    result = run_accuracy(*SHORT, *TEACHER, *extra, "--teacher-dir", str(tmp_path), "--data-dir",
                          str(tmp_path / "no-data-here"), cache=tmp_path)
    assert result.returncode == 2
    assert message.format(dir=tmp_path) in result.stderr and "no-data-here" not in result.stderr


def test_accuracy_names_a_saved_teacher_of_another_architecture(tiny_data, tmp_path):
    other = build_shipped_classifier(recipe_config("pico", model="pico-res", widths="8,16,24"), 10)
    torch.save(other.state_dict(), tmp_path / "pico-pico-seed0-teacher.pt")
    result = run_accuracy(*SHORT, *TEACHER, "--seeds", "0", "--untracked", "--teacher-dir", str(tmp_path),
                          "--data-dir", str(tiny_data), cache=tmp_path / "cache")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"accuracy.py: error: --teacher-dir: cannot load {tmp_path / 'pico-pico-seed0-teacher.pt'} "
                           "as a pico-res of these --teacher-set settings: Error(s) in loading state_dict"), last
    assert "size mismatch for " in last and last.endswith(" more)")  # the first mismatch, the others counted
    assert "epoch 1/1" not in result.stderr  # no student trained
    (tmp_path / "pico-pico-seed0-teacher.pt").write_text("not a model")
    result = run_accuracy(*SHORT, *TEACHER, "--seeds", "0", "--untracked", "--teacher-dir", str(tmp_path),
                          "--data-dir", str(tiny_data), cache=tmp_path / "cache")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        "as a pico-res of these --teacher-set settings: not a state_dict that --save-dir wrote")


def test_accuracy_refuses_a_save_dir_it_cannot_write_before_loading_data(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("")
    result = run_accuracy(*SHORT, "--save-dir", str(taken / "models"), "--data-dir", str(tmp_path / "missing"),
                          cache=tmp_path)
    assert result.returncode == 2
    assert f"cannot write to {taken / 'models'}: Not a directory" in result.stderr and "missing" not in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--set", "teacher=runs:/abc/model"], "--teacher-set trains the teacher: drop --set teacher"),
    (["--teacher-set", "widths=1,2"], "--teacher-set: widths must be three positive integers"),
    (["--teacher-set", "lr=fast"], "--teacher-set lr: "),
    (["--teacher-set", "teacher=runs:/abc/model", "--untracked"],
     "--teacher-set teacher needs MLflow to load the teacher's own teachers: drop --untracked"),
])
def test_accuracy_refuses_bad_teacher_settings_before_loading_data(tmp_path, extra, message):
    result = run_accuracy(*SHORT, *TEACHER, *extra, "--data-dir", str(tmp_path / "missing"), cache=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "missing" not in result.stderr


def test_the_seed_pipelines_recipe_trains_and_validates_on_the_projects_split(tiny_data, tmp_path, monkeypatch):
    # train_throughput.py --full-recipe seed-dataloader picks its images by index from an ImageFolder:
    # they must be the very images `cifar-exp train` (load_splits) trains and validates on.
    import numpy as np

    from cifar_exp.config import DataConfig
    from cifar_exp.data import load_splits

    data = DataConfig(data_dir=str(tiny_data), val_size=50, cache_dir=str(tmp_path))
    splits = load_splits(data)
    for subset, images in zip(load_script(THROUGHPUT, monkeypatch).seed_recipe_split(str(tiny_data), data),
                              (splits.train, splits.val), strict=True):
        assert len(subset) == len(images)
        for position in (0, len(subset) // 2, len(subset) - 1):
            image, label = subset[position]
            assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), images.images[position])
            assert label == int(images.labels[position])


def test_accuracy_latency_ratio_is_the_median_of_each_rounds_ratio(monkeypatch, capsys):
    # The VM's speed halves now and then, sometimes between a round's two measurements (the second and
    # fifth of five rounds here): separate medians (0.14 ms for both models) would call the model as fast
    # as the seed.
    accuracy = load_script(ACCURACY, monkeypatch)
    speeds = iter([1, 1, 1, 2, 2, 2, 2, 2, 1, 2] * len(accuracy.LATENCY_BACKENDS))  # model, seed, model, ...
    model, seed_model = torch.nn.Linear(1, 1), torch.nn.Linear(1, 2)

    def measure(network, batch_size, **_):
        milliseconds = (0.14 if network is model else 0.07) * next(speeds)
        return SimpleNamespace(p50_ms=milliseconds)

    monkeypatch.setattr(accuracy, "measure_latency", measure)
    monkeypatch.setattr(accuracy, "LATENCY_ROUNDS", 5)
    accuracy.compare_latency(model, seed_model)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(accuracy.LATENCY_BACKENDS)
    assert all(line.endswith("ratio 2.00x (rounds 1.00-2.00x)") for line in lines), lines
    assert "0.140 ms (0.140-0.280); seed model 0.140 ms (0.070-0.140)" in lines[0]

"""The command line: help, one-line errors for bad input, and no run ever left RUNNING."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from cifar_exp import interrupts, tracking
from cifar_exp.cli import _section, build_config, main
from cifar_exp.config import RECIPES, BenchmarkConfig, EvaluateConfig, ExportConfig, TuneConfig
from cifar_exp.deployment import check_model_choice
from conftest import CLASSES, signal_cli_mid_training

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--epochs", "1", "--batch-size", "32", "--val-size", "50", "--eval-batch-size", "100"]


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def all_runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["models"], ["ui"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_every_train_option_has_help():
    from cifar_exp.cli import train

    for param in train.params:
        assert param.help, param.name



@pytest.mark.parametrize(("entry_point", "parameters"), [
    ("main", {}), ("recipe", {}), ("evaluate", {}), ("tune", {}), ("benchmark", {}), ("export", {}),
    ("export", {"int8": "--no-int8"}), ("pareto", {}),
    # Switches take the flag itself: declared (distill_mirror), or not (tta, passed as --tta --no-tta).
    ("recipe", {"teacher": "runs:/0123/model", "distill_mirror": "--distill-mirror", "tta": "--no-tta"}),
    ("main", {"teacher": "runs:/0123/model", "distill_mirror": "--distill-mirror"}),
    ("tune", {"teacher": "runs:/0123/model", "distill_mirror": "--distill-mirror"}),
])
def test_mlproject_entry_points_render_commands_the_cli_accepts(entry_point, parameters, tmp_path):
    # What `mlflow run . -e NAME [-P ...]` would execute, parsed (not run) by the CLI.
    import shlex

    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(Path(__file__).resolve().parents[1]))
    command = shlex.split(project.get_entry_point(entry_point).compute_command(parameters, str(tmp_path)))
    assert command[0] == "cifar-exp"
    subcommand = main.get_command(main.make_context("cifar-exp", command[1:2]), command[1])
    with subcommand.make_context(command[1], command[2:]) as context:
        assert context.params  # every option name and value converted by click
        # ... and make the configs the command builds (an empty name, say, must not be refused).
        build_config(context.params)
        for section, name in ((TuneConfig, "tune"), (BenchmarkConfig, "benchmark"), (ExportConfig, "export"),
                              (EvaluateConfig, "evaluate")):
            if command[1] == name:
                _section(section, context.params)
    if entry_point == "recipe":
        assert context.params["recipe"] == "pico" and "lr" not in command and "--lr" not in command
    if entry_point == "recipe" and not parameters:
        # What the entry point itself passes counts as given and overrides a recipe: no recipe may set it.
        passed = {word[2:].replace("-", "_") for word in command if word.startswith("--")}
        passed |= {word[5:].replace("-", "_") for word in command if word.startswith("--no-")}
        assert "distill_mirror" in passed and not passed & {field for recipe in RECIPES.values() for field in recipe}
    if entry_point in ("main", "recipe", "tune"):
        train = build_config(context.params).train
        if "teacher" in parameters:
            assert train.teacher_uris() == ("runs:/0123/model",) and train.distill_mirror
        else:
            assert train.teacher_uris() == () and not train.distill_mirror  # no distillation unless asked
        if "tta" in parameters:
            assert context.params["tta"] is False and "--tta" in command  # both flags given: the last counts
    if entry_point == "evaluate":
        assert _section(EvaluateConfig, context.params).model_uri == "models:/cifar10-seed@champion"
    if entry_point == "export":
        assert context.params["int8"] == (parameters != {"int8": "--no-int8"})
    if entry_point == "benchmark":  # it passes --model too, beside the default --model-uri
        check_model_choice(build_config(context.params).train, _section(BenchmarkConfig, context.params))

def test_module_entry_point_works():
    out = subprocess.run([sys.executable, "-m", "cifar_exp", "models"], capture_output=True, text=True,
                         check=True).stdout
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert rows["seed"].split(None, 1)[1] == "152,458 parameters"  # nothing to fold
    assert rows["pico-rep"].split(None, 1)[1] == "130,210 parameters (145,770 while training)"
    assert rows["pico-sep"].split(None, 1)[1] == "143,418 parameters (145,114 while training)"


@pytest.mark.parametrize(("args", "message"), [
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (["--lr-decay", "1.2"], "lr-decay must be in (0, 1], got 1.2"),
    (["--lr-decay", "0"], "lr-decay must be in (0, 1], got 0.0"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--seed", "18446744073709551615"], "seed must be in [0, 4294967295], got 18446744073709551615"),
    (["--split-seed", "-1"], "split-seed must be in [0, 4294967295], got -1"),
    (["--batch-size", "0"], "batch-size must be >= 1, got 0"),
    (["--val-size", "400"], "val-size 400 must be smaller than the 400 training images"),
    (["--model", "vgg99"], "'vgg99' is not one of 'seed', 'seed-wide'"),
])
def test_bad_training_input_is_one_line_and_leaves_no_run(tiny_data, tracking_store, cache_dir, args, message):
    result = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, *args)
    assert result.exit_code != 0
    assert message in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1
    assert all_runs() == []


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_missing_or_empty_data_dir(tmp_path, tracking_store, folder):
    target = tmp_path / folder
    if folder == "empty":
        target.mkdir()
    result = run_cli("train", "--data-dir", target)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and str(target) in result.output
    assert all_runs() == []


def test_unreachable_tracking_server_fails_before_training(tiny_data, tmp_path, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.perf_counter()
    result = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS)
    assert result.exit_code == 1
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in result.output
    assert "epoch" not in result.output and time.perf_counter() - start < 30


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tiny_data, tracking_store, cache_dir):
    result = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--device", "cuda")
    assert result.exit_code == 1
    assert "--device cuda was asked for, but no CUDA GPU is available" in result.output
    assert all_runs() == []


def test_evaluate_unknown_model_uri(tiny_data, tracking_store, cache_dir):
    result = run_cli("evaluate", "--model-uri", "models:/no-such-model@champion", "--data-dir", tiny_data,
                     "--cache-dir", cache_dir)
    assert result.exit_code == 1
    assert "cannot load model models:/no-such-model@champion" in result.output
    assert all_runs() == []


def test_a_run_whose_artifacts_cannot_be_written_fails_before_training(tiny_data, tracking_store, cache_dir,
                                                                       tmp_path):
    (tmp_path / "mlruns").write_text("")  # where MLflow keeps a new experiment's artifacts: a file
    result = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--epochs", "2", "--val-size", "50")
    assert result.exit_code == 1
    assert "epoch 1/2" not in result.output
    assert result.output.splitlines()[-1].startswith(
        f"Error: cannot write the run's artifacts to {tmp_path / 'mlruns'}/1/") and "Not a directory" in result.output
    [run] = all_runs()
    assert run.info.status == "FAILED" and "train_loss" not in run.data.metrics


def test_a_run_in_an_experiment_whose_artifacts_only_a_server_stores_fails_before_training(
        tiny_data, tracking_store, cache_dir):
    # Plain `mlflow ui` gives the experiments created in it mlflow-artifacts:/ locations.
    MlflowClient().create_experiment("from-a-server-ui", artifact_location="mlflow-artifacts:/7")
    result = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--epochs", "2", "--val-size", "50",
                     "--experiment-name", "from-a-server-ui")
    assert result.exit_code == 1 and "epoch 1/2" not in result.output
    [run] = all_runs()
    assert run.info.status == "FAILED" and "train_loss" not in run.data.metrics
    assert result.output.splitlines()[-1] == (
        f"Error: the run's artifacts go to mlflow-artifacts:/7/{run.info.run_id}/artifacts, which only an MLflow "
        "tracking server stores (the experiment was created through one): set MLFLOW_TRACKING_URI to that "
        "server's address, or pass another --experiment-name")


@pytest.mark.slow
def test_train_then_evaluate_the_champion(tiny_data, tracking_store, cache_dir):
    trained = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS, "--lr", "0.05")
    assert trained.exit_code == 0, trained.output
    assert "registered models:/cifar10-seed/1 (champion)" in trained.output
    # --model-uri defaults to models:/cifar10-seed@champion
    evaluated = run_cli("evaluate", "--data-dir", tiny_data, "--cache-dir", cache_dir)
    assert evaluated.exit_code == 0, evaluated.output
    assert "models:/cifar10-seed@champion test accuracy" in evaluated.output
    runs = {r.info.run_id: r for r in all_runs()}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    train_run = next(r for r in runs.values() if "model_uri" not in r.data.tags)
    eval_run = next(r for r in runs.values() if "model_uri" in r.data.tags)
    # The logged model reproduces the training run's test accuracy: exactly where training evaluated
    # in fp32, as evaluate does; within 2 of the 100 images where it evaluated under bf16 autocast.
    exact = train_run.data.tags["amp_dtype"] == "none (fp32)"
    assert eval_run.data.metrics["test_accuracy"] == pytest.approx(train_run.data.metrics["test_accuracy"],
                                                                   abs=1e-9 if exact else 0.02)
    assert eval_run.data.tags["source_run_id"] == train_run.info.run_id
    names = {a.path for a in MlflowClient().list_artifacts(eval_run.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/sample_predictions.png"} <= names
    assert json.loads(train_run.data.params["data.classes"]) == list(CLASSES)
    # With flip TTA both accuracies are printed, each as logged.
    mirrored = run_cli("evaluate", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--tta")
    assert mirrored.exit_code == 0, mirrored.output
    tta_run = next(r for r in all_runs() if r.info.run_id not in runs)
    logged = tta_run.data.metrics
    assert (f"test accuracy {logged['test_accuracy']:.4f} with flip TTA "
            f"({logged['test_accuracy_without_tta']:.4f} one pass)") in mirrored.output
    assert logged["test_accuracy_without_tta"] == eval_run.data.metrics["test_accuracy"]

    # A folder whose class names number the labels differently is refused before any run starts.
    renamed = Path(tracking_store.split("///")[1]).parent / "renamed"
    shutil.copytree(tiny_data, renamed)
    for split in ("train", "test"):
        (renamed / split / "airplane").rename(renamed / split / "plane")
    for uri in ("models:/cifar10-seed@champion", "models:/cifar10-seed/latest"):
        refused = run_cli("evaluate", "--model-uri", uri, "--data-dir", renamed, "--cache-dir", cache_dir)
        assert refused.exit_code == 1
        assert (f"Error: {uri} was trained on classes {tracking.classes_param(CLASSES)}; {renamed} holds "
                '["automobile","bird",') in refused.output
    # As a command whose stderr is no terminal: MLflow's download progress bars stay off.
    command = subprocess.run([sys.executable, "-m", "cifar_exp", "evaluate", "--model-uri",
                              f"runs:/{train_run.info.run_id}/model", "--data-dir", renamed, "--cache-dir", cache_dir],
                             capture_output=True, text=True, env={**{k: v for k, v in os.environ.items()
                                                                  if k != "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"},
                                                               "MLFLOW_TRACKING_URI": tracking_store})
    assert command.returncode == 1 and "Downloading artifacts" not in command.stderr, command.stderr
    assert command.stderr.splitlines()[-1].startswith(f"Error: runs:/{train_run.info.run_id}/model was trained on")
    assert len(all_runs()) == 3


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal closed
def test_terminated_training_is_marked_killed(tiny_data, tracking_store, cache_dir, sig):
    returncode, output = signal_cli_mid_training(
        ["train", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--epochs", 500, "--val-size", 50],
        epochs=500, sig=sig,
    )
    # Killed by the signal (after closing its run and saying so), as a shell expects of a stopped command.
    assert returncode == -sig and output.strip().endswith(f"Aborted: {sig.name}."), output
    assert [r.info.status for r in all_runs()] == ["KILLED"]


def test_a_signal_inside_deferred_blocks_is_raised_when_the_outermost_ends(project_signal_handlers):
    done = []
    with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"):
        with interrupts.deferred():
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("inner block finished")
            done.append("outer block finished")
    assert done == ["inner block finished", "outer block finished"]
    with pytest.raises(KeyboardInterrupt, match="signal SIGINT"):
        os.kill(os.getpid(), signal.SIGINT)
        done.append("not deferred: never reached")
    with pytest.raises(KeyboardInterrupt, match="signal SIGINT"):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: out at once (a hung write)
            done.append("never reached either")
    assert len(done) == 2
    with interrupts.deferred():
        pass  # the signal raised at once is not raised again here

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job starts
    interrupts.install_handlers()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_signal_that_python_drops_in_a_finaliser_still_interrupts(project_signal_handlers):
    # A handler that runs inside __del__ (or a weakref callback, as seen at the end of a training run)
    # raises where Python can only print "Exception ignored": the signal is sent again.
    class SignalledWhileFinalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs here, inside __del__

    with pytest.raises(KeyboardInterrupt, match="signal SIGINT"):
        SignalledWhileFinalised()  # finalised at once
        time.sleep(5)  # the signal sent again wakes this wait
        pytest.fail("the signal was lost")


@pytest.fixture
def signal_inside_a_metric_write(request, project_signal_handlers):
    """Sends ``request.param`` from inside MLflow's first metric INSERT (the write begun, not committed).

    The window a real signal hits when it arrives as an epoch's metrics are written; without
    deferral the interrupted transaction kept SQLite locked and the run stayed RUNNING.
    """
    sig, sent = request.param, []

    def send(conn, cursor, statement, *args):
        if not sent and statement.lstrip().upper().startswith("INSERT INTO METRICS"):
            sent.append(time.perf_counter())  # when the signal went
            os.kill(os.getpid(), sig)  # its handler runs at the next bytecode: inside SQLAlchemy

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", send)
    yield sent
    sqlalchemy.event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", send)


@pytest.mark.parametrize("signal_inside_a_metric_write", [signal.SIGTERM, signal.SIGINT], indirect=True)
def test_a_signal_during_a_tracking_write_still_closes_the_run_as_killed(tiny_data, tracking_store, cache_dir,
                                                                          signal_inside_a_metric_write):
    result = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--epochs", 3, "--val-size", 50,
                     "--batch-size", 32)
    finished = time.perf_counter()
    assert signal_inside_a_metric_write, "no metric was written"
    assert result.exit_code != 0, result.output
    assert [r.info.status for r in all_runs()] == ["KILLED"]
    # Closed at once, not after SQLite's 20 s busy timeout on a transaction the signal left open.
    assert finished - signal_inside_a_metric_write[0] < 15


@pytest.mark.slow
def test_mlflow_run_of_the_project(tiny_data, tracking_store, cache_dir, tmp_path):
    """`mlflow run . --env-manager local` logs into the run that mlflow run created."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local",
         "--experiment-name", "project", "-P", "epochs=1", "-P", f"data_dir={tiny_data}",
         "-P", "val_size=50", "-P", f"cache_dir={cache_dir}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = all_runs()
    assert len(runs) == 1  # one run: mlflow run's, not a second one of ours
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1"
    assert "test_accuracy" in run.data.metrics
    assert MlflowClient().get_model_version_by_alias("cifar10-seed", "champion").run_id == run.info.run_id


def test_ui_on_a_tracking_server_points_at_the_servers_own_ui(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    launched = []
    monkeypatch.setattr("cifar_exp.tracking.launch_ui", lambda host, port, allowed_hosts: launched.append(port) or 0)
    result = run_cli("ui")
    assert result.exit_code == 0 and "open http://tracking.example:5000 in a browser" in result.output
    assert launched == []


def test_ui_on_a_port_in_use_is_an_error_not_a_pointer_to_another_server(tracking_store, monkeypatch):
    import socket

    launched = []
    monkeypatch.setattr(subprocess, "Popen", lambda command, **_: launched.append(command))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("ui", "--port", str(port))
    assert result.exit_code == 1
    assert result.output == f"Error: cannot serve the MLflow UI on 127.0.0.1:{port}: Address already in use\n"
    assert launched == []
    result = run_cli("ui", "--host", "no-such-host.invalid")
    assert result.exit_code == 1 and result.output.startswith(
        "Error: cannot serve the MLflow UI on no-such-host.invalid:5000: ")
    assert launched == []


def test_ui_passes_allowed_hosts_to_mlflow(tracking_store, monkeypatch):
    class Served:
        def __init__(self, command, **_):
            self.command = command
            launched.append(command)

        def wait(self, timeout=None):
            return 0

    launched = []
    monkeypatch.setattr(subprocess, "Popen", Served)
    port = free_port()
    result = run_cli("ui", "--host", "0.0.0.0", "--port", str(port), "--allowed-hosts",
                     "mlflow.example.com, [2001:db8::1],other.example:8080,*.example.org")
    assert result.exit_code == 0, result.output
    [command] = launched
    assert command[command.index("--host") + 1] == "0.0.0.0"
    # A browser sends the port in its Host header, which MLflow compares by exact string: both forms;
    # then MLflow's default list, which the option replaces.
    from mlflow.server.security_utils import get_default_allowed_hosts

    assert command[command.index("--allowed-hosts") + 1] == (
        f"mlflow.example.com,[2001:db8::1],other.example:8080,*.example.org,mlflow.example.com:{port},"
        f"[2001:db8::1]:{port}," + ",".join(get_default_allowed_hosts()))


def test_a_public_name_reaches_the_ui_as_a_browser_sends_it(tracking_store):
    # MLflow's own check of the Host header, on the value cifar-exp passes it.
    from mlflow.server.security_utils import is_allowed_host_header

    from cifar_exp.tracking import ui_allowed_hosts

    allowed = ui_allowed_hosts("that.name", 5000).split(",")
    assert is_allowed_host_header(allowed, "that.name:5000") and is_allowed_host_header(allowed, "that.name")
    assert not is_allowed_host_header(allowed, "that.name:5001")
    # Still answered besides the public name, as without the option: it replaces MLflow's list.
    for local in ("localhost:5000", "127.0.0.1:5000", "localhost", "192.168.1.2:5000", "10.0.0.5:5000"):
        assert is_allowed_host_header(allowed, local), local
    assert not is_allowed_host_header(allowed, "evil.example:5000")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_terminated_ui_stops_the_mlflow_server_it_started(tmp_path):
    import urllib.request

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    ui = subprocess.Popen([sys.executable, "-m", "cifar_exp", "ui", "--port", str(port)], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # until the server answers
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, ui.stdout.read()
                time.sleep(0.5)
        # An experiment created in the UI keeps its artifacts where cifar-exp's runs can write them.
        created = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/create", data=b'{"name": "from-the-ui"}',
            headers={"Content-Type": "application/json"}), timeout=30)
        experiment_id = json.load(created)["experiment_id"]
        assert MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment(experiment_id).artifact_location == \
            f"{tmp_path / 'mlruns'}/{experiment_id}"
        ui.send_signal(signal.SIGTERM)  # to cifar-exp alone, not its process group
        output = ui.communicate(timeout=60)[0]
        assert ui.returncode == -signal.SIGTERM and "Aborted: SIGTERM." in output, output
        with pytest.raises(OSError):  # nothing serves the port any more
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ui.pid, signal.SIGKILL)  # whatever is left of its session (MLflow's job consumers)


def test_a_run_id_from_elsewhere_is_one_line(tiny_data, tracking_store, cache_dir, monkeypatch):
    # MLFLOW_RUN_ID (set by `mlflow run`) naming no run of this store: an error, not a traceback.
    monkeypatch.setenv("MLFLOW_RUN_ID", "deadbeef")
    result = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: cannot log into MLFLOW_RUN_ID deadbeef: ")
    assert len(result.output.strip().splitlines()) == 1


def test_counts_written_as_whole_floats_are_taken_as_mlflow_run_passes_them(tiny_data, tracking_store, cache_dir):
    # An MLproject declares counts as float (MLflow has no integer type) and passes the text as given.
    result = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--epochs", "1.0", "--batch-size",
                     "32.0", "--val-size", "5e1", "--eval-batch-size", "100", "--no-register")
    assert result.exit_code == 0, result.output
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("cifar-exp").experiment_id])
    params = run.data.params
    assert (params["train.epochs"], params["train.batch_size"], params["data.val_size"]) == ("1", "32", "50")
    for value in ("1.5", "nan", "inf", "five"):
        result = run_cli("train", "--data-dir", tiny_data, "--epochs", value)
        assert result.exit_code == 2 and f"Invalid value for '--epochs': {value!r} is not a whole number" in result.output


def test_a_leftover_run_id_of_a_finished_run_is_refused_not_overwritten(tiny_data, tracking_store, cache_dir,
                                                                         monkeypatch):
    # MLFLOW_RUN_ID still set from an earlier `mlflow run`, or by hand: that run is not reopened.
    assert run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, *TINY_ARGS).exit_code == 0
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("cifar-exp").experiment_id])
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    for command in (["train", *TINY_ARGS], ["evaluate", "--model-uri", f"runs:/{run.info.run_id}/model"]):
        result = run_cli(*command, "--data-dir", tiny_data, "--cache-dir", cache_dir)
        assert result.exit_code == 1, result.output
        assert result.output == (f"Error: cannot log into MLFLOW_RUN_ID {run.info.run_id}: the run is FINISHED, not "
                                 "running (`mlflow run` sets the variable for the run it starts): unset it to log "
                                 "a new run\n")
    after = client.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.data.params == run.data.params
    assert client.get_metric_history(run.info.run_id, "val_accuracy") == history
    assert [v.version for v in client.search_model_versions("name='cifar10-seed'")] == [1]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_evaluate_needs_only_a_test_folder(tiny_data, tracking_store, cache_dir, tmp_path):
    trained = run_cli("train", "--data-dir", tiny_data, "--cache-dir", cache_dir, "--epochs", "2", "--val-size", "50")
    assert trained.exit_code == 0, trained.output
    held_out = tmp_path / "held-out"
    shutil.copytree(Path(tiny_data) / "test", held_out / "test")  # a test set shipped on its own
    full = run_cli("evaluate", "--data-dir", tiny_data, "--cache-dir", cache_dir)
    alone = run_cli("evaluate", "--data-dir", held_out, "--cache-dir", cache_dir)
    assert full.exit_code == alone.exit_code == 0, full.output + alone.output
    full_run, alone_run = sorted((r for r in all_runs() if "model_uri" in r.data.params),
                                 key=lambda r: r.info.start_time)
    assert alone_run.data.metrics == full_run.data.metrics  # the same images, the same labels
    # Its class folders name the labels: one missing would shift them, and is refused.
    shutil.rmtree(held_out / "test" / "airplane")
    refused = run_cli("evaluate", "--data-dir", held_out, "--cache-dir", cache_dir)
    assert refused.exit_code == 1 and "Error: " in refused.output


def test_other_exceptions_python_drops_still_reach_the_previous_hook(monkeypatch):
    from cifar_exp import interrupts

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(type(unraisable.exc_value)))
    handlers = {s: signal.getsignal(s) for s in interrupts.STOPPING_SIGNALS}
    try:
        interrupts.install_handlers()
        interrupts.install_handlers()  # twice (train inside tune, say): the hook must not wrap itself

        class BrokenFinaliser:
            def __del__(self):
                raise ValueError("dropped by Python")

        BrokenFinaliser()  # finalised at once
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert reported == [ValueError]


def test_an_error_raised_while_an_interrupt_unwinds_still_reads_as_the_interrupt(tracking_store, capsys):
    # A second Ctrl-C inside Optuna's cleanup of the trial the first one stopped surfaced as Optuna's
    # UnboundLocalError: the run was closed FAILED and the command ended in a traceback.
    import click

    from cifar_exp import tracking
    from cifar_exp.cli import reports_errors

    @reports_errors
    def command():
        with tracking.start_run("tests", "interrupted-twice"):
            try:
                raise interrupts.Interrupted(signal.SIGINT)
            finally:
                raise UnboundLocalError("cannot access local variable 'updated_state'")  # (the cleanup, cut short)

    with pytest.raises(click.exceptions.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 128 + signal.SIGINT
    assert capsys.readouterr().err.splitlines()[-1] == "Aborted: SIGINT."  # (after MLflow's log lines)
    assert [r.info.status for r in all_runs()] == ["KILLED"]

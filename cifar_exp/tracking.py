"""Everything MLflow: runs, params, metrics, artifacts, datasets, model logging and the registry.

The only module that imports mlflow. With no ``MLFLOW_TRACKING_URI`` set, MLflow's own default store
is used (``sqlite:///mlflow.db`` in the working directory, artifacts under ``./mlruns``), so
``cifar-exp``, ``mlflow run .`` and ``mlflow ui`` all see the same runs with no configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import sqlalchemy.engine
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from cifar_exp.data import ImageSet
from cifar_exp.errors import ConfigError, DataError, TrackingError, first_line
from cifar_exp.interrupts import deferred, interrupt_behind
from cifar_exp.models import shipped_copy
from cifar_exp.train import cpu_name

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHAMPION_METRIC = "val_accuracy"
CHAMPION_DECIMALS = 6  # the accuracies kept as version tags, and compared as kept
VALIDATION_DIGEST = "validation_digest"  # version tag: which images CHAMPION_METRIC was measured on
PREVIOUS_CHAMPION = "previous_champion"  # version tag: the champion it replaced, restored if it is deleted
NOT_CANDIDATE = "no_champion_candidate"  # version tag: why its validation accuracy cannot be compared
CREATED_NAME = "created_registered_model"  # version tag: its registration created the registered model
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
CLASSES_PARAM = "data.classes"  # the class names, in label order, a model was trained on
PARAM_VALUE_LIMIT = 6000  # characters of a param value MLflow keeps (it cuts longer ones, with a warning)


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (its query, if any, left off); None for others. A ``~``
    in it is a folder of that name, as SQLite opens it (it expands no home folders)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return None


def local_store_folder() -> Path:
    """The folder of a local SQLite or file tracking store; the working directory otherwise."""
    uri = tracking_uri()
    database = sqlite_file(uri)
    if database is not None:
        return database.resolve().parent
    if uri.startswith("file:") or "://" not in uri:
        path = Path(uri.removeprefix("file://").removeprefix("file:")).expanduser().resolve()
        return path.parent  # the folder holding ./mlruns
    return Path.cwd().resolve()


def check_tracking_store() -> str:
    """Fail fast, before any training, when the tracking store cannot be reached."""
    uri = tracking_uri()
    shown = hide_password(uri)
    if is_tracking_server(uri):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(f"MLflow tracking server {shown} is unreachable: {reason}") from None
    else:
        database = sqlite_file(uri)
        if database is not None:
            _check_sqlite_writable(database, shown)
        try:
            with _store_lock(database):
                MlflowClient(uri).search_experiments(max_results=1)
        except Exception as error:
            # first line: SQLAlchemy appends a "Background on this error" line
            raise TrackingError(f"MLflow tracking store {shown} cannot be used: {first_line(error)}") from None
    return uri


def _check_sqlite_writable(database: Path, shown: str) -> None:
    """A SQLite store must be writable, and so must its folder (SQLite writes its journal there). MLflow
    finds out only after a minute and a half of retries, with a warning each time."""
    for target, probe in ((database.parent, _probe_folder), (database, _probe_file)):
        try:
            probe(target)
        except OSError as error:
            raise TrackingError(f"MLflow tracking store {shown} cannot be used: cannot write {target}: "
                                f"{error.strerror or error}") from None


def _probe_folder(folder: Path) -> None:
    """Create ``folder`` if missing (as MLflow would) and write a file in it; an OSError if it cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder, prefix=".write-test-"):
        pass


def _probe_file(path: Path) -> None:
    if path.exists():
        with open(path, "r+b"):
            pass


@contextlib.contextmanager
def _store_lock(database: Path | None) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store: while opening it (MLflow creates and migrates the
    schema on first use, and two processes doing so at once fail, "duplicate column name": e.g. tune
    workers started together on a new store), and around the champion rule's read-compare-set."""
    with contextlib.ExitStack() as held:
        if database is not None:
            try:
                import fcntl

                database.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would create it
                lock = held.enter_context(open(database.with_name(database.name + ".lock"), "a"))
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            except (ImportError, OSError) as error:  # no POSIX locks here: MLflow's own errors, if any, follow
                log.debug("opening %s without a lock: %s", database, error)
        yield


def is_tracking_server(uri: str) -> bool:
    """An MLflow tracking server (which serves its own UI), not a store this process opens itself."""
    return uri.startswith(("http://", "https://"))


def hide_password(url: str) -> str:
    """``url`` with its password, if any, as ``***``: for messages and logs."""
    if "://" not in url:
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: hide whatever sits between user: and @
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@contextlib.contextmanager
def start_run(
    experiment_name: str,
    run_name: str | None = None,
    *,
    tags: Mapping[str, str] | None = None,
    nested: bool = False,
) -> Iterator[str]:
    """An active run, yielding its id; marked FAILED if the body raises, KILLED on Ctrl-C.

    Under ``mlflow run`` (``MLFLOW_RUN_ID`` set and no run active yet) this logs into the run that
    ``mlflow run`` created instead of starting a new one.
    """
    run = None
    try:
        with deferred():  # a signal that arrives while the run is created is raised once it exists
            run = _start_or_resume_run(experiment_name, run_name, tags=tags, nested=nested)
        _check_artifact_folder(run.info.artifact_uri)
        yield run.info.run_id
        _end(run.info.run_id, "FINISHED")  # a signal held back while it is written is raised after: it stays FINISHED
    except BaseException as error:
        # Closed only while it is still the active run: once FINISHED (or never opened) it is not,
        # and the run on top of MLflow's stack may be its parent.
        active = mlflow.active_run()
        if run is not None and active is not None and active.info.run_id == run.info.run_id:
            _end(run.info.run_id, "FAILED" if interrupt_behind(error) is None else "KILLED", after=error)
        if run is not None and isinstance(error, MlflowException):  # the store failed mid-run: one line
            raise TrackingError(f"the tracking store failed during run {run.info.run_id}: {first_line(error)}") \
                from None
        raise


def _end(run_id: str, status: str, after: BaseException | None = None) -> None:
    """End the active run ``run_id`` as ``status`` (``after``: the body's error). Where the tracking store
    does not take it (a server gone), the run stays RUNNING, and that is said: in the one-line error, or
    as a warning where an interrupt ends the command (it still ends by its signal)."""
    try:
        _end_run(status)
    except BaseException as ending:
        # An interrupt held back while the end was written is raised after it: its context is then the
        # write's own failure, if any (else the error being handled, or nothing: the end was written).
        failure = ending.__context__ if isinstance(ending, KeyboardInterrupt) else ending
        if failure is None or failure is after:
            raise
        left_open = f"run {run_id} is left RUNNING: the tracking store did not take its end ({first_line(failure)})"
        interrupt = interrupt_behind(ending) or interrupt_behind(after)
        if interrupt is not None:
            log.warning("%s", left_open)
            raise interrupt from None
        raise TrackingError(f"{first_line(after)}; {left_open}" if after is not None else left_open) from None


def _check_artifact_folder(artifact_uri: str) -> None:
    """A run whose artifacts cannot be written to a local folder fails now, not after its training
    (``./mlruns`` taken by a file, a read-only working folder), as does one in an experiment whose
    artifacts only a tracking server stores. Remote artifact stores are not probed."""
    scheme = urllib.parse.urlparse(artifact_uri).scheme
    if scheme == "mlflow-artifacts" and not is_tracking_server(tracking_uri()):
        # An experiment created in a tracking server's UI (plain `mlflow ui` serves artifacts itself).
        raise TrackingError(
            f"the run's artifacts go to {artifact_uri}, which only an MLflow tracking server stores (the experiment "
            "was created through one): set MLFLOW_TRACKING_URI to that server's address, or pass another "
            "--experiment-name")
    if scheme not in ("", "file"):
        return
    from mlflow.utils.file_utils import local_file_uri_to_path

    folder = Path(local_file_uri_to_path(artifact_uri))
    try:
        _probe_folder(folder)  # MLflow makes it on the first artifact; made now
    except OSError as error:
        raise TrackingError(f"cannot write the run's artifacts to {folder}: {error.strerror or error}") from None


def _writes_artifacts(function):
    """An artifact that cannot be written (disk full, permissions) is a one-line TrackingError."""
    @functools.wraps(function)
    def logged(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except OSError as error:
            raise TrackingError(f"cannot write an artifact of the active run: {error}") from None
    return logged


@deferred()
def _end_run(status: str) -> None:
    mlflow.end_run(status=status)


def _start_or_resume_run(
    experiment_name: str, run_name: str | None, *, tags: Mapping[str, str] | None, nested: bool,
) -> Any:
    if not nested:
        _check_no_active_run()
    if not nested and os.environ.get("MLFLOW_RUN_ID"):
        # Taken out of the environment, as mlflow.start_run() itself does, so that nested runs
        # started later (tune's trials) are new runs, not that run resumed.
        run_id = os.environ.pop("MLFLOW_RUN_ID")
        _check_project_run(MlflowClient(), run_id)
        try:
            return mlflow.start_run(run_id=run_id, tags=tags)
        except MlflowException as error:
            raise TrackingError(f"cannot log into MLFLOW_RUN_ID {run_id}: {first_line(error)}") from None
    try:
        if mlflow.active_run() is None:
            mlflow.set_experiment(experiment_name)
        return mlflow.start_run(run_name=run_name, nested=nested, tags=tags)
    except MlflowException as error:  # e.g. an experiment of that name was deleted
        raise TrackingError(
            f"cannot start a run in experiment {experiment_name!r}: {first_line(error)}"
        ) from None


@deferred()
def kill_stale_run(run_id: str, tags: dict[str, str] | None = None) -> list[str]:
    """Close a run whose process died (and its parent run) as KILLED; returns the ids closed.

    ``tags`` are set on ``run_id`` when it is closed. Runs that are no longer RUNNING are left as they are.
    """
    client = MlflowClient()
    closed = []
    first = run_id
    while run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            break
        if run.info.status == "RUNNING":
            mark_killed(run_id, (tags or {}) if run_id == first else {})  # not on a parent still open
            closed.append(run_id)
        run_id = run.data.tags.get("mlflow.parentRunId")
    return closed


@deferred()
def mark_killed(run_id: str, tags: Mapping[str, str]) -> None:
    """Tag ``run_id`` and close it as KILLED, whatever it was closed as: for an interrupt that was
    held back while the run was being finished, and so took effect after."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status="KILLED")


@deferred()
def log_params(params: Mapping[str, Any]) -> None:
    mlflow.log_params({k: "None" if v is None else v for k, v in params.items()})


@deferred()
def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


@deferred()
def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(dict(metrics), step=step)


@deferred()
@_writes_artifacts
def log_artifacts(folder: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifacts(str(folder), artifact_path)


@deferred()
@_writes_artifacts
def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    mlflow.log_table({key: [row[key] for row in rows] for key in rows[0]}, artifact_file)


def environment_tags(device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, str]:
    tags = {
        "git_commit": _git_commit(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "amp_dtype": str(amp_dtype).removeprefix("torch.") if amp_dtype else "none (fp32)",
        "python_version": platform.python_version(),
        "torch_threads": str(torch.get_num_threads()),
    }
    return tags


@deferred()
def log_datasets(sets: Mapping[str, ImageSet], source: str) -> None:
    """Record each split as an MLflow dataset input, with a digest of every image and label."""
    for split, data in sets.items():
        with warnings.catch_warnings():  # a local path matches two equivalent source types
            warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
            dataset = mlflow.data.from_numpy(
                data.images.numpy(),
                targets=data.labels.numpy(),
                source=source.split(":", 1)[-1],
                name=f"cifar10-{data.name}",
                digest=data.digest(),
            )
        _log_input(dataset, context=DATASET_CONTEXTS.get(split, split))


# Two runs logging the same new dataset at once race in MLflow's store: each looks the dataset up, finds
# none and inserts it, and the second insert breaks the key (experiment, name, digest): SQLite's and
# PostgreSQL's words for it. The failed request is rolled back whole, and by then the dataset exists.
_DATASET_INSERT_RACE = re.compile(
    r"UNIQUE constraint failed: datasets\.|duplicate key value violates unique constraint", re.IGNORECASE)


def _log_input(dataset: Any, context: str) -> None:
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as error:
        if not _DATASET_INSERT_RACE.search(str(error)):
            raise
        log.info("another run stored dataset %s at the same moment; linking it to this run again", dataset.name)
        mlflow.log_input(dataset, context=context)  # finds the stored dataset now, and only links it


def log_model(model: nn.Module, registered_model_name: str | None) -> tuple[str, str | None]:
    """Log ``model`` (float (B, 3, 32, 32) in [0, 1] -> logits) as ``model``.

    Returns the model URI and, when registered, the new registry version.

    Saved in MLflow's default ``pt2`` (torch.export) format with a dynamic batch dimension.
    """
    from mlflow.models import infer_signature

    exported = shipped_copy(model)
    example = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)  # batch >= 2: dynamic
    with torch.inference_mode():
        output = exported(torch.from_numpy(example)).numpy()
    client = MlflowClient()
    name_existed = registered_model_name is not None and _registered_model_exists(client, registered_model_name)
    info = None
    try:
        with deferred(), warnings.catch_warnings():
            # torch.export's packer takes channels_last weights for slices of a larger tensor and warns
            # that this "may cause issues when your weights are not on CPU": they are on the CPU, whole.
            warnings.filterwarnings("ignore", "No complete tensor found in the group", UserWarning)
            info = mlflow.pytorch.log_model(
                exported,
                name="model",
                input_example=example,
                signature=infer_signature(example, output),
                registered_model_name=registered_model_name,
                # Given explicitly: inferring them would start a subprocess that imports the model.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            )
            if info.registered_model_version is not None and not name_existed:
                # Marked so that, if this run fails, the name it created goes with its version.
                client.set_model_version_tag(registered_model_name, str(info.registered_model_version),
                                             CREATED_NAME, "true")
    except BaseException:
        # Ctrl-C raised as the logging ended, or the tag failed: the run will be KILLED or FAILED, and
        # no registered version may point at it. (A second Ctrl-C, which deferred() does not hold back,
        # may stop log_model after it registered the version but before it said which: found by run.)
        if info is not None and info.registered_model_version is not None:
            delete_model_version(registered_model_name, info.registered_model_version)
        elif registered_model_name is not None:
            for version in _versions_of_active_run(client, registered_model_name):
                delete_model_version(registered_model_name, version)
            if not name_existed:  # (its CREATED_NAME tag may not have been set yet)
                _delete_name_left_empty(client, registered_model_name)
        raise
    version = info.registered_model_version
    return info.model_uri, None if version is None else str(version)


@deferred()
def _versions_of_active_run(client: MlflowClient, name: str) -> list[str]:
    """The versions of registered model ``name`` made from the active run's model."""
    run = mlflow.active_run()
    if run is None:
        return []
    try:  # best effort, as the deletion is: the error being handled matters more
        # Filtered by run id only: a name may hold quotes that the filter syntax would need escaped.
        return [v.version for v in client.search_model_versions(f"run_id = '{run.info.run_id}'") if v.name == name]
    except MlflowException as error:
        log.warning("could not look up the %s versions of run %s: %s", name, run.info.run_id, error.message)
        return []


@deferred()
def promote_if_champion(
    name: str, version: str | int, *, val_accuracy: float, test_accuracy: float, validation_digest: str | None,
    not_candidate: str | None = None, classes: Sequence[str] | None = None,
) -> bool:
    """Tag the version with its accuracies; give it the ``champion`` alias if its validation
    accuracy beats the holder's (the test split is for reporting, never for choosing).

    Accuracies compare only on the same validation images: ``validation_digest`` (``ImageSet.digest``)
    is kept as a version tag, and a version validated on another split than the champion's (another
    ``--val-size`` or ``--split-seed``) leaves the alias where it is. ``None`` means the run validated
    on the test split (``--val-on-test``): such a version is never a candidate, nor is one with a
    ``not_candidate`` reason (kept as a version tag), e.g. a teacher that may have seen its validation images.
    """
    client = MlflowClient()
    client.set_model_version_tag(name, str(version), CHAMPION_METRIC, f"{val_accuracy:.{CHAMPION_DECIMALS}f}")
    client.set_model_version_tag(name, str(version), "test_accuracy", f"{test_accuracy:.{CHAMPION_DECIMALS}f}")
    client.set_model_version_tag(name, str(version), VALIDATION_DIGEST, validation_digest or "test split")
    if validation_digest is None:
        log.info("%s version %s is no champion candidate: it was validated on the test split", name, version)
        return False
    if not_candidate:
        client.set_model_version_tag(name, str(version), NOT_CANDIDATE, not_candidate)
        log.warning("%s version %s is no champion candidate: %s", name, version, not_candidate)
        return False
    # Two runs finishing together would both read the same holder, and the later write would win
    # whatever its accuracy: on a SQLite store the rule holds the store's lock. (A tracking server
    # offers no compare-and-set: there the alias can race, README says so.)
    with _store_lock(sqlite_file(tracking_uri())):
        return _promote_if_better(client, name, str(version), val_accuracy, validation_digest, classes)


def _promote_if_better(client: MlflowClient, name: str, version: str, val_accuracy: float,
                       validation_digest: str, classes: Sequence[str] | None) -> bool:
    # A missing alias is read from the model's alias table, not inferred from an error: a store that is
    # briefly unavailable ("database is locked") must fail the run, not crown this version unopposed.
    holder_version = client.get_registered_model(name).aliases.get(CHAMPION)
    holder = None if holder_version is None else client.get_model_version(name, str(holder_version))
    if holder is not None:
        # Versions registered before the digest was kept are compared as they always were.
        holder_digest = holder.tags.get(VALIDATION_DIGEST, validation_digest)
        if holder_digest != validation_digest:
            log.warning("%s champion stays version %s: it was validated on other images (%s) than version %s (%s), "
                        "so their accuracies do not compare; move the alias by hand to choose between them",
                        name, holder.version, holder_digest, version, validation_digest)
            return False
        # The digest holds the images and their label numbers, not the names: renamed class folders
        # give the same digest, and a champion the default commands would refuse on the data it knew.
        if classes is not None and other_classes(_recorded_classes(client, holder.run_id), classes):
            log.warning("%s champion stays version %s: it was trained on other class names (or another order) "
                        "than version %s, so their accuracies do not compare; move the alias by hand to choose "
                        "between them", name, holder.version, version)
            return False
        if CHAMPION_METRIC not in holder.tags:
            # Crowned before validation decided (an early version of this project): it carries only its
            # test accuracy, and the test split never chooses.
            log.warning("%s champion stays version %s: it has no validation accuracy to compare with version "
                        "%s's; move the alias by hand to choose between them", name, holder.version, version)
            return False
        best = float(holder.tags[CHAMPION_METRIC])
    else:
        best = float("-inf")
    if round(val_accuracy, CHAMPION_DECIMALS) > best:  # as the holder's was kept: a tie keeps the holder
        if holder is not None:  # what delete_model_version gives the alias back to
            client.set_model_version_tag(name, version, PREVIOUS_CHAMPION, str(holder.version))
        client.set_registered_model_alias(name, CHAMPION, version)
        log.info("%s version %s (validation accuracy %.4f) is the new champion", name, version, val_accuracy)
        return True
    log.info("%s champion stays (validation accuracy %.4f >= %.4f)", name, best, val_accuracy)
    return False


def _recorded_classes(client: MlflowClient, run_id: str | None) -> str | None:
    """The ``CLASSES_PARAM`` of run ``run_id``; None where it recorded none or the run is gone."""
    run = _existing_run(client, run_id)
    return run.data.params.get(CLASSES_PARAM) if run else None


def _existing_run(client: MlflowClient, run_id: str | None) -> Any | None:
    """Run ``run_id``, or None where there is no such run (or the id is no run id); a store that cannot
    answer is an error, not an answer (e.g. "database is locked": a decision taken on it would be taken on
    nothing)."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise TrackingError(f"cannot read run {run_id}: {first_line(error)}") from None


def run_status(run_id: str) -> str | None:
    """Run ``run_id``'s status (RUNNING, FINISHED, FAILED, KILLED); None where there is no such run."""
    run = _existing_run(MlflowClient(), run_id)
    return None if run is None else run.info.status


@deferred()
def delete_model_version(name: str, version: str | int) -> None:
    """Remove a registered version (of a run that failed or was interrupted after registering it);
    best effort. If it had become champion, the alias goes back to the version that held it before."""
    client = MlflowClient()
    try:
        with _store_lock(sqlite_file(tracking_uri())):  # the alias is read and moved as the champion rule does
            doomed = client.get_model_version(name, str(version))
            previous = doomed.tags.get(PREVIOUS_CHAMPION)
            if CHAMPION in doomed.aliases and previous:
                try:
                    client.set_registered_model_alias(name, CHAMPION, previous)
                    log.warning("%s champion is version %s again", name, previous)
                except MlflowException:  # that version was deleted since: the alias goes with this one
                    log.warning("%s has no champion now: version %s, which held it before version %s, is gone; "
                                "set the alias by hand", name, previous, version)
        client.delete_model_version(name, str(version))
        log.warning("deleted %s version %s: its run did not finish", name, version)
    except MlflowException as error:
        log.warning("could not delete %s version %s of an unfinished run: %s", name, version, error.message)
        return
    if doomed.tags.get(CREATED_NAME) == "true":
        _delete_name_left_empty(client, name)


def _registered_model_exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
        return True
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _delete_name_left_empty(client: MlflowClient, name: str) -> None:
    """Delete registered model ``name``, which the registration of a version just deleted created, if
    no other version was registered since. (One registered between this check and the deletion would
    go with the name: MLflow has no atomic delete-if-empty.) Best effort."""
    quote = "'" if "'" not in name else '"'
    try:
        if quote in name:  # a name with both quotes cannot be written in a filter: it stays
            return
        if client.search_model_versions(f"name={quote}{name}{quote}", max_results=1):
            return
        client.delete_registered_model(name)
        log.warning("deleted registered model %s: the run whose registration created it did not finish", name)
    except MlflowException as error:
        log.warning("could not delete registered model %s, left without versions: %s", name, error.message)


def load_model(model_uri: str) -> nn.Module:
    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as error:
        raise TrackingError(f"cannot load model {model_uri}: {first_line(error)}") from None


def model_source_run(model_uri: str) -> str | None:
    """The run id that logged the model behind ``model_uri`` (``model_origin``'s first half; a
    ``runs:/`` URI names it, with no MLmodel file to read)."""
    if model_uri.startswith("runs:/"):
        return model_uri.split("/")[1]
    return model_origin(model_uri)[0]


def model_origin(model_uri: str) -> tuple[str | None, str]:
    """(the run that logged the model behind ``model_uri``, what two URIs of one logged model share),
    from one read of its MLmodel file.

    The run is the one ``runs:/`` or the MLmodel file (``models:/...``, a logged model's folder given as
    a path) names; None for a model no run logged. A registry lookup that fails is an error, not an
    unknown run: callers check the run's classes and training images. The identity is the MLmodel's
    ``model_uuid``, shared by ``runs:/ID/model``, ``models:/m-ID``, ``models:/NAME/1`` and the folder;
    the URI itself where there is none.
    """
    named_run = model_uri.split("/")[1] if model_uri.startswith("runs:/") else None
    try:
        # Every form: a version, /latest, @alias, or m-<id> (a logged model, what log_model returns).
        info = mlflow.models.get_model_info(model_uri)
    except Exception as error:
        if model_uri.startswith("models:/"):
            raise TrackingError(f"cannot find the run behind {model_uri}: {first_line(error)}") from None
        return named_run, model_uri  # no MLmodel file to read (loading the model says what is wrong)
    return named_run or info.run_id, info.model_uuid or model_uri


# --- Inference runs (benchmark, export, pareto) ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A finished or running MLflow run as plain values, for code that must not touch MLflow."""

    run_id: str
    run_name: str
    status: str
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]


@deferred()
@_writes_artifacts
def log_dict(data: Mapping[str, Any], artifact_file: str) -> None:
    mlflow.log_dict(dict(data), artifact_file)


@deferred()
@_writes_artifacts
def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


@deferred()
@_writes_artifacts
def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def inside_project_run() -> bool:
    """True under ``mlflow run``, which created the run this process should log into."""
    return mlflow.active_run() is None and bool(os.environ.get("MLFLOW_RUN_ID"))


def active_run_name() -> str:
    """The active run's name: the one given, or under ``mlflow run`` the one that run was made with."""
    return mlflow.active_run().info.run_name


def get_run(run_id: str) -> RunRecord | None:
    try:
        return _record(MlflowClient().get_run(run_id))
    except MlflowException:
        return None


def run_finished(run_id: str | None) -> bool:
    """Whether run ``run_id`` exists and closed FINISHED."""
    record = get_run(run_id) if run_id else None
    return record is not None and record.status == "FINISHED"


def run_is_active(run_id: str) -> bool:
    """Whether run ``run_id`` exists and is not deleted (MLflow still returns deleted runs, but refuses
    to log into them)."""
    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def check_run_target(experiment_name: str) -> None:
    """Fail fast, before slow work or anything written, where a new run could not start: under ``mlflow
    run``, ``MLFLOW_RUN_ID`` must name a running run of this store; else an experiment
    ``experiment_name`` must not be a deleted one (MLflow keeps the name)."""
    _check_no_active_run()
    client = MlflowClient()
    if inside_project_run():
        _check_project_run(client, os.environ["MLFLOW_RUN_ID"])
        return
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except MlflowException as error:
        raise TrackingError(f"cannot use experiment {experiment_name!r}: {first_line(error)}") from None
    if experiment is not None and experiment.lifecycle_stage != "active":
        raise _deleted(experiment)


def _deleted(experiment: Any) -> TrackingError:
    return TrackingError(f"experiment {experiment.name!r} was deleted: restore it (`mlflow experiments restore "
                         f"--experiment-id {experiment.experiment_id}`) or pass another --experiment-name")


def _check_no_active_run() -> None:
    """A new top-level run cannot start while another is active in this process (a Python caller's own,
    left open in a notebook): MLflow then raises a bare ``Exception``, and only after the data has loaded."""
    active = mlflow.active_run()
    if active is not None:
        raise TrackingError(f"MLflow run {active.info.run_id} is already active in this process: end it first "
                            "(mlflow.end_run())")


def _check_project_run(client: MlflowClient, run_id: str) -> None:
    """``MLFLOW_RUN_ID`` must name a run of this store that is not deleted and still RUNNING, as the
    run ``mlflow run`` starts is: a finished one (the variable left over in a shell or notebook) would
    be reopened, its metrics, artifacts and status overwritten."""
    try:
        info = client.get_run(run_id).info
    except MlflowException as error:  # a run id from another store, or none at all
        raise TrackingError(f"cannot log into MLFLOW_RUN_ID {run_id}: {first_line(error)}") from None
    if info.lifecycle_stage != "active":
        raise TrackingError(f"cannot log into MLFLOW_RUN_ID {run_id}: the run was deleted")
    if info.status != "RUNNING":
        raise TrackingError(f"cannot log into MLFLOW_RUN_ID {run_id}: the run is {info.status}, not running "
                            "(`mlflow run` sets the variable for the run it starts): unset it to log a new run")


def classes_param(classes: Sequence[str]) -> str:
    """``CLASSES_PARAM``'s value: the class names as a JSON list. (Joined by commas, as runs logged
    before 2026-11-29 have them, the classes "a,b" and "c" could not be told from "a" and "b,c".)"""
    return json.dumps(list(classes), ensure_ascii=False, separators=(",", ":"))


def _recorded_names(recorded: str) -> list[str] | None:
    """The class names of a ``CLASSES_PARAM`` written as a JSON list; None for one joined by commas (a
    run logged before 2026-11-29) or one MLflow cut short."""
    try:
        names = json.loads(recorded)
    except ValueError:
        return None
    return names if isinstance(names, list) and all(isinstance(name, str) for name in names) else None


def _as_recorded(recorded: str, classes: Sequence[str]) -> str:
    """``classes`` written as the run recorded its own: a JSON list, or (an older run) joined by commas."""
    cut_short = len(recorded) >= PARAM_VALUE_LIMIT and recorded.startswith('["')  # a JSON list no longer parses
    json_list = _recorded_names(recorded) is not None or cut_short
    return classes_param(classes) if json_list else ",".join(classes)


def other_classes(recorded: str | None, classes: Sequence[str]) -> bool:
    """Whether a run that recorded ``recorded`` (its ``CLASSES_PARAM``; None: not recorded, nothing to
    tell) was trained on other class names, or another order, than ``classes``."""
    if not recorded:
        return False
    if len(recorded) >= PARAM_VALUE_LIMIT:  # MLflow kept the list's beginning: compared as far as kept
        return all(recorded != form[:len(recorded)] for form in (classes_param(classes), ",".join(classes)))
    names = _recorded_names(recorded)
    return names != list(classes) if names is not None else recorded != ",".join(classes)


def check_trained_classes(model_uri: str, classes: tuple[str, ...], data_dir: str, *,
                          source_run_id: str | None = None) -> str | None:
    """Refuse a model trained on other class names or another order; returns its source run id.

    ``source_run_id``: what ``model_source_run`` gave where the caller asked it already (a
    ``models:/`` URI costs a registry lookup and a download of its MLmodel file); None: looked up here.
    """
    if source_run_id is None:
        source_run_id = model_source_run(model_uri)
    trained_on = _recorded_classes(MlflowClient(), source_run_id)
    if other_classes(trained_on, classes):
        # ImageFolder numbers classes by folder name: other names or another order mislabel every image.
        raise DataError(f"{model_uri} was trained on classes {trained_on}; {data_dir} holds "
                        f"{_as_recorded(trained_on, classes)}")
    return source_run_id


def dataset_digest(run_id: str, split: str) -> str | None:
    """The digest of the ``split`` (train, val, test) dataset input that ``log_datasets`` recorded for
    run ``run_id``; None for an unknown run or one that recorded none."""
    run = _existing_run(MlflowClient(), run_id)
    if run is None:
        return None
    context = DATASET_CONTEXTS.get(split, split)
    return next((entry.dataset.digest for entry in run.inputs.dataset_inputs
                 if any(tag.key == "mlflow.data.context" and tag.value == context for tag in entry.tags)), None)


def running_runs(experiment_name: str, run_kinds: tuple[str, ...]) -> list[tuple[str, dict[str, str]]]:
    """(id, tags) of the RUNNING runs whose tag ``run_kind`` is one of ``run_kinds``, in the experiment a
    new run would go to: ``experiment_name``, or under ``mlflow run`` the experiment of the run it made."""
    client = MlflowClient()
    if inside_project_run():
        project_run = _existing_run(client, os.environ["MLFLOW_RUN_ID"])
        experiment_id = project_run.info.experiment_id if project_run else None
    else:
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else None
    if experiment_id is None:
        return []
    return [(run.info.run_id, dict(run.data.tags)) for kind in run_kinds  # MLflow filters have no OR
            for run in client.search_runs([experiment_id],
                                          f"attributes.status = 'RUNNING' AND tags.run_kind = '{kind}'")]


def find_runs(experiment_name: str) -> list[RunRecord]:
    """Every run of an experiment (active ones only, newest first); a TrackingError for an unknown or
    deleted experiment."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise TrackingError(f"no MLflow experiment named {experiment_name!r} in {tracking_uri()}")
    if experiment.lifecycle_stage != "active":  # its runs are deleted with it: not "no runs"
        raise _deleted(experiment)
    records, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], page_token=token, order_by=["start_time DESC"])
        records += [_record(run) for run in page]
        token = page.token
        if not token:
            return records


@deferred()
def add_to_run(
    run_id: str,
    *,
    metrics: Mapping[str, float],
    tags: Mapping[str, Any],
    artifacts: Mapping[Path, str | None],
) -> None:
    """Log into an existing run (e.g. the finished training run of a model) without reopening it.

    ``artifacts`` maps local files to their artifact folder; they go first, so that files that cannot
    be written leave no metrics or tags claiming them. The run's status stays as it was.
    """
    from mlflow.entities import Metric, RunTag

    client = MlflowClient()
    timestamp = int(time.time() * 1000)
    try:
        for path, artifact_path in artifacts.items():
            client.log_artifact(run_id, str(path), artifact_path)
        client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), timestamp, 0) for key, value in metrics.items()],
            tags=[RunTag(key, str(value)) for key, value in tags.items()],
        )
    except (MlflowException, OSError) as error:
        raise TrackingError(f"cannot log into run {run_id}: {first_line(error)}") from None


def _record(run: Any) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.info.run_id,
        status=run.info.status,
        tags=dict(run.data.tags),
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
    )


UI_STOP_SECONDS = 15  # how long a stopping `mlflow ui` gets to stop its server before it is killed


def check_ui_address(host: str, port: int) -> None:
    """Fail where ``mlflow ui`` could not listen: it logs the error but exits 0, and the address it was
    to serve may be another process's (another store's UI)."""
    # Bound as uvicorn (mlflow ui's server) binds: IPv6 only for a host written with ':', so "localhost"
    # is 127.0.0.1 even where the resolver lists ::1 first.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as error:  # taken, not an address of this machine, or a name that does not resolve
            raise ConfigError(f"cannot serve the MLflow UI on {host}:{port}: {error.strerror or error}") from None


def ui_allowed_hosts(allowed_hosts: str, port: int) -> str:
    """MLflow's ``--allowed-hosts`` for ``allowed_hosts``: each name also with the UI's port, as a browser
    sends it (``Host: that.name:5000``), which MLflow compares by exact string unless it holds a ``*``;
    then MLflow's own list, localhost and private addresses, which any ``--allowed-hosts`` replaces
    (given only a public name, the UI refused ``http://localhost:PORT``)."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    entries = [entry.strip() for entry in allowed_hosts.split(",") if entry.strip()]
    with_port = [f"{entry}:{port}" for entry in entries if "*" not in entry and not re.search(r":\d+$", entry)]
    return ",".join(dict.fromkeys(entries + with_port + get_default_allowed_hosts()))


def launch_ui(host: str, port: int, allowed_hosts: str | None = None) -> int:
    """Run ``mlflow ui`` on the store this tool logs to (``check_ui_address`` first); returns its exit
    code. ``allowed_hosts``: MLflow's ``--allowed-hosts`` (it answers only localhost and private
    addresses otherwise).

    An interrupt stops it gracefully: ``mlflow ui`` runs its web server as processes of its own, which
    it stops on Ctrl-C or SIGTERM, but killed outright (as ``subprocess.call`` does on an interrupt)
    it leaves them serving. A Ctrl-C typed at the terminal reached it too; any other interrupt (a
    SIGTERM to this process alone) is passed on as SIGTERM.
    """
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
               "--host", host, "--port", str(port)]
    if allowed_hosts:
        command += ["--allowed-hosts", ui_allowed_hosts(allowed_hosts, port)]
    if not is_tracking_server(tracking_uri()):
        # Experiments created in the UI keep their artifacts where the client puts a new experiment's
        # (./mlruns): by default the UI gives them mlflow-artifacts:/, which only a running server stores.
        command += ["--default-artifact-root", str(Path("mlruns").resolve())]
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:
        try:
            process.wait(timeout=1)  # already stopping, if the terminal's Ctrl-C reached it
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=UI_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        raise


def _git_commit() -> str:
    """The commit of the checkout this package runs from ("-dirty" with uncommitted changes); "unknown"
    when it is not run from its own checkout (an installed copy, or a copy inside another repository,
    whose commit would describe other code)."""
    try:
        source_dir = Path(__file__).resolve().parent
        top_level = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=source_dir, capture_output=True,
                                   text=True, timeout=5, check=True).stdout.strip()
        if Path(top_level).resolve() != source_dir.parent:
            return "unknown"
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source_dir,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"

"""Shared fixtures: a tiny, learnable CIFAR-like ImageFolder tree and an isolated MLflow store."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_PER_CLASS = 40
TEST_PER_CLASS = 10
# One distinct colour per class: the label is learnable from colour alone, yet pixel noise and a
# random bright square keep it from being trivial.
PALETTE = np.array([
    [230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40], [230, 40, 230],
    [40, 230, 230], [140, 70, 20], [250, 250, 250], [20, 20, 20], [128, 128, 128],
], dtype=np.float32)


def synthetic_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """(32, 32, 3) uint8 image whose mean colour encodes ``label``."""
    image = PALETTE[label] + rng.normal(0, 30, size=(32, 32, 3))
    row, col = rng.integers(0, 24, size=2)
    image[row : row + 8, col : col + 8] = rng.uniform(0, 255, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, train_per_class: int = TRAIN_PER_CLASS,
                       test_per_class: int = TEST_PER_CLASS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # Alternate formats: both png and jpg must load.
                suffix = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(synthetic_image(label, rng)).save(folder / f"{i:04d}.{suffix}")
    return root


def with_last_epoch(result, **fields):
    """``result`` (a ``FitResult``) with its last epoch's ``EpochStats`` changed: e.g. a validation
    that must not count, to show that a number comes from elsewhere."""
    last = dataclasses.replace(result.history[-1], **fields)
    return dataclasses.replace(result, history=[*result.history[:-1], last])


def signal_cli_mid_training(args: list[str], epochs: int, sig: signal.Signals, *,
                            program: tuple[str, ...] = ("-m", "cifar_exp"), env: dict | None = None) -> tuple[int, str]:
    """Run ``python -m cifar_exp *args`` (or another ``program``: a script), send ``sig`` once its
    ``epoch 1/<epochs>`` line is out.

    Returns the exit status and what the process wrote (stdout and stderr) after the signal.
    """
    def default_handling():  # under nohup (or in a background job) the child would inherit an ignored one
        if sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # (SIGKILL cannot be handled at all)
            signal.signal(sig, signal.SIG_DFL)

    process = subprocess.Popen([sys.executable, *program, *map(str, args)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=default_handling)
    try:
        for line in process.stdout:  # wait for training to be under way
            if line.startswith(f"epoch 1/{epochs}"):
                break
        process.send_signal(sig)
        rest = process.communicate(timeout=60)[0]
        return process.returncode, rest
    finally:
        process.kill()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree of 400 train and 100 test images (10 classes). Treat as read-only."""
    return write_image_folder(tmp_path_factory.mktemp("tiny-cifar"))


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLflow pointed at a fresh SQLite store in ``tmp_path`` (artifacts in ``tmp_path/mlruns``)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return uri


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_is_not_ignored():
    """A test run started in the background (``make test &`` in a script) inherits SIGINT ignored,
    and so would the CLI processes the Ctrl-C tests start: give it Python's default handler, whose
    children (after exec) get the system default."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture
def project_signal_handlers():
    """The CLI's SIGINT/SIGTERM/SIGHUP handlers installed for the test, the test process's own restored after."""
    from cifar_exp import interrupts

    handlers = {s: signal.getsignal(s) for s in interrupts.STOPPING_SIGNALS}
    unraisablehook = sys.unraisablehook
    interrupts.install_handlers()
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    sys.unraisablehook = unraisablehook

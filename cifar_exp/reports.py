"""Metrics and report files: confusion matrix, per-class precision/recall, curves, sample grid.

Everything here writes plain files into a folder; the tracking module uploads that folder.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)

from cifar_exp.train import EpochStats, EvalResult  # noqa: E402

PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


@dataclass(frozen=True)
class ClassMetrics:
    classes: tuple[str, ...]
    confusion: np.ndarray  # (C, C) counts, rows = true class, columns = predicted class
    precision: np.ndarray  # (C,)
    recall: np.ndarray  # (C,)
    f1: np.ndarray  # (C,)
    support: np.ndarray  # (C,) true images per class
    report_text: str

    def macro(self) -> dict[str, float]:
        return {
            "macro_precision": float(self.precision.mean()),
            "macro_recall": float(self.recall.mean()),
            "macro_f1": float(self.f1.mean()),
        }

    def per_class_rows(self) -> list[dict[str, object]]:
        return [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support)
        ]


def class_metrics(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> ClassMetrics:
    ids = np.arange(len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=ids, zero_division=0
    )
    return ClassMetrics(
        classes=tuple(classes),
        confusion=confusion_matrix(labels, predictions, labels=ids),
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        report_text=classification_report(
            labels, predictions, labels=ids, target_names=list(classes), digits=4, zero_division=0
        ),
    )


def write_evaluation_report(
    out_dir: Path,
    result: EvalResult,
    metrics: ClassMetrics,
    images: np.ndarray,
) -> None:
    """Confusion matrix, per-class table, text report and sample grid under ``out_dir``.

    ``images`` are the evaluated images, (N, 3, 32, 32) uint8, in the order of ``result``.
    """
    (out_dir / "metrics").mkdir(parents=True, exist_ok=True)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics" / "confusion_matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *metrics.classes])
        for name, row in zip(metrics.classes, metrics.confusion):
            writer.writerow([name, *row.tolist()])
    _write_csv(out_dir / "metrics" / "per_class.csv", metrics.per_class_rows(), PER_CLASS_COLUMNS)
    (out_dir / "metrics" / "classification_report.txt").write_text(metrics.report_text)
    plot_confusion_matrix(metrics, out_dir / "plots" / "confusion_matrix.png")
    plot_sample_predictions(images, result, metrics.classes, out_dir / "plots" / "sample_predictions.png")


def write_training_report(out_dir: Path, history: Sequence[EpochStats]) -> None:
    """``history.csv`` (one row per epoch) and the loss and accuracy curves."""
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": s.epoch, **s.metrics()} for s in history]
    _write_csv(out_dir / "history.csv", rows, tuple(rows[0]))
    epochs = [s.epoch for s in history]
    _plot_curves(
        epochs,
        {"train": [s.train_loss for s in history], "validation": [s.val_loss for s in history]},
        "cross-entropy loss",
        out_dir / "plots" / "loss_curves.png",
    )
    _plot_curves(
        epochs,
        {"train": [s.train_accuracy for s in history], "validation": [s.val_accuracy for s in history]},
        "accuracy",
        out_dir / "plots" / "accuracy_curves.png",
    )


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _plot_curves(epochs: list[int], series: dict[str, list[float]], ylabel: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, values in series.items():
        ax.plot(epochs, values, marker="o" if len(epochs) <= 20 else None, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion_matrix(metrics: ClassMetrics, path: Path) -> None:
    matrix = metrics.confusion
    size = max(5.0, 0.6 * len(metrics.classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(metrics.classes))
    ax.set_xticks(ticks, metrics.classes, rotation=45, ha="right")
    ax.set_yticks(ticks, metrics.classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"confusion matrix ({matrix.sum()} images, accuracy {accuracy:.2%})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sample_predictions(
    images: np.ndarray,
    result: EvalResult,
    classes: Sequence[str],
    path: Path,
    count: int = 32,
    seed: int = 0,
) -> None:
    """A grid of images titled with predicted class and confidence; mistakes in red with the truth."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(images), size=min(count, len(images)), replace=False))
    columns = 8
    rows = -(-len(picks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), dpi=120, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, picks):
        predicted, truth = result.predictions[index], result.labels[index]
        confidence = result.probabilities[index, predicted]
        ax.imshow(images[index].transpose(1, 2, 0))  # (3, 32, 32) -> (32, 32, 3)
        title = f"{classes[predicted]} {confidence:.0%}"
        if predicted != truth:
            title = f"✗ {title}\n(true: {classes[truth]})"
        ax.set_title(title, fontsize=7, color="black" if predicted == truth else "red")
    fig.suptitle("sample test predictions (predicted class, confidence; mistakes in red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""Metrics and report files: confusion matrix, per-class precision/recall, curves, sample grid.

Everything here writes plain files into a folder; the tracking module uploads that folder.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
# Figures are drawn without pyplot: saved straight to files, on any backend and with no display, and
# a library call neither switches the caller's backend (a notebook's inline one) nor leaves figures open.
from matplotlib.figure import Figure
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)

from cifar_exp.train import EpochStats, EvalResult

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


def write_training_report(out_dir: Path, history: Sequence[EpochStats], val_label: str = "validation",
                          train_objective: str = "cross-entropy") -> None:
    """``history.csv`` (one row per epoch) and the loss and accuracy curves; ``val_label`` names the
    split the per-epoch validation ran on (the test split under the seed report's protocol),
    ``train_objective`` what the training loss is (the evaluation loss is always plain cross-entropy)."""
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    rows = [{"epoch": s.epoch, **s.metrics()} for s in history]
    _write_csv(out_dir / "history.csv", rows, tuple(rows[0]))
    epochs = [s.epoch for s in history]
    _plot_curves(
        epochs,
        {f"train ({train_objective})": [s.train_loss for s in history],
         f"{val_label} (cross-entropy)": [s.val_loss for s in history]},
        "loss",
        out_dir / "plots" / "loss_curves.png",
    )
    _plot_curves(
        epochs,
        {"train": [s.train_accuracy for s in history], val_label: [s.val_accuracy for s in history]},
        "accuracy",
        out_dir / "plots" / "accuracy_curves.png",
    )


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def as_written(text: str) -> str:
    """``text`` (a class name, run label or study name: the user's) escaped for matplotlib, which reads a
    pair of ``$`` as maths: drawn as such, or failing the run on what is no valid maths (a class folder
    named ``$\\bad$``). Escaped per text, not switched off per figure: tick labels of log axes are maths."""
    return text.replace("$", r"\$")


def _plot_curves(epochs: list[int], series: dict[str, list[float]], ylabel: str, path: Path) -> None:
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for label, values in series.items():
        ax.plot(epochs, values, marker="o" if len(epochs) <= 20 else None, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# Past this many classes the plot shows colours only (the counts are in confusion_matrix.csv): one
# text artist per cell and a figure growing with the classes took minutes and gigabytes at 100-200.
MAX_LABELLED_CLASSES = 30


def plot_confusion_matrix(metrics: ClassMetrics, path: Path) -> None:
    matrix = metrics.confusion
    labelled = len(metrics.classes) <= MAX_LABELLED_CLASSES
    size = max(5.0, 0.6 * min(len(metrics.classes), MAX_LABELLED_CLASSES) + 2)
    fig = Figure(figsize=(size, size), dpi=120)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    if labelled:
        ticks = np.arange(len(metrics.classes))
        names = [as_written(name) for name in metrics.classes]
        ax.set_xticks(ticks, names, rotation=45, ha="right")
        ax.set_yticks(ticks, names)
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8,
                    color="white" if count > threshold else "black")
    ax.set_xlabel("predicted class" + ("" if labelled else " (index)"))
    ax.set_ylabel("true class" + ("" if labelled else " (index)"))
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"confusion matrix ({matrix.sum()} images, accuracy {accuracy:.2%})")
    fig.tight_layout()
    fig.savefig(path)


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
    fig = Figure(figsize=(columns * 1.6, rows * 1.9), dpi=120)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, picks):
        predicted, truth = result.predictions[index], result.labels[index]
        confidence = result.probabilities[index, predicted]
        ax.imshow(images[index].transpose(1, 2, 0))  # (3, 32, 32) -> (32, 32, 3)
        title = f"{as_written(classes[predicted])} {confidence:.0%}"
        if predicted != truth:
            title = f"✗ {title}\n(true: {as_written(classes[truth])})"
        ax.set_title(title, fontsize=7, color="black" if predicted == truth else "red")
    fig.suptitle("sample test predictions (predicted class, confidence; mistakes in red)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------------------------------
# The accuracy–latency trade-off

TARGET_FPS = 60  # the embedded targets' frame rate (the seed's stated objective)


@dataclass(frozen=True)
class TradeoffPoint:
    """One model run on one backend: its test accuracy against its cost."""

    label: str  # the model measured (name or URI)
    backend: str
    accuracy: float
    latency_ms: float  # batch-1 p50
    parameters: int
    run_id: str = ""


def pareto_front(accuracy: Sequence[float], cost: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point beats: (N,) bool, higher accuracy and lower cost are better.

    A point is dominated when another is at least as accurate and at most as costly, and strictly
    better in one of the two; equal points are all on the front.
    """
    accuracy, cost = np.asarray(accuracy, dtype=float), np.asarray(cost, dtype=float)
    if accuracy.shape != cost.shape or accuracy.ndim != 1:
        raise ValueError(f"accuracy {accuracy.shape} and cost {cost.shape} must be equal-length vectors")
    no_worse = (accuracy[None, :] >= accuracy[:, None]) & (cost[None, :] <= cost[:, None])  # [i, j]: j vs i
    better = (accuracy[None, :] > accuracy[:, None]) | (cost[None, :] < cost[:, None])
    return ~(no_worse & better).any(axis=1)


def plot_pareto(points: Sequence[TradeoffPoint], path: Path, accuracy_label: str = "test accuracy") -> None:
    """Accuracy vs. batch-1 latency and vs. parameters, each with its Pareto front highlighted.

    ``accuracy_label`` names the accuracy axis (which split the accuracy was measured on).
    """
    accuracy = np.array([p.accuracy for p in points])
    panels = (
        ("batch-1 latency, p50 (ms)", np.array([p.latency_ms for p in points])),
        ("parameters", np.array([p.parameters for p in points], dtype=float)),
    )
    backends = sorted({p.backend for p in points})
    markers = dict(zip(backends, "osD^vP*X"))
    fig = Figure(figsize=(12, 5), dpi=120)
    axes = fig.subplots(1, 2)
    for ax, (xlabel, cost) in zip(axes, panels):
        front = pareto_front(accuracy, cost)
        for backend in backends:
            chosen = np.array([p.backend == backend for p in points])
            ax.scatter(cost[chosen & ~front], accuracy[chosen & ~front], marker=markers[backend], color="0.6",
                       label=f"{backend}")
            ax.scatter(cost[chosen & front], accuracy[chosen & front], marker=markers[backend], color="tab:red",
                       s=60, zorder=3)
        order = np.argsort(cost[front])
        ax.step(cost[front][order], accuracy[front][order], where="post", color="tab:red", alpha=0.6,
                label="Pareto front")
        for index in np.flatnonzero(front):
            label = points[index].label
            shown = label if len(label) <= 32 else "…" + label[-31:]
            ax.annotate(as_written(shown), (cost[index], accuracy[index]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        if xlabel.startswith("batch-1"):
            ax.axvline(1000 / TARGET_FPS, color="tab:blue", linestyle="--", alpha=0.5,
                       label=f"{TARGET_FPS} FPS budget")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(accuracy_label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"accuracy vs. cost of {len(points)} model/backend points (Pareto front in red)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def write_pareto_csv(points: Sequence[TradeoffPoint], front: np.ndarray, path: Path) -> None:
    rows = [{**p.__dict__, "on_front": bool(on)} for p, on in zip(points, front)]
    _write_csv(path, rows, tuple(rows[0]))

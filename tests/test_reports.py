import subprocess
import sys

import matplotlib.axes
import matplotlib.pyplot as plt
import matplotlib.text
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from cifar_exp.reports import (
    MAX_LABELLED_CLASSES,
    TradeoffPoint,
    class_metrics,
    plot_confusion_matrix,
    plot_pareto,
    plot_sample_predictions,
)
from cifar_exp.train import EvalResult


def _plot(tmp_path, classes, monkeypatch):
    """(pixel size, cell labels drawn) of the confusion-matrix plot of a random run over ``classes``."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), 3)
    metrics = class_metrics(labels, rng.integers(0, classes, len(labels)), [f"class{i}" for i in range(classes)])
    texts = []
    draw_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, *a, **k: texts.append(a[2]) or draw_text(self, *a, **k))
    path = tmp_path / f"confusion-{classes}.png"
    plot_confusion_matrix(metrics, path)
    monkeypatch.undo()
    with Image.open(path) as image:
        return image.size, texts


def test_the_confusion_matrix_plot_counts_every_cell_of_ten_classes(tmp_path, monkeypatch):
    size, texts = _plot(tmp_path, 10, monkeypatch)
    assert len(texts) == 100 and sum(map(int, texts)) == 30  # every image counted once
    assert size == (960, 960)  # 8 inches at 120 dpi


def test_the_confusion_matrix_plot_of_many_classes_stays_small(tmp_path, monkeypatch):
    # 200 classes took 73 s and 7.7 GB with a label per cell and a figure growing with the classes.
    size, texts = _plot(tmp_path, 200, monkeypatch)
    assert texts == []  # colours only: the counts are in metrics/confusion_matrix.csv
    largest = round((0.6 * MAX_LABELLED_CLASSES + 2) * 120)
    assert max(size) <= largest


def _drawn(text: matplotlib.text.Text) -> tuple[str, bool]:
    """(the characters drawn, whether as maths) for a text of a figure."""
    return text._preprocess_math(text.get_text())


def test_class_names_are_drawn_as_written_not_as_maths(tmp_path, monkeypatch):
    # Folder names are the user's text: in a pair of $ matplotlib read maths, and the run failed at the
    # end of training on one that is no valid maths. The log axes' tick labels stay maths (10^-1).
    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or save(fig, *a, **k))
    classes = [r"$\bad$", "$5_or_$10", "dog"]
    labels, predictions = np.array([0, 1, 2, 0, 1, 2]), np.array([0, 2, 2, 1, 1, 0])
    plot_confusion_matrix(class_metrics(labels, predictions, classes), tmp_path / "confusion.png")
    result = EvalResult(loss=1.0, accuracy=0.5, labels=labels, predictions=predictions,
                        probabilities=np.full((6, 3), 1 / 3, dtype=np.float32))
    plot_sample_predictions(np.zeros((6, 3, 32, 32), dtype=np.uint8), result, classes, tmp_path / "samples.png")
    points = [TradeoffPoint(label=label, backend="onnxruntime-fp32", accuracy=accuracy, latency_ms=latency,
                            parameters=parameters)
              for label, accuracy, latency, parameters in (("run $x$ / $\\bad$", 0.7, 0.1, 1000),
                                                           ("seed", 0.6, 0.05, 200_000))]
    plot_pareto(points, tmp_path / "pareto.png")
    confusion, samples, pareto = figures
    assert [_drawn(t) for t in confusion.axes[0].get_xticklabels()] == [(name, False) for name in classes]
    titles = [_drawn(ax.title) for ax in samples.axes if ax.get_title()]
    assert (r"$\bad$ 33%", False) in titles and ("✗ $5_or_$10 33%\n(true: $\\bad$)", False) in titles
    annotations = [_drawn(t) for ax in pareto.axes for t in ax.texts]
    assert ("run $x$ / $\\bad$", False) in annotations
    log_ticks = [_drawn(t) for t in pareto.axes[0].get_xticklabels() if t.get_text()]
    assert log_ticks and all(math for _, math in log_ticks)


def test_the_library_leaves_pyplot_to_its_caller(tmp_path):
    # Importing a module switched the caller's backend to Agg (a notebook's inline one too), and a plot
    # whose file could not be written left its figure open in pyplot.
    code = ("import matplotlib; matplotlib.use('svg'); import cifar_exp.experiment, cifar_exp.deployment, "
            "cifar_exp.tune; print(matplotlib.get_backend())")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "svg\n"
    plt.close("all")
    metrics = class_metrics(np.array([0, 1]), np.array([0, 0]), ["cat", "dog"])
    try:
        plot_confusion_matrix(metrics, tmp_path / "absent" / "confusion.png")
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("the plot was written into a folder that does not exist")
    assert plt.get_fignums() == []

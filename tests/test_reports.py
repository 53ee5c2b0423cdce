import matplotlib.axes
import numpy as np
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


def test_class_names_are_drawn_as_written_not_as_maths(tmp_path, monkeypatch):
    # Folder names are the user's text: in a pair of $ matplotlib read maths, and the run failed at the
    # end of training on one that is no valid maths.
    classes = [r"$\bad$", "$5_or_$10", "dog"]
    labels, predictions = np.array([0, 1, 2, 0, 1, 2]), np.array([0, 2, 2, 1, 1, 0])
    plot_confusion_matrix(class_metrics(labels, predictions, classes), tmp_path / "confusion.png")
    titles = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: titles.append(set_title(self, label, *a, **k)) or titles[-1])
    result = EvalResult(loss=1.0, accuracy=0.5, labels=labels, predictions=predictions,
                        probabilities=np.full((6, 3), 1 / 3, dtype=np.float32))
    plot_sample_predictions(np.zeros((6, 3, 32, 32), dtype=np.uint8), result, classes, tmp_path / "samples.png")
    monkeypatch.undo()
    assert "$\\bad$ 33%" in [t.get_text() for t in titles] and not any(t._parse_math for t in titles)
    point = TradeoffPoint(label="run $x$ / $\\bad$", backend="onnxruntime-fp32", accuracy=0.7, latency_ms=0.1,
                          parameters=1000)
    plot_pareto([point], tmp_path / "pareto.png")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("confusion.png", "samples.png", "pareto.png"))

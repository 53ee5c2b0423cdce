import matplotlib.axes
import numpy as np
from PIL import Image

from cifar_exp.reports import MAX_LABELLED_CLASSES, class_metrics, plot_confusion_matrix


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

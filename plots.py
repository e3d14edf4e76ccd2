"""Figures of a run (matplotlib, Agg backend), saved as PNG through a temp file."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

CURVE_PANELS = (
    ("losses", ("label_loss", "domain_loss")),
    ("accuracy", ("label_accuracy", "domain_accuracy", "val_source_accuracy",
                  "val_target_accuracy", "val_domain_accuracy")),
    ("schedules", ("lambda", "lr")),
)


def save_figure(figure, path):
    """Writes `figure` to `path` through a temporary file, then closes it."""
    temporary = os.path.join(os.path.dirname(path) or ".",
                             f".tmp-{os.path.basename(path)}")
    figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    os.replace(temporary, path)


def training_curves(history, path):
    """Plots the per-epoch history rows (dicts with an `epoch` key) to `path`."""
    figure, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(15, 4))
    epochs = [row["epoch"] for row in history]
    for axis, (title, keys) in zip(axes, CURVE_PANELS):
        for key in keys:
            values = [row.get(key) for row in history]
            if any(v is not None and v != "" for v in values):
                axis.plot(epochs, [float(v) if v not in (None, "") else np.nan
                                   for v in values], marker=".", label=key)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save_figure(figure, path)


def confusion_matrix(matrix, class_names, title, path):
    """Draws a confusion matrix (rows: true class, columns: predicted class)."""
    matrix = np.asarray(matrix)
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names, rotation=90)
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title)
    if len(class_names) <= 20:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), value in np.ndenumerate(matrix):
            axis.text(col, row, str(value), ha="center", va="center", fontsize=7,
                      color="white" if value > threshold else "black")
    save_figure(figure, path)


def domain_scatter(points, domains, domain_names, title, path):
    """A 2-D scatter of points coloured by domain (index into `domain_names`)."""
    figure, axis = plt.subplots(figsize=(6, 6))
    for index, name in enumerate(domain_names):
        chosen = domains == index
        axis.scatter(points[chosen, 0], points[chosen, 1], s=4, alpha=0.6, label=name)
    axis.set_title(title)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.legend(markerscale=4)
    save_figure(figure, path)

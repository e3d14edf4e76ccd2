"""Figures of a run (matplotlib, Agg backend), saved as PNG through a temp file.

    python plots.py [--data_dir DATA] [--output_dir DIR]

draws the README's figures: the network and a grid of DATA/train's images.
"""

import os
import sys

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn import metrics  # noqa: E402

import folders  # noqa: E402
from file_utils import UserError, save_atomically  # noqa: E402

CURVE_PANELS = (
    ("losses", ("label_loss", "domain_loss", "adaptation_loss")),
    # val_domain_accuracy is monitor_domain_accuracy's figure on val: drawn there once.
    ("accuracy", ("label_accuracy", "domain_accuracy", "val_source_accuracy",
                  "val_target_accuracy")),
    ("target health (no labels read)", ("monitor_domain_accuracy",
                                        "monitor_top_class_share")),
    ("label-free scores (higher: better)", ("monitor_target_entropy",)),
    ("schedules", ("lambda",)),
)
# On its own scale, or it would lie flat (the learning rate at ~0) or squash the other.
SECOND_AXIS = {"schedules": "lr", "label-free scores (higher: better)": "monitor_snd"}


def save_figure(figure, path):
    """Writes `figure` to `path` as PNG through a temporary file, then closes it."""
    save_atomically(path, lambda temporary: figure.savefig(
        temporary, format="png", dpi=110, bbox_inches="tight"))
    plt.close(figure)


def _plot_column(axis, epochs, history, key, colour=None):
    """Plots one history column where it has values; says whether it had any."""
    values = [row.get(key) for row in history]
    present = any(v is not None and v != "" for v in values)
    if present:
        numbers = [float(v) if v not in (None, "") else np.nan for v in values]
        line, = axis.plot(epochs, numbers, marker=".", label=key, color=colour)
        if len(epochs) == 1:  # one point draws no line: say its value beside it,
            # on the left for a second axis (whose point sits on the first's)
            left = colour is not None
            axis.annotate(f"{numbers[0]:.3g}", (epochs[0], numbers[0]), fontsize=8,
                          xytext=(-5 if left else 5, 0), textcoords="offset points",
                          ha="right" if left else "left", va="center",
                          color=line.get_color())
    return present


def training_curves(history, path):
    """Plots the per-epoch history rows (dicts with an `epoch` key) to `path`."""
    figure, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(22, 4),
                                layout="constrained")
    epochs = [row["epoch"] for row in history]
    for axis, (title, keys) in zip(axes, CURVE_PANELS):
        for key in keys:
            _plot_column(axis, epochs, history, key)
        legend_axis = axis
        if title in SECOND_AXIS:
            second = axis.twinx()
            if _plot_column(second, epochs, history, SECOND_AXIS[title], colour="C3"):
                second.set_ylabel(SECOND_AXIS[title])
                legend_axis = second  # drawn above both axes' lines
        handles, labels = axis.get_legend_handles_labels()
        if legend_axis is not axis:
            more_handles, more_labels = legend_axis.get_legend_handles_labels()
            handles, labels = handles + more_handles, labels + more_labels
        if handles:  # below the panel, where it hides no point
            legend_axis.legend(handles, labels, fontsize=8, loc="upper center",
                               bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        for shown in {axis, legend_axis}:  # values as they are, no offset label
            shown.yaxis.get_major_formatter().set_useOffset(False)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        if len(keys) == 1:
            axis.set_ylabel(keys[0])
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if epochs:
            axis.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if len(set(epochs)) == 1:  # the locator would fall back to fractions
            axis.set_xticks(epochs[:1])
        axis.grid(alpha=0.3)
    save_figure(figure, path)


def confusion_matrix(matrix, class_names, title, path, normalised_only=False,
                     kind="class"):
    """Draws a confusion matrix (rows: true `kind`, columns: predicted `kind`): the
    counts and, beside them, each row normalised to 1 (or only the latter)."""
    matrix = np.asarray(matrix, np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    panels = [(np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0),
               f"normalised by true {kind}", ".2f")]
    if not normalised_only:
        panels.insert(0, (matrix.astype(np.int64), "counts", "d"))
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size),
                                squeeze=False, layout="constrained")
    for axis, (values, subtitle, value_format) in zip(axes[0], panels):
        metrics.ConfusionMatrixDisplay(values, display_labels=class_names).plot(
            ax=axis, cmap="Blues", colorbar=False, xticks_rotation="vertical",
            include_values=len(class_names) <= 20, values_format=value_format)
        axis.set(title=subtitle, xlabel=f"predicted {kind}", ylabel=f"true {kind}")
    figure.suptitle(title)
    save_figure(figure, path)


def precision_recall(labels, scores, class_names, title, path, most_classes=10):
    """Precision-recall curves of the label classifier, one small panel per class (that
    class against the rest, its average precision above it); with more than
    `most_classes` classes, one panel of the micro-average over all."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if len(class_names) <= most_classes:
        curves = [(name, labels == index, scores[:, index])
                  for index, name in enumerate(class_names) if np.any(labels == index)]
    else:
        onehot = np.eye(len(class_names), dtype=bool)[labels]
        curves = [("micro-average of all classes", onehot.ravel(), scores.ravel())]
    columns = min(5, len(curves))
    rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.4 * rows + 0.6),
                                sharex=True, sharey=True, squeeze=False,
                                layout="constrained")
    for axis, (name, positive, score) in zip(axes.flat, curves):
        precision, recall, _ = metrics.precision_recall_curve(positive, score)
        axis.plot(recall, precision, drawstyle="steps-post")
        axis.set_title(f"{name}: AP "
                       f"{metrics.average_precision_score(positive, score):.2f}",
                       fontsize=9)
        axis.set(xlim=(0, 1.02), ylim=(0, 1.02))
        axis.grid(alpha=0.3)
    for axis in axes.flat[len(curves):]:
        axis.set_visible(False)
    figure.supxlabel("recall")
    figure.supylabel("precision")
    figure.suptitle(f"{title}: precision-recall, each class against the rest")
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


MODE_COLOURS = {"source_only": "C3", "dann": "C0", "cdan": "C1", "cdan_e": "C4",
                "mcc": "C2", "coral": "C5"}


def tuning_figure(rows, params, objective, path, chosen=None):
    """A study's trials: the objective of every trial by number (source-only's as a
    dashed line; a ruled-out trial as a cross below the others; the `chosen` row
    ringed), then the adapted trials' objective against each searched flag; `params`
    maps each flag to its (low, high) range where it is drawn on a log scale, else
    None."""
    scored = [row for row in rows if row["state"] == "complete"]
    figure, axes = plt.subplots(1, 1 + len(params), figsize=(5 * (1 + len(params)), 4),
                                layout="constrained", squeeze=False)
    axes = axes[0]
    _draw_trials(axes, rows, scored, params)
    if chosen is not None:
        axes[0].scatter([chosen["trial"]], [chosen["score"]], s=160, facecolors="none",
                        edgecolors="black", label="chosen by the rule (choice.txt)")
    _label_trial_axes(axes, rows, scored, params, objective)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    figure.legend(unique.values(), unique.keys(), loc="outside right upper", fontsize=8)
    ruled_out = len(rows) - len(scored)
    figure.suptitle(f"{len(rows)} trials: {len(scored)} scored, {ruled_out} ruled out "
                    "or unfinished")
    save_figure(figure, path)


def _draw_trials(axes, rows, scored, params):
    """Each mode's scored trials in its colour, the others as crosses below them,
    source-only's score as a dashed line across every panel."""
    scores = [row["score"] for row in scored] or [0.0]
    floor = min(scores) - 0.1 * (max(scores) - min(scores) or 1.0)
    for mode in dict.fromkeys(row["mode"] for row in rows):
        of_mode = [row for row in scored if row["mode"] == mode]
        colour = MODE_COLOURS.get(mode, "C7")
        axes[0].scatter([row["trial"] for row in of_mode],
                        [row["score"] for row in of_mode], color=colour, label=mode)
        for axis, name in zip(axes[1:], params):
            if mode != "source_only":  # it searches nothing: its line is drawn instead
                axis.scatter([row[name] for row in of_mode],
                             [row["score"] for row in of_mode], color=colour, label=mode)
    ruled_out = [row for row in rows if row["state"] != "complete"]
    for axis, name in zip(axes, ("trial", *params)):
        axis.scatter([row[name] for row in ruled_out], [floor] * len(ruled_out),
                     marker="x", color="C7", label="ruled out" if ruled_out else None)
    for source_only in (row for row in scored if row["mode"] == "source_only"):
        for axis in axes:
            axis.axhline(source_only["score"], color=MODE_COLOURS["source_only"],
                         linestyle="--", linewidth=1, label="source-only")


def _label_trial_axes(axes, rows, scored, params, objective):
    """Axis labels and ticks: integer trial numbers, each flag's scale or values."""
    axes[0].set_xlabel("trial")
    if len(rows) <= 20:
        axes[0].set_xticks(sorted({row["trial"] for row in rows}))
    else:
        axes[0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for axis, (name, log_range) in zip(axes[1:], params.items()):
        axis.set_xlabel(name)
        if log_range:
            axis.set_xscale("log")
            axis.set_xlim(*log_range)
        else:  # a choice: ticks at the values drawn
            axis.set_xticks(sorted({row[name] for row in rows}))
    for axis in axes:
        axis.set_ylabel(f"{objective} on val (higher: better)")
        axis.grid(alpha=0.3)


ARCHITECTURE = (
    # (x, y, width, text, colour) of each box, in axis units.
    (0.2, 2.0, 1.6, "image\n28x28x3\n(0-255)", "#dddddd"),
    (2.2, 2.0, 2.0, "minus channel mean\nconv 5x5x32, ReLU\nmax-pool 2\n"
     "conv 5x5x48, ReLU\nmax-pool 2\nflatten (768)", "#9ecae1"),
    (4.8, 3.3, 2.0, "label classifier\nFC100, ReLU\nFC100, ReLU\nFC10", "#a1d99b"),
    (4.8, 0.7, 2.0, "gradient reversal\nforward: identity\nbackward: -lambda x grad",
     "#fdae6b"),
    (7.4, 0.7, 1.8, "domain classifier\nFC100, ReLU\nFC1 (logit)", "#fc9272"),
    (7.4, 3.3, 1.8, "class\n(source labels)", "#eeeeee"),
    (9.7, 0.7, 1.6, "domain\nsource 0 / target 1", "#eeeeee"),
)
ARROWS = ((1.8, 2.0, 2.2, 2.0), (4.2, 2.4, 4.8, 3.3), (4.2, 1.6, 4.8, 0.7),
          (6.8, 3.3, 7.4, 3.3), (6.8, 0.7, 7.4, 0.7), (9.2, 0.7, 9.7, 0.7))


def architecture_diagram(path):
    """Draws the DANN network: shared features, label head, GRL and domain head."""
    figure, axis = plt.subplots(figsize=(12, 4.2))
    for x, y, width, text, colour in ARCHITECTURE:
        height = max(1.1, 0.22 * (text.count("\n") + 1) + 0.2)
        axis.add_patch(matplotlib.patches.FancyBboxPatch(
            (x, y - height / 2), width, height, boxstyle="round,pad=0.05", facecolor=colour,
            edgecolor="black"))
        axis.text(x + width / 2, y, text, ha="center", va="center", fontsize=8.5)
    for x0, y0, x1, y1 in ARROWS:
        axis.annotate("", xy=(x1, y1), xytext=(x0, y0),
                      arrowprops={"arrowstyle": "->", "lw": 1.5})
    axis.text(5.8, -0.25, "features learn to fool the domain classifier", ha="center",
              fontsize=8.5, style="italic")
    axis.set_xlim(0, 11.5)
    axis.set_ylim(-0.5, 4.2)
    axis.axis("off")
    axis.set_title("DANN (Ganin & Lempitsky 2015), the MNIST network")
    save_figure(figure, path)


def sample_grid(split, path, per_class=2, seed=0):
    """Source images above target images of the same classes, from a scanned split."""
    rng = np.random.default_rng(seed)
    rows = []
    count = per_class * len(split.class_names)
    for files in (split.source, split.target):
        labels = np.asarray(files.labels)
        if files.labelled:
            chosen = [index for label in range(len(split.class_names)) for index in
                      rng.choice(np.flatnonzero(labels == label), per_class,
                                 replace=False)]
        else:  # as many images, drawn from all
            chosen = rng.choice(len(files.paths), count, replace=len(files.paths) < count)
        tiles = []
        for index in chosen:
            with Image.open(files.paths[index]) as image:
                tiles.append(np.asarray(image.convert("RGB").resize((28, 28))))
        rows.append(np.concatenate(tiles, axis=1))
    figure, axis = plt.subplots(figsize=(len(rows[0][0]) / 40, 1.6))
    axis.imshow(np.concatenate(rows, axis=0))
    axis.set_yticks([14, 42], ["source", "target"])
    axis.set_xticks([])
    axis.set_title("Training images, two per class: source (top), target (bottom)",
                   fontsize=9)
    save_figure(figure, path)


def refuse_a_foreign_figure(path):
    """Refuses to replace a file at `path` that is not a figure drawn by matplotlib
    (its PNG "Software" note): the user's own file of that name."""
    if not os.path.exists(path):
        return
    try:
        with Image.open(path) as image:
            drawn = image.info.get("Software", "").startswith("Matplotlib")
    except OSError:
        drawn = False
    if not drawn:
        raise UserError(f"--output_dir: {path} is a file this command did not write: "
                        "pass another --output_dir")


def readme_figures(data_dir, output_dir):
    """Draws the README's figures into `output_dir`: the architecture, and a grid of
    `data_dir`/train's images; returns the paths written.

    Raises:
        UserError: `data_dir`/train is not a split folder.
    """
    try:
        split = folders.scan_split(os.path.join(data_dir, "train"))
    except UserError as error:
        raise UserError(f"{error} (python mnist_m.py builds the default data set)"
                        ) from None
    written = [os.path.join(output_dir, name)
               for name in ("architecture.png", "samples.png")]
    for path in written:
        refuse_a_foreign_figure(path)
    os.makedirs(output_dir, exist_ok=True)
    architecture_diagram(written[0])
    sample_grid(split, written[1])
    return written


def main(data_dir, output_dir):
    """plots.py's work: the README's figures, what it wrote, or one error line."""
    try:
        written = readme_figures(data_dir, output_dir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"Wrote {', '.join(written)} (training images from "
          f"{os.path.join(data_dir, 'train')})")


if __name__ == "__main__":
    from absl import app, flags

    import common_flags

    common_flags.define(common_flags.PLOTS)
    flags.adopt_module_key_flags(common_flags)
    app.run(lambda argv: main(**common_flags.values(common_flags.PLOTS)),
            flags_parser=common_flags.parse_or_exit)

"""A shift where DANN's features are not aligned, and whether train.py says so.

    python benchmarks/small_target.py [--seeds 3] [--num_epochs 15]

Builds, from the default MNIST -> MNIST-M folders, a training split of 10,000
labelled MNIST digits and 1,200 unlabelled MNIST-M digits (files linked, not copied;
the target flat, without class folders), trains `dann` and `source_only` on it with
the paper's recipe through the real train.py, and records per run the health signals
of every epoch and the warnings train.py gave. Only then does it evaluate each final
model on the full labelled test split. Writes small_target.json and small_target.md.
"""

import json
import os
import random
import time

import numpy as np
from absl import app, flags

import bench  # this folder's benchmark; importing it puts the repository on sys.path
import paper_table

import common_flags  # noqa: E402
import folders  # noqa: E402
import mnist_m  # noqa: E402
import monitor  # noqa: E402
import run_folder  # noqa: E402

FLAGS = flags.FLAGS
MODES = ("source_only", "dann")
NUM_CLASSES = 10  # digits


def link_small_split(data_dir, split_dir, num_source, num_target, seed=0):
    """split_dir/source/<class>/ with `num_source` of data_dir/train's source images
    and split_dir/target/ with `num_target` of its target images, flat (unlabelled),
    drawn with `seed`; returns split_dir. Kept when already there."""
    if os.path.isdir(split_dir):
        return split_dir
    train = folders.scan_split(os.path.join(data_dir, "train"))
    draw = random.Random(seed)
    temporary = f"{split_dir}.tmp"
    for domain, count in (("source", num_source), ("target", num_target)):
        files = getattr(train, domain)
        for index in sorted(draw.sample(range(len(files)), count)):
            path = files.paths[index]
            folder = os.path.join(temporary, domain)
            name = os.path.basename(path)
            if domain == "source":
                folder = os.path.join(folder, train.class_names[files.labels[index]])
            else:  # unlabelled: the class goes into no folder and no name
                name = f"{index:06d}{os.path.splitext(path)[1]}"
            os.makedirs(folder, exist_ok=True)
            os.link(path, os.path.join(folder, name))
    os.replace(temporary, split_dir)
    return split_dir


def train_and_watch(split_dir, model_dir, mode, seed, num_epochs):
    """Trains one run; returns its per-epoch signals and the warnings train.py
    printed, read from its log."""
    paper_table.run_commands(model_dir, [[
        "train.py", f"--train_dir={split_dir}", f"--model_dir={model_dir}",
        f"--mode={mode}", f"--seed={seed}", f"--num_epochs={num_epochs}",
        "--overwrite"]])
    with open(os.path.join(model_dir, run_folder.HISTORY_JSON)) as handle:
        history = json.load(handle)
    with open(f"{model_dir}.log") as handle:
        warnings = [line.split("warning: ", 1)[1].strip() for line in handle
                    if line.startswith("warning: ")]
    keys = ("monitor_domain_accuracy", "monitor_top_class_share", "domain_accuracy")
    return {"warnings": warnings,
            "warned": sorted(monitor.health_warnings(history, num_epochs, mode,
                                                     NUM_CLASSES)),
            **{f"{key}_per_epoch": [round(row[key], 4) for row in history]
               for key in keys}}


def markdown(record):
    lines = [f"{record['num_source']:,} labelled source digits (MNIST), "
             f"{record['num_target']:,} unlabelled target digits (MNIST-M-style), "
             f"{record['num_epochs']} epochs, the paper's recipe; target test accuracy "
             f"on the full test split, read after training.", "",
             "| run | domain accuracy (monitor) per epoch | warnings | target test "
             "accuracy |", "| --- | --- | --- | --- |"]
    for name, run in record["runs"].items():
        epochs = ", ".join(f"{value:.2f}"
                           for value in run["monitor_domain_accuracy_per_epoch"])
        lines.append(f"| {name} | {epochs} | {', '.join(run['warned']) or 'none'} | "
                     f"{run['target_test_accuracy']:.4f} |")
    lines += [""] + [f"Mean target test accuracy, {mode}: {record['mean'][mode]:.4f} "
                     f"+- {record['std'][mode]:.4f}" for mode in MODES]
    lines += ["", f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} "
              f"cores; {record['wall_seconds'] / 60:.0f} minutes."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    started = time.perf_counter()
    if not os.path.isdir(FLAGS.data_dir):
        mnist_m.build_mnist_mnistm(FLAGS.data_dir, cache_dir=common_flags.CACHE_DIR)
    split_dir = link_small_split(FLAGS.data_dir, os.path.join(FLAGS.runs_dir, "train"),
                                 FLAGS.num_source, FLAGS.num_target)
    runs = {}
    for seed in range(FLAGS.seeds):
        for mode in MODES:
            model_dir = os.path.join(FLAGS.runs_dir, f"{mode}-seed{seed}")
            print(f"{mode} seed {seed}: training into {model_dir}", flush=True)
            runs[f"{mode}-seed{seed}"] = train_and_watch(split_dir, model_dir, mode, seed,
                                                         FLAGS.num_epochs)
    # Only now, every run trained and its warnings recorded, the target test labels.
    test_dir = os.path.join(FLAGS.data_dir, "test")
    for name, run in runs.items():
        run["target_test_accuracy"] = paper_table.target_test_accuracy(
            os.path.join(FLAGS.runs_dir, name), test_dir)
    accuracies = {mode: [run["target_test_accuracy"] for name, run in runs.items()
                         if name.startswith(f"{mode}-")] for mode in MODES}
    record = {"num_source": FLAGS.num_source, "num_target": FLAGS.num_target,
              "num_epochs": FLAGS.num_epochs, "runs": runs,
              "mean": {mode: float(np.mean(values)) for mode, values in accuracies.items()},
              "std": {mode: float(np.std(values)) for mode, values in accuracies.items()},
              "data": os.path.relpath(FLAGS.data_dir, bench.REPO),
              "machine": bench.machine(), "versions": bench.versions(),
              "commit": paper_table.commit(), "wall_seconds": time.perf_counter() - started}
    paper_table.write_results(FLAGS.output_prefix, record, markdown(record))


if __name__ == "__main__":
    flags.DEFINE_integer("seeds", 3, "Seeds per mode (0, 1, ...).")
    flags.DEFINE_integer("num_epochs", 15, "Training epochs of every run.")
    flags.DEFINE_integer("num_source", 10_000, "Labelled source digits to train on.")
    flags.DEFINE_integer("num_target", 1_200, "Unlabelled target digits to train on.")
    flags.DEFINE_string("data_dir", common_flags.DEFAULT_DATA_DIR,
                        "MNIST -> MNIST-M folders (built here first if missing).")
    flags.DEFINE_string("runs_dir", os.path.join(bench.REPO, "runs", "small_target"),
                        "Where the small split and the runs are written.")
    flags.DEFINE_string("output_prefix", os.path.join(bench.REPO, "benchmarks",
                                                      "small_target"),
                        "Writes PREFIX.json and PREFIX.md.")
    app.run(main)

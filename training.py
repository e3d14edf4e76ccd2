"""One training run, as train.py asks for it: data in, a complete run folder out.

The run folder's file names live here, for train.py, eval.py and the benchmarks.
"""

import csv
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import time

import keras
from absl import logging

import common_flags
import data_utils
import models
import plots
from file_utils import DiskFull, UserError, save_atomically, write_atomically

FINAL_MODEL = "model.keras"
FLAGS_FILE = "flags.txt"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
CURVES_PNG = "train_curves.png"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.keras$")
REPORT_FILE = "eval_report.json"
TSNE_FILE = "tsne.png"
EVAL_FILES = (REPORT_FILE, "confusion_source.png", "confusion_target.png", TSNE_FILE)
# All a run writes: --overwrite removes it all, leaving no report of the old model.
RUN_FILES = (FINAL_MODEL, FLAGS_FILE, CHECKPOINT_DIR, HISTORY_CSV, HISTORY_JSON,
             CURVES_PNG, "logs", *EVAL_FILES)

TrainConfig = common_flags.config_class("TrainConfig", common_flags.TRAIN)
TrainConfig.__doc__ = """Everything a training run depends on: train.py's flags, with
their defaults, checked by the same rules when built in code."""


def image_shape(config):
    """(height, width, channels) of the images a run trains on."""
    return (config.img_height, config.img_width, 3 if config.img_mode == "rgb" else 1)


def checkpoint_path(model_dir, step):
    return os.path.join(model_dir, CHECKPOINT_DIR, f"ckpt-{step:08d}.keras")


def latest_checkpoint(model_dir):
    """The checkpoint of `model_dir` with the highest step, or None."""
    folder = os.path.join(model_dir, CHECKPOINT_DIR)
    found = [(int(match.group(1)), os.path.join(folder, match.group(0)))
             for match in map(CHECKPOINT_PATTERN.match,
                              os.listdir(folder) if os.path.isdir(folder) else [])
             if match]
    return max(found)[1] if found else None


def save_model_atomically(model, path):
    """Saves a `.keras` file (weights, optimiser state, step) through a temporary name."""
    save_atomically(path, model.save)


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Saves the model with its optimiser state every `every` epochs and at the end."""

    def __init__(self, model_dir, every, num_epochs):
        super().__init__()
        self.model_dir, self.every, self.num_epochs = model_dir, every, num_epochs

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0 or epoch + 1 == self.num_epochs:
            step = int(self.model.optimizer.iterations.numpy())
            save_model_atomically(self.model, checkpoint_path(self.model_dir, step))


class HistoryWriter(keras.callbacks.Callback):
    """Rewrites history.csv/json (and the curves at the end) after every epoch."""

    def __init__(self, model_dir, rows, run_started):
        super().__init__()
        self.model_dir, self.rows, self.run_started = model_dir, rows, run_started

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1}
        row.update({key: float(value) for key, value in (logs or {}).items()})
        now = time.perf_counter()
        row["epoch_seconds"] = now - self.started
        # From the start of this process's run: loading, decoding and tracing included.
        row["run_seconds"] = now - self.run_started
        self.rows.append(row)
        write_history(self.model_dir, self.rows)

    def on_train_end(self, logs=None):
        if self.rows:
            plots.training_curves(self.rows, os.path.join(self.model_dir, CURVES_PNG))


def write_history(model_dir, rows):
    keys = ["epoch"] + sorted({key for row in rows for key in row} - {"epoch"})

    def write_csv(handle):
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

    write_atomically(os.path.join(model_dir, HISTORY_CSV), write_csv)
    write_atomically(os.path.join(model_dir, HISTORY_JSON),
                     lambda handle: json.dump(rows, handle, indent=1))


def read_history(model_dir, up_to_epoch):
    """History rows of a run being resumed, up to the epoch it resumes after."""
    path = os.path.join(model_dir, HISTORY_JSON)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [row for row in json.load(handle) if row["epoch"] <= up_to_epoch]


def holds_run(model_dir):
    return os.path.isdir(model_dir) and any(
        os.path.exists(os.path.join(model_dir, name)) for name in RUN_FILES)


def check_model_dir(config):
    """Refuses an unusable --model_dir before anything is loaded or written."""
    model_dir = config.model_dir
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise UserError(f"--model_dir {model_dir} is a file: pass a folder")
    if holds_run(model_dir) and not (config.restore_model or config.overwrite):
        raise UserError(
            f"{model_dir} already holds a run: pass --restore_model to resume it, "
            "--overwrite to replace it, or another --model_dir")
    existing = os.path.abspath(model_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(
            f"cannot create --model_dir {model_dir} ({existing} is not a writable "
            "folder): pass a writable folder")


def prepare_model_dir(config):
    """Makes the run folder; with --overwrite, first removes the run it held."""
    if holds_run(config.model_dir) and not config.restore_model:
        for name in RUN_FILES:
            path = os.path.join(config.model_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(os.path.join(config.model_dir, CHECKPOINT_DIR), exist_ok=True)


@dataclasses.dataclass
class TrainingData:
    """The scanned training split, its decoded domains and the optional validation."""
    train: data_utils.SplitFiles
    source: object
    target: object
    validation: object = None
    validation_steps: int = None
    splits: list = dataclasses.field(default_factory=list)


def load_split(split_dir, config, class_names=None):
    """Scans a split and returns (SplitFiles, source and target `decoded_batches`)."""
    split = data_utils.scan_split(split_dir, class_names)
    if split.ignored_files:
        logging.info("%s: ignored %d files that are not images", split_dir,
                     split.ignored_files)
    shape = image_shape(config)
    if config.skip_bad_images:
        split, dropped = data_utils.without_unreadable(split, shape[2])
        logging.info("%s: skipped %d unreadable images", split_dir, dropped)
    return (split, data_utils.decoded_batches(split.source, shape[:2], shape[2]),
            data_utils.decoded_batches(split.target, shape[:2], shape[2]))


def load_data(config):
    """The training split and, with --val_dir, the validation stream."""
    data = TrainingData(*load_split(config.train_dir, config))
    data.splits.append(data.train)
    if config.val_dir:
        val, source, target = load_split(config.val_dir, config, data.train.class_names)
        data.splits.append(val)
        batch_size = config.batch_size * 4
        data.validation = data_utils.evaluation_dataset(source, target, batch_size)
        data.validation_steps = -(-(len(val.source) + len(val.target)) // batch_size)
    return data


def new_model(config, data, total_steps):
    """A compiled DANN whose input normalisation is the training images' channel mean."""
    mean = models.channel_mean(images for domain in (data.source, data.target)
                               for images, _ in domain)
    return models.build_dann(
        image_shape(config), len(data.train.class_names), mean, config.mode,
        total_steps, config.lr, config.momentum, config.lr_alpha, config.lr_beta,
        config.gamma, data.train.class_names)


def restore(config, total_steps):
    """Loads the latest checkpoint of the run being resumed."""
    path = latest_checkpoint(config.model_dir)
    if path is None:
        raise UserError(
            f"--restore_model: {config.model_dir} has no checkpoint in {CHECKPOINT_DIR}/: "
            "train without --restore_model first")
    model = keras.saving.load_model(path)
    saved_steps = model.total_steps
    if saved_steps != total_steps or model.mode != config.mode:
        raise UserError(
            f"{path} belongs to a {model.mode} run of {saved_steps} steps, but these "
            f"flags ask for a {config.mode} run of {total_steps} steps: resume with the "
            f"flags in {os.path.join(config.model_dir, FLAGS_FILE)}")
    logging.info("Resuming from %s at step %d", path, int(model.optimizer.iterations))
    return model


class TrainingStopped(Exception):
    """Training stopped before its end; the message says where and what was kept."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class StopGuard(keras.callbacks.Callback):
    """Stops cleanly on SIGINT/SIGTERM (saving a checkpoint first) or a non-finite loss.

    The signal handlers only set a flag; the check runs between two steps, where the
    model and optimiser are consistent, so the checkpoint resumes exactly.
    """

    def __init__(self, model_dir):
        super().__init__()
        self.model_dir, self.received, self.epoch, self.previous_handlers = (
            model_dir, None, 0, {})

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame):
        del frame
        self.received = signum

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            kept = latest_checkpoint(self.model_dir) or "none yet"
            raise TrainingStopped(
                f"the loss became {loss} at epoch {self.epoch}, step {step}: training "
                f"stopped; the last good checkpoint is {kept}. Try a lower --lr", 1)
        if self.received is not None:
            path = checkpoint_path(self.model_dir, step)
            save_model_atomically(self.model, path)
            name = signal.Signals(self.received).name
            raise TrainingStopped(
                f"{name} at epoch {self.epoch}, step {step}: saved {path}; continue "
                f"with the same flags plus --restore_model", 128 + self.received)


def run(config, verbose=1, flags_file_text=None):
    """Trains one model as `config` says and writes its run folder.

    Args:
        config: a `TrainConfig`.
        verbose: Keras's progress output: 1 a live bar, 2 a line per epoch, 0 none.
        flags_file_text: the run's flags, saved as flags.txt when a run starts.

    Returns:
        The per-epoch history rows (dicts) of the whole run, resumed epochs included.

    Raises:
        UserError: bad input (folders, flags that do not match a resumed run), or a
            full disk (`DiskFull`).
        TrainingStopped: a signal or a non-finite loss stopped training.
    """
    run_started = time.perf_counter()
    check_model_dir(config)
    keras.utils.set_random_seed(config.seed)
    data = load_data(config)
    steps = data_utils.steps_per_epoch(len(data.train.source), len(data.train.target),
                                       config.batch_size)
    try:
        with data_utils.naming_unreadable(data.splits, image_shape(config)[2]):
            if config.restore_model:
                model = restore(config, steps * config.num_epochs)
            else:
                model = new_model(config, data, steps * config.num_epochs)
            # The data and the model are sound: only now is an old run replaced.
            prepare_model_dir(config)
            if flags_file_text and not config.restore_model:
                write_atomically(os.path.join(config.model_dir, FLAGS_FILE),
                                 lambda handle: handle.write(flags_file_text))
            history = fit(model, config, data, steps, run_started, verbose)
        save_model_atomically(model, os.path.join(config.model_dir, FINAL_MODEL))
    except DiskFull as error:
        raise said_what_was_kept(error, config.model_dir) from None
    return history


def said_what_was_kept(error, model_dir):
    """A `DiskFull` during training, completed with the checkpoint it left to resume."""
    kept = latest_checkpoint(model_dir)
    if kept is None:
        return DiskFull(error.path, f"{error.kept}; no checkpoint was kept",
                        "free some space and run again with --overwrite")
    return DiskFull(error.path, f"{error.kept}; the latest checkpoint kept is {kept}",
                    "free some space and continue with --restore_model")


def fit(model, config, data, steps, run_started, verbose):
    """Trains from the model's current step to the end of the run; returns the history."""
    done_steps = int(model.optimizer.iterations.numpy())
    labelled = "target" if config.mode == "target_only" else "source"
    history = read_history(config.model_dir, done_steps // steps)
    with StopGuard(config.model_dir) as guard:
        callbacks = [
            guard, models.ScheduleLogger(),
            PeriodicCheckpoint(config.model_dir, config.log_rate, config.num_epochs),
            HistoryWriter(config.model_dir, history, run_started),
            keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs")),
        ]
        for epoch, epochs, epoch_steps in epoch_segments(done_steps, steps,
                                                         config.num_epochs):
            set_steps_per_execution(model, epoch_steps, config.steps_per_execution)
            batches = data_utils.training_dataset(
                (data.source, len(data.train.source)),
                (data.target, len(data.train.target)), labelled, config.batch_size,
                config.seed, skip_steps=epoch * steps + steps - epoch_steps)
            model.fit(batches, epochs=epochs, steps_per_epoch=epoch_steps,
                      initial_epoch=epoch, validation_data=data.validation,
                      validation_steps=data.validation_steps, callbacks=callbacks,
                      verbose=verbose, shuffle=False)
    return history


def set_steps_per_execution(model, epoch_steps, requested):
    """Runs the largest number of steps per call, up to `requested`, dividing an epoch.

    Keras rounds an epoch up to whole calls, so a value that does not divide the
    epoch's steps would train extra steps and change the result.
    """
    chosen = max(n for n in range(1, requested + 1) if epoch_steps % n == 0)
    if chosen != model.steps_per_execution:
        model.steps_per_execution = chosen
        model.make_train_function(force=True)
    logging.info("%d steps per epoch, %d steps per compiled call", epoch_steps, chosen)


def epoch_segments(done_steps, steps, num_epochs):
    """The `fit` calls that finish a run: (initial epoch, epochs, steps per epoch).

    A run stopped inside an epoch first finishes that epoch's remaining steps.
    """
    epoch, offset = divmod(done_steps, steps)
    segments = []
    if offset:
        segments.append((epoch, epoch + 1, steps - offset))
        epoch += 1
    if epoch < num_epochs:
        segments.append((epoch, num_epochs, steps))
    return segments

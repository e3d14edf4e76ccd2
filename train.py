"""Trains DANN (or a source-only / target-only baseline) on two-domain image folders.

    python train.py --train_dir DATA/train --val_dir DATA/test --model_dir runs/dann
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import csv  # noqa: E402  (TensorFlow's log level must be set before it loads)
import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags, logging  # noqa: E402

import common_flags  # noqa: E402
import data_utils  # noqa: E402
import models  # noqa: E402
import plots  # noqa: E402

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common_flags)

FINAL_MODEL = "model.keras"
FLAGS_FILE = "flags.txt"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
CURVES_PNG = "train_curves.png"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.keras$")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on.

    The flags map onto it one to one, and their defaults in common_flags.py are its
    defaults.
    """

    train_dir: str
    model_dir: str
    val_dir: str = None
    mode: str = FLAGS["mode"].default
    num_epochs: int = FLAGS["num_epochs"].default
    batch_size: int = FLAGS["batch_size"].default
    lr: float = FLAGS["lr"].default
    momentum: float = FLAGS["momentum"].default
    lr_alpha: float = FLAGS["lr_alpha"].default
    lr_beta: float = FLAGS["lr_beta"].default
    gamma: float = FLAGS["gamma"].default
    img_width: int = FLAGS["img_width"].default
    img_height: int = FLAGS["img_height"].default
    img_mode: str = FLAGS["img_mode"].default
    seed: int = FLAGS["seed"].default
    log_rate: int = FLAGS["log_rate"].default
    restore_model: bool = False
    overwrite: bool = False
    skip_bad_images: bool = False
    steps_per_execution: int = FLAGS["steps_per_execution"].default
    verbose: int = 1

    @property
    def image_size(self):
        return (self.img_height, self.img_width)

    @property
    def channels(self):
        return 3 if self.img_mode == "rgb" else 1


def checkpoint_path(model_dir, step):
    return os.path.join(model_dir, CHECKPOINT_DIR, f"ckpt-{step:08d}.keras")


def latest_checkpoint(model_dir):
    """The checkpoint of `model_dir` with the highest step, or None."""
    found = []
    for path in glob.glob(os.path.join(model_dir, CHECKPOINT_DIR, "ckpt-*.keras")):
        match = CHECKPOINT_PATTERN.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def save_model_atomically(model, path):
    """Saves a `.keras` file (weights, optimiser state, step) through a temporary name."""
    data_utils.save_atomically(path, model.save)


class PeriodicCheckpoint(models.keras.callbacks.Callback):
    """Saves the model with its optimiser state every `every` epochs and at the end."""

    def __init__(self, model_dir, every, num_epochs):
        super().__init__()
        self.model_dir, self.every, self.num_epochs = model_dir, every, num_epochs

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0 or epoch + 1 == self.num_epochs:
            step = int(self.model.optimizer.iterations.numpy())
            save_model_atomically(self.model, checkpoint_path(self.model_dir, step))


class HistoryWriter(models.keras.callbacks.Callback):
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

    data_utils.write_atomically(os.path.join(model_dir, HISTORY_CSV), write_csv)
    data_utils.write_atomically(os.path.join(model_dir, HISTORY_JSON),
                                lambda handle: json.dump(rows, handle, indent=1))


def read_history(model_dir, up_to_epoch):
    """History rows of a run being resumed, up to the epoch it resumes after."""
    path = os.path.join(model_dir, HISTORY_JSON)
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [row for row in json.load(handle) if row["epoch"] <= up_to_epoch]


RUN_FILES = (FINAL_MODEL, FLAGS_FILE, CHECKPOINT_DIR, HISTORY_CSV, HISTORY_JSON,
             CURVES_PNG, "logs")


def holds_run(model_dir):
    return os.path.isdir(model_dir) and any(
        os.path.exists(os.path.join(model_dir, name)) for name in RUN_FILES)


def check_model_dir(config):
    """Refuses an unusable --model_dir before anything is loaded or written."""
    model_dir = config.model_dir
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise data_utils.UserError(f"--model_dir {model_dir} is a file: pass a folder")
    if holds_run(model_dir) and not (config.restore_model or config.overwrite):
        raise data_utils.UserError(
            f"{model_dir} already holds a run: pass --restore_model to resume it, "
            "--overwrite to replace it, or another --model_dir")
    existing = os.path.abspath(model_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise data_utils.UserError(
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


def load_split(split_dir, config, class_names=None):
    """Scans a split and returns (SplitFiles, source and target `decoded_batches`)."""
    split = data_utils.scan_split(split_dir, class_names)
    if split.ignored_files:
        logging.info("%s: ignored %d files that are not images", split_dir,
                     split.ignored_files)
    if config.skip_bad_images:
        split, dropped = data_utils.without_unreadable(split, config.channels)
        logging.info("%s: skipped %d unreadable images", split_dir, dropped)
    source = data_utils.decoded_batches(split.source, config.image_size, config.channels)
    target = data_utils.decoded_batches(split.target, config.image_size, config.channels)
    return split, source, target


def restore(config, total_steps):
    """Loads the latest checkpoint of the run being resumed."""
    path = latest_checkpoint(config.model_dir)
    if path is None:
        raise data_utils.UserError(
            f"--restore_model: {config.model_dir} has no checkpoint in {CHECKPOINT_DIR}/: "
            "train without --restore_model first")
    model = models.keras.saving.load_model(path)
    saved_steps = model.total_steps
    if saved_steps != total_steps or model.mode != config.mode:
        raise data_utils.UserError(
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


class StopGuard(models.keras.callbacks.Callback):
    """Stops cleanly on SIGINT/SIGTERM (saving a checkpoint first) or a non-finite loss.

    The signal handlers only set a flag; the check runs between two steps, where the
    model and optimiser are consistent, so the checkpoint resumes exactly.
    """

    def __init__(self, model_dir):
        super().__init__()
        self.model_dir = model_dir
        self.received = None
        self.epoch = 0
        self.previous_handlers = {}

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


def run(config, flags_file_text=None):
    """Trains one model as `config` says and writes its run folder.

    Args:
        config: a `TrainConfig`.
        flags_file_text: the run's flags, saved as flags.txt when a run starts.

    Returns:
        The per-epoch history rows (dicts) of the whole run, resumed epochs included.

    Raises:
        UserError: bad input (folders, flags that do not match a resumed run).
        TrainingStopped: a signal or a non-finite loss stopped training.
    """
    run_started = time.perf_counter()
    check_model_dir(config)
    models.keras.utils.set_random_seed(config.seed)
    train, source, target = load_split(config.train_dir, config)
    splits, validation = [train], None
    if config.val_dir:
        val, val_source, val_target = load_split(config.val_dir, config,
                                                 train.class_names)
        splits.append(val)
        validation = data_utils.evaluation_dataset(val_source, val_target,
                                                   config.batch_size * 4)
    steps = data_utils.steps_per_epoch(len(train.source), len(train.target),
                                       config.batch_size)
    total_steps = steps * config.num_epochs
    with data_utils.naming_unreadable(splits, config.channels):
        if config.restore_model:
            model = restore(config, total_steps)
        else:
            mean = models.channel_mean(
                images for data in (source, target) for images, _ in data)
            model = models.build_dann(
                (*config.image_size, config.channels), len(train.class_names), mean,
                config.mode, total_steps, config.lr, config.momentum, config.lr_alpha,
                config.lr_beta, config.gamma, train.class_names)
        # The data and the model are sound: only now is an old run replaced.
        prepare_model_dir(config)
        if flags_file_text and not config.restore_model:
            data_utils.write_atomically(os.path.join(config.model_dir, FLAGS_FILE),
                                        lambda handle: handle.write(flags_file_text))
        done_steps = int(model.optimizer.iterations.numpy())
        labelled = "target" if config.mode == "target_only" else "source"

        def batches(skip_steps):
            return data_utils.training_dataset(
                (source, len(train.source)), (target, len(train.target)), labelled,
                config.batch_size, config.seed, skip_steps)

        history = read_history(config.model_dir, done_steps // steps)
        with StopGuard(config.model_dir) as guard:
            callbacks = [
                guard,
                models.ScheduleLogger(),
                PeriodicCheckpoint(config.model_dir, config.log_rate, config.num_epochs),
                HistoryWriter(config.model_dir, history, run_started),
                models.keras.callbacks.TensorBoard(
                    os.path.join(config.model_dir, "logs")),
            ]
            for epoch, epochs, epoch_steps in epoch_segments(done_steps, steps,
                                                             config.num_epochs):
                set_steps_per_execution(model, epoch_steps, config.steps_per_execution)
                model.fit(batches(epoch * steps + steps - epoch_steps), epochs=epochs,
                          steps_per_epoch=epoch_steps, initial_epoch=epoch,
                          validation_data=validation, callbacks=callbacks,
                          verbose=config.verbose, shuffle=False)
    save_model_atomically(model, os.path.join(config.model_dir, FINAL_MODEL))
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


def config_from_flags():
    names = {field.name for field in dataclasses.fields(TrainConfig)} - {"verbose"}
    # Keras's live progress bar on a terminal; one line per epoch in a log file.
    verbose = 1 if sys.stdout.isatty() else 2
    return TrainConfig(verbose=verbose, **{name: FLAGS[name].value for name in names})


def flags_text():
    """The flags of this run as `--flagfile` lines (resume and overwrite left out)."""
    lines = (FLAGS[flag.name].serialize()
             for flag in FLAGS.get_flags_for_module(common_flags)
             if flag.name not in ("restore_model", "overwrite"))
    return "".join(f"{line}\n" for line in sorted(lines) if line)


def build_default_data_if_missing():
    """Builds MNIST -> MNIST-M in the default data folder when training on it."""
    default_train = os.path.join(common_flags.DEFAULT_DATA_DIR, "train")
    if FLAGS.train_dir != default_train or os.path.exists(common_flags.DEFAULT_DATA_DIR):
        return
    print(f"No data set in {common_flags.DEFAULT_DATA_DIR}: building MNIST -> MNIST-M "
          "there first (python data_utils.py).")
    data_utils.build_mnist_mnistm(
        common_flags.DEFAULT_DATA_DIR, FLAGS.mnist_path, FLAGS.mnistm_path,
        FLAGS.backgrounds, FLAGS.num_train, FLAGS.num_test, seed=0,
        binarize=FLAGS.binarize, cache_dir=common_flags.CACHE_DIR)


def main(argv):
    del argv
    config = config_from_flags()
    try:
        build_default_data_if_missing()
        history = run(config, flags_text())
    except data_utils.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    summary = ", ".join(f"{key} {value:.4f}" for key, value in sorted(history[-1].items())
                        if key != "epoch")
    print(f"Trained {config.mode} for {config.num_epochs} epochs into "
          f"{config.model_dir}: {summary}")


if __name__ == "__main__":
    app.run(main)

"""One training run, as train.py asks for it: data in, a complete run folder out."""

import dataclasses
import functools
import os
import tempfile
import time

import keras
from absl import logging

import cache
import common_flags
import data_utils
import distribute
import models
import monitor
import networks
import plots
import run_folder
from file_utils import DiskFull, UserError, write_atomically
from run_folder import checkpoint_path, latest_checkpoint
# Callers catch these as training's: a run stops with them.
from stopping import (SignalsRecorded, StopGuard, TrainingStopped,  # noqa: F401
                      save_model_atomically)

TrainConfig = common_flags.TrainConfig


def image_shape(config):
    """(height, width, channels) of the images a run trains on; a size of 0 is the
    model's own."""
    default = networks.DEFAULT_IMAGE_SIZE[config.model]
    return (config.img_height or default, config.img_width or default,
            3 if config.img_mode == "rgb" else 1)


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
    """Rewrites history.csv/json (and the curves at the end) after every epoch.

    A row's `steps` are the optimiser steps its metrics cover: fewer than an epoch's
    in the row of an epoch a run resumed inside.
    """

    def __init__(self, model_dir, rows, run_started):
        super().__init__()
        self.model_dir, self.rows, self.run_started = model_dir, rows, run_started
        # A resumed run's clock goes on from the time its kept epochs had taken.
        self.earlier_seconds = rows[-1]["run_seconds"] if rows else 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()
        self.first_step = int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1}
        row.update({key: float(value) for key, value in (logs or {}).items()})
        row["steps"] = int(self.model.optimizer.iterations.numpy()) - self.first_step
        now = time.perf_counter()
        row["epoch_seconds"] = now - self.started
        # Loading, decoding and tracing included.
        row["run_seconds"] = self.earlier_seconds + now - self.run_started
        self.rows.append(row)
        run_folder.write_history(self.model_dir, self.rows)

    def on_train_end(self, logs=None):
        if self.rows:
            plots.training_curves(self.rows,
                                  os.path.join(self.model_dir, run_folder.CURVES_PNG))


def new_model(config, data, total_steps):
    """A compiled DANN; a digit network's input normalisation is the training images'
    channel mean."""
    return models.dann_from_recipe(
        dataclasses.asdict(config), image_shape(config), len(data.train.class_names),
        models.input_mean(config.model, (data.source, data.target)), total_steps,
        data.train.class_names)


def restore(config, total_steps):
    """Loads the latest checkpoint of the run being resumed."""
    path = latest_checkpoint(config.model_dir)
    if path is None:
        raise UserError(
            f"--restore_model: {config.model_dir} has no checkpoint to resume from: "
            "train without --restore_model, with --overwrite if the folder holds a run")
    model = keras.saving.load_model(path)
    saved = (model.network, model.mode, model.total_steps, model.precision)
    wanted = (config.model, config.mode, total_steps, config.precision)
    if saved != wanted:
        describe = "a {} {} run of {} steps in {}".format
        raise UserError(
            f"{path} belongs to {describe(*saved)}, but these flags ask for "
            f"{describe(*wanted)}: resume with --flagfile="
            f"{os.path.join(config.model_dir, run_folder.FLAGS_FILE)} "
            f"--model_dir={config.model_dir} --restore_model")
    logging.info("Resuming from %s at step %d", path,
                 int(model.optimizer.iterations.numpy()))
    return model


def run(config, verbose=1, flags_file_text=None, strategy=None, callbacks=()):
    """Trains one model as `config` says and writes its run folder.

    Args:
        config: a `TrainConfig`.
        verbose: Keras's progress output: 1 a live bar, 2 a line per epoch, 0 none.
        flags_file_text: the run's flags, saved as flags.txt when a run starts.
        strategy: a `tf.distribute` strategy to train under instead of the one
            --distribute chooses.
        callbacks: Keras callbacks that see each epoch's logs once it is recorded
            (the health signals included); one that sets `model.stop_training` ends
            the run there, as a finished run of fewer epochs.

    Returns:
        The per-epoch history rows (dicts) of the whole run, resumed epochs included.

    Raises:
        UserError: bad input (folders, flags that do not match a resumed run), or a
            full disk (`DiskFull`).
        TrainingStopped: a signal or a non-finite loss stopped training.
    """
    run_started = time.perf_counter()
    networks.check(config.model, image_shape(config), config.weights)
    strategy = strategy or distribute.choose(config.distribute)[0]
    distribute.check_batch_size(config.batch_size, strategy)
    if config.val_dir and distribute.is_multi_worker(strategy):
        raise UserError("--val_dir is not evaluated with --distribute=multi_worker: "
                        "leave it out and evaluate the run with eval.py")
    try:
        if not distribute.is_chief(strategy):
            return train_as_worker(config, strategy, run_started)
        return train_as_chief(config, verbose, flags_file_text, strategy, run_started,
                              callbacks)
    except distribute.LOST_WORKER_ERRORS as error:
        raise TrainingStopped(
            f"another worker stopped or cannot be reached ({type(error).__name__}): "
            "see the other workers' logs; start all workers again with "
            "--restore_model to continue from the chief's last checkpoint", 1) from None


def train_as_chief(config, verbose, flags_file_text, strategy, run_started,
                   callbacks=()):
    """The run on one machine, or the chief of a multi-worker run: writes the folder."""
    run_folder.check(config.model_dir, config.restore_model, config.overwrite)
    build_default_data_if_missing(config.train_dir)
    with run_folder.owned(config.model_dir):
        # Again: another process may have written the folder since the check.
        run_folder.refuse_an_old_run(config.model_dir, config.restore_model,
                                     config.overwrite)
        keras.utils.set_random_seed(config.seed)
        disk_dir = os.path.join(config.model_dir, run_folder.DECODED_CACHE_DIR)
        shape = image_shape(config)
        data = cache.load_data(config, shape, disk_dir, monitor.MONITOR_IMAGES)
        try:
            with data_utils.naming_unreadable(data_utils.file_groups(data.splits),
                                              shape[2]):
                with strategy.scope():
                    model, steps = build_or_restore(config, data)
                # The data and the model are sound: only now is an old run replaced.
                run_folder.prepare(config.model_dir, config.restore_model)
                if flags_file_text and not config.restore_model:
                    write_atomically(os.path.join(config.model_dir, run_folder.FLAGS_FILE),
                                     lambda handle: handle.write(flags_file_text))
                history = fit(model, config, data, steps, run_started, verbose, strategy,
                              extra_callbacks=callbacks)
            save_model_atomically(model, os.path.join(config.model_dir,
                                                      run_folder.FINAL_MODEL))
        except DiskFull as error:
            raise said_what_was_kept(error, config.model_dir) from None
    return history


def build_default_data_if_missing(train_dir):
    """Builds MNIST -> MNIST-M in the default data folder when training on it."""
    default = common_flags.DEFAULT_DATA_DIR
    if train_dir != os.path.join(default, "train") or os.path.exists(default):
        return
    import mnist_m

    logging.info("No data set in %s: building MNIST -> MNIST-M there first "
                 "(python mnist_m.py)", default)
    mnist_m.build_mnist_mnistm(default, cache_dir=common_flags.CACHE_DIR)


def train_as_worker(config, strategy, run_started):
    """A multi-worker run on a worker other than the chief: every step, nothing written
    in the run folder (--cache disk decodes into a temporary folder of this machine).

    A resumed run reads the chief's checkpoint: --model_dir must be the same folder
    (a shared file system) or a copy of it.
    """
    keras.utils.set_random_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="dann-decoded-") as disk_dir:
        data = cache.load_data(config, image_shape(config), disk_dir,
                               monitor.MONITOR_IMAGES)
        with strategy.scope():
            model, steps = build_or_restore(config, data)
        return fit(model, config, data, steps, run_started, 0, strategy, writes=False)


def build_or_restore(config, data):
    """The model to train (new, or the resumed run's) and the steps of an epoch."""
    steps = data_utils.steps_per_epoch(len(data.train.source), len(data.train.target),
                                       config.batch_size)
    if config.restore_model:
        return restore(config, steps * config.num_epochs), steps
    return new_model(config, data, steps * config.num_epochs), steps


def said_what_was_kept(error, model_dir):
    """A `DiskFull` during training, completed with the checkpoint it left to resume."""
    kept = latest_checkpoint(model_dir)
    if kept is None:
        return DiskFull(error.path, f"{error.kept}; no checkpoint was kept",
                        "free some space and run again with --overwrite")
    return DiskFull(error.path, f"{error.kept}; the latest checkpoint kept is {kept}",
                    "free some space and continue with --restore_model")


def fit(model, config, data, steps, run_started, verbose, strategy, writes=True,
        extra_callbacks=()):
    """Trains from the model's current step to the end of the run (or an epoch where
    a callback stops it); returns the history.

    Without `writes` (a multi-worker run's other workers), nothing is written.
    """
    done_steps = int(model.optimizer.iterations.numpy())
    labelled = "target" if config.mode == "target_only" else "source"
    history = run_folder.read_history(config.model_dir, done_steps // steps) \
        if writes else []
    with StopGuard(config.model_dir if writes else None, steps) as guard:
        # The guard last: an epoch is recorded before a stop at its end.
        callbacks = [*(recording_callbacks(config, data, history, run_started,
                                           extra_callbacks) if writes else []), guard]
        for epoch, epochs, epoch_steps in epoch_segments(done_steps, steps,
                                                         config.num_epochs):
            per_call = set_steps_per_execution(
                model, epoch_steps,
                distribute.steps_per_call(config.steps_per_execution, strategy))
            logging.info("%s, %d steps per compiled call", f"epoch {epoch + 1} resumes "
                         f"for its last {epoch_steps} of {steps} steps"
                         if epoch_steps < steps else f"{steps} steps per epoch", per_call)
            batches = functools.partial(
                data_utils.training_dataset, data.source, data.target, labelled,
                config.batch_size, config.seed,
                skip_steps=epoch * steps + steps - epoch_steps, augment=config.augment)
            if distribute.is_multi_worker(strategy):
                distribute.fit_multi_worker(model, strategy, batches(), config.batch_size,
                                            (epoch, epochs), epoch_steps, callbacks,
                                            verbose)
            else:
                model.fit(distribute.for_keras_fit(batches, strategy), epochs=epochs,
                          steps_per_epoch=epoch_steps, initial_epoch=epoch,
                          callbacks=callbacks, verbose=verbose, shuffle=False)
            if model.stop_training:
                break
    return history


def recording_callbacks(config, data, history, run_started, extra_callbacks):
    """The callbacks that write a run's epochs: schedules, health signals,
    checkpoints, history, TensorBoard, then the caller's."""
    return [models.ScheduleLogger(),
            monitor.HealthMonitor(data.monitored, data.val is not None, history,
                                  config.num_epochs, config.mode),
            PeriodicCheckpoint(config.model_dir, config.log_rate, config.num_epochs),
            HistoryWriter(config.model_dir, history, run_started),
            keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs")),
            *extra_callbacks]


def set_steps_per_execution(model, epoch_steps, requested):
    """Runs the largest number of steps per call, up to `requested`, dividing an epoch;
    returns that number.

    Keras rounds an epoch up to whole calls, so a value that does not divide the
    epoch's steps would train extra steps and change the result.
    """
    chosen = max(n for n in range(1, requested + 1) if epoch_steps % n == 0)
    if chosen != model.steps_per_execution:
        model.steps_per_execution = chosen
        model.make_train_function(force=True)
    return chosen


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

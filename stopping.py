"""Stopping a training run cleanly: on Ctrl-C or SIGTERM (saving a checkpoint first,
so that --restore_model resumes exactly), on a non-finite loss, or where a caller's
rule says so (`TrainingStopped`)."""

import math
import os
import signal

import keras

from file_utils import save_atomically
from run_folder import checkpoint_path, latest_checkpoint


def save_model_atomically(model, path):
    """Saves a `.keras` file (weights, optimiser state, step) through a temporary name."""
    save_atomically(path, model.save)


class TrainingStopped(Exception):
    """Training stopped before its end; the message says where and what was kept
    (`where`), then how train.py continues it (`advice`)."""

    def __init__(self, where, exit_code, advice=""):
        super().__init__(f"{where}; {advice}" if advice else where)
        self.where, self.exit_code = where, exit_code


class SignalsRecorded:
    """While active, SIGINT and SIGTERM are recorded (`received`) instead of raising
    KeyboardInterrupt, which a finaliser running at that moment would swallow; a
    `StopGuard` entered meanwhile stops at its first step on a recorded signal."""
    active, received = False, None

    def __enter__(self):
        SignalsRecorded.active, SignalsRecorded.received = True, None
        self.previous_handlers = {signum: signal.signal(signum, self.record)
                                  for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        SignalsRecorded.active, SignalsRecorded.received = False, None
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    @staticmethod
    def record(signum, frame=None):
        """A signal handler: records `signum` while a SignalsRecorded is active."""
        del frame
        if SignalsRecorded.active:
            SignalsRecorded.received = signum


class StopGuard(keras.callbacks.Callback):
    """Stops cleanly on SIGINT/SIGTERM (saving a checkpoint first) or a non-finite loss.

    The signal handlers only set a flag; the check runs between two steps, where the
    model and optimiser are consistent, so the checkpoint resumes exactly. A signal
    that comes at an epoch's last step stops at the epoch's end, after the callbacks
    before this one (the history among them) have written that epoch.
    """

    def __init__(self, model_dir, steps_per_epoch):
        super().__init__()
        self.model_dir, self.steps_per_epoch = model_dir, steps_per_epoch
        self.received, self.epoch, self.previous_handlers = None, 0, {}

    def __enter__(self):
        self.received = SignalsRecorded.received
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame):
        del frame
        self.received = signum
        SignalsRecorded.record(signum)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            kept = self.model_dir and latest_checkpoint(self.model_dir)
            raise TrainingStopped(
                f"the loss became {loss} at epoch {self.epoch}, step {step}: training "
                "stopped; " + (f"the last good checkpoint is {kept}" if kept else
                               "no checkpoint had been saved yet"), 1,
                "try a lower --lr")
        if self.received is not None and step % self.steps_per_epoch:
            self._stop(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.received is not None:
            self._stop(int(self.model.optimizer.iterations.numpy()))

    def _stop(self, step):
        name = signal.Signals(self.received).name
        if self.model_dir is None:  # a worker that writes nothing
            raise TrainingStopped(f"{name} at epoch {self.epoch}, step {step}: stopped; "
                                  "the chief keeps the run's checkpoints",
                                  128 + self.received)
        path = checkpoint_path(self.model_dir, step)
        if not os.path.exists(path):
            save_model_atomically(self.model, path)
        raise TrainingStopped(f"{name} at epoch {self.epoch}, step {step}: saved {path}",
                              128 + self.received,
                              "continue with the same flags plus --restore_model")

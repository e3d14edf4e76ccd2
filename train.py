"""Trains DANN (or a source-only / target-only baseline) on two-domain image folders.

    python train.py --train_dir DATA/train --val_dir DATA/val --model_dir runs/mine

With no flags it trains on MNIST -> MNIST-M (`training.run` builds that data set first
if needed). The flags are checked before TensorFlow loads; `training.run` does the work.
"""

import os
import sys

from absl import app, flags

import common_flags
import file_utils

FLAGS = flags.FLAGS
common_flags.define(common_flags.TRAIN)
flags.adopt_module_key_flags(common_flags)


def main(argv):
    del argv
    with file_utils.without_start_up_notes():
        import training
    for name in ("train_dir", "val_dir", "model_dir"):  # so flags.txt replays anywhere
        if FLAGS[name].value:
            FLAGS[name].value = os.path.abspath(FLAGS[name].value)
    config = training.TrainConfig(**common_flags.values(common_flags.TRAIN))
    # Keras's live progress bar on a terminal; one line per epoch in a log file.
    verbose = 1 if sys.stdout.isatty() else 2
    try:
        strategy, _ = training.distribute.choose(config.distribute)
        history = training.run(config, verbose,
                               common_flags.flags_text(common_flags.TRAIN), strategy)
    except file_utils.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except training.TrainingStopped as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    if not training.distribute.is_chief(strategy):
        print(f"Trained {config.mode} for {config.num_epochs} epochs as a worker; the "
              f"chief wrote the run into {config.model_dir}")
        return
    print(f"Trained {config.mode} for {file_utils.plural(len(history), 'epoch')} into "
          f"{config.model_dir}: {summary_of(history[-1])}")
    num_classes = training.run_folder.saved_config(
        os.path.join(config.model_dir, training.run_folder.FINAL_MODEL))["num_classes"]
    warnings = training.monitor.health_warnings(history, config.num_epochs, config.mode,
                                                num_classes)
    if warnings:
        names = ", ".join(training.monitor.WARNING_NAMES[kind] for kind in warnings)
        print(f"{len(warnings)} warning{'s' if len(warnings) > 1 else ''} above ({names}): "
              f"{training.monitor.README_SECTION}")


def summary_of(row):
    """The last epoch's figures in words: steps as a count, times in seconds."""
    def shown(key, value):
        if key == "steps":
            return f"{int(value)} steps"
        if key.endswith("seconds"):
            return f"{key} {value:.1f} s"
        return f"{key} {value:.4f}"
    return ", ".join(shown(key, value) for key, value in sorted(row.items())
                     if key != "epoch")


if __name__ == "__main__":
    app.run(main, flags_parser=common_flags.parse_or_exit)

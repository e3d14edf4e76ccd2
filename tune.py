"""Chooses a recipe, and a method, for an unlabelled target: a study of ordinary
runs, each scored on a validation split without target labels.

    python tune.py --train_dir D/train --val_dir D/val --study_dir runs/tune --trials 16

Optuna proposes lr, gamma and the epochs (common_flags.SEARCH_SPACE), and the method
where --methods names several, steered by --objective; any other train.py flag passes
to every trial. Source-only and the default DANN recipe are always trials.

The rule that chooses (study_dir/best, choice.txt): keep source-only, unless an
adapted trial (DANN or another method) beats it on val by every sign readable without
target labels: its target predictions are more confident (a higher target_entropy),
its source images weighted toward the target are classified better (a higher dev),
its source accuracy is at most 2 points below source-only's, and its target images
are no more piled onto one class (at most 10 points more given the most given class).
Of the trials that qualify, the best by both scores (their rank sum) is chosen. On
six digit shifts, two seeds each, it never chose below source-only, where choosing by
snd alone lost up to 10.9 points (benchmarks/shifts.md). A trial whose source task
was not learned or whose target predictions collapsed is ruled out, after any epoch
that shows it.

Ctrl-C stops it; the same command continues. Several processes, on one machine or
several (--storage), can run trials of one study. The flags are checked before
TensorFlow loads; `tuning.run` does the work.
"""

import sys

from absl import app, flags

import common_flags
import file_utils

FLAGS = flags.FLAGS
common_flags.define({**common_flags.TUNE, **common_flags.TRIAL})
flags.adopt_module_key_flags(common_flags)


def main(argv):
    del argv
    with file_utils.without_start_up_notes():
        import tuning
    tune = common_flags.values(common_flags.TUNE)
    settings = {**common_flags.values(common_flags.TRIAL),
                "train_dir": tune.pop("train_dir"), "val_dir": tune.pop("val_dir")}
    try:
        rows = tuning.run(settings, verbose=1 if sys.stdout.isatty() else 2, **tune)
    except file_utils.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (tuning.training.TrainingStopped, KeyboardInterrupt) as stop:
        print(f"stopped: {getattr(stop, 'where', 'Ctrl-C')}; run the same command again "
              "to continue (an unfinished trial resumes from its latest checkpoint)",
              file=sys.stderr)
        sys.exit(getattr(stop, "exit_code", 130))
    print("\n".join(tuning.leaderboard(rows, tune["objective"])))
    chosen = tuning.choosing.choose(rows)[0]
    print(f"Wrote {tune['study_dir']}/trials.csv, trials.png, choice.txt; " + (
        f"{tune['study_dir']}/best links to the chosen trial, {chosen['run']}" if chosen
        else "no best link: no trial was chosen"))


def parse_flags(argv):
    """common_flags.parse_or_exit, after refusing in words a flag tune.py searches
    (absl would call it unknown)."""
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("-") and name in (*common_flags.SEARCH_SPACE, "mode"):
            print(f"error: --{name} is searched by tune.py ("
                  + ("common_flags.SEARCH_SPACE" if name != "mode" else "--methods")
                  + "): leave it out", file=sys.stderr)
            sys.exit(2)
    return common_flags.parse_or_exit(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""Choosing a recipe for an unlabelled target: a study of ordinary runs, each scored
on a validation split without target labels. Optuna is the engine: its samplers
propose the trials, its storage (study_store.py) holds the study, so any number of
processes, on one machine or several, can work on one study and a stopped study
continues where it stopped.

Every trial is a run folder (`study_dir/trial_0007/`) that train.py wrote and eval.py
scored on the validation split with `--label_free`. The study always holds two
baselines, enqueued when it is created: `--mode source_only` and DANN with the
default recipe, scored the same way. A trial the rules rule out (`ruled_out`,
`ruled_out_early`) is pruned, after its last epoch or as soon as an epoch shows it.
"""

import csv
import dataclasses
import functools
import os
import signal
import time

import keras
import optuna
from absl import logging

import choosing
import common_flags
import evaluation
import file_utils
import plots
import run_folder
import study_store
import training
from file_utils import UserError, write_atomically
from monitor import COLLAPSE_SHARE
from study_store import BEST_LINK, CHOICE, FIGURE, TRIALS_CSV

SEARCH_SPACE = common_flags.SEARCH_SPACE
OBJECTIVES = common_flags.TUNE["objective"].choices
# A trial is ruled out (not ranked) when the source task was not learned or its
# target predictions collapsed onto one class; a collapsed model is confident, so
# entropy-like scores would rank it high.
SOURCE_ACCURACY_FLOOR = 0.5
# The same rules after each epoch (on the --val_dir signals): from this epoch on, a
# source accuracy below the floor stops a trial; in the run's second half, a collapse.
EARLY_FROM_EPOCH = 3
# The per-epoch signal (history.csv) each objective is reported to Optuna as.
EPOCH_SIGNALS = {"snd": "monitor_snd", "target_entropy": "monitor_target_entropy",
                 "source_accuracy": "val_source_accuracy"}
WAIT_S = 10  # between two looks at other processes' running trials


class NotNeeded(Exception):
    """Other processes have already started every trial the study asks for."""


def suggest(trial, methods=("dann",)):
    """The searched flags of `trial`, drawn as SEARCH_SPACE says, and its mode: a
    baseline's or a retried trial's own, else one of `methods` (drawn where several)."""
    values = {}
    for name, (kind, *space) in SEARCH_SPACE.items():
        if kind == "choice":
            values[name] = trial.suggest_categorical(name, list(space[0]))
        else:
            values[name] = trial.suggest_float(name, *space, log=True)
    values["mode"] = trial.user_attrs.get("mode") or (
        trial.suggest_categorical("mode", list(methods)) if len(methods) > 1
        else methods[0])
    return values


def top_share(counts):
    """The share of images given the most given class, from {class: count}."""
    return max(counts.values()) / sum(counts.values())


def ruled_out(scores):
    """Why a trial is not ranked (the rule in SOURCE_ACCURACY_FLOOR, COLLAPSE_SHARE),
    or None."""
    if scores["source_accuracy"] < SOURCE_ACCURACY_FLOOR:
        return (f"source accuracy {scores['source_accuracy']:.3f} on val is below "
                f"{SOURCE_ACCURACY_FLOOR}: the source task was not learned")
    share = scores["target_top_share"]
    if share >= COLLAPSE_SHARE:
        return f"{share:.0%} of the val target images were given one class: collapsed"
    return None


def ruled_out_early(row, num_epochs):
    """Why the history row of an epoch already rules a trial out (the rules of
    `ruled_out` on the epoch's val signals, from EARLY_FROM_EPOCH; a collapse in the
    second half of the run), or None."""
    epoch, when = row["epoch"], f" (at epoch {row['epoch']} of {num_epochs})"
    accuracy = row.get("val_source_accuracy", 1.0)
    share = row.get("monitor_top_class_share", 0.0)
    if epoch >= EARLY_FROM_EPOCH and accuracy < SOURCE_ACCURACY_FLOOR:
        return ruled_out({"source_accuracy": accuracy, "target_top_share": 0.0}) + when
    if epoch > num_epochs / 2 and share >= COLLAPSE_SHARE:
        return ruled_out({"source_accuracy": 1.0, "target_top_share": share}) + when
    return None


class RulesEveryEpoch(keras.callbacks.Callback):
    """Reports each epoch's val signal of the objective to Optuna, and stops the
    trial at the first epoch `ruled_out_early` rules it out (`reason`)."""

    def __init__(self, trial, objective, num_epochs):
        super().__init__()
        self.trial, self.signal, self.num_epochs = (trial, EPOCH_SIGNALS[objective],
                                                    num_epochs)
        self.reason = None

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch + 1, **(logs or {})}
        if self.signal in row:
            self.trial.report(float(row[self.signal]), epoch + 1)
        self.reason = ruled_out_early(row, self.num_epochs)
        if self.reason:
            self.model.stop_training = True


def trial_config(trial, settings, study_dir, methods=("dann",)):
    """The `TrainConfig` of one trial: `settings` (train.py's flags that pass
    through), its searched flags and mode, its own run folder (a retried trial's, to
    resume from its latest checkpoint)."""
    model_dir = trial.user_attrs.get("model_dir") or os.path.join(
        study_dir, f"trial_{trial.number:04d}")
    resume = run_folder.latest_checkpoint(model_dir) is not None
    values = suggest(trial, methods)
    trial.set_user_attr("model_dir", model_dir)
    trial.set_user_attr("mode", values["mode"])
    return training.TrainConfig(**{**settings, **values, "model_dir": model_dir,
                                   "restore_model": resume, "overwrite": not resume})


def objective_function(settings, study_dir, objective, n_trials, verbose, methods):
    """The function Optuna maximises: trains a trial's run, scores it on val."""
    def run_trial(trial):
        started = study_trials(trial.study, (optuna.trial.TrialState.COMPLETE,
                                             optuna.trial.TrialState.PRUNED,
                                             optuna.trial.TrialState.RUNNING))
        if len(started) > n_trials:
            trial.study.stop()
            raise NotNeeded()
        if training.SignalsRecorded.received:  # Ctrl-C after the last trial ended
            name = signal.Signals(training.SignalsRecorded.received).name
            raise training.TrainingStopped(f"{name} between two trials",
                                           128 + training.SignalsRecorded.received)
        config = trial_config(trial, settings, study_dir, methods)
        logging.info("trial %d%s: %s %s into %s", number_of(trial),
                     " resumes" if config.restore_model else "", config.mode,
                     {name: getattr(config, name) for name in SEARCH_SPACE},
                     config.model_dir)
        rules = RulesEveryEpoch(trial, objective, config.num_epochs)
        try:
            training.run(config, verbose, common_flags.flags_text_of(
                dataclasses.asdict(config), common_flags.TRAIN), callbacks=[rules])
        except training.TrainingStopped as stop:
            if stop.exit_code != 1:  # a signal: the study stops, the trial resumes
                raise
            rules.reason = str(stop)  # the loss became NaN
        if rules.reason:
            trial.set_user_attr("ruled_out", rules.reason)
            raise optuna.TrialPruned(rules.reason)
        report = evaluation.run(config.model_dir, config.val_dir, label_free=True)
        # Not a score (higher is not better): the rules read it beside the scores.
        scores = {**report["label_free_scores"], "target_top_share": top_share(
            report["predicted_counts"]["target"])}
        trial.set_user_attr("scores", scores)
        reason = ruled_out(scores)
        if reason:
            trial.set_user_attr("ruled_out", reason)
            raise optuna.TrialPruned(reason)
        return scores[objective]
    return run_trial


def study_trials(study, states):
    return study.get_trials(deepcopy=False, states=states)


def number_of(trial):
    """A trial's number as users see it: its run folder's (a stopped trial that
    resumed keeps its folder and number)."""
    folder = os.path.basename(trial.user_attrs.get("model_dir", ""))
    return int(folder[len("trial_"):]) if folder.startswith("trial_") else trial.number


def trial_rows(study, objective):
    """One dict per trial (per run folder: a stopped trial that resumed is one row),
    for trials.csv and the leaderboard, in the order of their numbers."""
    trials = study.get_trials(deepcopy=False)
    resumed = {trial.user_attrs.get("retry_of") for trial in trials}
    rows = []
    for trial in trials:
        if "model_dir" not in trial.user_attrs or trial.number in resumed:
            continue  # not started (waiting, or not needed), or continued by another
        stopped = trial.state == optuna.trial.TrialState.FAIL
        scores = trial.user_attrs.get("scores", {})
        rows.append({
            "trial": number_of(trial), "state": "stopped" if stopped else
            trial.state.name.lower(), "mode": trial.user_attrs.get("mode", "dann"),
            **{name: value for name, value in trial.params.items() if name != "mode"},
            "score": trial.value, **{f"val_{name}": value for name, value
                                     in scores.items()},
            "seconds": (trial.duration.total_seconds() if trial.duration else None),
            "ruled_out": trial.user_attrs.get("ruled_out", ""),
            "run": trial.user_attrs.get("model_dir", "")})
    return sorted(rows, key=lambda row: row["trial"])


def point_best_link(study_dir, row):
    """study_dir/best: a link to the chosen trial's run folder, replaced atomically;
    removed while no trial is chosen (`row` None)."""
    link = os.path.join(study_dir, BEST_LINK)
    if row is None:
        if os.path.islink(link):
            os.remove(link)
        return
    temporary = f"{link}.tmp-{os.getpid()}"  # other processes replace it too
    if os.path.lexists(temporary):
        os.remove(temporary)
    os.symlink(os.path.relpath(row["run"], study_dir), temporary)
    os.replace(temporary, link)


def write_outputs(study, study_dir, objective):
    """trials.csv, trials.png, choice.txt (the leaderboard) and the `best` link to
    the trial `choosing.choose` picks; returns the trial rows."""
    rows = trial_rows(study, objective)
    keys = list(dict.fromkeys(key for row in rows for key in row))

    def write(handle):
        writer = csv.DictWriter(handle, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    write_atomically(os.path.join(study_dir, TRIALS_CSV), write)
    log_ranges = {name: tuple(space) if kind == "log_float" else None
                  for name, (kind, *space) in SEARCH_SPACE.items()}
    chosen = choosing.choose(rows)[0]
    plots.tuning_figure(rows, log_ranges, objective, os.path.join(study_dir, FIGURE),
                        chosen)
    write_atomically(os.path.join(study_dir, CHOICE), lambda handle: handle.write(
        "\n".join(leaderboard(rows, objective)) + "\n"))
    point_best_link(study_dir, chosen)
    return rows


def after_trial(study, trial, study_dir, objective):
    """Logs how a trial ended and rewrites the study's outputs."""
    if "model_dir" in trial.user_attrs:
        ended = (f"{objective} {trial.value:.4f}" if trial.value is not None else
                 trial.user_attrs.get("ruled_out", trial.state.name.lower()))
        logging.info("trial %d ended: %s", number_of(trial), ended)
    write_outputs(study, study_dir, objective)


def wait_for_others(study):
    """Waits while other processes run trials of the study, so that the outputs
    written last hold their results; a process that died is noticed by its missed
    heartbeats (a database storage; a journal has none). Ctrl-C stops waiting."""
    told = False
    while True:
        study_store.fail_stale_trials(study)
        running = study_trials(study, (optuna.trial.TrialState.RUNNING,))
        if not running or training.SignalsRecorded.received:
            return
        if not told:
            file_utils.tell("note", "waiting for trial(s) " + ", ".join(
                str(number_of(trial)) for trial in running) + ", which other processes "
                "run (Ctrl-C stops waiting; the same command reads their results later)")
            told = True
        time.sleep(WAIT_S)


def check_settings(settings):
    """Refuses settings without a validation split, or that set a searched flag."""
    if not settings.get("val_dir"):
        raise UserError("--val_dir is needed: every trial is scored on it, without "
                        "target labels")
    for name in (*SEARCH_SPACE, "mode"):
        if name in settings:
            raise UserError(f"--{name} is searched by tune.py (common_flags.SEARCH_SPACE"
                            f"{'' if name in SEARCH_SPACE else '; --methods'}): leave it "
                            "out, or take it out of the search space")


def run(settings, study_dir, trials=16, sampler="tpe", objective="snd", storage=None,
        sampler_seed=0, verbose=2, methods="dann"):
    """Runs trials of the study in `study_dir` (or `storage`) until it holds `trials`
    finished ones, counting those other processes run; writes its outputs.

    Args:
        settings: train.py's flags for every trial: `common_flags.TRIAL`'s,
            `train_dir` and `val_dir` (the split every trial is scored on).
        objective, methods: tune.py's --objective and --methods (comma-separated).

    Returns:
        The trial rows (dicts), as trials.csv holds them.

    Raises:
        UserError: bad input, as train.py and eval.py refuse it, or a storage that
            cannot be opened or holds a study of other settings.
        training.TrainingStopped, KeyboardInterrupt: a signal stopped a trial (its
            checkpoint is kept); the same call continues it.
    """
    check_settings(settings)
    # Optuna's own line per trial (and its warning for a surplus trial that another
    # process made unnecessary) give way to `after_trial`'s.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    methods = tuple(methods.split(","))
    study = study_store.prepare_study(study_dir, storage, objective, sampler,
                                      sampler_seed, methods)
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    try:
        with training.SignalsRecorded():
            if len(study_trials(study, counted)) < trials:
                study.optimize(objective_function(settings, study_dir, objective, trials,
                                                  verbose, methods),
                               callbacks=[optuna.study.MaxTrialsCallback(
                                   trials, states=counted), functools.partial(
                                       after_trial, study_dir=study_dir,
                                       objective=objective)], catch=(NotNeeded,))
            wait_for_others(study)
    finally:
        rows = write_outputs(study, study_dir, objective)
    return rows


def leaderboard(rows, objective, top=10):
    """The lines tune.py prints: the `top` trials best first by the objective, and the
    chosen one (marked `*`) wherever it ranks, the ruled-out ones, and the choice in
    the rule's words."""
    chosen, reason = choosing.choose(rows)
    ranked = sorted(choosing.completed(rows), key=lambda row: -row["score"])
    lines = [f"  {'trial':>5} {'mode':<11} {'lr':>7} {'gamma':>6} {'epochs':>6} "
             f"{'snd':>7} {'target_entropy':>14} {'dev':>8} {'val source acc':>14}"]
    shown = ranked[:top] + [row for row in ranked[top:] if row is chosen]
    for row in shown:
        mark = "*" if row is chosen else " "
        lines.append(f"{mark} {row['trial']:>5} {row['mode']:<11} {row['lr']:>7.4f} "
                     f"{row['gamma']:>6.2f} {row['num_epochs']:>6} {row['val_snd']:>7.4f} "
                     f"{row['val_target_entropy']:>14.4f} {row['val_dev']:>8.4f} "
                     f"{row['val_source_accuracy']:>14.4f}")
    lines += [f"trial {row['trial']} ruled out: {row['ruled_out']}" for row in rows
              if row["ruled_out"]]
    lines += [f"trial {row['trial']} stopped before its end: the same command continues "
              "it from its latest checkpoint" for row in rows if row["state"] == "stopped"]
    if chosen is None:
        return lines + [
            f"Nothing chosen: none of the {len(rows)} trials was scored (the reasons "
            "above). Where the source task was not learned, check train/source and "
            "val/source; where predictions collapsed, get more target images; then "
            "run the same command with a larger --trials."]
    return lines + [f"The rule {reason}."]

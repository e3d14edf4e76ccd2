"""Choosing a recipe for an unlabelled target: a study of ordinary runs, each scored
on a validation split without target labels. Optuna is the engine: its samplers
propose the trials, its storage (SQLite, or a database several machines share) holds
the study, so any number of processes can work on one study and a stopped study
continues where it stopped.

Every trial is a run folder (`study_dir/trial_0007/`) that train.py wrote and eval.py
scored on the validation split with `--label_free`. The study always holds two
baselines, enqueued when it is created: `--mode source_only` and DANN with the
default recipe, scored the same way.
"""

import contextlib
import csv
import dataclasses
import os
import signal
import time
import warnings

import optuna
import sqlalchemy
from absl import logging

import choosing
import common_flags
import evaluation
import plots
import run_folder
import training
from file_utils import UserError, refuse_foreign_files, write_atomically
from monitor import COLLAPSE_SHARE

SEARCH_SPACE, GRID = common_flags.SEARCH_SPACE, common_flags.GRID
DEFAULT_RECIPE = {"lr": 0.01, "gamma": 10.0, "num_epochs": 20}
OBJECTIVES = common_flags.TUNE["objective"].choices
# A trial is ruled out (not ranked) when the source task was not learned or its
# target predictions collapsed onto one class; a collapsed model is confident, so
# entropy-like scores would rank it high.
SOURCE_ACCURACY_FLOOR = 0.5
HEARTBEAT_S, GRACE_S = 60, 180  # a trial whose process died is retried after this
STUDY_NAME = "dann"
TRIALS_CSV, FIGURE, BEST_LINK, STUDY_DB, CHOICE = (
    "trials.csv", "trials.png", "best", "study.db", "choice.txt")
STUDY_LOCK = ".study.lock"


class NotNeeded(Exception):
    """Other processes have already started every trial the study asks for."""


def storage_of(url, study_dir, attempts=5):
    """The Optuna storage of `url` (default: SQLite in `study_dir`), with heartbeats
    so that a trial whose process died is found and retried.

    Processes that start together race to create the database's tables; the loser
    tries again.
    """
    url = url or f"sqlite:///{os.path.abspath(os.path.join(study_dir, STUDY_DB))}"
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # heartbeats: "experimental" in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S)
        except Exception as error:  # SQLAlchemy's many types for a bad URL or server
            racing = isinstance(error, (sqlalchemy.exc.IntegrityError,
                                        sqlalchemy.exc.OperationalError))
            if racing and attempt + 1 < attempts:
                time.sleep(1)
                continue
            raise UserError(
                f"--storage {url}: cannot open it ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}): pass a database URL Optuna "
                "accepts, such as sqlite:///study.db or "
                "postgresql://user:password@host/db") from None


def sampler_of(name, seed, methods=("dann",)):
    """The Optuna sampler --sampler names, seeded; a grid holds every method."""
    if name == "grid":
        grid = {key: list(values) for key, values in GRID.items()}
        if len(methods) > 1:
            grid["mode"] = list(methods)
        return optuna.samplers.GridSampler(grid, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(storage, objective, methods=("dann",)):
    """Loads the study, or creates it with its two baselines enqueued first (only the
    process that creates it enqueues them); refuses a study of another objective or
    other methods. Returns the study and whether this process created it."""
    settings = {"objective": objective, "methods": ",".join(methods)}
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except KeyError:  # no such study yet
        try:
            study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                        direction="maximize")
        except optuna.exceptions.DuplicatedStudyError:  # another process was first
            return open_study(storage, objective, methods)
        for name, value in settings.items():
            study.set_user_attr(name, value)
        for mode in ("source_only", "dann"):
            study.enqueue_trial(DEFAULT_RECIPE, user_attrs={"mode": mode})
        return study, True
    for name, value in settings.items():
        recorded = study.user_attrs.get(name, "dann" if name == "methods" else value)
        if recorded != value:
            raise UserError(f"the study in this storage has --{name} {recorded}, not "
                            f"{value}: pass --{name} {recorded}, or another "
                            "--study_dir or --storage for a new study")
    return study, False


@contextlib.contextmanager
def study_lock(study_dir):
    """One process of this machine at a time in the block. SQLite has no row locks:
    two processes drawing a trial at the same moment could both draw the same queued
    one, or both queue the same retry. (Across machines, PostgreSQL's or MySQL's row
    locks do this.)"""
    with open(os.path.join(study_dir, STUDY_LOCK), "a") as handle:
        if run_folder.fcntl:
            run_folder.fcntl.flock(handle, run_folder.fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def drawing_alone(study, study_dir):
    """`study`, whose `ask` (through which `study.optimize` draws every trial) now
    holds the study lock."""
    ask = study.ask

    def ask_alone(*args, **kwargs):
        with study_lock(study_dir):
            return ask(*args, **kwargs)

    study.ask = ask_alone
    return study


def retry_stopped(study):
    """Enqueues, once, a trial that stopped unfinished (Ctrl-C, a crash): the same
    recipe into the same run folder, which resumes from its latest checkpoint."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retried = {trial.user_attrs.get("retry_of") for trial in trials}
    for trial in trials:
        if (trial.state == optuna.trial.TrialState.FAIL and "model_dir" in
                trial.user_attrs and trial.number not in retried):
            study.enqueue_trial(trial.params, user_attrs={
                "mode": trial.user_attrs.get("mode", "dann"), "retry_of": trial.number,
                "model_dir": trial.user_attrs["model_dir"]})


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
        retry_of = trial.user_attrs.get("retry_of")
        logging.info("trial %d%s: %s %s into %s", trial.number,
                     "" if retry_of is None else f" (trial {retry_of} again, resumed)",
                     config.mode, {name: getattr(config, name) for name in SEARCH_SPACE},
                     config.model_dir)
        try:
            training.run(config, verbose, common_flags.flags_text_of(
                dataclasses.asdict(config), common_flags.TRAIN))
        except training.TrainingStopped as stop:
            if stop.exit_code != 1:  # a signal: the study stops, the trial resumes
                raise
            trial.set_user_attr("ruled_out", str(stop))  # the loss became NaN
            raise optuna.TrialPruned(str(stop)) from None
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


def trial_rows(study, objective):
    """One dict per trial, for trials.csv and the leaderboard."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if "model_dir" not in trial.user_attrs:
            continue  # not started: waiting, or not needed
        scores = trial.user_attrs.get("scores", {})
        rows.append({
            "trial": trial.number, "state": trial.state.name.lower(),
            "mode": trial.user_attrs.get("mode", "dann"), **trial.params,
            "score": trial.value, **{f"val_{name}": value for name, value
                                     in scores.items()},
            "seconds": (trial.duration.total_seconds() if trial.duration else None),
            "ruled_out": trial.user_attrs.get("ruled_out", ""),
            "run": trial.user_attrs.get("model_dir", "")})
    return rows


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
        logging.info("trial %d ended: %s", trial.number, ended)
    write_outputs(study, study_dir, objective)


def check_settings(settings):
    """Refuses settings without a validation split, or that set a searched flag."""
    if not settings.get("val_dir"):
        raise UserError("--val_dir is needed: every trial is scored on it, without "
                        "target labels")
    for name in SEARCH_SPACE:
        default = common_flags.TRAIN[name].default
        if settings.get(name, default) != default:
            raise UserError(f"--{name} is searched by tune.py (common_flags.SEARCH_SPACE): "
                            "leave it out, or take it out of the search space")


def prepare_study(study_dir, storage, objective, sampler, sampler_seed,
                  methods=("dann",)):
    """The study, opened or created, with its sampler and its stopped trials
    enqueued again."""
    refuse_foreign_files(study_dir, "--study_dir", (
        "trial_[0-9][0-9][0-9][0-9]", TRIALS_CSV, FIGURE, BEST_LINK, f"{BEST_LINK}.tmp-*",
        f"{STUDY_DB}*", CHOICE, STUDY_LOCK, ".tmp-*"))
    os.makedirs(study_dir, exist_ok=True)
    with study_lock(study_dir):
        study, created = open_study(storage_of(storage, study_dir), objective, methods)
        # Processes that join a study draw apart: the same seed would propose the same
        # trials in each.
        study.sampler = sampler_of(sampler, sampler_seed if created else
                                   sampler_seed + os.getpid(), methods)
        retry_stopped(study)
    return drawing_alone(study, study_dir)


def run(settings, study_dir, trials=16, sampler="tpe", objective="snd", storage=None,
        sampler_seed=0, verbose=2, methods="dann"):
    """Runs trials of the study in `study_dir` (or `storage`) until it holds `trials`
    finished ones, counting those other processes run; writes its outputs.

    Args:
        settings: train.py's flags for every trial: `common_flags.TRIAL`'s,
            `train_dir` and `val_dir` (the split every trial is scored on).
        objective: one of OBJECTIVES, the label-free score maximised.
        methods: the adapting modes searched, comma-separated (tune.py's --methods).

    Returns:
        The trial rows (dicts), as trials.csv holds them.

    Raises:
        UserError: bad input, as train.py and eval.py refuse it, or a storage that
            cannot be opened or holds a study of another objective.
        training.TrainingStopped, KeyboardInterrupt: a signal stopped a trial (its
            checkpoint is kept); the same call continues it.
    """
    check_settings(settings)
    # Optuna's own line per trial (and its warning for a surplus trial that another
    # process made unnecessary) give way to `after_trial`'s.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    methods = tuple(methods.split(","))
    study = prepare_study(study_dir, storage, objective, sampler, sampler_seed, methods)
    counted = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    try:
        if len(study_trials(study, counted)) < trials:
            with training.SignalsRecorded():
                study.optimize(
                    objective_function(settings, study_dir, objective, trials, verbose,
                                       methods),
                    callbacks=[optuna.study.MaxTrialsCallback(trials, states=counted),
                               lambda study, trial: after_trial(study, trial, study_dir,
                                                                objective)],
                    catch=(NotNeeded,))
    finally:
        rows = write_outputs(study, study_dir, objective)
    return rows


def leaderboard(rows, objective, top=10):
    """The lines tune.py prints: the trials best first by the objective (`*` marks
    the chosen one), the ruled-out ones, and the choice in the rule's words."""
    chosen, reason = choosing.choose(rows)
    ranked = sorted(choosing.completed(rows), key=lambda row: -row["score"])
    lines = [f"  {'trial':>5} {'mode':<11} {'lr':>7} {'gamma':>6} {'epochs':>6} "
             f"{'snd':>7} {'target_entropy':>14} {'val source acc':>14}"]
    for row in ranked[:top]:
        mark = "*" if row is chosen else " "
        lines.append(f"{mark} {row['trial']:>5} {row['mode']:<11} {row['lr']:>7.4f} "
                     f"{row['gamma']:>6.2f} {row['num_epochs']:>6} {row['val_snd']:>7.4f} "
                     f"{row['val_target_entropy']:>14.4f} "
                     f"{row['val_source_accuracy']:>14.4f}")
    lines += [f"trial {row['trial']} ruled out: {row['ruled_out']}" for row in rows
              if row["ruled_out"]]
    if chosen is None:
        return lines + [
            f"Nothing chosen: none of the {len(rows)} trials was scored (the reasons "
            "above). Where the source task was not learned, check train/source and "
            "val/source; where predictions collapsed, get more target images; then "
            "run the same command with a larger --trials."]
    return lines + [f"The rule {reason}."]

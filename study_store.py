"""Where a tune.py study lives, and how processes share it.

A study is an Optuna study in a storage: SQLite in the study folder by default (one
machine), a database server several machines reach (PostgreSQL, MySQL), or a journal
file in a folder several machines share (`journal:PATH`, no server). Its two
baselines are queued when it is created; a trial that stopped unfinished is queued
again, once, into its own run folder; processes of one machine draw trials one at a
time.
"""

import contextlib
import os
import time
import warnings

import optuna
import sqlalchemy

import run_folder
from common_flags import GRID
from file_utils import UserError, refuse_foreign_files

DEFAULT_RECIPE = {"lr": 0.01, "gamma": 10.0, "num_epochs": 20}
HEARTBEAT_S, GRACE_S = 60, 180  # a trial whose process died is retried after this
STUDY_NAME = "dann"
JOURNAL = "journal:"
TRIALS_CSV, FIGURE, BEST_LINK, STUDY_DB, CHOICE = (
    "trials.csv", "trials.png", "best", "study.db", "choice.txt")
STUDY_LOCK = ".study.lock"
# What tune.py writes in a study folder; anything else there is the user's.
OWN_FILES = ("trial_[0-9][0-9][0-9][0-9]", TRIALS_CSV, FIGURE, BEST_LINK,
             f"{BEST_LINK}.tmp-*", f"{STUDY_DB}*", CHOICE, STUDY_LOCK, ".tmp-*")


def journal_storage(path):
    """A journal-file storage at `path`: no server, for machines sharing a folder;
    without heartbeats (a trial whose process was killed is not retried)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--storage {JOURNAL}{path}: {folder} is not a folder: create "
                        "it on the folder the machines share, or pass another path")
    backend = optuna.storages.journal.JournalFileBackend(os.path.abspath(path))
    return optuna.storages.JournalStorage(backend)


def storage_of(url, study_dir, attempts=5):
    """The Optuna storage of `url`: `journal:PATH`, or a database URL (default:
    SQLite in `study_dir`) with heartbeats, so that a trial whose process died is
    found and retried.

    Processes that start together race to create a database's tables; the loser
    tries again.
    """
    if url and url.startswith(JOURNAL):
        return journal_storage(url[len(JOURNAL):])
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
            raise UserError(f"--storage {url}: cannot open it ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]}): "
                            f"{storage_hint(error)}") from None


def storage_hint(error):
    """What to do about a storage that did not open."""
    if isinstance(error, ModuleNotFoundError):
        return ("install the database's driver: for PostgreSQL, pip install -r "
                "requirements-postgresql.txt and a postgresql+psycopg://user:password"
                "@host/db URL")
    return ("pass a database URL Optuna accepts, such as sqlite:///study.db (one "
            "machine), postgresql+psycopg://user:password@host/db, or "
            f"{JOURNAL}/shared/folder/journal.log")


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
    one, or both queue the same retry. (Across machines, a database's row locks or
    the journal's file lock do this.)"""
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


def fail_stale_trials(study):
    """Marks failed the trials whose process stopped sending heartbeats (a storage
    with heartbeats only)."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retry_stopped(study):
    """Enqueues, once, a trial that stopped unfinished (Ctrl-C, a crash): the same
    recipe into the same run folder, which resumes from its latest checkpoint."""
    fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retried = {trial.user_attrs.get("retry_of") for trial in trials}
    for trial in trials:
        if (trial.state == optuna.trial.TrialState.FAIL and "model_dir" in
                trial.user_attrs and trial.number not in retried):
            study.enqueue_trial(trial.params, user_attrs={
                "mode": trial.user_attrs.get("mode", "dann"), "retry_of": trial.number,
                "model_dir": trial.user_attrs["model_dir"]})


def prepare_study(study_dir, storage, objective, sampler, sampler_seed,
                  methods=("dann",)):
    """The study, opened or created, with its sampler and its stopped trials
    enqueued again."""
    refuse_foreign_files(study_dir, "--study_dir", OWN_FILES)
    os.makedirs(study_dir, exist_ok=True)
    with study_lock(study_dir):
        study, created = open_study(storage_of(storage, study_dir), objective, methods)
        # Processes that join a study draw apart: the same seed would propose the same
        # trials in each.
        study.sampler = sampler_of(sampler, sampler_seed if created else
                                   sampler_seed + os.getpid(), methods)
        retry_stopped(study)
    return drawing_alone(study, study_dir)

"""A run folder (`--model_dir`): what a run writes there and under which names, its
checkpoints and history, and that one process at a time writes it.

Loads no TensorFlow: eval.py, the benchmarks and the tests read run folders with it.
"""

import contextlib
import csv
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import zipfile

from file_utils import UserError, write_atomically

try:
    import fcntl
except ImportError:  # Windows: runs there are not guarded against a second process.
    fcntl = None

FINAL_MODEL = "model.keras"
FLAGS_FILE = "flags.txt"
HISTORY_CSV = "history.csv"
HISTORY_JSON = "history.json"
CURVES_PNG = "train_curves.png"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^ckpt-(\d+)\.keras$")
LOCK_FILE = ".lock"
EVAL_DIR = "eval"
# What eval.py wrote into the run folder itself before it wrote into EVAL_DIR.
EVAL_PATTERNS = ("eval_report*.json", "confusion_*.png", "pr_*.png", "tsne*.png")
DECODED_CACHE_DIR = "decoded_cache"  # --cache disk
PREDICTIONS_CSV = "predictions.csv"  # predict.py's default --output
EXPORT_DIR = "export"  # export.py's default --output
RUN_FILES = (FINAL_MODEL, FLAGS_FILE, CHECKPOINT_DIR, HISTORY_CSV, HISTORY_JSON,
             CURVES_PNG, "logs", DECODED_CACHE_DIR, EVAL_DIR, PREDICTIONS_CSV,
             EXPORT_DIR)


def checkpoint_path(model_dir, step):
    return os.path.join(model_dir, CHECKPOINT_DIR, f"ckpt-{step:08d}.keras")


def checkpoints(model_dir):
    """(step, file name) of every checkpoint of `model_dir`, by step."""
    folder = os.path.join(model_dir, CHECKPOINT_DIR)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(match.group(1)), match.group(0))
                  for match in map(CHECKPOINT_PATTERN.match, names) if match)


def latest_checkpoint(model_dir):
    """The checkpoint of `model_dir` with the highest step, or None."""
    found = checkpoints(model_dir)
    return os.path.join(model_dir, CHECKPOINT_DIR, found[-1][1]) if found else None


def model_to_evaluate(model_dir, weights_fname=None):
    """The `.keras` file `--weights_fname` names: a path, a file in `model_dir` or in
    its checkpoints folder, or a checkpoint's step (`32`, `ckpt-32.keras`)."""
    if not weights_fname:
        return os.path.join(model_dir, FINAL_MODEL)
    step = re.fullmatch(r"(?:ckpt-)?(\d+)(?:\.keras)?", weights_fname)
    candidates = [weights_fname, os.path.join(model_dir, weights_fname),
                  os.path.join(model_dir, CHECKPOINT_DIR, weights_fname)]
    if step:
        candidates.append(checkpoint_path(model_dir, int(step.group(1))))
    found = next((path for path in candidates if os.path.isfile(path)), None)
    if found is None:
        saved = ", ".join(saved_models(model_dir)) or "no .keras file"
        raise UserError(f"--weights_fname {weights_fname}: no such model in {model_dir} "
                        f"(it holds {saved}): pass one of those, a checkpoint's step, "
                        "or the path of a .keras file")
    return found


def saved_models(model_dir):
    """The `.keras` files of a run that --weights_fname can name, final model first."""
    final = [FINAL_MODEL] if os.path.isfile(os.path.join(model_dir, FINAL_MODEL)) else []
    return final + [os.path.join(CHECKPOINT_DIR, name)
                    for _, name in checkpoints(model_dir)]


def eval_folder(model_dir, test_dir):
    """Where eval.py writes what it finds on the split `test_dir`:
    MODEL_DIR/eval/<the split folder's name>/, or, where that folder holds another
    split's evaluation (one of another data set's test/, say),
    MODEL_DIR/eval/<name>-<digest of the split's path>/."""
    split = os.path.abspath(test_dir)
    name = os.path.basename(split.rstrip(os.sep)) or "split"
    folder = os.path.join(model_dir, EVAL_DIR, name)
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "eval_report*.json"))):
        with open(path) as handle:
            if os.path.abspath(json.load(handle).get("test_dir", split)) != split:
                digest = hashlib.sha256(split.encode()).hexdigest()[:8]
                return f"{folder}-{digest}"
        break
    return folder


def eval_outputs(model_dir, model_path, test_dir):
    """Where eval.py writes its report and figures for the model at `model_path` on
    the split `test_dir` (in `eval_folder`).

    The final model's are eval_report.json, confusion_{source,target,domain}.png,
    pr_{source,target}.png and tsne.png; a checkpoint's carry its name
    (eval_report-ckpt-00000032.json, ...), so they never replace the final model's.
    """
    name = os.path.splitext(os.path.basename(model_path))[0]
    suffix = "" if os.path.abspath(model_path) == os.path.abspath(
        os.path.join(model_dir, FINAL_MODEL)) else f"-{name}"
    names = {"report": f"eval_report{suffix}.json", "tsne": f"tsne{suffix}.png",
             **{f"{kind}_{of}": f"{kind}_{of}{suffix}.png" for kind, of in (
                 ("confusion", "source"), ("confusion", "target"),
                 ("confusion", "domain"), ("pr", "source"), ("pr", "target"))}}
    folder = eval_folder(model_dir, test_dir)
    return {key: os.path.join(folder, value) for key, value in names.items()}


def report_path(model_dir, test_dir, model_path=None):
    """The eval report of the run's final model (or of `model_path`) on `test_dir`."""
    return eval_outputs(model_dir, model_path or os.path.join(model_dir, FINAL_MODEL),
                        test_dir)["report"]


def write_history(model_dir, rows):
    """Writes the per-epoch rows (dicts) as history.csv and history.json."""
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


def _written(model_dir):
    """The paths of everything a run and its evaluations wrote into `model_dir`."""
    paths = [os.path.join(model_dir, name) for name in RUN_FILES]
    for pattern in EVAL_PATTERNS:
        paths += glob.glob(os.path.join(glob.escape(model_dir), pattern))
    return [path for path in paths if os.path.exists(path)]


def check(model_dir, restore_model, overwrite):
    """Refuses an unusable --model_dir before anything is loaded or written."""
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise UserError(f"--model_dir {model_dir} is a file: pass a folder")
    holder = _holder(model_dir)
    if holder:
        raise _in_use(model_dir, holder)
    refuse_an_old_run(model_dir, restore_model, overwrite)
    existing = os.path.abspath(model_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise UserError(f"cannot create --model_dir {model_dir} ({existing} is not a "
                        "writable folder): pass a writable folder")


def refuse_an_old_run(model_dir, restore_model, overwrite):
    """Refuses a folder holding a run, unless resuming or replacing it."""
    if _written(model_dir) and not (restore_model or overwrite):
        if latest_checkpoint(model_dir) is None:
            raise UserError(f"{model_dir} holds a run that saved no checkpoint: pass "
                            "--overwrite to start it again, or another --model_dir")
        raise UserError(
            f"{model_dir} already holds a run: pass --restore_model to resume it, "
            "--overwrite to replace it, or another --model_dir")


def prepare(model_dir, restore_model):
    """Makes the run folder; unless resuming, first removes all an old run wrote, its
    evaluations included (no report of the old model is left beside the new one)."""
    if not restore_model:
        for path in _written(model_dir):
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    os.makedirs(os.path.join(model_dir, CHECKPOINT_DIR), exist_ok=True)


def _in_use(model_dir, holder):
    return UserError(f"{model_dir} is in use by {holder}: wait for it to end, or pass "
                     "another --model_dir")


def _holder(model_dir):
    """Who holds `model_dir` now (see `owned`), or None."""
    path = os.path.join(model_dir, LOCK_FILE)
    if fcntl is None or not os.path.isfile(path):
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
    return None


@contextlib.contextmanager
def owned(model_dir):
    """Holds `model_dir` for this process: a second process is refused at once.

    The lock is the operating system's, on model_dir/.lock, so it ends with the process
    (a killed run blocks nothing); the file names its holder for the message.
    """
    created = not os.path.exists(model_dir)
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, LOCK_FILE)
    handle = open(path, "a+")
    try:
        if fcntl:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise _in_use(model_dir, holder) from None
    handle.truncate(0)
    handle.write(f"process {os.getpid()} ({' '.join(sys.argv)[:300]})")
    handle.flush()
    try:
        yield
    finally:
        os.remove(path)
        handle.close()
        if created and not os.listdir(model_dir):
            os.rmdir(model_dir)


def saved_config(path):
    """The configuration a `.keras` file was saved with ({"num_classes": ...,
    "class_names": ..., "mode": ...}), read without loading the model."""
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))["config"]

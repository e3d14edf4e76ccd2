"""The user-error type, output checks, atomic writes, and TensorFlow's start without
its notes.

Imports neither TensorFlow nor absl, so the scripts can check their flags first.
"""

import contextlib
import errno
import fnmatch
import os
import re
import sys
import tempfile

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
# Notes TensorFlow's native libraries write to file descriptor 2 as they load, before
# any log level applies (TF_CPP_MIN_LOG_LEVEL does not hide them).
START_UP_NOTES = re.compile(r"absl::InitializeLog|oneDNN custom operations are on|"
                            r"cpu_feature_guard|^To enable the following instructions|"
                            # The `tensorflow` package on a machine without a GPU:
                            r"Could not find cuda drivers|failed call to cuInit")


class UserError(Exception):
    """A mistake in the user's input; the scripts print it on one line and exit 2."""


class DiskFull(UserError):
    """A file could not be written for lack of space; nothing was left half-written."""

    def __init__(self, path, kept, fix="free some space and run again"):
        super().__init__(f"the disk is full: could not write {path} ({kept}); {fix}")
        self.path, self.kept = path, kept


def refuse_foreign_files(folder, flag, own):
    """Refuses an existing `folder` holding anything whose name matches none of the
    `own` patterns (fnmatch): a command may replace what it wrote, never a user's
    files."""
    if not os.path.isdir(folder):
        return
    foreign = sorted(name for name in os.listdir(folder)
                     if not any(fnmatch.fnmatchcase(name, pattern) for pattern in own))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                          if len(foreign) > 3 else "")
        raise UserError(f"{flag} {folder} holds files this command did not write "
                        f"({shown}): pass a new or empty folder")


def tell(kind, message):
    """Prints a message for the user as a plain line on stderr: "warning: ..." or
    "note: ..." (absl's log lines are for what is a log)."""
    print(f"{kind}: {message}", file=sys.stderr, flush=True)


def plural(count, noun, nouns=None):
    """"1 file", "3 files": `count` and the noun in its number."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def save_atomically(path, save):
    """Calls `save(temporary_path)` for a temporary file next to `path`, then renames it.

    A crash leaves the previous `path` (or none) intact, never half a file. The
    temporary name keeps `path`'s extension, which some writers (Keras) require, and
    holds the process id, so that processes writing the same file (a study's
    trials.csv) do not share one.

    Raises:
        DiskFull: the disk filled up while writing; `path` is as it was.
    """
    temporary = os.path.join(os.path.dirname(path) or ".",
                             f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        save(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = "its previous version is kept" if os.path.exists(path) else "none was left"
        raise DiskFull(path, kept) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_atomically(path, write, mode="w"):
    """Calls `write(handle)` on a file that replaces `path` only once complete."""
    def save(temporary):
        with open(temporary, mode) as handle:
            write(handle)

    save_atomically(path, save)


@contextlib.contextmanager
def without_start_up_notes():
    """Leaves TensorFlow's start-up notes out of what the block writes to stderr;
    anything else written there (an import error, say) still reaches it after.
    TensorFlow loaded in the block logs only its errors, unless TF_CPP_MIN_LOG_LEVEL
    says otherwise: its runtime notes and warnings (a tf.data function that cannot
    be optimised, an aborted rendezvous before an unreadable image's error) are not
    the user's to act on."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
            tensorflow = sys.modules.get("tensorflow")
            if tensorflow is not None:  # its devices start here, with their notes
                tensorflow.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace")
                    .splitlines(keepends=True) if not START_UP_NOTES.search(line)]
            sys.stderr.write("".join(kept))

"""Shared fixtures and helpers: tiny generated two-domain image folders, the commands
run or started as a user would, saved weights, and the checks of a one-line error."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_script(script, *args, timeout=600):
    """Runs one of the repository's commands to its end; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args],
                          capture_output=True, text=True, timeout=timeout)


def start_script(script, *args, env=None, merged=False):
    """Starts one of the repository's commands, unbuffered, its stdout piped (stderr
    too, or merged into stdout); returns the running process."""
    return subprocess.Popen(
        [sys.executable, "-u", os.path.join(REPO, script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True, env=dict(os.environ, **(env or {})))


def saved_model(path):
    """A `.keras` file written by train.py, loaded."""
    import keras

    import models  # noqa: F401  (registers the DANN classes)

    return keras.saving.load_model(path)


def saved_weights(path):
    """The weights of a `.keras` file written by train.py, as NumPy arrays."""
    return [weight.numpy() for weight in saved_model(path).weights]


def snapshot(folder):
    """{path: sha256} of every file under `folder`."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            digests[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digests


def assert_one_line_error(result, *fragments):
    """The command failed with status 2 and a last line `error: ...` holding each of
    `fragments`, without a traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, last


def make_image(label, domain, rng, size=28):
    """A bar whose position encodes the label; the target domain is coloured."""
    image = rng.integers(0, 40, (size, size)).astype(np.float64)
    start = 3 + 7 * label
    image[start:start + 5, 4:size - 4] = 230
    if domain == "source":
        return Image.fromarray(image.astype(np.uint8), mode="L")
    background = rng.integers(0, 256, 3)
    rgb = np.abs(background[None, None, :] - image[:, :, None])
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def write_split(root, per_class, num_classes=3, seed=0):
    """Writes root/{source,target}/class_<k>/*.png and returns root."""
    rng = np.random.default_rng(seed)
    for domain in ("source", "target"):
        for label in range(num_classes):
            folder = os.path.join(root, domain, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            for index in range(per_class):
                make_image(label, domain, rng).save(
                    os.path.join(folder, f"{index:05d}.png"))
    return str(root)


def with_unlabelled_val(tiny_data, root, layout):
    """A copy of `tiny_data` at `root` with val/: a copy of test/ whose target has no
    labels (`unlabel_target`'s `layout`). Returns root."""
    shutil.copytree(tiny_data, root)
    shutil.copytree(os.path.join(root, "test"), os.path.join(root, "val"))
    unlabel_target(os.path.join(root, "val"), layout)
    return root


def unlabel_target(root, layout):
    """Moves root/target/class_<k>/*.png out of their class folders: `flat` straight
    into target/, `nested` into folders of other names, two levels deep."""
    target = os.path.join(root, "target")
    for name in sorted(os.listdir(target)):
        for file_name in sorted(os.listdir(os.path.join(target, name))):
            folder = target if layout == "flat" else os.path.join(target, f"cam_{name}",
                                                                 "day_1")
            os.makedirs(folder, exist_ok=True)
            os.rename(os.path.join(target, name, file_name),
                      os.path.join(folder, f"{name}-{file_name}"))
        os.rmdir(os.path.join(target, name))
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A tiny data set: DIR/train (16 per class), DIR/test (8 per class)."""
    root = tmp_path_factory.mktemp("tiny_data")
    write_split(root / "train", per_class=16, seed=1)
    write_split(root / "test", per_class=8, seed=2)
    return str(root)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "network: needs PyPI (skip with -m 'not network' when offline)")
    config.addinivalue_line(
        "markers", "slow: starts training processes, workers, studies or grids (the "
        "fast tier, -m 'not slow', leaves them to CI)")
    # Keras 3.15's own saving code calls np.array(x) on its variables, which NumPy 2
    # warns about once per variable saved; nothing in this project can change it.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy "
        "keyword:DeprecationWarning:keras")

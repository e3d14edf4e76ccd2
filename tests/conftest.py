"""Shared fixtures: tiny generated two-domain image folders."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
    # Keras 3.15's own saving code calls np.array(x) on its variables, which NumPy 2
    # warns about once per variable saved; nothing in this project can change it.
    config.addinivalue_line(
        "filterwarnings", "ignore:__array__ implementation doesn't accept a copy "
        "keyword:DeprecationWarning:keras")

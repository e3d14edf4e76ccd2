"""Where a domain's decoded training images are kept, and the shuffled stream of each;
`load_data` gives a training run its data this way.

- memory: decoded once and held in memory, shuffled as decoded images (the digits).
- disk: decoded once into a NumPy file under the run folder; the stream shuffles
  indices into it, so memory holds only the batches in flight.
- none: nothing kept; the stream shuffles file names and decodes every pass.

Every mode gives a stream whose order depends only on the seed, and which skips the
first images of a resumed run without decoding them (except in memory mode, where
they are already decoded).
"""

import dataclasses
import hashlib
import os

import numpy as np
import tensorflow as tf
from absl import logging

import data_utils
import folders
from file_utils import UserError, save_atomically

MODES = ("memory", "disk", "none")
KEPT = {"memory": "decoded once and kept in memory",
        "disk": "decoded once and kept in a file in the run folder",
        "none": "decoded again every epoch"}
# Memory mode holds the decoded set about twice (the cache and the shuffle buffer).
MEMORY_SHARE = 0.25


def machine_memory():
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def decoded_bytes(num_images, image_size, channels):
    """Bytes of `num_images` decoded uint8 images."""
    return num_images * int(np.prod(image_size)) * channels


def choose(requested, decoded_bytes, memory=None):
    """The cache mode for `requested` (one of MODES or "auto") and why, as a sentence."""
    if requested != "auto":
        return requested, f"--cache {requested}"
    memory = memory or machine_memory()
    size = f"{decoded_bytes / 2**30:.2f} GiB decoded"
    if memory is None or decoded_bytes <= MEMORY_SHARE * memory:
        return "memory", f"--cache auto: {size}, within a quarter of this machine's memory"
    return "none", (f"--cache auto: {size}, more than a quarter of this machine's "
                    f"{memory / 2**30:.1f} GiB")


class DomainImages:
    """The training images of one domain and where their decoded pixels are kept.

    Args:
        files: a `folders.DomainFiles`.
        image_size, channels: the decoded images' (height, width) and channels.
        mode: one of MODES.
        disk_dir: where `disk` mode writes its file (in the run folder).
    """

    def __init__(self, files, image_size, channels, mode="memory", disk_dir=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.files, self.image_size, self.channels = files, tuple(image_size), channels
        self.mode, self.disk_dir = mode, disk_dir
        self._decoded = None

    def __len__(self):
        return len(self.files)

    def batches(self):
        """(uint8 images, labels) batches in file order; in memory mode cached, so
        the first pass decodes for every later one."""
        if self.mode != "memory":
            return data_utils.decoded_batches(self.files, self.image_size,
                                              self.channels, cache=False)
        if self._decoded is None:
            self._decoded = data_utils.decoded_batches(self.files, self.image_size,
                                                       self.channels)
        return self._decoded

    def shuffled(self, seed, labelled, skip, numbered=False):
        """An endless stream of (uint8 image, label), reshuffled every pass, from its
        `skip`-th image; labels are -1 unless `labelled`. With `numbered`, elements
        are (number, image, label), `number` counting images from the stream's start;
        only then, since numbering every image cost the digits' stream 8x its speed
        (60,000 against 510,000 images/s here)."""
        stream = self._in_file_order(labelled).shuffle(
            len(self), seed=seed, reshuffle_each_iteration=True).repeat()
        if numbered:
            stream = stream.enumerate()
        stream = stream.skip(skip)
        if self.mode == "memory":
            return stream.map(lambda number, item: (number, *item)) if numbered \
                else stream
        read = self._decoder() if self.mode == "none" else self._disk_reader()

        def load(key, label):
            return read(key), label

        return data_utils.without_autotune_thread(stream.map(
            (lambda number, item: (number, *load(*item))) if numbered else load,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))

    def _in_file_order(self, labelled):
        """(image, label) in memory mode, else (path or index into the disk file,
        label), one element per image in file order; labels -1 unless `labelled`."""
        if self.mode == "memory":
            stream = self.batches()
            if not labelled:
                stream = stream.map(lambda images, labels: (
                    images, tf.fill(tf.shape(labels), -1)))
            return stream.unbatch()
        labels = self.files.labels if labelled else [-1] * len(self.files)
        keys = self.files.paths if self.mode == "none" else tf.range(len(self))
        return tf.data.Dataset.from_tensor_slices((keys, labels))

    def _decoder(self):
        return lambda path: data_utils.decode_image(path, self.image_size, self.channels)

    def _disk_reader(self):
        pixels = np.load(self.disk_file(), mmap_mode="r")
        shape = (*self.image_size, self.channels)

        def read(index):
            image = tf.numpy_function(lambda i: np.asarray(pixels[i]), [index], tf.uint8,
                                      stateful=False)
            return tf.ensure_shape(image, shape)
        return read

    def disk_file(self):
        """The `.npy` file of the decoded images, written by one decoding pass if not
        already there (a resumed run reuses it)."""
        key = hashlib.sha256(repr((self.files.paths, self.image_size,
                                   self.channels)).encode()).hexdigest()[:16]
        path = os.path.join(self.disk_dir, f"{key}.npy")
        if not os.path.isfile(path):
            os.makedirs(self.disk_dir, exist_ok=True)
            save_atomically(path, self._write_decoded)
            logging.info("Decoded %d images into %s", len(self), path)
        return path

    def _write_decoded(self, path):
        pixels = np.lib.format.open_memmap(
            path, mode="w+", dtype=np.uint8,
            shape=(len(self), *self.image_size, self.channels))
        start = 0
        for images, _ in self.batches().as_numpy_iterator():
            pixels[start:start + len(images)] = images
            start += len(images)
        pixels.flush()
        del pixels


@dataclasses.dataclass
class TrainingData:
    """The scanned training split, its two `DomainImages`, the optional validation
    split, and the (source, target) `DomainImages` the per-epoch monitor predicts:
    the validation split's, else a fixed sample of the training split's."""
    train: folders.SplitFiles
    source: DomainImages
    target: DomainImages
    val: folders.SplitFiles = None
    monitored: tuple = ()

    @property
    def splits(self):
        """The scanned splits the run reads: training, and validation if any."""
        return [self.train] + ([self.val] if self.val else [])


def load_split(split_dir, config, shape, disk_dir, class_names=None, mode=None):
    """Scans a split of `shape` (height, width, channels) images; returns (SplitFiles,
    source and target `DomainImages`), kept as `mode` says, or as --cache chooses for
    the training split (`disk` in `disk_dir`)."""
    split, _ = data_utils.scan_and_log(split_dir, class_names, config.skip_bad_images,
                                       shape[2])
    if mode is None:
        size = decoded_bytes(len(split.source) + len(split.target), shape[:2], shape[2])
        mode, reason = choose(config.cache, size)
        logging.info("%s: images %s (%s)", split_dir, KEPT[mode], reason)
    return (split, *(DomainImages(getattr(split, domain), shape[:2], shape[2], mode,
                                  disk_dir) for domain in folders.DOMAINS))


def check_layouts(config):
    """Refuses, from the folders' listings alone, a training or validation split
    this run cannot use: a wrong layout, or --mode target_only with a target that has
    no labels. Prints what the splits hold."""
    train = folders.scan_split(config.train_dir)
    if config.mode == "target_only" and not train.target.labelled:
        raise UserError(
            f"--mode target_only trains on target labels, but {config.train_dir}/target "
            "has none (no class folders): use --mode dann or source_only, or put the "
            "target images in target/<class_name>/")
    splits = [train] + ([folders.scan_split(config.val_dir, train.class_names)]
                        if config.val_dir else [])
    for split in splits:
        print(folders.describe(split), flush=True)


def load_data(config, shape, disk_dir, monitor_images):
    """The training data of a `TrainConfig`, of `shape` images (`disk` cache in
    `disk_dir`): its training split, and the images the monitor predicts, those of
    --val_dir or `monitor_images` of each training domain.

    Raises:
        UserError: as `folders.scan_split`, or --mode target_only with a target
            that has no labels.
    """
    check_layouts(config)  # before any image is decoded
    data = TrainingData(*load_split(config.train_dir, config, shape, disk_dir))
    # Decoded once into memory where the training images are, else every epoch.
    mode = "memory" if data.source.mode == "memory" else "none"
    if config.val_dir:
        data.val, *data.monitored = load_split(config.val_dir, config, shape, disk_dir,
                                               data.train.class_names, mode)
    else:
        data.monitored = [DomainImages(folders.sample_files(files, monitor_images),
                                       shape[:2], shape[2], mode)
                          for files in (data.train.source, data.train.target)]
    return data

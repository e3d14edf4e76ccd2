"""Two-domain image folders: the layout, its validation and the tf.data input pipeline.

A split folder holds `source/<class>/*` and `target/<class>/*`; class folders are
matched by name across domains and splits and sorted, so a class's index is the same
everywhere.
"""

import contextlib
import dataclasses
import os

import tensorflow as tf
from absl import logging

from file_utils import IMAGE_EXTENSIONS, UserError

DOMAINS = ("source", "target")
DECODE_BATCH = 256


def without_autotune_thread(dataset):
    """`dataset` (and all made from it) without tf.data's autotuning thread.

    That thread wakes ever less often (0.01, 0.03, 0.07, ... s after an iterator
    starts), and an iterator that ran out waited for its next wake-up: up to twice a
    pass's work. `AUTOTUNE` parallelism stays at the number of cores, as fast here.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


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


def _domain_classes(split_dir):
    """{domain: sorted class folder names} of a split, refusing a missing domain."""
    if not os.path.isdir(split_dir):
        raise UserError(f"{split_dir} is not a folder: pass a folder holding "
                        "source/<class>/ and target/<class>/ image folders")
    found = {}
    for domain in DOMAINS:
        domain_dir = os.path.join(split_dir, domain)
        if not os.path.isdir(domain_dir):
            raise UserError(f"{domain_dir} is missing: a split folder needs both "
                            "source/<class>/ and target/<class>/ image folders")
        found[domain] = sorted(e.name for e in os.scandir(domain_dir) if e.is_dir())
        if not found[domain]:
            raise UserError(f"{domain_dir} has no class folders: put the images in "
                            f"{domain_dir}/<class_name>/")
    return found


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
    domain_classes = _domain_classes(split_dir)
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


def to_pixels(values):
    """Float pixel values (a resize's output) rounded and clipped to uint8."""
    return tf.cast(tf.clip_by_value(tf.round(values), 0, 255), tf.uint8)


def decode_image(path, image_size, channels):
    """Reads one image file as uint8 (height, width, channels) of `image_size`.

    Grayscale files become RGB (channel repeated) when `channels` is 3, and colour
    files become grayscale when it is 1. Images of another size are resized; images
    already of `image_size` are kept as they are.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                               expand_animations=False)

    def resized():
        return to_pixels(tf.image.resize(image, image_size))

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


def scan_and_log(split_dir, class_names, skip_bad_images, channels):
    """`scan_split`, logging ignored files, and with `skip_bad_images` the split
    without its unreadable images; returns (SplitFiles, number of images skipped)."""
    split, skipped = scan_split(split_dir, class_names), 0
    if split.ignored_files:
        logging.info("%s: ignored %d files that are not images", split_dir,
                     split.ignored_files)
    if skip_bad_images:
        split, skipped = without_unreadable(split, channels)
        logging.info("%s: skipped %d unreadable images", split_dir, skipped)
    return split, skipped


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


def decoded_batches(files, image_size, channels, cache=True):
    """A dataset of (uint8 images, int32 labels) batches in file order.

    Decoding runs in parallel, DECODE_BATCH files at a time. With `cache`, the decoded
    batches are kept in memory, so only the first pass reads the files; caching whole
    batches rather than single images keeps tf.data's per-element cost off the pass
    that fills the cache. `.unbatch()` gives the images one by one.
    """
    labels = tf.constant(files.labels, tf.int32)
    dataset = tf.data.Dataset.from_tensor_slices((files.paths, labels)).batch(
        DECODE_BATCH)
    dataset = dataset.map(
        lambda paths, labels: (decode_images(paths, image_size, channels), labels),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return without_autotune_thread(dataset.cache() if cache else dataset.prefetch(
        tf.data.AUTOTUNE))


def image_batches(files, image_size, channels, batch_size, crop=False):
    """Uncached batches of the decoded images of `files` in order, for a single pass;
    centre-cropped with `crop`."""
    def decode(paths):
        images = decode_images(paths, image_size, channels)
        return centre_crop(images) if crop else images

    dataset = tf.data.Dataset.from_tensor_slices(files.paths).batch(batch_size)
    return without_autotune_thread(dataset.map(decode,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE))


def steps_per_epoch(num_source, num_target, batch_size):
    """Steps in one epoch: enough to show every image of the larger domain once.

    The smaller domain repeats; batches are always full, so the last batch of a pass
    is completed from the next one.
    """
    return -(-max(num_source, num_target) // batch_size)


def random_resized_crop(image, seed):
    """A random crop of 8-100% of the image's area, aspect ratio 3/4-4/3, resized back
    to the image's size, then a random horizontal flip; `seed` is a stateless pair."""
    size = tf.shape(image)[:2]
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.zeros((1, 0, 4)), seed, min_object_covered=0.0,
        aspect_ratio_range=(0.75, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    crop = tf.image.resize(tf.slice(image, begin, crop_size), size)
    return to_pixels(tf.image.stateless_random_flip_left_right(crop, seed + 1))


def centre_crop(images):
    """The central 87.5% of a batch of uint8 images, resized back to their size (as
    resizing to 256 and cropping 224)."""
    size = tf.shape(images)[1:3]
    return to_pixels(tf.image.resize(tf.image.central_crop(images, 0.875), size))


def training_dataset(source, target, labelled_domain, batch_size, seed,
                     skip_steps=0, augment=False):
    """An endless stream of dicts `source_images`, `target_images`, `labels`.

    Each domain is reshuffled on every pass and repeats on its own, so the smaller
    one comes round more often. The order (and with `augment`, each image's random
    crop and flip) depends only on `seed`, so a run resumed after `skip_steps` steps
    sees the batches an uninterrupted run sees. `source` and `target` are
    `cache.DomainImages`; only the labels of `labelled_domain` ("source", or "target"
    in target_only mode) enter the batches.
    """
    streams = []
    for index, domain in enumerate((source, target)):
        stream = domain.shuffled(seed * 2 + index, DOMAINS[index] == labelled_domain,
                                 skip_steps * batch_size, numbered=augment)
        if augment:
            stream = stream.map(
                lambda number, image, label, index=index: (random_resized_crop(
                    image, tf.stack([tf.cast(seed * 2 + index, tf.int64), number])),
                    label), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        streams.append(stream.batch(batch_size, drop_remainder=True))

    def to_batch(source_batch, target_batch):
        labelled = source_batch if labelled_domain == "source" else target_batch
        return {"source_images": source_batch[0], "target_images": target_batch[0],
                "labels": labelled[1]}

    return tf.data.Dataset.zip(tuple(streams)).map(to_batch).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(source_batches, target_batches, batch_size, crop=False):
    """Both domains' `decoded_batches` in one stream of `images`, `labels`, `domains`
    (0 / 1) batches of `batch_size`, centre-cropped with `crop`."""
    def tag(domain):
        return lambda images, labels: {
            "images": centre_crop(images) if crop else images, "labels": labels,
            "domains": tf.fill(tf.shape(labels), domain)}

    stream = source_batches.map(tag(0)).concatenate(target_batches.map(tag(1)))
    return stream.rebatch(batch_size).prefetch(tf.data.AUTOTUNE)

"""The tf.data input pipeline: decoding (with the one resize every image gets),
unreadable files, training and evaluation batches, augmentation.

What a split folder holds is `folders`' business; this module decodes its files.
"""

import contextlib
import os

import tensorflow as tf

import file_utils
import folders
from file_utils import UserError, plural

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


def to_pixels(values):
    """Float pixel values (a resize's output) rounded and clipped to uint8."""
    return tf.cast(tf.clip_by_value(tf.round(values), 0, 255), tf.uint8)


def resized(images, image_size):
    """An image or a batch of images (uint8, or float pixel values in [0, 255]) at
    `image_size`: resampled (bilinear) and rounded to whole pixel values where their
    size differs, as they are where it does not. Decoding and the model's own input
    layer (`networks.InferenceInput`) both resize with it."""
    size = images.shape[-3:-1]
    if size.is_fully_defined() and tuple(size) == tuple(image_size):
        return images

    def resample():
        return tf.cast(to_pixels(tf.image.resize(images, image_size)), images.dtype)

    shape = [*images.shape[:-3], *image_size, images.shape[-1]]
    same_size = tf.reduce_all(tf.equal(tf.shape(images)[-3:-1], image_size))
    # A reshape to the known size, not ensure_shape: TFLite has no EnsureShape, and
    # needs the static shape the condition loses.
    return tf.reshape(tf.cond(same_size, lambda: images, resample),
                      [-1 if size is None else size for size in shape])


def decode_image(path, image_size, channels):
    """Reads one image file as uint8 (height, width, channels) of `image_size`.

    Grayscale files become RGB (channel repeated) when `channels` is 3, and colour
    files become grayscale when it is 1; other sizes are `resized`.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                               expand_animations=False)
    return tf.ensure_shape(resized(image, image_size), (*image_size, channels))


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


def readable_only(files, channels, where):
    """`files` (DomainFiles) without the images that cannot be decoded, and those
    images' paths; raises UserError where none is left."""
    bad = set(unreadable_images(files, channels))
    kept = [(p, label) for p, label in zip(files.paths, files.labels) if p not in bad]
    if not kept:
        raise UserError(f"no readable images in {where}: fix the image files")
    kept = folders.DomainFiles([p for p, _ in kept], [lb for _, lb in kept],
                               files.labelled)
    return kept, sorted(bad)


def without_unreadable(split, channels):
    """The split minus the images that cannot be decoded, and their paths."""
    dropped = []
    for domain, files in split.domains():
        kept, bad = readable_only(files, channels, os.path.join(split.root, domain))
        setattr(split, domain, kept)
        dropped += bad
    return split, dropped


def log_skipped(where, skipped):
    """Tells how many unreadable images of `where` were left out, and which."""
    if skipped:
        file_utils.tell("note", f"{where}: left out "
                        f"{plural(len(skipped), 'unreadable image')}"
                        + "".join(f"\n  {path}" for path in skipped))


def tell_ignored(where, count):
    """Tells how many files of `where` were not images, so were not read."""
    file_utils.tell("note", f"{where}: ignored {plural(count, 'file')} that "
                    f"{'is not an image' if count == 1 else 'are not images'}")


def scan_and_log(split_dir, class_names, skip_bad_images, channels,
                 required=folders.DOMAINS):
    """`folders.scan_split`, telling of ignored files, and with `skip_bad_images` the split
    without its unreadable images; returns (SplitFiles, number of images skipped)."""
    split = folders.scan_split(split_dir, class_names, required)
    if split.ignored_files:
        tell_ignored(split_dir, split.ignored_files)
    if not skip_bad_images:
        return split, 0
    split, skipped = without_unreadable(split, channels)
    log_skipped(split_dir, skipped)
    return split, len(skipped)


def check_readable(groups, channels):
    """Raises UserError naming the first image that cannot be decoded among `groups`
    ([(where, DomainFiles)], as `SplitFiles.domains` with the split's folder)."""
    for where, files in groups:
        bad = unreadable_images(files, channels)
        if bad:
            raise UserError(
                f"{bad[0]} is not a readable image ({len(bad)} such files in {where}): "
                "fix or delete them, or pass --skip_bad_images to leave them out")


def file_groups(splits):
    """[(folder, DomainFiles)] of every domain of `splits`, for `naming_unreadable`."""
    return [(os.path.join(split.root, domain), files) for split in splits
            for domain, files in split.domains()]


@contextlib.contextmanager
def naming_unreadable(groups, channels):
    """Turns TensorFlow's decode error inside the block into a UserError naming the
    file, one of `groups` ([(where, DomainFiles)])."""
    try:
        yield
    except tf.errors.InvalidArgumentError:
        check_readable(groups, channels)
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
        labelled = folders.DOMAINS[index] == labelled_domain
        stream = domain.shuffled(seed * 2 + index, labelled, skip_steps * batch_size,
                                 numbered=augment)
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

"""Two-domain image folders: scanning, validation and the tf.data input pipeline.

A split folder holds `source/<class>/*` and `target/<class>/*`; class folders are
matched by name across domains and splits and sorted, so a class's index is the same
everywhere.
"""

import dataclasses
import os

import tensorflow as tf

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DOMAINS = ("source", "target")


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


def write_atomically(path, write, mode="w"):
    """Calls `write(handle)` on a temporary file next to `path`, then renames it.

    A crash leaves the previous `path` (or none) intact, never half a file.
    """
    temporary = os.path.join(os.path.dirname(path) or ".",
                             f".tmp-{os.path.basename(path)}")
    try:
        with open(temporary, mode) as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


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
    """Reads one image file as uint8 (height, width, channels), resized if needed.

    Grayscale files become RGB (channel repeated) when `channels` is 3, and colour
    files become grayscale when it is 1.
    """
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                               expand_animations=False)
    if image_size is not None:
        resized = tf.image.resize(image, image_size)
        image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
        image = tf.ensure_shape(image, (*image_size, channels))
    return image


def decoded_dataset(files, image_size, channels):
    """A cached dataset of (uint8 image, int32 label) in file order.

    Decoding runs in parallel; the decoded images are cached in memory, so only the
    first pass reads the files.
    """
    labels = tf.constant(files.labels, tf.int32)
    dataset = tf.data.Dataset.from_tensor_slices((files.paths, labels))
    dataset = dataset.map(
        lambda path, label: (decode_image(path, image_size, channels), label),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.cache()


def steps_per_epoch(num_source, num_target, batch_size):
    """Steps in one epoch: one pass over the larger domain, the smaller one repeats."""
    return max(1, max(num_source, num_target) // batch_size)


def training_dataset(source, target, labelled_domain, batch_size, seed,
                     skip_steps=0):
    """An endless stream of paired source and target batches.

    Each domain is reshuffled on every pass and repeats on its own, so the smaller
    domain simply comes round more often. The order depends only on `seed`, so a run
    resumed after `skip_steps` steps sees exactly the batches an uninterrupted run
    sees. Only the labels of `labelled_domain` enter the batches.

    Args:
        source, target: `(decoded_dataset, number of images)` of each domain.
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
            data = data.map(lambda image, label: (image, tf.constant(-1)))
        shuffled = data.shuffle(size, seed=seed * 2 + index,
                                reshuffle_each_iteration=True).repeat()
        streams.append(shuffled.skip(skip_steps * batch_size).batch(
            batch_size, drop_remainder=True))

    def to_batch(source_batch, target_batch):
        labelled = source_batch if labelled_domain == "source" else target_batch
        return {"source_images": source_batch[0], "target_images": target_batch[0],
                "labels": labelled[1]}

    return tf.data.Dataset.zip(tuple(streams)).map(to_batch).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(source_data, target_data, batch_size):
    """Both domains in one stream of `images`, `labels`, `domains` (0 / 1) batches."""
    def tag(domain):
        return lambda image, label: {"images": image, "labels": label,
                                     "domains": tf.constant(domain, tf.int32)}

    stream = source_data.map(tag(0)).concatenate(target_data.map(tag(1)))
    return stream.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def images_only(dataset, batch_size):
    """Batches of images of a (image, label) dataset, for computing statistics."""
    return dataset.map(lambda image, label: image).batch(batch_size)

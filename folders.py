"""What a split folder holds: its layouts, their validation, and image files to predict.

A split folder (train, val or test) holds `source/<class>/*` and `target/`. The
target is labelled when it holds exactly the source's class folders
(`target/<class>/*`), unlabelled when its images lie anywhere under it in no folder
named after a class. Class folders are sorted, so a class's index is the same in
every domain and split. Loads no TensorFlow.
"""

import dataclasses
import os

import numpy as np

from file_utils import IMAGE_EXTENSIONS, UserError

DOMAINS = ("source", "target")
UNLABELLED = -1  # the label of every image of an unlabelled target
UNLABELLED_HINT = (", or, if the target has no labels, put its images in target/ "
                   "without class folders")


@dataclasses.dataclass
class DomainFiles:
    """Image paths of one domain with their class indices; an unlabelled domain's
    labels are all UNLABELLED."""
    paths: list
    labels: list
    labelled: bool = True

    def __len__(self):
        return len(self.paths)


@dataclasses.dataclass
class SplitFiles:
    """The scanned contents of one split folder (train, val or test); a domain the
    split does not hold (allowed only where the caller said so) is None."""
    root: str
    class_names: list
    source: DomainFiles
    target: DomainFiles
    ignored_files: int

    def domains(self):
        """[(domain name, DomainFiles)] of the domains the split holds."""
        return [(name, getattr(self, name)) for name in DOMAINS
                if getattr(self, name) is not None]


def _sub_folders(folder):
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(folder):
    """(sorted image paths anywhere under `folder`, number of other files there)."""
    images, ignored = [], 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if _is_image(name):
                images.append(os.path.join(root, name))
            else:
                ignored += 1
    return sorted(images), ignored


def list_images(inputs):
    """The images among `inputs` (image files, and folders read recursively) as
    unlabelled DomainFiles in sorted order, and the number of other files found in
    the folders; raises UserError for a missing path, an explicit file that is not an
    image, or no image at all."""
    found, ignored = set(), 0
    for path in inputs:
        if os.path.isdir(path):
            images, others = images_under(path)
            found.update(map(os.path.normpath, images))
            ignored += others
        elif not os.path.exists(path):
            raise UserError(f"{path} does not exist: pass image files or folders")
        elif not _is_image(path):
            raise UserError(f"{path} is not an image file ({', '.join(IMAGE_EXTENSIONS)})"
                            ": pass image files or folders holding them")
        else:
            found.add(os.path.normpath(path))
    if not found:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                        f"{', '.join(inputs)}: pass image files or folders holding them")
    paths = sorted(found)
    return DomainFiles(paths, [UNLABELLED] * len(paths), labelled=False), ignored


def _scan_class_folders(domain_dir, class_names, unlabelled_hint=""):
    """The labelled layout: `domain_dir/<class>/*` for every class."""
    paths, labels, ignored = [], [], 0
    for index, name in enumerate(class_names):
        class_dir = os.path.join(domain_dir, name)
        files = sorted(e.name for e in os.scandir(class_dir) if e.is_file())
        images = [f for f in files if _is_image(f)]
        ignored += len(files) - len(images)
        if not images:
            raise UserError(
                f"class folder {class_dir} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder "
                f"from every domain and split{unlabelled_hint}")
        paths.extend(os.path.join(class_dir, f) for f in images)
        labels.extend([index] * len(images))
    return DomainFiles(paths, labels), ignored


def _scan_source(source_dir, class_names):
    """The source: labelled class folders, the classes of the split (or the given
    `class_names`, which they must match)."""
    found = _sub_folders(source_dir)
    if not found:
        raise UserError(f"{source_dir} has no class folders: put the labelled source "
                        f"images in {source_dir}/<class_name>/")
    if class_names is not None and list(class_names) != found:
        raise UserError(
            f"class folders of {source_dir} differ from the training classes "
            f"({_difference(class_names, found)}): every split needs the same "
            "class folder names")
    return found, *_scan_class_folders(source_dir, found)


def _scan_target(target_dir, class_names):
    """The target in either layout: labelled (`<class>/` folders, exactly the source's
    classes) or unlabelled (images anywhere under it, in no folder named after a
    class)."""
    folders = _sub_folders(target_dir)
    named_after_classes = [name for name in folders if name in class_names]
    if not named_after_classes:
        paths, ignored = images_under(target_dir)
        if not paths:
            raise UserError(f"{target_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}"
                            f"): put the target images there, in any sub-folders, or in "
                            f"{target_dir}/<class_name>/ if they have labels")
        return DomainFiles(paths, [UNLABELLED] * len(paths), labelled=False), ignored
    loose = any(e.is_file() and _is_image(e.name) for e in os.scandir(target_dir))
    if folders != list(class_names) or loose:
        difference = "; ".join(filter(None, [
            _difference(class_names, folders) if folders != list(class_names) else "",
            "images directly inside" if loose else ""]))
        raise UserError(
            f"class folders of {target_dir} match the source's only partly "
            f"({difference}): use one layout, "
            f"{target_dir}/<class>/ with exactly the source's class folders for a "
            "labelled target, or no folder named after a class for an unlabelled one")
    return _scan_class_folders(target_dir, class_names, UNLABELLED_HINT)


def _domain_folders(split_dir, required):
    """{domain: folder} of the domains a split folder holds, all of `required` (or,
    with none required, at least one)."""
    if not os.path.isdir(split_dir):
        raise UserError(f"{split_dir} is not a folder: pass a folder holding "
                        "source/<class>/ and target/ image folders")
    present = {domain: os.path.join(split_dir, domain) for domain in DOMAINS
               if os.path.isdir(os.path.join(split_dir, domain))}
    missing = [domain for domain in DOMAINS if domain in required
               and domain not in present] or (
        [] if present else list(DOMAINS))
    if missing:
        raise UserError(f"{os.path.join(split_dir, missing[0])} is missing: a split "
                        "folder needs source/<class>/ and target/ image folders")
    return present


def scan_split(split_dir, class_names=None, required=DOMAINS):
    """Lists and validates the images of a split folder.

    Args:
        split_dir: folder holding `source/<class>/` and `target/` (labelled:
            `target/<class>/` with the source's classes; unlabelled: images anywhere
            under `target/`, in no folder named after a class).
        class_names: the classes this split must have (those of the training split
            or model); None takes them from the source's class folders.
        required: the domains the split must hold; with none required, at least one.

    Returns:
        A `SplitFiles`.

    Raises:
        UserError: the folder is missing, lacks a required domain, its source class
            folders differ from `class_names`, a class folder has no images, or the
            target matches the source's class folders only partly.
    """
    # Without `class_names`, the source's class folders name the classes.
    present = _domain_folders(split_dir, set(required) | (
        set() if class_names is not None else {"source"}))
    files, ignored = dict.fromkeys(DOMAINS), 0
    if "source" in present:
        class_names, files["source"], ignored = _scan_source(present["source"],
                                                             class_names)
    if "target" in present:
        files["target"], ignored_target = _scan_target(present["target"], class_names)
        ignored += ignored_target
    return SplitFiles(split_dir, list(class_names), files["source"], files["target"],
                      ignored)


def _difference(expected, found):
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
        [f"extra {', '.join(extra)}"] if extra else [])
    return "; ".join(parts) or "different order"


def sample_files(files, count, seed=0):
    """Up to `count` of `files` (DomainFiles), drawn without replacement, in order."""
    chosen = np.sort(np.random.default_rng(seed).permutation(len(files))[:count])
    return DomainFiles([files.paths[i] for i in chosen],
                       [files.labels[i] for i in chosen], files.labelled)


def describe(split):
    """One line on what a scanned split holds: its classes, its images per domain,
    and whether its target has labels."""
    names = split.class_names
    shown = ", ".join(names if len(names) <= 6 else [*names[:3], "...", *names[-2:]])
    parts = [f"{len(names)} classes ({shown})"]
    if split.source is not None:
        parts.append(f"source {len(split.source):,} labelled images")
    if split.target is not None:
        parts.append(f"target {len(split.target):,} images " + (
            "with labels (target/<class>/)" if split.target.labelled else
            "without labels (no class folders under target/)"))
    return f"{split.root}: " + "; ".join(parts)

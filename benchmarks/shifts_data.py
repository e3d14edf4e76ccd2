"""The domain shifts of benchmarks/shifts.py, built offline from a seed.

Every domain is 28x28 RGB digits, drawn from one of:
- `mnist`: MNIST (the PyPI copy), grey repeated to three channels;
- `mnistm`: MNIST blended over crops of the photos that ship with scikit-image and
  scikit-learn (the paper's |crop - digit|, mnist_m.blend_mnistm);
- `inverted`: MNIST with its colours inverted (255 - pixel);
- `synth`: digits rendered from the fonts installed under /usr/share/fonts (Debian's
  font packages) with a random font, size, position, rotation, colours and blur.

A shift's folder holds `train/` (labelled source, unlabelled target), `val/` (the
same, other images) and `test/` (labelled target, read only after every choice),
and `dataset.json` with the counts, the seed and, for `synth`, the fonts used. No two
roles share an MNIST digit; the same seed gives the same images.
"""

import json
import os
import shutil

import numpy as np
from PIL import Image, ImageFilter, ImageFont, ImageDraw

import mnist_m
import mnist_readers
from file_utils import write_atomically

FONT_ROOT = "/usr/share/fonts"
# Fonts whose digit code points hold pictures, not digits.
NOT_DIGIT_FONTS = ("dingbat", "symbol", "emoji", "d050000l")
SIZE = 28
# name: (source domain, target domain, unlabelled target images for training)
SHIFTS = {
    "mnist_to_mnistm": ("mnist", "mnistm", 5000),
    "mnist_to_mnistm_1200": ("mnist", "mnistm", 1200),
    "mnistm_to_mnist": ("mnistm", "mnist", 5000),
    "synth_to_mnist": ("synth", "mnist", 5000),
    "mnist_to_synth": ("mnist", "synth", 5000),
    "mnist_to_inverted": ("mnist", "inverted", 5000),
}
SOURCE_TRAIN, VAL, TEST = 10000, 1000, 3000
# Where in MNIST's (shuffled) 60,000 training digits each role's digits lie; the
# target's test digits are MNIST's test set.
ROLE_DIGITS = {"source_train": (0, 12000), "source_val": (12000, 20000),
               "target_train": (20000, 32000), "target_val": (32000, 40000)}
ROLES = (*ROLE_DIGITS, "test")
DOMAINS = ("mnist", "mnistm", "inverted", "synth")


def digit_fonts(root=FONT_ROOT):
    """The installed font files that draw ten distinct, non-empty digits, sorted."""
    fonts = []
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if (not name.lower().endswith((".ttf", ".otf")) or
                    any(word in name.lower() for word in NOT_DIGIT_FONTS)):
                continue
            try:
                font = ImageFont.truetype(path, 24)
                masks = [bytes(font.getmask(str(digit))) for digit in range(10)]
            except OSError:
                continue
            if all(any(mask) for mask in masks) and len(set(masks)) == 10:
                fonts.append(path)
    return fonts


def render_digit(label, font_path, rng):
    """One rendered digit: uint8 (28, 28, 3)."""
    scale = 4  # drawn large, then reduced: smooth edges
    background = rng.integers(0, 256, 3)
    foreground = (background + rng.integers(80, 177, 3)) % 256  # stays visible
    canvas = Image.new("RGB", (SIZE * scale,) * 2, tuple(int(v) for v in background))
    font = ImageFont.truetype(font_path, int(rng.integers(15, 25)) * scale)
    draw = ImageDraw.Draw(canvas)
    centre = (SIZE * scale / 2 + rng.normal(0, 1.5) * scale,
              SIZE * scale / 2 + rng.normal(0, 1.5) * scale)
    draw.text(centre, str(label), font=font, anchor="mm",
              fill=tuple(int(v) for v in foreground))
    canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR,
                           fillcolor=tuple(int(v) for v in background))
    canvas = canvas.resize((SIZE, SIZE), Image.LANCZOS)
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))
    return np.asarray(canvas, np.uint8)


def rendered_digits(count, fonts, rng):
    """(images, labels): `count` rendered digits, labels uniform over 0-9."""
    labels = rng.integers(0, 10, count)
    choice = rng.integers(0, len(fonts), count)
    images = np.stack([render_digit(label, fonts[index], rng)
                       for label, index in zip(labels, choice)])
    return images, labels


def mnist_pools(cache_dir, seed):
    """{role: (images, labels)} of MNIST digits, no digit in two roles."""
    mnist, _ = mnist_readers.load_mnist(cache_dir=cache_dir, log=lambda line: None)
    order = np.random.default_rng([seed, 0]).permutation(len(mnist["train"].labels))
    train_images = mnist["train"].images[order]
    train_labels = mnist["train"].labels[order]
    pools = {"test": (mnist["test"].images, mnist["test"].labels)}
    for role, (start, end) in ROLE_DIGITS.items():
        pools[role] = (train_images[start:end], train_labels[start:end])
    return pools


def domain_images(domain, role, count, pools, seed, fonts):
    """(uint8 (count, 28, 28, 3) images, labels) of `domain` for `role`."""
    rng = np.random.default_rng([seed, ROLES.index(role), DOMAINS.index(domain)])
    if domain == "synth":
        return rendered_digits(count, fonts, rng)
    images, labels = (array[:count] for array in pools[role])
    grey = np.repeat(images[..., None], 3, axis=-1)
    if domain == "mnist":
        return grey, labels
    if domain == "inverted":
        return 255 - grey, labels
    _, photos = mnist_m.load_photos()
    return mnist_m.blend_mnistm(images, photos, rng)[0], labels


def image_paths(folder, labels, labelled):
    """Paths for the images of one domain of one split: class_<k>/ or flat."""
    return [os.path.join(folder, f"class_{label}" if labelled else "",
                         f"{index:05d}.png") for index, label in enumerate(labels)]


def plan(shift, scale=1.0):
    """[(split, domain folder, domain, role, count, labelled)] of a shift; `scale`
    multiplies every count (a quick check of the benchmark itself)."""
    source, target, target_train = SHIFTS[shift]
    return [(split, folder, domain, role, max(10, round(count * scale)), labelled)
            for split, folder, domain, role, count, labelled in (
                ("train", "source", source, "source_train", SOURCE_TRAIN, True),
                ("train", "target", target, "target_train", target_train, False),
                ("val", "source", source, "source_val", VAL, True),
                ("val", "target", target, "target_val", VAL, False),
                ("test", "target", target, "test", TEST, True))]


def build_shift(shift, output_dir, seed=0, cache_dir=None, scale=1.0):
    """Builds `shift` (a key of SHIFTS) into `output_dir`, complete or absent;
    `scale` multiplies the image counts.

    Returns:
        The dataset.json record.
    """
    pools = mnist_pools(cache_dir, seed)
    fonts = digit_fonts() if "synth" in SHIFTS[shift][:2] else []
    temporary = f"{output_dir.rstrip(os.sep)}.tmp-build"
    shutil.rmtree(temporary, ignore_errors=True)
    counts = {}
    for split, folder, domain, role, count, labelled in plan(shift, scale):
        images, labels = domain_images(domain, role, count, pools, seed, fonts)
        paths = image_paths(os.path.join(temporary, split, folder), labels, labelled)
        for class_dir in sorted({os.path.dirname(path) for path in paths}):
            os.makedirs(class_dir, exist_ok=True)
        mnist_m.write_pngs(images, paths)
        counts.setdefault(split, {})[folder] = len(paths)
    record = {"shift": shift, "source": SHIFTS[shift][0], "target": SHIFTS[shift][1],
              "seed": seed, "counts": counts,
              "fonts": [os.path.relpath(path, FONT_ROOT) for path in fonts]}
    write_atomically(os.path.join(temporary, "dataset.json"),
                     lambda handle: json.dump(record, handle, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    os.rename(temporary, output_dir)
    return record

"""Labels for images: a trained model's predictions for image files, as a CSV.

The images go through evaluation's own path (`evaluation.predict_domain`), so a
prediction here is eval.py's prediction for the same image and model.
"""

import io
import os
import time

import numpy as np
from scipy import special

import data_utils
import evaluation
import folders
import run_folder
from file_utils import UserError, write_atomically

CSV_START = b"path,predicted_class,probability"  # what a CSV written here begins with


def check_output(path, flag, own_start):
    """Refuses, before any work, an output path that is a folder, lies under a file,
    or is a file that does not begin with `own_start` (bytes): one this command did
    not write."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: pass a file name inside it")
    if os.path.isfile(path):
        with open(path, "rb") as handle:
            if handle.read(len(own_start)) != own_start:
                raise UserError(f"{flag} {path} is a file this command did not write: "
                                "pass a new file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: {folder} is a file, not a folder: pass "
                        "another path")


def write_atomically_into_folder(path, write, mode="w"):
    """`write_atomically`, making the file's folder first where it is missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, write, mode)


def images_to_predict(inputs, channels, skip_bad_images):
    """The images of `inputs` (files and folders) as DomainFiles, in sorted order;
    with `skip_bad_images`, without the files that cannot be decoded (logged)."""
    files, ignored = folders.list_images(inputs)
    if ignored:
        data_utils.tell_ignored("--input", ignored)
    if skip_bad_images:
        files, skipped = data_utils.readable_only(files, channels, "--input")
        data_utils.log_skipped("--input", skipped)
    return files


def csv_field(text):
    """`text` as one CSV field, quoted where it holds a comma, quote or line break."""
    if any(character in text for character in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def write_csv(path, paths, class_names, probabilities, domain_logits):
    """The CSV, a row per image: path, predicted class, its probability, one
    probability per class, and the probability that the image is a target image.

    The numbers are formatted by NumPy, a block at a time: row by row in Python took
    about a tenth of the time of predicting the images.
    """
    header = [*CSV_START.decode().split(","),
              *(f"probability_{name}" for name in class_names),
              "target_domain_probability"]
    predicted = np.argmax(probabilities, axis=1)
    numbers = np.column_stack([probabilities.max(axis=1), probabilities,
                               special.expit(domain_logits)])
    block = io.StringIO()
    np.savetxt(block, numbers, fmt="%.9g", delimiter=",")
    names = [csv_field(name) for name in class_names]

    def write(handle):
        handle.write(",".join(map(csv_field, header)) + "\n")
        for image, k, line in zip(paths, predicted, block.getvalue().splitlines()):
            handle.write(f"{csv_field(image)},{names[k]},{line}\n")

    write_atomically_into_folder(path, write)


def run(model_dir, inputs, output=None, weights_fname=None, features=None,
        skip_bad_images=False, verbose=0):
    """Predicts the class of every image under `inputs`; writes the CSV.

    Args:
        model_dir: a run folder; `weights_fname` picks a checkpoint of it, as in
            eval.py.
        inputs: image files and folders (read recursively, class folders not read).
        output: the CSV to write (default: MODEL_DIR/predictions.csv), atomically.
        features: also write the shared features of every image, row-aligned, to
            this .npy file.
        skip_bad_images: leave out files that cannot be decoded instead of stopping.
        verbose: Keras's progress output: 1 a live bar, 2 one line, 0 none.

    Returns:
        As `predict_files`.
    """
    output = output or os.path.join(model_dir, run_folder.PREDICTIONS_CSV)
    for path, flag, own_start in ((output, "--output", CSV_START),
                                  (features, "--features", b"\x93NUMPY")):
        if path:
            check_output(path, flag, own_start)
    model = evaluation.load_trained_model(run_folder.model_to_evaluate(model_dir,
                                                                       weights_fname))
    files = images_to_predict(inputs, model.image_shape[2], skip_bad_images)
    return predict_files(model, files, output, features, verbose)


def predict_files(model, files, output, features=None, verbose=0):
    """Writes the CSV of `model`'s predictions for `files` (DomainFiles), and with
    `features` the .npy of their shared features.

    Returns:
        A summary dict: `images`, `seconds` (predicting and writing the CSV),
        `images_per_second`, `class_counts`, `outputs` (the files written).
    """
    with data_utils.naming_unreadable([("--input", files)], model.image_shape[2]):
        started = time.perf_counter()
        class_logits, domain_logits = evaluation.predict_domain(model, files,
                                                                verbose=verbose)
        probabilities = special.softmax(class_logits, axis=-1)
        write_csv(output, files.paths, model.class_names, probabilities, domain_logits)
        seconds = time.perf_counter() - started
        if features:
            shared = evaluation.predict_features(model, files)
            write_atomically_into_folder(features, lambda handle: np.save(handle, shared),
                                         "wb")
    counts = np.bincount(np.argmax(probabilities, axis=1),
                         minlength=len(model.class_names))
    return {"images": len(files), "seconds": seconds,
            "images_per_second": len(files) / seconds,
            "class_counts": dict(zip(model.class_names, counts.tolist())),
            "outputs": [path for path in (output, features) if path]}

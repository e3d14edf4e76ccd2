"""Labels for images: a trained model's predictions for image files, as a CSV.

The images go through evaluation's own path (`evaluation.predict_domain`), so a
prediction here is eval.py's prediction for the same image and model.
"""

import csv
import os
import time

import numpy as np
from absl import logging
from scipy import special

import data_utils
import evaluation
import folders
import run_folder
from file_utils import UserError, write_atomically

PREDICTIONS_CSV = "predictions.csv"


def check_output(path, flag):
    """Refuses an output path that is a folder; makes its folder where missing."""
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: pass a file name inside it")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot create its folder {folder} "
                        f"({error.strerror}): pass a writable path") from None


def images_to_predict(inputs, channels, skip_bad_images):
    """The images of `inputs` (files and folders) as DomainFiles, in sorted order;
    with `skip_bad_images`, without the files that cannot be decoded (logged)."""
    files, ignored = folders.list_images(inputs)
    if ignored:
        logging.info("ignored %d files that are not images", ignored)
    if skip_bad_images:
        files, skipped = data_utils.readable_only(files, channels, "--input")
        data_utils.log_skipped("--input", skipped)
    return files


def rows(paths, class_names, probabilities, domain_logits):
    """The CSV's header and rows: path, predicted class, its probability, one
    probability per class, and the probability that the image is a target image."""
    header = ["path", "predicted_class", "probability",
              *(f"probability_{name}" for name in class_names),
              "target_domain_probability"]
    predicted = np.argmax(probabilities, axis=1)
    target = special.expit(domain_logits)
    body = ([path, class_names[k], f"{p[k]:.9g}", *(f"{v:.9g}" for v in p), f"{t:.9g}"]
            for path, k, p, t in zip(paths, predicted, probabilities, target))
    return header, body


def write_csv(path, header, body):
    def write(handle):
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(body)

    write_atomically(path, write)


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
        A summary dict: `images`, `seconds`, `images_per_second`, `class_counts`,
        `outputs` (the files written).
    """
    output = output or os.path.join(model_dir, PREDICTIONS_CSV)
    for path, flag in ((output, "--output"), (features, "--features")):
        if path:
            check_output(path, flag)
    model = evaluation.load_trained_model(run_folder.model_to_evaluate(model_dir,
                                                                       weights_fname))
    files = images_to_predict(inputs, model.image_shape[2], skip_bad_images)
    with data_utils.naming_unreadable([("--input", files)], model.image_shape[2]):
        started = time.perf_counter()
        class_logits, domain_logits = evaluation.predict_domain(model, files,
                                                                verbose=verbose)
        probabilities = special.softmax(class_logits, axis=-1)
        write_csv(output, *rows(files.paths, model.class_names, probabilities,
                                domain_logits))
        seconds = time.perf_counter() - started
        if features:
            shared = evaluation.predict_features(model, files)
            write_atomically(features, lambda handle: np.save(handle, shared), mode="wb")
    return summary(len(files), probabilities, seconds, model.class_names,
                   [path for path in (output, features) if path])


def summary(num_images, probabilities, seconds, class_names, outputs):
    """What `run` returns."""
    counts = np.bincount(np.argmax(probabilities, axis=1), minlength=len(class_names))
    return {"images": num_images, "seconds": seconds,
            "images_per_second": num_images / seconds,
            "class_counts": dict(zip(class_names, counts.tolist())), "outputs": outputs}

"""A trained model for people without this repository: a TensorFlow SavedModel with a
serving signature, a TFLite file, and the class names beside them.

Both take a batch of decoded images (uint8, any height and width, the model's
channels) and do all the rest themselves, as the saved model does: resizing to the
model's size, the centre crop of a run trained with random crops, the normalisation.
"""

import errno
import os
import shutil
import tempfile

import keras
import tensorflow as tf

import evaluation
import run_folder
from file_utils import DiskFull, UserError, refuse_foreign_files

SAVED_MODEL = "saved_model"
TFLITE_FILE = "model.tflite"
CLASS_NAMES_FILE = "class_names.txt"
SIGNATURE = "serving_default"


def with_channels(images, channels):
    """uint8 images of 1, 3 or 4 channels as the model's `channels`: grey repeated to
    RGB, RGB(A) made grey (tf.image.rgb_to_grayscale's weights), alpha dropped."""
    images = images[..., :3]
    grey = tf.equal(tf.shape(images)[-1], 1)
    if channels == 3:
        matched = tf.cond(grey, lambda: tf.repeat(images[..., :1], 3, axis=-1),
                          lambda: images)
    else:
        matched = tf.cond(grey, lambda: images, lambda: tf.cast(tf.round(
            tf.image.rgb_to_grayscale(tf.cast(images, tf.float32))), tf.uint8))
    matched.set_shape((None, None, None, channels))  # the graph's shape: no op
    return matched


def serving_function(model):
    """images (uint8, [batch, height, width, 1, 3 or 4 channels]) -> `probabilities`
    (one column per class), `class_index` (int32) and `target_domain_probability`."""
    def serve(images):
        images = with_channels(images, model.image_shape[2])
        outputs = model(images, training=False)
        probabilities = tf.nn.softmax(outputs["class_logits"])
        return {"probabilities": probabilities,
                "class_index": tf.argmax(probabilities, axis=-1, output_type=tf.int32),
                "target_domain_probability": tf.sigmoid(outputs["domain_logits"][:, 0])}
    return serve


def write_saved_model(model, path):
    """The SavedModel, whose `serve` function is also its `serving_default`."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, None, None, None), tf.uint8, name="images")
    archive.add_endpoint("serve", serving_function(model), input_signature=[spec])
    archive.write_out(path, verbose=False)


def write_tflite(saved_model, path):
    """The SavedModel's serving signature converted to TFLite (float32)."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model,
                                                         signature_keys=[SIGNATURE])
    with open(path, "wb") as handle:
        handle.write(converter.convert())


def replace_folder(folder, write):
    """Calls `write(temporary folder)`, then puts that folder in place of `folder`:
    a failure leaves the previous export (or none) as it was."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from a server
    previous = f"{temporary}-previous"
    try:
        write(temporary)
        if os.path.isdir(folder):
            os.replace(folder, previous)
        os.replace(temporary, folder)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(folder, "the previous export is kept") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def export(model_dir, weights_fname=None, output=None):
    """Writes `output` (default MODEL_DIR/export): saved_model/, model.tflite and
    class_names.txt (one per line, in the order of the probabilities).

    Returns:
        {"saved_model", "tflite", "class_names"}: the paths written.
    """
    output = output or os.path.join(model_dir, run_folder.EXPORT_DIR)
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"--output {output} is a file: pass a folder")
    # An earlier export is replaced whole, so it must be nothing but an export.
    refuse_foreign_files(output, "--output", (SAVED_MODEL, TFLITE_FILE, CLASS_NAMES_FILE))
    model = evaluation.load_trained_model(run_folder.model_to_evaluate(model_dir,
                                                                       weights_fname))

    def write(folder):
        write_saved_model(model, os.path.join(folder, SAVED_MODEL))
        write_tflite(os.path.join(folder, SAVED_MODEL), os.path.join(folder, TFLITE_FILE))
        with open(os.path.join(folder, CLASS_NAMES_FILE), "w") as handle:
            handle.writelines(f"{name}\n" for name in model.class_names)

    replace_folder(output, write)
    return {"saved_model": os.path.join(output, SAVED_MODEL),
            "tflite": os.path.join(output, TFLITE_FILE),
            "class_names": os.path.join(output, CLASS_NAMES_FILE)}

"""Exports a trained run for use without this repository.

    python export.py --model_dir runs/mine [--weights_fname CKPT] [--output DIR]

writes DIR/saved_model/ (a TensorFlow SavedModel whose serving signature takes uint8
images of any size and gives class probabilities, the class index and the
target-domain probability), DIR/model.tflite and DIR/class_names.txt; DIR defaults to
MODEL_DIR/export. The flags are checked before TensorFlow loads; `exporting.export`
does the work.
"""

import sys

from absl import app, flags, logging

import common_flags
import file_utils

FLAGS = flags.FLAGS
common_flags.define(common_flags.EXPORT)
flags.adopt_module_key_flags(common_flags)


def main(argv):
    del argv
    # Saving and converting log dozens of notes, none of them for the user.
    logging.set_verbosity(logging.WARNING)
    with file_utils.without_start_up_notes():
        import exporting
    try:
        written = exporting.export(**common_flags.values(common_flags.EXPORT))
    except file_utils.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print("Wrote " + ", ".join(written.values()))


if __name__ == "__main__":
    app.run(main, flags_parser=common_flags.parse_or_exit)

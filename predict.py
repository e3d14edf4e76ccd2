"""Predicts the class of images with a trained run, into a CSV.

    python predict.py --model_dir runs/mine --input photos/ more/ --output labels.csv

Folders are read recursively in any layout; a row per image gives its path, the
predicted class and its probability, every class's probability and the probability
that the image is a target-domain image. The flags are checked before TensorFlow
loads; `prediction.run` does the work.
"""

import sys

from absl import app, flags

import common_flags
import file_utils

FLAGS = flags.FLAGS
common_flags.define(common_flags.PREDICT)
flags.adopt_module_key_flags(common_flags)


def main(argv):
    inputs = FLAGS.input + argv[1:]  # --input a b c: absl keeps b and c in argv
    if not inputs:
        print("error: no images to predict: pass --input PATH [PATH ...]",
              file=sys.stderr)
        sys.exit(2)
    with file_utils.without_start_up_notes():
        import prediction
    settings = common_flags.values(common_flags.PREDICT)
    settings["inputs"] = inputs
    del settings["input"]
    try:
        summary = prediction.run(**settings, verbose=1 if sys.stdout.isatty() else 2)
    except file_utils.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    counts = ", ".join(f"{name} {count}" for name, count in
                       summary["class_counts"].items())
    print(f"Predicted {summary['images']} images in {summary['seconds']:.1f} s "
          f"({summary['images_per_second']:,.0f} images/s); per class: {counts}")
    print("Wrote " + ", ".join(summary["outputs"]))


if __name__ == "__main__":
    app.run(main, flags_parser=common_flags.parse_or_exit)

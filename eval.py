"""Evaluates a trained run on a two-domain test split.

    python eval.py --model_dir runs/dann --test_dir DATA/test

Prints per-domain label accuracy (where a domain has labels) and what the domain
classifier recognises, and writes eval_report.json and its figures (with --tsne,
tsne.png) into MODEL_DIR/eval/<split name>/; a checkpoint's outputs carry its name.
The flags are checked before TensorFlow loads; `evaluation.run` does the work.
"""

import sys

from absl import app, flags

import common_flags
import file_utils

FLAGS = flags.FLAGS
common_flags.define(common_flags.EVAL)
flags.adopt_module_key_flags(common_flags)


def main(argv):
    del argv
    with file_utils.without_start_up_notes():
        import evaluation
    try:
        report = evaluation.run(**common_flags.values(common_flags.EVAL))
    except file_utils.UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(evaluation.summary_table(report))
    print("Wrote " + ", ".join(report["outputs"]))


if __name__ == "__main__":
    app.run(main, flags_parser=common_flags.parse_or_exit)

"""Every command-line flag of dann-keras, with its help text and validator.

Defaults follow Ganin & Lempitsky (2015/2016); edit them here.
"""

import os

from absl import flags

import models

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_DIR = os.path.join(REPO_DIR, "data", "mnist_mnistm")
DEFAULT_MODEL_DIR = os.path.join(REPO_DIR, "runs", "dann")
CACHE_DIR = os.path.join(REPO_DIR, "data", "cache")

# Data.
flags.DEFINE_string(
    "train_dir", os.path.join(DEFAULT_DATA_DIR, "train"),
    "Training split: a folder with source/<class>/ and target/<class>/ images.")
flags.DEFINE_string(
    "val_dir", None,
    "Optional split evaluated after every epoch (source, target and domain "
    "accuracy). Used for logging only, never for choosing a checkpoint.")
flags.DEFINE_string(
    "test_dir", os.path.join(DEFAULT_DATA_DIR, "test"),
    "Split that eval.py evaluates.")
flags.DEFINE_integer("img_width", 28, "Image width; other sizes are resized.")
flags.DEFINE_integer("img_height", 28, "Image height; other sizes are resized.")
flags.DEFINE_boolean(
    "skip_bad_images", False,
    "Leave out image files that cannot be decoded (counted in the log) instead of "
    "stopping with an error that names the first one.")
flags.DEFINE_enum(
    "img_mode", "rgb", ["rgb", "grayscale"],
    "Channels the images are read with; grayscale sources are repeated to 3 "
    "channels in rgb mode.")

# Building MNIST -> MNIST-M (data_utils.py; train.py uses them when it builds the
# default data set).
flags.DEFINE_string("output_dir", DEFAULT_DATA_DIR,
                    "data_utils.py: folder to write the MNIST -> MNIST-M data set into.")
flags.DEFINE_string(
    "mnist_path", None,
    "Folder of LeCun's MNIST IDX files (.gz or not) or a Keras mnist.npz. Default: "
    "Keras's cached or downloaded copy, else the copy shipped on PyPI.")
flags.DEFINE_string(
    "mnistm_path", None,
    "The official MNIST-M release (the mnist_m folder or mnist_m.tar.gz) to use as "
    "the target instead of generating it.")
flags.DEFINE_string(
    "backgrounds", None,
    "Photos for generating MNIST-M: a folder of colour images or BSDS500's "
    "BSR_bsds500.tgz (its training photos, as in the paper). Default: the 11 colour "
    "photos shipped with scikit-image and scikit-learn.")
flags.DEFINE_integer("num_train", 0, "Keep the first N training digits (0: all 60,000).")
flags.DEFINE_integer("num_test", 0, "Keep the first N test digits (0: all 10,000).")
flags.DEFINE_boolean(
    "binarize", False,
    "Binarise digits (pixel > 0 -> 255) before blending, as the widely used MNIST-M "
    "re-creation script does; default: blend the grayscale digit, as the paper states.")

# Run.
flags.DEFINE_string(
    "model_dir", DEFAULT_MODEL_DIR,
    "Folder holding the whole record of a run: flags, checkpoints, history, logs, "
    "figures and evaluation reports.")
flags.DEFINE_enum(
    "mode", "dann", list(models.MODES),
    "dann: adversarial adaptation; source_only: same network without the domain "
    "loss (lower bound); target_only: trained on target labels (upper bound).")
flags.DEFINE_integer(
    "num_epochs", 20,
    "Training epochs (passes over the larger domain); the schedules span all of them. "
    "20 keeps the default MNIST -> MNIST-M run near 10 minutes on 2 CPU cores.")
flags.DEFINE_integer("batch_size", 64, "Images per domain per step (the paper: 64 + 64).")
flags.DEFINE_integer(
    "steps_per_execution", 16,
    "Training steps Keras runs per compiled call. Larger values cut Python overhead; "
    "results are identical, since lambda and the learning rate are computed from "
    "the step counter inside each step. Progress, Ctrl-C and NaN checks happen "
    "between calls.")
flags.DEFINE_integer("seed", 0, "Random seed of weights and data order.")
flags.DEFINE_integer("log_rate", 5, "Epochs between checkpoints (the last epoch is "
                     "always saved).")
flags.DEFINE_boolean(
    "restore_model", False,
    "Resume the run in --model_dir from its latest checkpoint; the learning-rate and "
    "lambda schedules continue where they stopped.")
flags.DEFINE_boolean(
    "overwrite", False,
    "Replace the run already in --model_dir (without it, train.py refuses to start "
    "there), or the data set in --output_dir (data_utils.py).")
flags.DEFINE_boolean(
    "tsne", False,
    "eval.py: also draw tsne.png, a t-SNE of the features of 1,000 source and 1,000 "
    "target test images coloured by domain.")
flags.DEFINE_string(
    "weights_fname", None,
    "eval.py: checkpoint to evaluate, a path or a file name inside --model_dir "
    "(default: model.keras).")

# Optimisation.
flags.DEFINE_float("lr", 0.01, "Initial learning rate lr0.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("lr_alpha", 10.0, "alpha in lr0 / (1 + alpha p)^beta.")
flags.DEFINE_float("lr_beta", 0.75, "beta in lr0 / (1 + alpha p)^beta.")
flags.DEFINE_float("gamma", 10.0, "gamma in lambda = 2 / (1 + exp(-gamma p)) - 1.")

for _name in ("num_epochs", "batch_size", "log_rate", "img_width", "img_height",
              "steps_per_execution"):
    flags.register_validator(_name, lambda value: value is not None and value >= 1,
                             message=f"--{_name} must be a positive integer")
for _name in ("num_train", "num_test"):
    flags.register_validator(_name, lambda value: value is not None and value >= 0,
                             message=f"--{_name} must be zero (all) or positive")
for _name in ("lr", "lr_alpha", "lr_beta", "gamma"):
    flags.register_validator(_name, lambda value: value is not None and value >= 0,
                             message=f"--{_name} must be zero or positive")
flags.register_validator("lr", lambda value: value > 0, message="--lr must be positive")
flags.register_validator("momentum", lambda value: 0 <= value < 1,
                         message="--momentum must be in [0, 1)")

FLAGS = flags.FLAGS

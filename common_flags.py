"""Every command-line flag of dann-keras: its default, help text and rule.

Defaults follow Ganin & Lempitsky (2015/2016); edit them here. The settings are plain
data grouped by command: each script defines its own groups as absl flags (`define`),
and a configuration built in code (`TrainConfig`) is checked by the same rules.
Importing this module defines no flag and loads no TensorFlow.
"""

import dataclasses
import os
import sys

from absl import flags

from file_utils import UserError

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA_DIR = os.path.join(REPO_DIR, "data", "mnist_mnistm")
DEFAULT_MODEL_DIR = os.path.join(REPO_DIR, "runs", "dann")
CACHE_DIR = os.path.join(REPO_DIR, "data", "cache")
# flags.txt is the recipe of a run, not where it lives, how it was resumed or replaced,
# or how it was spread over devices: a replay goes where its own --model_dir says.
NOT_RECORDED = ("model_dir", "restore_model", "overwrite", "distribute")
# The modes that adapt to the target (models.MODES less the two baselines).
ADAPTING_MODES = ("dann", "cdan", "cdan_e", "mcc", "coral")
RULES = {  # name: (test, what the error message says the value must be)
    "methods": (lambda value: bool(value) and all(
        part in ADAPTING_MODES for part in value.split(",")),
                f"must be a comma-separated list of {', '.join(ADAPTING_MODES)}"),
    "positive": (lambda value: value >= 1, "must be a positive integer"),
    "at least 0": (lambda value: value >= 0, "must be zero or positive"),
    "above 0": (lambda value: value > 0, "must be positive"),
    "momentum": (lambda value: 0 <= value < 1, "must be in [0, 1)"),
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One flag: its type is its default's (str where the default is None; a list
    default makes a flag that may be given several times)."""

    default: object
    help: str
    rule: str = None  # a key of RULES
    choices: tuple = ()


WEIGHTS_FNAME = Setting(None, "Checkpoint to use, a path, a file name inside --model_dir "
                        "or a step (default: model.keras, the final model).")
MODEL_DIR = Setting(DEFAULT_MODEL_DIR, "Folder holding the whole record of a run: flags, "
                    "checkpoints, history, logs, figures and evaluation reports.")
SKIP_BAD_IMAGES = Setting(False, "Leave out image files that cannot be decoded "
                          "(counted in the log) instead of stopping with an error that "
                          "names the first one.")
DATA = {
    "train_dir": Setting(os.path.join(DEFAULT_DATA_DIR, "train"), "Training split: a "
                         "folder with source/<class>/ images and target/ images, "
                         "unlabelled (any sub-folders not named after a class) or in "
                         "target/<class>/."),
    "val_dir": Setting(None, "Optional split of the same layout, predicted after every "
                       "epoch for the health signals and accuracies in history.csv "
                       "(the target's only where it has labels); never used to choose a "
                       "checkpoint. Without it, a fixed sample of the training split is "
                       "watched."),
    "img_width": Setting(0, "Image width; other sizes are resized (0: the model's own, "
                         "28 for the digit networks, 224 for resnet50).", "at least 0"),
    "img_height": Setting(0, "Image height; other sizes are resized (0: the model's own, "
                          "28 for the digit networks, 224 for resnet50).", "at least 0"),
    "img_mode": Setting("rgb", "Channels the images are read with; grayscale sources "
                        "are repeated to 3 channels in rgb mode.",
                        choices=("rgb", "grayscale")),
    "skip_bad_images": SKIP_BAD_IMAGES,
    "augment": Setting(False, "Random resized crop and horizontal flip of training "
                       "images, resize and centre crop of evaluated ones (for photos; "
                       "off for digits). Stored in the saved model."),
    "cache": Setting(
        "auto", "Where decoded training images are kept. memory: decoded once, held in "
        "memory (fastest for small sets). disk: decoded once into a file in --model_dir. "
        "none: decoded again every epoch. auto: memory if the decoded set fits in a "
        "quarter of this machine's memory, else none; the log says which.",
        choices=("auto", "memory", "disk", "none")),
}
NETWORK = {
    "model": Setting("mnist", "mnist: the paper's MNIST network. svhn: the paper's "
                     "SVHN/synthetic-digits network. keras_dann: the MNIST network as the "
                     "original Keras DANN repository built it (random-normal "
                     "initialisers, dropout 0.5 in both heads). resnet50: a "
                     "keras.applications ResNet-50 backbone with a 256-unit bottleneck, "
                     "learning at 0.1x the heads' rate (for photos; see --weights). "
                     "Stored in the saved model.",
                     choices=("mnist", "svhn", "keras_dann", "resnet50")),
    "weights": Setting("none", "Backbone weights for --model resnet50: imagenet "
                       "(downloaded by Keras on first use into ~/.keras/models), a local "
                       "Keras weights file, or none (random)."),
    "fixed_lambda": Setting(0.0, "A constant gradient-reversal lambda from the first "
                            "step instead of the paper's schedule (0: the schedule; the "
                            "original Keras DANN repository used 1).", "at least 0"),
}
RUN = {
    "model_dir": MODEL_DIR,
    "mode": Setting("dann", "dann: adversarial adaptation (the paper); source_only: "
                    "same network without the domain loss (lower bound); target_only: "
                    "trained on target labels (upper bound); cdan, cdan_e: conditional "
                    "adversarial adaptation, cdan_e weighting confident images more; "
                    "mcc: minimum class confusion; coral: Deep CORAL (methods.py). "
                    "lambda (--gamma, --fixed_lambda) weights every method's "
                    "adaptation.",
                    choices=("dann", "source_only", "target_only", *ADAPTING_MODES[1:])),
    "num_epochs": Setting(20, "Training epochs (passes over the larger domain); the "
                          "schedules span all of them. The paper table's runs use 40.",
                          "positive"),
    "batch_size": Setting(64, "Images per domain per step (the paper: 64 + 64).",
                          "positive"),
    "steps_per_execution": Setting(
        16, "Training steps Keras runs per compiled call: fewer Python round trips, "
        "identical results (lambda and the learning rate come from the step counter "
        "inside each step). Progress, Ctrl-C and NaN checks happen between calls.",
        "positive"),
    "seed": Setting(0, "Random seed of weights and data order."),
    "precision": Setting(
        "float32", "float32: the paper's arithmetic. mixed_bfloat16: hidden layers "
        "compute in bfloat16 (faster on GPUs with bfloat16; on a CPU, check "
        "benchmarks/bench.py's bf16_speedup first: 0.70 on AVX-512 BF16 without AMX); "
        "mixed_float16: float16 with dynamic loss scaling (NVIDIA GPUs only). "
        "Logits, losses, lambda and the input normalisation stay float32.",
        choices=("float32", "mixed_bfloat16", "mixed_float16")),
    "distribute": Setting(
        "auto", "none: one device. mirrored: all GPUs of this machine "
        "(tf.distribute.MirroredStrategy). multi_worker: several machines, each named "
        "in the TF_CONFIG environment variable (MultiWorkerMirroredStrategy). auto: "
        "multi_worker if TF_CONFIG names several workers, else mirrored if more than one "
        "GPU is visible, else none. --batch_size stays the batch of one step, split "
        "across the devices, so the result does not depend on their number.",
        choices=("auto", "none", "mirrored", "multi_worker")),
    "log_rate": Setting(5, "Epochs between checkpoints (the last epoch is always saved).",
                        "positive"),
    "restore_model": Setting(False, "Resume the run in --model_dir from its latest "
                             "checkpoint; the learning-rate and lambda schedules "
                             "continue where they stopped."),
    "overwrite": Setting(False, "Replace the run already in --model_dir (without it, "
                         "train.py refuses to start there)."),
}
OPTIMISATION = {
    "lr": Setting(0.01, "Initial learning rate lr0.", "above 0"),
    "momentum": Setting(0.9, "SGD momentum.", "momentum"),
    "lr_alpha": Setting(10.0, "alpha in lr0 / (1 + alpha p)^beta.", "at least 0"),
    "lr_beta": Setting(0.75, "beta in lr0 / (1 + alpha p)^beta.", "at least 0"),
    "gamma": Setting(10.0, "gamma in lambda = 2 / (1 + exp(-gamma p)) - 1.", "at least 0"),
}
TRAIN = {**DATA, **NETWORK, **RUN, **OPTIMISATION}
EVAL = {
    "model_dir": MODEL_DIR,
    "test_dir": Setting(os.path.join(DEFAULT_DATA_DIR, "test"), "Split to evaluate: a "
                        "folder with source/<class>/ and/or target/ images (a target "
                        "without class folders gets no accuracy); the report goes to "
                        "MODEL_DIR/eval/<its name>/."),
    "weights_fname": WEIGHTS_FNAME,
    "skip_bad_images": SKIP_BAD_IMAGES,
    "tsne": Setting(False, "Also draw tsne.png, a t-SNE of the features of up to 1,000 "
                    "images of each domain, coloured by domain."),
    "label_free": Setting(False, "Also score the model without target labels "
                          "(source_accuracy, target_entropy, snd, dev; higher is better) "
                          "into the report's label_free_scores; use a validation split "
                          "as --test_dir, never the test split you report."),
    "reverse_validation": Setting(False, "--label_free plus the paper's reverse "
                                  "validation, which trains a model with the run's "
                                  "recipe from the split's pseudo-labelled target to "
                                  "its source (about a run's length on the split)."),
}
PREDICT = {
    "model_dir": MODEL_DIR,
    "input": Setting([], "Image files or folders to predict (folders are read "
                     "recursively; class folders are neither needed nor read). Several "
                     "may follow one flag, as in --input a.png photos/ more/"),
    "output": Setting(None, "CSV to write, one row per image (default: "
                      "MODEL_DIR/predictions.csv)."),
    "features": Setting(None, "Also write the images' shared features to this .npy "
                        "file, a row per CSV row."),
    "weights_fname": WEIGHTS_FNAME,
    "skip_bad_images": SKIP_BAD_IMAGES,
}
EXPORT = {
    "model_dir": MODEL_DIR,
    "output": Setting(None, "Folder to write saved_model/, model.tflite and "
                      "class_names.txt into (default: MODEL_DIR/export)."),
    "weights_fname": WEIGHTS_FNAME,
}
PLOTS = {
    "data_dir": Setting(DEFAULT_DATA_DIR, "Data set whose train/ split samples.png "
                        "shows, two images per class and domain."),
    "output_dir": Setting(os.path.join(REPO_DIR, "img"), "Folder to write "
                          "architecture.png and samples.png into (default: the README's "
                          "img/, whose figures it replaces)."),
}
TUNE = {
    "train_dir": DATA["train_dir"],
    "val_dir": Setting(None, "Validation split every trial is scored on, without target "
                       "labels (its target may be unlabelled): never the test split you "
                       "report."),
    "study_dir": Setting(os.path.join(REPO_DIR, "runs", "tune"), "Folder of the study: "
                         "a run folder per trial (trial_0007/), trials.csv, trials.png, "
                         "choice.txt, best (a link to the chosen trial) and, by default, "
                         "study.db. A folder holding anything else is refused."),
    "trials": Setting(16, "Trials the study holds when done, those of every process "
                      "sharing it and its two baselines (source-only and the default "
                      "DANN recipe) included.", "positive"),
    "sampler": Setting("tpe", "How trials are proposed: tpe (Optuna's TPE, seeded), "
                       "random, or grid (common_flags.GRID).",
                       choices=("tpe", "random", "grid")),
    "methods": Setting("dann", "The methods (--mode) the study searches, comma-separated: "
                       "dann, cdan, cdan_e, mcc, coral; with more than one, each trial "
                       "draws one. Source-only and the default DANN recipe are always "
                       "trials.", "methods"),
    "objective": Setting("snd", "The label-free score on --val_dir the sampler "
                         "maximises (it steers which recipes are tried; the trial chosen "
                         "is the rule's: see the top of this help); source_accuracy "
                         "for comparison.",
                         choices=("snd", "target_entropy", "source_accuracy")),
    "storage": Setting(None, "Where the study lives, for several processes or machines "
                       "on one study. Default: sqlite:///STUDY_DIR/study.db, for ONE "
                       "machine (file locks over network file systems are unreliable). "
                       "Several machines: a database server, postgresql+psycopg://user:"
                       "password@host/db (pip install -r requirements-postgresql.txt), "
                       "or a journal file in a folder they share, "
                       "journal:/shared/folder/journal.log (no server)."),
    "sampler_seed": Setting(0, "Seed of the sampler of the process that creates the "
                            "study; processes that join it add their process id, so "
                            "as not to propose the same trials (--seed stays the "
                            "trials' weights seed)."),
}
# tune.py's search space, one place to change it: train.py flag -> how a trial
# draws it (log-uniform between two values, or one of a few).
SEARCH_SPACE = {
    "lr": ("log_float", 0.001, 0.1),
    "gamma": ("log_float", 1.0, 30.0),
    "num_epochs": ("choice", (10, 20, 30)),
}
# tune.py --sampler grid: the values tried of each searched flag.
GRID = {"lr": (0.003, 0.01, 0.03), "gamma": (1.0, 10.0, 30.0), "num_epochs": (10, 20)}
# train.py's flags that tune.py passes unchanged to every trial.
TRIAL = {name: setting for name, setting in TRAIN.items()
         if name not in TUNE and name not in SEARCH_SPACE and name not in (
             "model_dir", "mode", "restore_model", "overwrite")}
BUILD = {
    "output_dir": Setting(DEFAULT_DATA_DIR, "Folder to write the data set into."),
    "mnist_path": Setting(None, "Folder of LeCun's MNIST IDX files (.gz or not) or a "
                          "Keras mnist.npz. Default: Keras's cached or downloaded copy, "
                          "else the copy shipped on PyPI."),
    "mnistm_path": Setting(None, "The official MNIST-M release (the mnist_m folder or "
                           "mnist_m.tar.gz) to use as the target instead of generating "
                           "it."),
    "backgrounds": Setting(None, "Photos for generating MNIST-M: a folder of colour "
                           "images or BSDS500's BSR_bsds500.tgz (its training photos, as "
                           "in the paper). Default: the 11 colour photos shipped with "
                           "scikit-image and scikit-learn."),
    "num_train": Setting(0, "Keep the first N training digits (0: all 60,000).",
                         "at least 0"),
    "num_test": Setting(0, "Keep the first N test digits (0: all 10,000).", "at least 0"),
    "num_val": Setting(0, "Move the last N training digits of both domains into "
                       "DIR/val/, a validation split for choosing runs without touching "
                       "test/ (0: no val/).", "at least 0"),
    "seed": Setting(0, "Seed of the photo and crop choices."),
    "binarize": Setting(False, "Binarise digits (pixel > 0 -> 255) before blending, as "
                        "the widely used MNIST-M re-creation script does; default: blend "
                        "the grayscale digit, as the paper states."),
    "overwrite": Setting(False, "Replace the data set already in --output_dir."),
}


def problem(setting, value):
    """What `value` breaks of the setting's type, choices or rule ("must be ..."), or
    None."""
    types = {bool: (bool,), int: (int,), float: (int, float), list: (list,)}.get(
        type(setting.default), (str, type(None)))
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        return f"must be {' or '.join(kind.__name__ for kind in types)}, not {value!r}"
    if setting.choices and value not in setting.choices:
        return f"must be one of {', '.join(setting.choices)}, not {value!r}"
    test, says = RULES.get(setting.rule, (None, ""))
    return f"{says}, not {value!r}" if test and not test(value) else None


def define(settings, flag_values=flags.FLAGS):
    """Defines `settings` ({name: Setting}) as absl flags, each checked by `problem`."""
    for name, setting in settings.items():
        if setting.choices:
            flags.DEFINE_enum(name, setting.default, setting.choices, setting.help,
                              flag_values=flag_values)
        else:
            define_flag = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
                           float: flags.DEFINE_float, list: flags.DEFINE_multi_string
                           }.get(type(setting.default), flags.DEFINE_string)
            define_flag(name, setting.default, setting.help, flag_values=flag_values)

        def check(value, setting=setting):
            message = problem(setting, value)
            if message:
                raise flags.ValidationError(message)
            return True

        flags.register_validator(name, check, flag_values=flag_values)


def parse_or_exit(argv):
    """absl's flag parser for `app.run`: a bad value is one `error:` line and status 2;
    `--help` (which absl ends with status 1) ends with status 0."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as exit_request:
        asked_for_help = any(arg.lstrip("-").startswith("help") or arg in ("-h", "-?")
                             for arg in argv[1:])
        sys.exit(0 if asked_for_help and exit_request.code == 1 else exit_request.code)


def values(settings, flag_values=flags.FLAGS):
    """{name: parsed value} of `settings`' flags."""
    return {name: flag_values[name].value for name in settings}


def flags_text(settings, flag_values=flags.FLAGS):
    """`settings`' flags as `--flagfile` lines, those in NOT_RECORDED left out."""
    lines = sorted(flag_values[name].serialize() for name in settings
                   if name not in NOT_RECORDED)
    return "".join(f"{line}\n" for line in lines if line)


def flags_text_of(values, settings):
    """`flags_text` of {name: value} set in code (a `TrainConfig`'s), so that a run
    started from code records its flags.txt as train.py would."""
    flag_values = flags.FlagValues()
    define(settings, flag_values)
    flag_values(["flags_text_of"])
    for name in settings:
        flag_values[name].value = values[name]
    return flags_text(settings, flag_values)


def recorded_values(flags_file, settings):
    """{name: value} of `settings` as a flags.txt file records them (parsed by absl;
    a setting the file lacks keeps its default)."""
    flag_values = flags.FlagValues()
    define(settings, flag_values)
    flag_values(["flags.txt", f"--flagfile={flags_file}"])
    return values(settings, flag_values)


def _default(name):
    return dataclasses.field(default=TRAIN[name].default)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on: train.py's flags (TRAIN), with their
    defaults; building one raises UserError where a value breaks its flag's rule."""
    train_dir: str = _default("train_dir")
    val_dir: str | None = _default("val_dir")
    img_width: int = _default("img_width")
    img_height: int = _default("img_height")
    img_mode: str = _default("img_mode")
    skip_bad_images: bool = _default("skip_bad_images")
    augment: bool = _default("augment")
    cache: str = _default("cache")
    model: str = _default("model")
    weights: str = _default("weights")
    fixed_lambda: float = _default("fixed_lambda")
    model_dir: str = _default("model_dir")
    mode: str = _default("mode")
    num_epochs: int = _default("num_epochs")
    batch_size: int = _default("batch_size")
    steps_per_execution: int = _default("steps_per_execution")
    seed: int = _default("seed")
    precision: str = _default("precision")
    distribute: str = _default("distribute")
    log_rate: int = _default("log_rate")
    restore_model: bool = _default("restore_model")
    overwrite: bool = _default("overwrite")
    lr: float = _default("lr")
    momentum: float = _default("momentum")
    lr_alpha: float = _default("lr_alpha")
    lr_beta: float = _default("lr_beta")
    gamma: float = _default("gamma")

    def __post_init__(self):
        for name, setting in TRAIN.items():
            message = problem(setting, getattr(self, name))
            if message:
                raise UserError(f"--{name} {message}")

"""Speed and memory of dann-keras on this machine; prints a table, writes results.json.

    python benchmarks/bench.py            # full data set and TensorFlow settings:
                                          # ~10 minutes on 2 cores
    python benchmarks/bench.py --quick    # 20,480 + 20,480 images; under 3 minutes;
                                          # no full build or full-data memory figure

Everything runs with the model and batch of a real run (64 + 64, the paper's network).
The training path is the real train.py, in a child process, for 4 epochs (3 with --quick),
in float32 and again in mixed_bfloat16 (`bf16_speedup` = bf16 / float32 warm images/s).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import common_flags  # noqa: E402
import data_utils  # noqa: E402
import evaluation  # noqa: E402
import folders  # noqa: E402
import mnist_m  # noqa: E402
import models  # noqa: E402
import prediction  # noqa: E402
import run_folder  # noqa: E402
from file_utils import write_atomically  # noqa: E402

FLAGS = flags.FLAGS
BATCH = 64
METHODS = ("cdan", "cdan_e", "mcc", "coral")


def _random_images(count):
    rng = np.random.default_rng(0)
    return tf.constant(rng.integers(0, 256, (count, 28, 28, 3)), tf.uint8)


def _images_per_second(step, images_per_step, steps, windows=5):
    """Median images/s over `windows` stretches of `steps / windows` calls, after warm-up.

    The median keeps a moment of interference from other work on a shared machine
    from moving the figure.
    """
    for _ in range(10):
        step().numpy()
    steps_per_window = max(1, steps // windows)
    rates = []
    for _ in range(windows):
        started = time.perf_counter()
        for _ in range(steps_per_window):
            result = step()
        result.numpy()
        rates.append(images_per_step * steps_per_window / (time.perf_counter() - started))
    return float(np.median(rates))


def _in_memory_batch():
    return {"source_images": _random_images(BATCH), "target_images": _random_images(BATCH),
            "labels": tf.constant(np.arange(BATCH) % 10, tf.int32)}


def bare_step_images_per_second(steps, jit_compile=False, precision="float32"):
    """The ceiling: one GradientTape and the SGD update on tensors already in memory."""
    model = models.DANN((28, 28, 3), 10, [0.5, 0.5, 0.5], total_steps=10_000,
                        precision=precision)
    model.grl.lambda_.assign(1.0)
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    batch = _in_memory_batch()
    weights = model.trainable_weights

    @tf.function(jit_compile=jit_compile)
    def step():
        with tf.GradientTape() as tape:
            loss = model.total_loss(model._forward(batch, training=True)[0])
        optimizer.apply(tape.gradient(loss, weights), weights)
        return loss

    return _images_per_second(step, 2 * BATCH, steps)


def forward_images_per_second(steps):
    """The evaluation ceiling: the network's forward pass on eval.py's batches in memory."""
    model = models.DANN((28, 28, 3), 10, [0.5, 0.5, 0.5], total_steps=10_000)
    images = _random_images(evaluation.EVAL_BATCH_SIZE)

    @tf.function
    def step():
        return model(images, training=False)["class_logits"]

    return _images_per_second(step, evaluation.EVAL_BATCH_SIZE, steps)


def fit_images_per_second(steps_per_execution, steps=320, mode="dann"):
    """Keras fit() of the `mode` model on one batch held in memory (no input
    pipeline)."""
    model = models.build_dann((28, 28, 3), 10, [0.5, 0.5, 0.5], mode, 10 * steps,
                              steps_per_execution=steps_per_execution)
    data = data_utils.without_autotune_thread(
        tf.data.Dataset.from_tensors(_in_memory_batch()).repeat())
    model.fit(data, steps_per_epoch=steps, verbose=0, shuffle=False)  # traces the step
    started = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, verbose=0, shuffle=False)
    return 2 * BATCH * steps / (time.perf_counter() - started)


VARIANTS = {  # name: environment of the child process that measures it
    "default (oneDNN on, 2 threads)": {},
    "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "1 TensorFlow thread": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"},
}


def variant_figures():
    """Images/s of this process's settings: bare step with and without XLA, fit()."""
    return {"bare_step": bare_step_images_per_second(300),
            "bare_step_xla": bare_step_images_per_second(300, jit_compile=True),
            "fit_1_step_per_call": fit_images_per_second(1),
            "fit_16_steps_per_call": fit_images_per_second(16)}


def method_ratios(rounds=3):
    """Each method's warm fit() images/s and its ratio to DANN's, measured in turns
    (DANN, CDAN, ..., DANN, CDAN, ...) so that a slower stretch of the machine falls
    on all of them; the median of `rounds` turns."""
    rates = {mode: [] for mode in ("dann", *METHODS)}
    for _ in range(rounds):
        for mode in rates:
            rates[mode].append(fit_images_per_second(16, mode=mode))
    medians = {mode: float(np.median(values)) for mode, values in rates.items()}
    return {"fit_img_per_s": medians,
            "ratio_to_dann": {mode: rate / medians["dann"]
                              for mode, rate in medians.items()}}


def measure_variants():
    """Each of VARIANTS in a fresh process (TensorFlow reads these settings at start)."""
    figures = {}
    for name, env in VARIANTS.items():
        result = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--variant_child"],
            env=dict(os.environ, **env), check=True, capture_output=True, text=True)
        figures[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def train_path(data_dir, work_dir, epochs, precision="float32"):
    """Runs train.py in a child process on `data_dir`.

    Returns:
        (cold, warm, peak RSS in MB, run folder). Cold is the images of epoch 1 over
        the time from the start of training to the end of epoch 1 (scanning, decoding,
        the channel-mean pass, building and tracing included; Python's start and
        imports not); warm is the median over the later epochs, data already cached.
        The peak RSS is the largest of this process's children so far.
    """
    model_dir = os.path.join(work_dir, f"run-{precision}")
    subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                    f"--train_dir={data_dir}/train", f"--model_dir={model_dir}",
                    f"--num_epochs={epochs}", f"--precision={precision}"], check=True,
                   capture_output=True)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(os.path.join(model_dir, run_folder.HISTORY_JSON)) as handle:
        history = json.load(handle)
    split = folders.scan_split(os.path.join(data_dir, "train"))
    images = 2 * BATCH * data_utils.steps_per_epoch(len(split.source), len(split.target),
                                                    BATCH)
    warm_seconds = float(np.median([row["epoch_seconds"] for row in history[1:]]))
    return (images / history[0]["run_seconds"], images / warm_seconds, peak_rss_mb,
            model_dir)


def eval_path(model_dir, test_dir):
    """Images/s of eval.py's evaluation (decoding included, model loading not).

    Returns:
        (evaluation, decoding alone): the second is eval.py's input pipeline on the
        same split with no model, so that evaluation's bound can be read off.
    """
    model = evaluation.load_trained_model(os.path.join(model_dir, run_folder.FINAL_MODEL))
    split = folders.scan_split(test_dir, model.class_names)
    images = len(split.source) + len(split.target)

    def decode_split():
        for domain in folders.DOMAINS:
            for _ in data_utils.image_batches(getattr(split, domain), model.image_shape[:2],
                                              model.image_shape[2],
                                              evaluation.EVAL_BATCH_SIZE):
                pass

    evaluation.evaluate(model, split)  # compile the predict function once
    started = time.perf_counter()
    evaluation.evaluate(model, split)
    evaluate_seconds = time.perf_counter() - started
    started = time.perf_counter()
    decode_split()
    return images / evaluate_seconds, images / (time.perf_counter() - started)


def predict_path(model_dir, target_dir, work_dir):
    """Images/s of predict.py's work on the test target, a folder read recursively:
    decoding, predicting and writing the CSV; listing the files and loading the model
    not counted. A first call compiles the predict function, as in `eval_path`."""
    model = evaluation.load_trained_model(os.path.join(model_dir, run_folder.FINAL_MODEL))
    files = prediction.images_to_predict([target_dir], model.image_shape[2], False)
    output = os.path.join(work_dir, "predictions.csv")
    prediction.predict_files(model, files, output)
    return prediction.predict_files(model, files, output)["images_per_second"]


def build_seconds(output_dir, **limits):
    started = time.perf_counter()
    mnist_m.build_mnist_mnistm(output_dir, cache_dir=common_flags.CACHE_DIR,
                               log=lambda message: None, **limits)
    return time.perf_counter() - started


def in_repository(path):
    """`path` as a committed record names it: relative to the repository."""
    return os.path.relpath(os.path.abspath(path), REPO)


def versions():
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__}


def machine():
    """The CPU, its cores, the system and the GPUs TensorFlow sees (the device the
    figures ran on: the first GPU if any, else the CPU)."""
    model_name = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            for gpu in tf.config.list_physical_devices("GPU")]
    return {"cpu": model_name, "cores": os.cpu_count(), "system": platform.platform(),
            "gpus": gpus, "device": gpus[0] if gpus else f"CPU ({model_name})"}


def measure(quick):
    """Every figure of the benchmark, as results.json records them."""
    results = {"quick": quick, "machine": machine(), "versions": versions()}
    bare_steps = 100 if quick else 400
    bare_before = bare_step_images_per_second(bare_steps)
    results["forward_img_per_s"] = forward_images_per_second(20 if quick else 80)
    with tempfile.TemporaryDirectory() as work_dir:
        data_dir = os.path.join(work_dir, "data")
        if quick:
            # 64 x 2**k images per domain: 320 steps an epoch, 16 steps per call.
            build_seconds(data_dir, num_train=20_480, num_test=5_120)
        build = None if quick else build_seconds(data_dir)
        epochs = 3 if quick else 4
        cold, warm, peak_rss_mb, model_dir = train_path(data_dir, work_dir, epochs)
        evaluate, decode = eval_path(model_dir, os.path.join(data_dir, "test"))
        results["predict_img_per_s"] = predict_path(
            model_dir, os.path.join(data_dir, "test", "target"), work_dir)
        results.update(train_cold_img_per_s=cold, train_warm_img_per_s=warm,
                       eval_img_per_s=evaluate, eval_decode_img_per_s=decode,
                       data_build_s=build, peak_rss_mb=None if quick else peak_rss_mb)
        results["train_warm_bf16_img_per_s"] = train_path(data_dir, work_dir, epochs,
                                                          "mixed_bfloat16")[1]
    results["bare_step_bf16_img_per_s"] = bare_step_images_per_second(
        bare_steps, precision="mixed_bfloat16")
    # The ceiling measured on both sides of the training run, which it is compared to.
    bare_after = bare_step_images_per_second(bare_steps)
    results["bare_step_img_per_s"] = (bare_before + bare_after) / 2
    results["bare_step_before_after"] = [bare_before, bare_after]
    results["variants"] = None if quick else measure_variants()
    results["methods"] = method_ratios(1 if quick else 3)
    return add_ratios(results)


def add_ratios(results):
    """The ratios and the evaluation bound the README compares, added to `results`."""
    for name, key in (("warm", "train_warm_img_per_s"), ("cold", "train_cold_img_per_s")):
        results[f"ratio_{name}_to_bare"] = results[key] / results["bare_step_img_per_s"]
    results["ratio_eval_to_warm"] = (results["eval_img_per_s"]
                                     / results["train_warm_img_per_s"])
    results["ratio_predict_to_eval"] = (results["predict_img_per_s"]
                                        / results["eval_img_per_s"])
    # Decoding and the forward pass share the cores, so their times per image add up.
    results["eval_bound_img_per_s"] = 1 / (1 / results["eval_decode_img_per_s"]
                                           + 1 / results["forward_img_per_s"])
    results["bf16_speedup"] = (results["train_warm_bf16_img_per_s"]
                               / results["train_warm_img_per_s"])
    return results


def print_results(results):
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:24s} {value:12.2f}")
        elif not isinstance(value, dict):
            print(f"{key:24s} {value!s:>12}")
    for mode, ratio in results.get("methods", {}).get("ratio_to_dann", {}).items():
        print(f"{mode} training images/s as a share of dann's: {ratio:.2f}")
    for name, figures in (results["variants"] or {}).items():
        print(f"{name}: " + ", ".join(f"{key} {value:,.0f}" for key, value in
                                      figures.items()) + " img/s")
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; "
          f"device: {results['machine']['device']}")


def main(argv):
    del argv
    if FLAGS.variant_child:
        print(json.dumps(variant_figures()))
        return
    if FLAGS.methods_only:  # into the recorded figures, the others kept
        with open(FLAGS.results) as handle:
            results = json.load(handle)
        results["methods"] = {**method_ratios(), "machine": machine()}
    else:
        results = measure(FLAGS.quick)
    write_atomically(FLAGS.results, lambda handle: json.dump(results, handle, indent=1))
    print_results(results)
    print(f"Wrote {FLAGS.results}")


if __name__ == "__main__":
    flags.DEFINE_boolean("quick", False, "Smaller data, fewer steps; skips the full "
                         "data build and the full-data memory figure (written as null).")
    flags.DEFINE_boolean("methods_only", False, "Only measure each method's fit() "
                         "images/s against DANN's, into the existing --results file.")
    flags.DEFINE_boolean("variant_child", False, "Internal: print the TensorFlow "
                         "settings' figures of this process as JSON.")
    flags.DEFINE_string("results", os.path.join(REPO, "benchmarks", "results.json"),
                        "Where to write the figures.")
    app.run(main)

"""Speed and memory of dann-keras on this machine; prints a table, writes results.json.

    python benchmarks/bench.py            # full: ~4 minutes on 2 cores
    python benchmarks/bench.py --quick    # under 3 minutes; no full build or memory

Everything runs with the model and batch of a real run (64 + 64, the paper's network).
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
import eval as evaluation  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

FLAGS = flags.FLAGS
BATCH = 64


def bare_step_images_per_second(steps):
    """The ceiling: one GradientTape and the SGD update on tensors already in memory."""
    model = models.DANN((28, 28, 3), 10, [0.5, 0.5, 0.5], total_steps=10_000)
    model.grl.lambda_.assign(1.0)
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    batch = {"source_images": tf.constant(rng.integers(0, 256, (BATCH, 28, 28, 3)),
                                          tf.uint8),
             "target_images": tf.constant(rng.integers(0, 256, (BATCH, 28, 28, 3)),
                                          tf.uint8),
             "labels": tf.constant(rng.integers(0, 10, BATCH), tf.int32)}
    weights = model.trainable_weights

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            label_loss, domain_loss, *_ = model._forward(batch, training=True)
            loss = label_loss + domain_loss
        optimizer.apply(tape.gradient(loss, weights), weights)
        return loss

    for _ in range(10):
        step().numpy()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.numpy()
    return 2 * BATCH * steps / (time.perf_counter() - started)


def train_path(data_dir, work_dir, epochs):
    """Images/s of train.run: first epoch with decoding (cold), later epochs (warm)."""
    config = train.TrainConfig(train_dir=os.path.join(data_dir, "train"),
                               model_dir=os.path.join(work_dir, "run"),
                               num_epochs=epochs, verbose=0)
    started = time.perf_counter()
    history = train.run(config)
    total = time.perf_counter() - started
    split = data_utils.scan_split(config.train_dir)
    images = 2 * BATCH * data_utils.steps_per_epoch(len(split.source), len(split.target),
                                                    BATCH)
    seconds = [row["epoch_seconds"] for row in history]
    setup = total - sum(seconds)  # scanning, decoding and the channel-mean pass
    return (images / (setup + seconds[0]), images / float(np.mean(seconds[1:])),
            config.model_dir)


def eval_path(model_dir, test_dir):
    """Images/s of eval.py's evaluation (decoding included, model loading not)."""
    model = evaluation.load_trained_model(os.path.join(model_dir, "model.keras"))
    split = data_utils.scan_split(test_dir, model.class_names)
    evaluation.evaluate(model, split)  # compile the predict function once
    started = time.perf_counter()
    evaluation.evaluate(model, split)
    return (len(split.source) + len(split.target)) / (time.perf_counter() - started)


def build_seconds(output_dir, **limits):
    started = time.perf_counter()
    data_utils.build_mnist_mnistm(output_dir, cache_dir=common_flags.CACHE_DIR,
                                  log=lambda message: None, **limits)
    return time.perf_counter() - started


def peak_training_rss_mb(data_dir, work_dir):
    """Max RSS of a one-epoch train.py run on `data_dir`, in a child process."""
    subprocess.run([sys.executable, os.path.join(REPO, "train.py"),
                    f"--train_dir={data_dir}/train", f"--model_dir={work_dir}/rss",
                    "--num_epochs=1"], check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def versions():
    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__}


def machine():
    model_name = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    return {"cpu": model_name, "cores": os.cpu_count(), "system": platform.platform()}


def main(argv):
    del argv
    quick = FLAGS.quick
    results = {"quick": quick, "machine": machine(), "versions": versions()}
    with tempfile.TemporaryDirectory() as work_dir:
        results["bare_step_img_per_s"] = bare_step_images_per_second(100 if quick else 400)
        subset = os.path.join(work_dir, "subset")
        # 64 x 2**k images per domain: the epoch's step count divides by the default
        # 16 steps per compiled call, as the full set's 938 steps divide by 14.
        size = 5_120 if quick else 20_480
        build_seconds(subset, num_train=size, num_test=size // 10)
        cold, warm, model_dir = train_path(subset, work_dir, 3)
        results["train_cold_img_per_s"], results["train_warm_img_per_s"] = cold, warm
        results["eval_img_per_s"] = eval_path(model_dir, os.path.join(subset, "test"))
        results["data_build_s"] = results["peak_rss_mb"] = None
        if not quick:
            full = os.path.join(work_dir, "full")
            results["data_build_s"] = build_seconds(full)
            results["peak_rss_mb"] = peak_training_rss_mb(full, work_dir)
    results["ratio_warm_to_bare"] = (results["train_warm_img_per_s"]
                                     / results["bare_step_img_per_s"])
    data_utils.write_atomically(FLAGS.results, lambda handle: json.dump(
        results, handle, indent=1))
    for key, value in results.items():
        if isinstance(value, float):
            print(f"{key:24s} {value:12.2f}")
        elif not isinstance(value, dict):
            print(f"{key:24s} {value!s:>12}")
    print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores")
    print(f"Wrote {FLAGS.results}")


if __name__ == "__main__":
    flags.DEFINE_boolean("quick", False, "Smaller data, fewer steps; skips the full "
                         "data build and the full-data memory figure (written as null).")
    flags.DEFINE_string("results", os.path.join(REPO, "benchmarks", "results.json"),
                        "Where to write the figures.")
    app.run(main)

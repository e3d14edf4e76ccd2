"""Photo-sized data on this machine: a ResNet-50 step, and a data set larger than memory.

    python benchmarks/photos.py                       # 100,000 224x224 JPEGs; ~30 min
    python benchmarks/photos.py --num_images 4000 --steps 8   # a quick look

Generates NUM_IMAGES 224x224 JPEGs (half per domain, two classes) in --data_dir once,
then measures, each in its own child process so that its peak memory is its own:
- `resnet50`: seconds per training step of `--model resnet50` (random weights: no
  ImageNet download here) at 32 + 32 images, float32, and that process's peak memory;
- `streaming`: DANN (the default network at 224x224, 64 + 64) trained on all the
  images with the cache `--cache auto` chooses for them (decoded again every epoch when
  they do not fit), its peak memory and images/s;
- `in_memory`: the same on 2,000 + 2,000 of the images held decoded in memory: the
  speed streaming is compared with (`streaming_speed_ratio`).
Writes benchmarks/photos.json and photos.md.
"""

import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

import bench  # this folder's benchmark; importing it puts the repository on sys.path
import paper_table

FLAGS = flags.FLAGS
SIZE = 224
IN_MEMORY_PER_DOMAIN = 2000


def _write_images(task):
    """Writes the JPEGs of one (folder, first index, count, domain) task."""
    import numpy as np
    from PIL import Image
    folder, first, count, domain = task
    os.makedirs(folder, exist_ok=True)
    for index in range(first, first + count):
        rng = np.random.default_rng(index)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((SIZE, SIZE), Image.BILINEAR))
        if domain == "target":
            pixels = 255 - pixels
        Image.fromarray(pixels).save(os.path.join(folder, f"{index:06d}.jpg"), quality=90)


def generate(data_dir, num_images):
    """NUM_IMAGES smooth random 224x224 JPEGs under data_dir/{source,target}/class_k/."""
    marker = os.path.join(data_dir, f"complete-{num_images}")
    if os.path.exists(marker):
        return
    per_class, chunk = num_images // 4, 1000
    tasks = [(os.path.join(data_dir, domain, f"class_{label}"), first,
              min(chunk, per_class - first), domain)
             for domain in ("source", "target") for label in range(2)
             for first in range(0, per_class, chunk)]
    with multiprocessing.Pool() as pool:
        pool.map(_write_images, tasks)
    open(marker, "w").close()


def _peak_memory_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_resnet50(steps):
    """Seconds per training step of resnet50 at 32 + 32 images of 224x224."""
    import numpy as np
    import tensorflow as tf
    import models
    model = models.build_dann((SIZE, SIZE, 3), 31, [0.0] * 3, "dann", 10_000,
                              network="resnet50")
    rng = np.random.default_rng(0)
    batch = {f"{domain}_images": tf.constant(rng.integers(0, 256, (32, SIZE, SIZE, 3)),
                                             tf.uint8) for domain in ("source", "target")}
    batch["labels"] = tf.constant(np.arange(32) % 31, tf.int32)
    step = tf.function(lambda: model.train_step(batch)["loss"])
    step().numpy()  # tracing and the first step
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.numpy()
    return {"seconds_per_step": (time.perf_counter() - started) / steps,
            "images_per_step": 64, "peak_memory_gib": _peak_memory_gib()}


def measure_training(data_dir, steps, in_memory):
    """images/s and peak memory of DANN training on the generated images."""
    import cache
    import data_utils
    import folders
    import models
    split = folders.scan_split(data_dir)
    files = [getattr(split, domain) for domain in folders.DOMAINS]
    if in_memory:  # evenly spaced, so both classes are there
        every = [max(1, len(f) // IN_MEMORY_PER_DOMAIN) for f in files]
        files = [folders.DomainFiles(f.paths[::k][:IN_MEMORY_PER_DOMAIN],
                                        f.labels[::k][:IN_MEMORY_PER_DOMAIN])
                 for f, k in zip(files, every)]
    mode, reason = cache.choose("memory" if in_memory else "auto", cache.decoded_bytes(
        sum(len(f) for f in files), (SIZE, SIZE), 3))
    domains = [cache.DomainImages(f, (SIZE, SIZE), 3, mode) for f in files]
    for domain in domains if mode == "memory" else ():
        for _ in domain.batches():  # fill the cache before timing
            pass
    model = models.build_dann((SIZE, SIZE, 3), 2, [0.5] * 3, "dann", 10_000)
    batches = data_utils.training_dataset(*domains, "source", bench.BATCH, seed=0)
    model.fit(batches, epochs=1, steps_per_epoch=3, verbose=0)  # tracing, warm-up
    started = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
    seconds = time.perf_counter() - started
    return {"images": sum(len(d) for d in domains), "cache": mode, "why": reason,
            "images_per_s": 2 * bench.BATCH * steps / seconds,
            "peak_memory_gib": _peak_memory_gib()}


def child(name):
    """Runs one measurement in a child process; returns its dict."""
    result = subprocess.run(
        [sys.executable, __file__, f"--measure={name}", f"--data_dir={FLAGS.data_dir}",
         f"--steps={FLAGS.steps}", f"--resnet_steps={FLAGS.resnet_steps}"],
        capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(result):
    resnet, stream, memory = (result[k] for k in ("resnet50", "streaming", "in_memory"))
    return "\n".join([
        "| measurement | figure |", "| --- | --- |",
        f"| resnet50 training step, 32 + 32 images 224x224, float32 | "
        f"{resnet['seconds_per_step']:.1f} s ({64 / resnet['seconds_per_step']:.1f} "
        f"img/s), peak memory {resnet['peak_memory_gib']:.2f} GiB |",
        f"| DANN on {stream['images']:,} JPEGs, cache {stream['cache']} | "
        f"{stream['images_per_s']:.1f} img/s, peak memory "
        f"{stream['peak_memory_gib']:.2f} GiB |",
        f"| the same on {memory['images']:,} images held in memory | "
        f"{memory['images_per_s']:.1f} img/s, peak memory "
        f"{memory['peak_memory_gib']:.2f} GiB |",
        f"| streaming / in memory, images/s | {result['streaming_speed_ratio']:.2f} |",
        "", f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"commit {result['commit'][:7]}; {stream['why']}."]) + "\n"


def main(argv):
    del argv
    if FLAGS.measure:
        measured = measure_resnet50(FLAGS.resnet_steps) if FLAGS.measure == "resnet50" \
            else measure_training(FLAGS.data_dir, FLAGS.steps,
                                  FLAGS.measure == "in_memory")
        print(json.dumps(measured))
        return
    started = time.perf_counter()
    generate(FLAGS.data_dir, FLAGS.num_images)
    print(f"{FLAGS.num_images:,} JPEGs in {FLAGS.data_dir}", flush=True)
    result = {name: child(name) for name in ("resnet50", "streaming", "in_memory")}
    result["streaming_speed_ratio"] = (result["streaming"]["images_per_s"]
                                       / result["in_memory"]["images_per_s"])
    result.update(machine=bench.machine(), versions=bench.versions(),
                  commit=paper_table.commit(),
                  wall_seconds=time.perf_counter() - started)
    paper_table.write_results(FLAGS.output_prefix, result, markdown(result))


if __name__ == "__main__":
    flags.DEFINE_integer("num_images", 100_000, "Generated JPEGs, both domains together.")
    flags.DEFINE_string("data_dir", os.path.join(bench.REPO, "data", "photos_224"),
                        "Where the JPEGs are generated (once).")
    flags.DEFINE_integer("steps", 30, "Timed training steps of each DANN measurement.")
    flags.DEFINE_integer("resnet_steps", 5, "Timed resnet50 steps.")
    flags.DEFINE_enum("measure", None, ["resnet50", "streaming", "in_memory"],
                      "Internal: run one measurement in this process.")
    flags.DEFINE_string("output_prefix", os.path.join(bench.REPO, "benchmarks", "photos"),
                        "Writes PREFIX.json and PREFIX.md.")
    app.run(main)

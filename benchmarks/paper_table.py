"""The paper's MNIST -> MNIST-M table, reproduced over several seeds.

    python benchmarks/paper_table.py [--seeds 3] [--num_epochs 40]
    python benchmarks/paper_table.py --modes dann --precision mixed_bfloat16 \
        --runs_dir runs/paper_table_bf16 --output_prefix benchmarks/paper_table_bf16
    python benchmarks/paper_table.py --modes dann --model keras_dann \
        --runs_dir runs/paper_table_keras_dann \
        --output_prefix benchmarks/paper_table_keras_dann
    python benchmarks/paper_table.py --modes cdan --modes cdan_e --modes mcc \
        --modes coral --runs_dir runs/paper_table --output_prefix \
        benchmarks/paper_table_methods

Trains source_only, dann and target_only (or --modes) with the paper's recipe and
--model's network, in --precision, for each seed through the real train.py, evaluates
each final model with eval.py on the test split (no checkpoint is chosen on it), and
writes paper_table.json and paper_table.md.
Runs go side by side, each on its own thread(s).
"""

import json
import os
import subprocess
import sys
import time
from concurrent import futures

import numpy as np
from absl import app, flags

import bench  # this folder's benchmark; importing it puts the repository on sys.path

import common_flags  # noqa: E402
import mnist_m  # noqa: E402
import run_folder  # noqa: E402
from file_utils import write_atomically  # noqa: E402

REPO = bench.REPO
ORDER = ("source_only", "dann", "target_only")  # the paper's rows
METHODS = ("cdan", "cdan_e", "mcc", "coral")  # rows the paper does not have
PAPER = {"JMLR 2016": {"source_only": 0.5225, "dann": 0.7666, "target_only": 0.9596},
         "ICML 2015": {"source_only": 0.5749, "dann": 0.8149, "target_only": 0.9891}}


def recorded_flag(run_flags, name, default):
    """A flag's value in a run's flags.txt lines, or `default` where the run predates
    the flag."""
    return next((flag.split("=", 1)[1] for flag in run_flags
                 if flag.startswith(f"--{name}=")), default)


def finished_report(model_dir, num_epochs, test_dir, precision="float32", model="mnist"):
    """The eval report of a run of `model` in `precision` that trained all `num_epochs`
    and was evaluated on `test_dir` after its last epoch, else None."""
    paths = [os.path.join(model_dir, name) for name in
             (run_folder.HISTORY_JSON, run_folder.FINAL_MODEL)]
    paths += [run_folder.report_path(model_dir, test_dir),
              os.path.join(model_dir, run_folder.FLAGS_FILE)]
    if not all(os.path.exists(path) for path in paths):
        return None
    with open(paths[0]) as history, open(paths[2]) as report_file, \
            open(paths[3]) as flags_file:
        epochs, report = len(json.load(history)), json.load(report_file)
        run_flags = flags_file.read().split()
    evaluated_last = os.path.getmtime(paths[2]) >= os.path.getmtime(paths[1])
    same_test = os.path.abspath(report["test_dir"]) == os.path.abspath(test_dir)
    recipe = (recorded_flag(run_flags, "precision", "float32"),
              recorded_flag(run_flags, "model", "mnist"))
    finished = epochs == num_epochs and evaluated_last and same_test
    return report if finished and recipe == (precision, model) else None


def mode_seed_folder(runs_dir, mode, seed):
    """The run folder of one mode and seed inside `runs_dir`."""
    return os.path.join(runs_dir, f"{mode}-seed{seed}")


def run_commands(model_dir, commands, threads=None, append=False):
    """Runs the repository's scripts (`[script, *args]` each) one after the other,
    their output in <model_dir>.log; raises RuntimeError naming the log if one fails.

    `threads` limits each command's TensorFlow threads (default: TensorFlow's own).
    """
    log_path = f"{model_dir}.log"
    env = dict(os.environ)
    if threads:
        env.update(TF_NUM_INTRAOP_THREADS=str(threads),
                   TF_NUM_INTEROP_THREADS=str(threads))
    os.makedirs(os.path.dirname(os.path.abspath(model_dir)), exist_ok=True)
    with open(log_path, "a" if append else "w") as log:
        for command in commands:
            if subprocess.run([sys.executable, os.path.join(REPO, command[0]),
                               *command[1:]], env=env, stdout=log,
                              stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"{' '.join(command)} failed: see {log_path}")


def resumable(model_dir, train_args):
    """Whether `model_dir` holds an interrupted run that train.py started with
    `train_args` (`--name=value` each): it has a checkpoint, and its flags.txt records
    the same values."""
    flags_path = os.path.join(model_dir, run_folder.FLAGS_FILE)
    if run_folder.latest_checkpoint(model_dir) is None or not os.path.exists(flags_path):
        return False
    with open(flags_path) as handle:
        run_flags = handle.read().split()
    for arg in train_args:
        name, wanted = arg[2:].split("=", 1)
        if name in common_flags.NOT_RECORDED:
            continue
        kept = recorded_flag(run_flags, name, None)
        if name.endswith("_dir") and kept is not None:
            kept, wanted = os.path.abspath(kept), os.path.abspath(wanted)
        if kept != wanted:
            return False
    return True


def run_job(data_dir, run_dir, mode, seed, num_epochs, threads, reuse_finished=False,
            precision="float32", model="mnist"):
    """Trains one mode and seed with train.py, evaluates it, returns eval_report.json.

    With `reuse_finished`, a finished run is kept and an interrupted one continues
    from its latest checkpoint. Says when the run starts and ends, with its result; the
    commands' output goes to <run folder>.log.
    """
    model_dir = mode_seed_folder(run_dir, mode, seed)
    report = finished_report(model_dir, num_epochs, f"{data_dir}/test", precision,
                             model) if reuse_finished else None
    if report is None:
        train_args = [f"--train_dir={data_dir}/train", f"--model_dir={model_dir}",
                      f"--mode={mode}", f"--num_epochs={num_epochs}", f"--seed={seed}",
                      f"--precision={precision}", f"--model={model}"]
        resume = reuse_finished and resumable(model_dir, train_args)
        print(f"{mode} seed {seed}: " + (
            f"resuming {model_dir} from its latest checkpoint; log {model_dir}.log "
            "(appended)" if resume else
            f"training into {model_dir} (with --overwrite: the table owns its run "
            f"folders); log {model_dir}.log"), flush=True)
        run_commands(model_dir, [
            ["train.py", *train_args, "--restore_model" if resume else "--overwrite"],
            ["eval.py", f"--model_dir={model_dir}", f"--test_dir={data_dir}/test"]],
            threads=threads, append=resume)
        with open(run_folder.report_path(model_dir, f"{data_dir}/test")) as handle:
            report = json.load(handle)
    print(f"{mode} seed {seed}: target accuracy {report['target_accuracy']:.4f} "
          f"({model_dir})", flush=True)
    return report


def target_test_accuracy(model_dir, test_dir):
    """Evaluates a run's final model on the labelled split `test_dir` with eval.py
    (its output appended to the run's log); returns the target accuracy."""
    run_commands(model_dir, [
        ["eval.py", f"--model_dir={model_dir}", f"--test_dir={test_dir}"]], append=True)
    with open(run_folder.report_path(model_dir, test_dir)) as handle:
        return json.load(handle)["target_accuracy"]


def write_results(prefix, record, text):
    """Writes PREFIX.json (`record`) and PREFIX.md (`text`, its table); prints `text`."""
    write_atomically(f"{prefix}.json", lambda handle: json.dump(record, handle, indent=1))
    write_atomically(f"{prefix}.md", lambda handle: handle.write(text))
    print(text)


def commit():
    """The repository's git commit, or None outside a git checkout."""
    result = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                            text=True)
    return result.stdout.strip() or None


def training_seconds(model_dir):
    """Seconds from the start of a run's training to the end of its last epoch."""
    with open(os.path.join(model_dir, run_folder.HISTORY_JSON)) as handle:
        return json.load(handle)[-1]["run_seconds"]


def summarise(reports, seeds, runs_dir, modes_run=ORDER):
    """{mode: per-seed accuracies and training seconds, mean and std of the target
    accuracy}."""
    modes = {}
    for mode in modes_run:
        row = {f"{key}_per_seed": [reports[mode, seed][key] for seed in seeds]
               for key in ("target_accuracy", "source_accuracy", "domain_accuracy")}
        row["training_seconds_per_seed"] = [
            training_seconds(mode_seed_folder(runs_dir, mode, seed)) for seed in seeds]
        row["mean"] = float(np.mean(row["target_accuracy_per_seed"]))
        row["std"] = float(np.std(row["target_accuracy_per_seed"]))
        modes[mode] = row
    return modes


def gap_closed(source_only, dann, target_only):
    """Share of the source-only -> target-only gap that DANN closes."""
    return (dann - source_only) / (target_only - source_only)


def markdown(table):
    ours = {mode: row["mean"] for mode, row in table["modes"].items()}
    precision = table.get("precision", "float32")
    one_seed = len(table["seeds"]) == 1
    over = f"seed {table['seeds'][0]} only" if one_seed else \
        f"mean +- std over {len(table['seeds'])} seeds"
    lines = [
        f"MNIST -> MNIST-M target test accuracy, {over} "
        f"({table.get('model', 'mnist')} network, {table['num_epochs']} epochs, "
        f"{precision}; target: "
        f"{table['data'].get('target', table['data']['path'])}).",
        "",
        "| method | ours | JMLR 2016 | ICML 2015 |",
        "| --- | --- | --- | --- |",
    ]
    for mode in (mode for mode in ORDER + METHODS if mode in ours):
        row = table["modes"][mode]
        spread = "" if one_seed else f" +- {row['std']:.4f}"
        lines.append(f"| {mode} | {row['mean']:.4f}{spread} | " + " | ".join(
            f"{paper[mode]:.4f}" if mode in paper else "-" for paper in PAPER.values())
            + " |")
    if set(ours) == set(ORDER):
        shares = [gap_closed(*(source[mode] for mode in ORDER))
                  for source in (ours, *PAPER.values())]
        lines.append("| gap closed by DANN | " + " | ".join(f"{s:.0%}" for s in shares)
                     + " |")
    training = sum(sum(row["training_seconds_per_seed"]) for row in table["modes"].values())
    lines += ["", f"Machine: {table['machine']['cpu']}, {table['machine']['cores']} "
              f"cores. Training took {training / 60:.0f} minutes summed over the runs, "
              f"run {table['parallel']} at a time; this call took "
              f"{table['wall_seconds'] / 60:.0f} minutes (runs it found finished in "
              "--runs_dir with --reuse_finished are not trained again)."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    seeds = list(range(FLAGS.seeds))
    data_dir = FLAGS.data_dir
    if not os.path.isdir(data_dir):
        mnist_m.build_mnist_mnistm(data_dir, cache_dir=common_flags.CACHE_DIR)
    record = os.path.join(data_dir, "dataset.json")
    data = {"path": bench.in_repository(data_dir)}
    if os.path.exists(record):
        with open(record) as handle:
            data.update(json.load(handle))
    started = time.perf_counter()
    jobs = {}
    with futures.ThreadPoolExecutor(FLAGS.parallel) as pool:
        # DANN's runs first: the row the table exists for is known soonest.
        for mode in sorted(FLAGS.modes, key=lambda mode: mode != "dann"):
            for seed in seeds:
                jobs[mode, seed] = pool.submit(run_job, data_dir, FLAGS.runs_dir, mode,
                                               seed, FLAGS.num_epochs,
                                               FLAGS.threads_per_run,
                                               FLAGS.reuse_finished, FLAGS.precision,
                                               FLAGS.model)
    reports = {key: job.result() for key, job in jobs.items()}
    modes = [mode for mode in ORDER + METHODS if mode in FLAGS.modes]
    table = {"modes": summarise(reports, seeds, FLAGS.runs_dir, modes), "seeds": seeds,
             "precision": FLAGS.precision, "model": FLAGS.model,
             "parallel": FLAGS.parallel,
             "num_epochs": FLAGS.num_epochs, "data": data, "machine": bench.machine(),
             "versions": bench.versions(), "commit": commit(),
             "wall_seconds": time.perf_counter() - started}
    write_results(FLAGS.output_prefix, table, markdown(table))


if __name__ == "__main__":
    flags.DEFINE_integer("seeds", 3, "Seeds per mode (0, 1, ...).")
    flags.DEFINE_integer("num_epochs", 40, "Training epochs of every run (train.py's "
                         "default, 20, does not reach the paper's result reliably).")
    flags.DEFINE_string("data_dir", common_flags.DEFAULT_DATA_DIR,
                        "MNIST -> MNIST-M folders (built here first if missing).")
    flags.DEFINE_string("runs_dir", os.path.join(REPO, "runs", "paper_table"),
                        "Where the runs are written.")
    flags.DEFINE_multi_enum("modes", list(ORDER), ORDER + METHODS,
                            "Modes to train (a row each).")
    flags.DEFINE_enum("precision", "float32", common_flags.RUN["precision"].choices,
                      "train.py's --precision of every run.")
    flags.DEFINE_enum("model", "mnist", common_flags.NETWORK["model"].choices,
                      "train.py's --model of every run.")
    flags.DEFINE_integer("parallel", 2, "Runs side by side.")
    flags.DEFINE_integer("threads_per_run", 1, "TensorFlow threads of each run.")
    flags.DEFINE_boolean("reuse_finished", False, "Keep runs in --runs_dir that trained "
                         "all epochs and were evaluated on this test split, and continue "
                         "interrupted runs of the same flags from their latest "
                         "checkpoint, instead of training them again (to resume an "
                         "interrupted table).")
    flags.DEFINE_string("output_prefix", os.path.join(REPO, "benchmarks", "paper_table"),
                        "Writes PREFIX.json and PREFIX.md.")
    FLAGS = flags.FLAGS
    app.run(main)

"""Do label-free scores choose DANN's hyperparameters well? A grid, scored, then judged.

    python benchmarks/selection.py            # 12 configurations on MNIST -> MNIST-M

Builds MNIST -> MNIST-M with a validation split (`mnist_m.py --num_val 5000`), trains
every configuration of the grid (lr0 x gamma x epochs) through train.py, scores each
final model on val/ with eval.py --reverse_validation (source labels and unlabelled
target images only), writes those scores, and only then evaluates each model on
test/ for its target accuracy. For every score: the configuration it picks, that
configuration's target test accuracy, its regret against the grid's best (the
oracle) and the Spearman correlation of score and accuracy over the grid. The grid's
best and worst configurations are trained again with --check_seed to see whether
each score still orders them the same way. Writes selection.json and selection.md.
"""

import itertools
import json
import math
import os
import time

from absl import app, flags
from scipy import stats

import bench  # this folder's benchmark; importing it puts the repository on sys.path
import paper_table

import mnist_m  # noqa: E402
import run_folder  # noqa: E402
from file_utils import write_atomically  # noqa: E402

FLAGS = flags.FLAGS
REPO = bench.REPO


def configurations(lrs, gammas, epochs):
    """The grid: one dict of train.py flags per configuration."""
    return [{"lr": float(lr), "gamma": float(gamma), "num_epochs": int(num_epochs)}
            for lr, gamma, num_epochs in itertools.product(lrs, gammas, epochs)]


def folder_name(config, seed):
    return "-".join(f"{key}{value}" for key, value in config.items()) + f"-seed{seed}"


def train_and_score(config, seed, data_dir, runs_dir):
    """Trains one configuration and returns its label-free scores on val/."""
    model_dir = os.path.join(runs_dir, folder_name(config, seed))
    print(f"{folder_name(config, seed)}: training and scoring on val/", flush=True)
    paper_table.run_commands(model_dir, [
        ["train.py", f"--train_dir={data_dir}/train", f"--model_dir={model_dir}",
         f"--seed={seed}", "--overwrite",
         *(f"--{key}={value}" for key, value in config.items())],
        ["eval.py", f"--model_dir={model_dir}", f"--test_dir={data_dir}/val",
         "--reverse_validation"]])
    with open(run_folder.report_path(model_dir, f"{data_dir}/val")) as handle:
        return json.load(handle)["label_free_scores"]


def target_test_accuracy(config, seed, data_dir, runs_dir):
    """The target accuracy on test/ of a trained configuration (read last)."""
    return paper_table.target_test_accuracy(
        os.path.join(runs_dir, folder_name(config, seed)), f"{data_dir}/test")


def judge(rows):
    """{score: picked index, its target accuracy, regret, Spearman r} over the grid."""
    accuracies = [row["target_test_accuracy"] for row in rows]
    oracle = max(accuracies)
    validators = {}
    for name in rows[0]["label_free_scores"]:
        values = [row["label_free_scores"][name] for row in rows]
        picked = max(range(len(rows)), key=values.__getitem__)
        spearman = float(stats.spearmanr(values, accuracies).statistic)
        validators[name] = {
            "picked": picked, "picked_target_accuracy": accuracies[picked],
            "regret": oracle - accuracies[picked],
            # None where a score or the accuracy is the same for every configuration.
            "spearman": None if math.isnan(spearman) else spearman}
    return validators, oracle


def seed_check(rows, data_dir, runs_dir, seed):
    """Whether each score orders the grid's best and worst configurations as it did,
    when both are trained again with `seed`."""
    accuracies = [row["target_test_accuracy"] for row in rows]
    best, worst = accuracies.index(max(accuracies)), accuracies.index(min(accuracies))
    again = {index: train_and_score(rows[index]["flags"], seed, data_dir, runs_dir)
             for index in (best, worst)}
    stable = {}
    for name in rows[0]["label_free_scores"]:
        first = [rows[index]["label_free_scores"][name] for index in (best, worst)]
        stable[name] = (first[0] > first[1]) == (again[best][name] > again[worst][name])
    return {"seed": seed, "best": best, "worst": worst,
            "scores": {str(index): scores for index, scores in again.items()},
            "same_order": stable}


def markdown(result):
    lines = ["| score | picked | its target test accuracy | regret | Spearman r | "
             "same order, 2nd seed |", "| --- | --- | --- | --- | --- | --- |"]
    for name, row in result["validators"].items():
        flags_text = " ".join(f"{k}={v}" for k, v in
                              result["configs"][row["picked"]]["flags"].items())
        spearman = "-" if row["spearman"] is None else f"{row['spearman']:.2f}"
        lines.append(f"| {name} | {flags_text} | {row['picked_target_accuracy']:.4f} | "
                     f"{row['regret']:.4f} | {spearman} | "
                     f"{result['seed_check']['same_order'][name]} |")
    machine = result["machine"]
    lines += ["", f"Oracle (the grid's best target test accuracy, never used to "
              f"choose): {result['oracle_target_accuracy']:.4f}. "
              f"{len(result['configs'])} configurations, seed 0; machine: "
              f"{machine['cpu']}, {machine['cores']} cores; "
              f"{result['wall_seconds'] / 60:.0f} minutes."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    started = time.perf_counter()
    if not os.path.isdir(FLAGS.data_dir):
        mnist_m.build_mnist_mnistm(FLAGS.data_dir, num_val=FLAGS.num_val,
                                   cache_dir=os.path.join(REPO, "data", "cache"))
    grid = configurations(FLAGS.lrs, FLAGS.gammas, FLAGS.epochs)
    rows = [{"flags": config, "label_free_scores": train_and_score(
        config, 0, FLAGS.data_dir, FLAGS.runs_dir)} for config in grid]
    write_atomically(f"{FLAGS.output_prefix}.scores.json",
                     lambda handle: json.dump(rows, handle, indent=1))
    # Only now, every score written, are the target test labels read.
    for row in rows:
        row["target_test_accuracy"] = target_test_accuracy(row["flags"], 0,
                                                           FLAGS.data_dir, FLAGS.runs_dir)
    validators, oracle = judge(rows)
    result = {"configs": rows, "validators": validators, "oracle_target_accuracy": oracle,
              "seed_check": seed_check(rows, FLAGS.data_dir, FLAGS.runs_dir,
                                       FLAGS.check_seed),
              "data_dir": bench.in_repository(FLAGS.data_dir), "machine": bench.machine(),
              "versions": bench.versions(), "commit": paper_table.commit(),
              "wall_seconds": time.perf_counter() - started}
    paper_table.write_results(FLAGS.output_prefix, result, markdown(result))


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", os.path.join(REPO, "data", "mnist_mnistm_val"),
                        "MNIST -> MNIST-M with val/ (built here first if missing).")
    flags.DEFINE_integer("num_val", 5000, "Digits per domain moved to val/ when the "
                         "data set is built here.")
    flags.DEFINE_list("lrs", ["0.003", "0.01", "0.03"], "lr0 values of the grid.")
    flags.DEFINE_list("gammas", ["1", "10"], "gamma values of the grid.")
    flags.DEFINE_list("epochs", ["10", "20"], "Run lengths of the grid.")
    flags.DEFINE_integer("check_seed", 1, "Seed the best and worst are trained with again.")
    flags.DEFINE_string("runs_dir", os.path.join(REPO, "runs", "selection"),
                        "Where the runs are written.")
    flags.DEFINE_string("output_prefix", os.path.join(REPO, "benchmarks", "selection"),
                        "Writes PREFIX.json, PREFIX.md (and PREFIX.scores.json first).")
    app.run(main)

"""Does tune.py choose well? A study on MNIST -> MNIST-M, judged only after it ended.

    python benchmarks/tune_check.py [--trials 16] [--sampler tpe]

Builds MNIST -> MNIST-M with a 5,000-digit val/ split (if missing), runs the real
tune.py on it (its objective on val/, no target label read), and only after the study
ended evaluates every finished trial on the labelled test split. Writes tune.json and
tune.md: the trial the objective picked, its target test accuracy, the best among the
trials (the oracle, never used to choose), the regret, the default recipe's accuracy
(the study's own baseline trial), source-only's, where each label-free score would
have ranked source-only, and the wall time.
"""

import csv
import os
import time

from absl import app, flags

import bench  # this folder's benchmark; importing it puts the repository on sys.path
import paper_table

import mnist_m  # noqa: E402
import run_folder  # noqa: E402
import tuning  # noqa: E402

FLAGS = flags.FLAGS
REPO = bench.REPO
SCORES = ("snd", "target_entropy", "source_accuracy")
AGREEMENT = "snd+target_entropy"  # a rule, not a score: the two scores' rank sum


def finished_trials(study_dir):
    """The study's completed trials (trials.csv rows), numbers made numbers."""
    with open(os.path.join(study_dir, tuning.TRIALS_CSV), newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["state"] == "complete"]
    for row in rows:
        for key, value in row.items():
            if key.startswith("val_") or key in ("score", "lr", "gamma", "seconds"):
                row[key] = float(value)
        row["trial"], row["num_epochs"] = int(row["trial"]), int(row["num_epochs"])
    return rows


def ranking(rows, name):
    """The trials best first by a label-free score, or by AGREEMENT: the sum of their
    ranks by snd and by target_entropy (ties broken by snd)."""
    if name != AGREEMENT:
        return sorted(rows, key=lambda row: -row[f"val_{name}"])
    rank = {}
    for score in ("snd", "target_entropy"):
        for place, row in enumerate(ranking(rows, score)):
            rank[row["trial"]] = rank.get(row["trial"], 0) + place
    return sorted(rows, key=lambda row: (rank[row["trial"]], -row["val_snd"]))


def training_seconds(rows):
    """Seconds the trials trained, summed over their histories' epochs (a stopped
    trial's epochs kept by its resumed retry count once; scoring not included)."""
    return sum(epoch["epoch_seconds"] for row in rows
               for epoch in run_folder.read_history(row["run"], row["num_epochs"]))


def judge(rows):
    """Per label-free score (and the AGREEMENT rule): the trial it picks, its accuracy,
    the regret against the oracle, and the rank (1 = best) it gives source-only."""
    oracle = max(row["target_test_accuracy"] for row in rows)
    judged = {}
    for name in SCORES + (AGREEMENT,):
        ranked = ranking(rows, name)
        modes = [row["mode"] for row in ranked]
        judged[name] = {"picked_trial": ranked[0]["trial"],
                        "picked_mode": ranked[0]["mode"],
                        "picked_target_accuracy": ranked[0]["target_test_accuracy"],
                        "regret": oracle - ranked[0]["target_test_accuracy"],
                        "source_only_rank": modes.index("source_only") + 1
                        if "source_only" in modes else None}
    return judged, oracle


def markdown(record):
    lines = [f"tune.py, {record['trials']} {record['sampler']} trials on MNIST -> "
             f"MNIST-M (val/: 5,000 digits per domain), objective "
             f"`{record['objective']}`; target test accuracy read after the study.", "",
             "| score | picks | its target test accuracy | regret | source-only's rank |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in record["scores"].items():
        lines.append(f"| {name} | trial {row['picked_trial']} ({row['picked_mode']}) | "
                     f"{row['picked_target_accuracy']:.4f} | {row['regret']:.4f} | "
                     f"{row['source_only_rank']} of {len(record['trials_judged'])} |")
    lines += ["", f"Oracle (best trial, never used to choose): {record['oracle']:.4f}; "
              f"default recipe (lr 0.01, gamma 10, 20 epochs): "
              f"{record['default_recipe_accuracy']:.4f}; source-only: "
              f"{record['source_only_accuracy']:.4f}.",
              f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} "
              f"cores; the trials trained for {record['training_seconds'] / 3600:.1f} "
              f"hours in all (this call took {record['wall_seconds'] / 3600:.1f}: a "
              "study continued from an earlier call counts only its own part)."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    started = time.perf_counter()
    if not os.path.isdir(FLAGS.data_dir):
        mnist_m.build_mnist_mnistm(FLAGS.data_dir, num_val=5000,
                                   cache_dir=os.path.join(REPO, "data", "cache"))
    paper_table.run_commands(FLAGS.study_dir, [[
        "tune.py", f"--train_dir={FLAGS.data_dir}/train",
        f"--val_dir={FLAGS.data_dir}/val", f"--study_dir={FLAGS.study_dir}",
        f"--trials={FLAGS.trials}", f"--sampler={FLAGS.sampler}",
        f"--objective={FLAGS.objective}"]], append=True)
    rows = finished_trials(FLAGS.study_dir)
    # Only now, the study ended, are the target test labels read.
    for row in rows:
        row["target_test_accuracy"] = paper_table.target_test_accuracy(
            row["run"], f"{FLAGS.data_dir}/test")
    scores, oracle = judge(rows)
    baseline = {row["mode"]: row["target_test_accuracy"] for row in rows
                if (row["lr"], row["gamma"], row["num_epochs"]) == (0.01, 10.0, 20)}
    trained = training_seconds(rows)
    for row in rows:  # the record names runs relative to the repository
        row["run"] = bench.in_repository(row["run"])
    record = {"trials": FLAGS.trials, "sampler": FLAGS.sampler,
              "objective": FLAGS.objective, "scores": scores, "oracle": oracle,
              "default_recipe_accuracy": baseline.get("dann"),
              "source_only_accuracy": baseline.get("source_only"),
              "trials_judged": rows, "data": bench.in_repository(FLAGS.data_dir),
              "machine": bench.machine(), "versions": bench.versions(),
              "commit": paper_table.commit(), "wall_seconds": time.perf_counter() - started,
              "training_seconds": trained}
    paper_table.write_results(FLAGS.output_prefix, record, markdown(record))


if __name__ == "__main__":
    flags.DEFINE_string("data_dir", os.path.join(REPO, "data", "mnist_mnistm_val"),
                        "MNIST -> MNIST-M with val/ (built here first if missing).")
    flags.DEFINE_string("study_dir", os.path.join(REPO, "runs", "tune_check"),
                        "The study's folder (a study already there is continued).")
    flags.DEFINE_integer("trials", 16, "Trials of the study, its two baselines included.")
    flags.DEFINE_enum("sampler", "tpe", ("tpe", "random", "grid"), "tune.py's --sampler.")
    flags.DEFINE_enum("objective", "snd", tuning.OBJECTIVES, "tune.py's --objective.")
    flags.DEFINE_string("output_prefix", os.path.join(REPO, "benchmarks", "tune"),
                        "Writes PREFIX.json and PREFIX.md.")
    app.run(main)

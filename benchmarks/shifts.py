"""Is tune.py's choice safe? The same study on several domain shifts, judged after.

    python benchmarks/shifts.py [--shifts mnist_to_mnistm,synth_to_mnist] [--seeds 0,1]
    python benchmarks/shifts.py --judge_only      # re-judge the recorded studies

Builds each shift (benchmarks/shifts_data.py) if missing, runs the real tune.py on it
(source-only, the default DANN recipe and TPE trials, scored on val/ without target
labels) and, only after the study ended, evaluates every scored trial on the
labelled target test split. Each finished study is recorded in shifts.json at once,
so a stopped benchmark continues with the studies it lacks. Then every selection
rule is judged on every recorded study: the target test accuracy of its choice
against source-only's (mean and worst difference), the regret to the study's best
trial (never used to choose), and how often it keeps source-only. Writes shifts.json
and shifts.md.
"""

import json
import os
import time

from absl import app, flags

import bench  # this folder's benchmark; importing it puts the repository on sys.path
import paper_table
import shifts_data

import choosing  # noqa: E402
import tuning  # noqa: E402

FLAGS = flags.FLAGS
REPO = bench.REPO
SCORES = ("snd", "target_entropy", "dev", "iwcv", "source_accuracy")


def alone(score):
    return lambda rows: choosing.best_by(choosing.completed(rows), (score,))


def safe(*evidence):
    return lambda rows: choosing.choose(rows, evidence=evidence)[0]


RULES = {
    **{score: alone(score) for score in SCORES},
    "rank sum of snd and target_entropy": lambda rows: choosing.best_by(
        choosing.completed(rows), ("snd", "target_entropy")),
    "source-only unless beaten on target_entropy (default)": safe("target_entropy"),
    "source-only unless beaten on snd": safe("snd"),
    "source-only unless beaten on snd and target_entropy": safe("snd",
                                                                "target_entropy"),
    "source-only unless beaten on dev": safe("dev"),
    "source-only unless beaten on snd and dev": safe("snd", "dev"),
    "source-only unless beaten on target_entropy and dev": safe("target_entropy", "dev"),
    "source-only unless beaten on snd, target_entropy and dev": safe(
        "snd", "target_entropy", "dev"),
}


def run_study(shift, seed):
    """Runs (or continues) tune.py on `shift` with `seed`, then reads each scored
    trial's target test accuracy; returns the study's record."""
    data_dir = os.path.join(FLAGS.data_root, shift)
    if not os.path.isdir(data_dir):
        shifts_data.build_shift(shift, data_dir, seed=0, scale=FLAGS.scale,
                                cache_dir=os.path.join(REPO, "data", "cache"))
    study_dir = os.path.join(FLAGS.runs_dir, shift, f"seed_{seed}")
    started = time.perf_counter()
    paper_table.run_commands(study_dir, [[
        "tune.py", f"--train_dir={data_dir}/train", f"--val_dir={data_dir}/val",
        f"--study_dir={study_dir}", f"--trials={FLAGS.trials}", f"--seed={seed}",
        f"--sampler_seed={seed}"]], append=True)
    rows = choosing.read_trials(os.path.join(study_dir, tuning.TRIALS_CSV))
    # Only now, the study ended, are the target test labels read.
    for row in choosing.completed(rows):
        row["target_test_accuracy"] = paper_table.target_test_accuracy(
            row["run"], f"{data_dir}/test")
    for row in rows:
        row["run"] = bench.in_repository(row["run"])
    with open(os.path.join(data_dir, "dataset.json")) as handle:
        dataset = json.load(handle)
    return {"shift": shift, "seed": seed, "trials": rows, "dataset": dataset,
            "wall_seconds": time.perf_counter() - started,
            "machine": bench.machine(), "commit": paper_table.commit()}


def judge_study(study):
    """{rule: the chosen trial, its accuracy, its difference to source-only, regret}."""
    scored = choosing.completed(study["trials"])
    oracle = max(row["target_test_accuracy"] for row in scored)
    source_only = next(row for row in scored if row["mode"] == "source_only")
    judged = {}
    for name, rule in RULES.items():
        chosen = rule(study["trials"])
        judged[name] = {"trial": chosen["trial"], "mode": chosen["mode"],
                        "accuracy": chosen["target_test_accuracy"],
                        "to_source_only": chosen["target_test_accuracy"]
                        - source_only["target_test_accuracy"],
                        "regret": oracle - chosen["target_test_accuracy"]}
    return {"oracle": oracle, "source_only": source_only["target_test_accuracy"],
            "rules": judged}


def summary(judged):
    """{rule: mean and worst difference to source-only, mean regret, kept count}."""
    table = {}
    for name in RULES:
        picks = [study["rules"][name] for study in judged.values()]
        table[name] = {
            "mean_to_source_only": sum(p["to_source_only"] for p in picks) / len(picks),
            "worst_to_source_only": min(p["to_source_only"] for p in picks),
            "mean_regret": sum(p["regret"] for p in picks) / len(picks),
            "kept_source_only": sum(p["mode"] == "source_only" for p in picks)}
    return table


def markdown(record):
    """shifts.md: the rules over all studies, then each study's picks."""
    studies, table = record["judged"], record["summary"]
    lines = [f"Selection rules on {len(studies)} studies (tune.py, up to "
             f"{FLAGS.trials} trials each, TPE on `snd`); target test accuracy read "
             "after each study ended. Differences in points of accuracy.", "",
             "| rule | mean vs source-only | worst vs source-only | mean regret | "
             "keeps source-only |", "| --- | --- | --- | --- | --- |"]
    for name, row in table.items():
        lines.append(f"| {name} | {100 * row['mean_to_source_only']:+.1f} | "
                     f"{100 * row['worst_to_source_only']:+.1f} | "
                     f"{100 * row['mean_regret']:.1f} | {row['kept_source_only']} of "
                     f"{len(studies)} |")
    default = next(name for name in RULES if name.endswith("(default)"))
    lines += ["", "| study | source-only | best trial | snd picks | default rule "
              "picks |", "| --- | --- | --- | --- | --- |"]
    for key, study in studies.items():
        snd, rule = study["rules"]["snd"], study["rules"][default]
        lines.append(f"| {key} | {study['source_only']:.4f} | {study['oracle']:.4f} | "
                     f"trial {snd['trial']} ({snd['mode']}) {snd['accuracy']:.4f} | "
                     f"trial {rule['trial']} ({rule['mode']}) {rule['accuracy']:.4f} |")
    machine = record["machine"]
    hours = sum(study["wall_seconds"] for study in record["studies"].values()) / 3600
    lines += ["", f"Machine: {machine['cpu']}, {machine['cores']} cores; the studies "
              f"took {hours:.1f} hours. How each shift is built: "
              "benchmarks/shifts_data.py."]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    path = f"{FLAGS.output_prefix}.json"
    studies = {}
    if os.path.exists(path):
        with open(path) as handle:
            studies = json.load(handle)["studies"]
    missing = [(shift, int(seed)) for seed in FLAGS.seeds for shift in FLAGS.shifts
               if f"{shift}/seed_{seed}" not in studies]
    for shift, seed in [] if FLAGS.judge_only else missing:
        studies[f"{shift}/seed_{seed}"] = run_study(shift, seed)
        write(studies)
    if FLAGS.judge_only or not missing:
        write(studies)


def write(studies):
    """Judges every recorded study; writes shifts.json and shifts.md."""
    # A study whose source-only trial was not scored cannot say what a rule loses.
    judged = {key: judge_study(study) for key, study in studies.items()
              if any(row["mode"] == "source_only" for row in
                     choosing.completed(study["trials"]))}
    if not judged:
        return
    record = {"studies": studies, "judged": judged, "summary": summary(judged),
              "machine": bench.machine(), "versions": bench.versions()}
    paper_table.write_results(FLAGS.output_prefix, record, markdown(record))


if __name__ == "__main__":
    flags.DEFINE_list("shifts", list(shifts_data.SHIFTS), "Shifts to run "
                      "(benchmarks/shifts_data.py: SHIFTS).")
    flags.DEFINE_list("seeds", ["0"], "Training and sampler seeds, a study each.")
    flags.DEFINE_integer("trials", 8, "Trials of each study, its two baselines included.")
    flags.DEFINE_string("data_root", os.path.join(REPO, "data", "shifts"),
                        "Where the shifts are built.")
    flags.DEFINE_string("runs_dir", os.path.join(REPO, "runs", "shifts"),
                        "Where the studies run (one folder per shift and seed).")
    flags.DEFINE_string("output_prefix", os.path.join(REPO, "benchmarks", "shifts"),
                        "Writes PREFIX.json and PREFIX.md.")
    flags.DEFINE_float("scale", 1.0, "Multiplies the image counts of a shift built "
                       "here (a quick check of this script).")
    flags.DEFINE_bool("judge_only", False, "Only re-judge the studies in PREFIX.json.")
    app.run(main)

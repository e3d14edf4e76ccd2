"""Is tune.py's choice safe? The same study on several domain shifts, judged after.

    python benchmarks/shifts.py [--shifts mnist_to_mnistm,synth_to_mnist] [--seeds 0,1]
    python benchmarks/shifts.py --judge_only      # re-judge the recorded studies
    python benchmarks/shifts.py --methods dann,cdan,cdan_e,mcc,coral --default_recipes \
        --runs_dir runs/shifts_methods --output_prefix benchmarks/shifts_methods

Builds each shift (benchmarks/shifts_data.py) if missing, runs the real tune.py on it
(source-only, the default DANN recipe and TPE trials, scored on val/ without target
labels) and, only after the study ended, evaluates every scored trial on the
labelled target test split. Each finished study is recorded in shifts.json at once,
so a stopped benchmark continues with the studies it lacks. Then every selection
rule is judged on every recorded study: the target test accuracy of its choice
against source-only's (mean and worst difference), the regret to the study's best
trial (never used to choose), and how often it keeps source-only. With --methods the
studies search those methods (tune.py --methods); with --default_recipes each method
of --methods is also trained once per shift with train.py's defaults. Writes
shifts.json and shifts.md (or --output_prefix).
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


def unless_beaten(evidence):
    """The name of the rule: source-only unless a trial beats it on `evidence`
    (choosing.choose), marked where it is tune.py's default."""
    default = " (default)" if evidence == choosing.EVIDENCE else ""
    return f"source-only unless beaten on {choosing.in_words(evidence)}{default}"


EVIDENCE_SETS = (("target_entropy",), ("snd",), ("snd", "target_entropy"), ("dev",),
                 ("snd", "dev"), ("target_entropy", "dev"),
                 ("snd", "target_entropy", "dev"))
RULES = {
    **{score: alone(score) for score in SCORES},
    "rank sum of snd and target_entropy": lambda rows: choosing.best_by(
        choosing.completed(rows), ("snd", "target_entropy")),
    **{unless_beaten(evidence): lambda rows, evidence=evidence: choosing.choose(
        rows, evidence=evidence)[0] for evidence in EVIDENCE_SETS},
}
DEFAULT = unless_beaten(choosing.EVIDENCE)
# The rule chosen on seed 0, shown beside the default in each study's row.
FIRST_CHOICE = unless_beaten(("target_entropy",))


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
        f"--sampler_seed={seed}", f"--methods={','.join(FLAGS.methods)}"]], append=True)
    rows = choosing.read_trials(os.path.join(study_dir, tuning.TRIALS_CSV))
    defaults = default_recipes(data_dir, study_dir, seed) if FLAGS.default_recipes \
        else {}
    # Only now, the study and the default runs ended, are the target test labels read.
    for row in choosing.completed(rows):
        row["target_test_accuracy"] = paper_table.target_test_accuracy(
            row["run"], f"{data_dir}/test")
    defaults = {mode: paper_table.target_test_accuracy(model_dir, f"{data_dir}/test")
                for mode, model_dir in defaults.items()}
    for row in rows:
        row["run"] = bench.in_repository(row["run"])
    with open(os.path.join(data_dir, "dataset.json")) as handle:
        dataset = json.load(handle)
    return {"shift": shift, "seed": seed, "trials": rows, "dataset": dataset,
            "default_recipes": defaults, "wall_seconds": time.perf_counter() - started,
            "machine": bench.machine(), "commit": paper_table.commit()}


def default_recipes(data_dir, study_dir, seed):
    """Trains each method of --methods but DANN (the study's trial 1) once with
    train.py's defaults, beside the study's folder; returns {mode: run folder}."""
    runs = {}
    for mode in FLAGS.methods:
        if mode == "dann":
            continue
        runs[mode] = os.path.join(f"{study_dir}_defaults", mode)
        if not os.path.exists(os.path.join(runs[mode], "model.keras")):
            paper_table.run_commands(runs[mode], [[
                "train.py", f"--train_dir={data_dir}/train", f"--val_dir={data_dir}/val",
                f"--model_dir={runs[mode]}", f"--mode={mode}", f"--seed={seed}",
                "--overwrite"]])
    return runs


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


def summary_lines(table, count):
    """Markdown rows of a `summary` table over `count` studies."""
    return [f"| {name} | {100 * row['mean_to_source_only']:+.1f} | "
            f"{100 * row['worst_to_source_only']:+.1f} | {100 * row['mean_regret']:.1f} | "
            f"{row['kept_source_only']} of {count} |" for name, row in table.items()]


def default_recipe_lines(record):
    """Markdown: each method's default recipe against source-only, where run."""
    studies = {key: study for key, study in record["studies"].items()
               if study.get("default_recipes") and key in record["judged"]}
    if not studies:
        return []
    modes = ["dann", *next(iter(studies.values()))["default_recipes"]]
    header = ["study", "source-only", *modes, "tune.py's choice"]
    lines = ["", "Each method with train.py's defaults (lr 0.01, gamma 10, 20 epochs), "
             "and the study's choice among them (the default rule):", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    gains = {mode: [] for mode in [*modes, "choice"]}
    for key, study in studies.items():
        judged = record["judged"][key]
        accuracy = {"dann": next(row["target_test_accuracy"] for row in study["trials"]
                                 if row["trial"] == 1), **study["default_recipes"]}
        chosen = judged["rules"][DEFAULT]
        accuracy["choice"] = chosen["accuracy"]
        for mode in gains:
            gains[mode].append(accuracy[mode] - judged["source_only"])
        lines.append(f"| {key} | {judged['source_only']:.4f} | " + " | ".join(
            f"{accuracy[mode]:.4f}" for mode in modes) + f" | {chosen['accuracy']:.4f} "
            f"({chosen['mode']}) |")
    lines.append("| mean (worst) vs source-only, points | | " + " | ".join(
        f"{100 * sum(g) / len(g):+.1f} ({100 * min(g):+.1f})" for g in gains.values())
        + " |")
    return lines


def rule_tables(record):
    """Markdown: every rule over all studies, then the choosing rules per seed."""
    studies, table = record["judged"], record["summary"]
    head = ("| rule | mean vs source-only | worst vs source-only | mean regret | "
            "keeps source-only |", "| --- | --- | --- | --- | --- |")
    lines = [f"Selection rules on {len(studies)} studies (tune.py --trials "
             f"{FLAGS.trials}: source-only, the default DANN recipe, and trials of "
             f"{', '.join(FLAGS.methods)} drawn by Optuna's seeded TPE sampler, whose "
             "first 10 draws are random); target test accuracy read after each study "
             "ended. Differences in points of accuracy.", "", *head,
             *summary_lines(table, len(studies))]
    shown = ["snd", *map(unless_beaten, EVIDENCE_SETS)]
    for seed, by_seed in record["summary_by_seed"].items():
        count = sum(study.endswith(f"seed_{seed}") for study in studies)
        lines += ["", f"Seed {seed} only ({count} studies):", "", *head,
                  *summary_lines({name: by_seed[name] for name in shown}, count)]
    return lines


def study_lines(record):
    """Markdown: each study's source-only, best trial, and the picks of three rules."""
    columns = {"snd": "snd picks", FIRST_CHOICE: "beaten on target_entropy picks",
               DEFAULT: "default rule picks"}
    lines = ["", "| study | source-only | best trial | " + " | ".join(columns.values())
             + " |", "| --- | --- | --- |" + " --- |" * len(columns)]
    for key, study in record["judged"].items():
        picks = [study["rules"][name] for name in columns]
        lines.append(f"| {key} | {study['source_only']:.4f} | {study['oracle']:.4f} | "
                     + " | ".join(f"trial {pick['trial']} ({pick['mode']}) "
                                  f"{pick['accuracy']:.4f}" for pick in picks) + " |")
    return lines


def markdown(record):
    """shifts.md: the rules over all studies and per seed, each study's picks, the
    methods' default recipes where run, the machines."""
    lines = [*rule_tables(record), *study_lines(record), *default_recipe_lines(record)]
    machines = {}
    for study in record["studies"].values():
        machine = f"{study['machine']['cpu']}, {study['machine']['cores']} cores"
        machines.setdefault(machine, set()).add(str(study["seed"]))
    hours = sum(study["wall_seconds"] for study in record["studies"].values()) / 3600
    lines += ["", "Machines: " + "; ".join(
        f"{machine} (seed {', '.join(sorted(seeds))})" for machine, seeds in
        machines.items()) + f". The studies took {hours:.1f} hours in all. How each "
        "shift is built: benchmarks/shifts_data.py."]
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
    seeds = sorted({study["seed"] for study in studies.values()})
    by_seed = {seed: summary({key: value for key, value in judged.items()
                              if studies[key]["seed"] == seed}) for seed in seeds}
    record = {"studies": studies, "judged": judged, "summary": summary(judged),
              "summary_by_seed": by_seed, "machine": bench.machine(),
              "versions": bench.versions()}
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
    flags.DEFINE_list("methods", ["dann"], "The methods each study searches (tune.py "
                      "--methods).")
    flags.DEFINE_bool("default_recipes", False, "Also train each method of --methods "
                      "with train.py's defaults, once per shift and seed.")
    app.run(main)

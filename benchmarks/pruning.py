"""What checking tune.py's rules after every epoch saves, replayed on recorded studies.

    python benchmarks/pruning.py [--runs_dir runs/shifts]

Every study folder under --runs_dir (a trials.csv beside its trial_NNNN/ run folders,
as benchmarks/shifts.py leaves them) was run with the rules checked only after a
trial's last epoch. For each trial, `tuning.ruled_out_early` is replayed over its
recorded history (history.json holds the per-epoch val signals it reads): the epoch
at which it would have stopped the trial, and the training after that epoch, saved.
The study's choice (`choosing.choose`) is computed again with those trials ruled out,
to show whether it changes. Writes pruning.json and pruning.md.
"""

import json
import os

from absl import app, flags

import bench  # this folder's benchmark; importing it puts the repository on sys.path
import paper_table

import choosing  # noqa: E402
import run_folder  # noqa: E402
import tuning  # noqa: E402

FLAGS = flags.FLAGS


def replay(row):
    """(epoch it stops at or None, its reason, seconds trained, seconds saved)."""
    with open(os.path.join(row["run"], run_folder.HISTORY_JSON)) as handle:
        history = json.load(handle)
    trained = sum(epoch["epoch_seconds"] for epoch in history)
    for epoch in history:
        reason = tuning.ruled_out_early(epoch, row["num_epochs"])
        if reason:
            saved = sum(later["epoch_seconds"] for later in history
                        if later["epoch"] > epoch["epoch"])
            return epoch["epoch"], reason, trained, saved
    return None, None, trained, 0.0


def study_record(study_dir):
    """The replay of one study: per trial, and whether its choice changes."""
    rows = choosing.read_trials(os.path.join(study_dir, tuning.TRIALS_CSV))
    # Studies run before trials were numbered by folder have a `fail` row for a trial
    # that a later row resumed in the same folder: its history counts once.
    resumed = {row["run"] for row in rows if row["state"] != "fail"}
    trials, early = [], []
    for row in rows:
        if row["state"] == "fail" and row["run"] in resumed:
            continue
        if not os.path.exists(os.path.join(row["run"], run_folder.HISTORY_JSON)):
            continue  # stopped in its first epoch (a NaN loss): nothing to replay
        epoch, reason, trained, saved = replay(row)
        trials.append({"trial": row["trial"], "state": row["state"],
                       "ruled_out": row["ruled_out"], "stops_at_epoch": epoch,
                       "reason": reason, "trained_seconds": trained,
                       "saved_seconds": saved})
        if epoch is not None:
            early.append(row["trial"])
    replayed = [dict(row, state="pruned") if row["trial"] in early else row
                for row in rows]
    before, after = choosing.choose(rows)[0], choosing.choose(replayed)[0]
    return {"trials": trials,
            "chosen_before": before and before["trial"],
            "chosen_after": after and after["trial"],
            "scored_trials_stopped": [trial["trial"] for trial in trials
                                      if trial["stops_at_epoch"] is not None
                                      and trial["state"] == "complete"]}


def markdown(studies):
    """pruning.md: a row per study, then the totals."""
    lines = [f"The rules checked after every epoch (from epoch {tuning.EARLY_FROM_EPOCH}: "
             f"val source accuracy below {tuning.SOURCE_ACCURACY_FLOOR}; in the second "
             "half: 90 % of the val target given one class), replayed on the recorded "
             "histories of each study's trials.", "",
             "| study | trials | stopped early (at epoch) | hours trained | hours "
             "saved | chosen trial: end-only rules -> every epoch |",
             "| --- | --- | --- | --- | --- | --- |"]
    totals = [0.0, 0.0]
    for key, study in studies.items():
        trials = study["trials"]
        stopped = [f"{t['trial']} ({t['stops_at_epoch']})" for t in trials
                   if t["stops_at_epoch"] is not None]
        trained = sum(t["trained_seconds"] for t in trials) / 3600
        saved = sum(t["saved_seconds"] for t in trials) / 3600
        totals = [totals[0] + trained, totals[1] + saved]
        lines.append(f"| {key} | {len(trials)} | {', '.join(stopped) or 'none'} | "
                     f"{trained:.2f} | {saved:.2f} | {study['chosen_before']} -> "
                     f"{study['chosen_after']} |")
    lines += ["", f"In all: {totals[1]:.2f} of {totals[0]:.2f} hours of training saved "
              f"({100 * totals[1] / max(totals[0], 1e-9):.0f} %); "
              + ("the chosen trial is the same in every study." if all(
                  s["chosen_before"] == s["chosen_after"] for s in studies.values())
                 else "the chosen trial CHANGES in some study (above).")]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    studies = {}
    for folder, _, files in sorted(os.walk(FLAGS.runs_dir)):
        if tuning.TRIALS_CSV in files:
            studies[os.path.relpath(folder, FLAGS.runs_dir)] = study_record(folder)
    record = {"studies": studies, "runs_dir": bench.in_repository(FLAGS.runs_dir),
              "early_from_epoch": tuning.EARLY_FROM_EPOCH,
              "machine": bench.machine(), "commit": paper_table.commit()}
    paper_table.write_results(FLAGS.output_prefix, record, markdown(studies))


if __name__ == "__main__":
    flags.DEFINE_string("runs_dir", os.path.join(bench.REPO, "runs", "shifts"),
                        "Folder of recorded studies (benchmarks/shifts.py's).")
    flags.DEFINE_string("output_prefix", os.path.join(bench.REPO, "benchmarks",
                                                      "pruning"),
                        "Writes PREFIX.json and PREFIX.md.")
    app.run(main)

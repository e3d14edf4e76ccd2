"""The rule that chooses a study's trial without target labels (choosing.py), on
constructed score tables, and the leaderboard lines that report it."""

import csv
import json
import os
import sys

import pytest

import choosing
import tuning
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import pruning  # noqa: E402
import shifts  # noqa: E402


def trial(number, mode, snd, entropy, source_accuracy, share=0.12, dev=-0.2,
          state="complete", **params):
    return {"trial": number, "mode": mode, "state": state, "lr": params.get("lr", 0.01),
            "gamma": params.get("gamma", 10.0), "num_epochs": 20, "score": snd,
            "val_snd": snd, "val_target_entropy": entropy, "val_dev": dev,
            "val_source_accuracy": source_accuracy, "val_target_top_share": share,
            "ruled_out": "" if state == "complete" else "the loss became NaN",
            "run": f"runs/tune/trial_{number:04d}"}


# The study of a real digit shift that tune.py once got wrong (issue 31): snd alone
# chose trial 3, 16.6 points below source-only on the target.
REAL_SHIFT = [trial(0, "source_only", 4.7044, -0.2625, 0.986, dev=-0.1596),
              trial(1, "dann", 4.5952, -0.5570, 0.964, dev=-0.4023),
              trial(3, "dann", 4.8011, -0.4543, 0.923, dev=-0.5091, lr=0.0196),
              trial(7, "dann", 4.6028, -0.5819, 0.982, dev=-0.0964),
              trial(9, "dann", 4.6613, -0.2660, 0.9735, dev=-0.1887)]


def test_a_higher_snd_alone_does_not_beat_source_only():
    assert choosing.best_by(REAL_SHIFT, ("snd",))["trial"] == 3  # what snd alone did
    chosen, reason = choosing.choose(REAL_SHIFT)
    assert chosen["trial"] == 0
    assert reason == ("kept source-only (trial 0): no dann trial beat it on "
                      "target_entropy and dev")


def test_trial_3_falls_short_on_target_entropy_even_with_source_only_s_accuracy():
    lucky = dict(REAL_SHIFT[2], val_source_accuracy=0.986)
    chosen, _ = choosing.choose([REAL_SHIFT[0], lucky])
    assert chosen["trial"] == 0
    assert choosing.falls_short(lucky, REAL_SHIFT[0], choosing.EVIDENCE, 0.02, 0.1) == \
        "not above source-only on target_entropy and dev"


# The held-out seed of benchmarks/shifts.md's mnist_to_synth (seed 1): trial 1 was more
# confident than source-only on the val target, within both margins, and 5.7 points
# below it on the target test split; its dev, lower than source-only's, rules it out.
MORE_CONFIDENT_AND_WRONG = [
    trial(0, "source_only", 5.1261, -1.7485, 0.975, share=0.355, dev=-0.0096),
    trial(1, "dann", 4.7118, -1.1822, 0.971, share=0.312, dev=-0.0982),
    trial(6, "dann", 5.0037, -1.5165, 0.966, share=0.306, dev=-0.0705)]


def test_a_more_confident_trial_with_a_lower_dev_does_not_beat_source_only():
    assert choosing.choose(MORE_CONFIDENT_AND_WRONG, evidence=("target_entropy",))[0][
        "trial"] == 1  # what the rule chosen on the first seed did
    chosen, reason = choosing.choose(MORE_CONFIDENT_AND_WRONG)
    assert chosen["trial"] == 0
    assert choosing.falls_short(MORE_CONFIDENT_AND_WRONG[1], chosen, choosing.EVIDENCE,
                                0.02, 0.1) == "not above source-only on dev"


def test_a_score_that_is_missing_or_not_a_number_never_beats_source_only():
    source_only, dann = trial(0, "source_only", 4.0, -0.5, 0.99), trial(
        1, "dann", 4.5, -0.2, 0.99, dev=-0.1)
    assert choosing.choose([source_only, dann])[0]["trial"] == 1
    for missing in (None, float("nan")):
        chosen, reason = choosing.choose([source_only, dict(dann, val_dev=missing)])
        assert chosen["trial"] == 0 and reason.endswith("on target_entropy and dev")


def test_a_dann_trial_above_source_only_on_the_evidence_is_chosen():
    rows = REAL_SHIFT + [trial(10, "dann", 4.75, -0.20, 0.980, dev=-0.1)]
    chosen, reason = choosing.choose(rows)
    assert chosen["trial"] == 10
    assert reason == ("chose trial 10 (dann): above source-only (trial 0) on "
                      "target_entropy and dev, val source accuracy 0.9800 against "
                      "0.9860; the only adapted trial that qualified")


@pytest.mark.parametrize("source_accuracy, share, fragment", [
    (0.9659, 0.12, "more than 0.02 below source-only's"),
    (0.98, 0.2201, "more than 10% above source-only's"),
])
def test_margins_on_source_accuracy_and_class_share_rule_a_trial_out(
        source_accuracy, share, fragment):
    source_only = trial(0, "source_only", 4.0, -0.5, 0.986)
    dann = trial(1, "dann", 4.5, -0.2, source_accuracy, share=share, dev=-0.1)
    chosen, reason = choosing.choose([source_only, dann])
    assert chosen["trial"] == 0
    assert reason.startswith("kept source-only (trial 0): no dann trial beat it on "
                             "target_entropy and dev within the margins (trial 1: ")
    assert fragment in choosing.falls_short(dann, source_only, choosing.EVIDENCE,
                                            choosing.ACCURACY_MARGIN,
                                            choosing.SHARE_MARGIN)
    within = dict(dann, val_source_accuracy=0.967, val_target_top_share=0.21)
    assert choosing.choose([source_only, within])[0]["trial"] == 1


def test_of_the_qualified_trials_the_best_rank_sum_wins():
    rows = [trial(0, "source_only", 4.0, -0.5, 0.99, dev=-0.3),
            trial(1, "dann", 4.9, -0.45, 0.99, dev=-0.1),   # ranks 0 + 2, dev 0
            trial(2, "dann", 4.6, -0.30, 0.99, dev=-0.2),   # ranks 1 + 0, dev 1
            trial(3, "dann", 4.5, -0.40, 0.99, dev=-0.25)]  # ranks 2 + 1, dev 2
    assert choosing.choose(rows, evidence=("snd", "target_entropy"))[0]["trial"] == 2
    assert choosing.best_by(rows, ("snd", "target_entropy"))["trial"] == 2
    assert choosing.best_by(rows, ("dev",))["trial"] == 1
    assert choosing.choose(rows)[0]["trial"] == 2  # target_entropy 0 + dev 1


def test_without_a_scored_source_only_trial_the_reason_says_so():
    rows = [trial(0, "source_only", 4.0, -0.5, 0.99, state="pruned"),
            trial(1, "dann", 4.5, -0.2, 0.98)]
    chosen, reason = choosing.choose(rows)
    assert chosen["trial"] == 1 and "no source-only trial was scored" in reason
    assert choosing.choose(rows[:1]) == (None, None)


def test_a_study_recorded_before_the_class_share_is_still_chosen_from():
    rows = [dict(trial(0, "source_only", 4.0, -0.5, 0.99), val_target_top_share=None),
            dict(trial(1, "dann", 4.5, -0.2, 0.98, dev=-0.1), val_target_top_share=None)]
    assert choosing.choose(rows)[0]["trial"] == 1


def test_the_leaderboard_says_what_was_kept_and_never_beats_from_one_score():
    lines = tuning.leaderboard(REAL_SHIFT, "snd")
    assert lines[-1].startswith("The rule kept source-only (trial 0)")
    assert not any("beats" in line for line in lines)
    marked = [line for line in lines if line.startswith("*")]
    assert len(marked) == 1 and marked[0].split()[1:3] == ["0", "source_only"]
    assert lines[0].split()[-6:-3] == ["snd", "target_entropy", "dev"]
    assert marked[0].split()[-4:-1] == ["4.7044", "-0.2625", "-0.1596"]  # its scores
    # Sorted by the objective: trial 3 first, unmarked.
    assert lines[1].split()[:2] == ["3", "dann"]


def test_the_chosen_trial_is_listed_even_below_the_top_by_the_objective():
    lines = tuning.leaderboard(REAL_SHIFT, "snd", top=1)
    assert [line.split()[0] for line in lines[1:3]] == ["3", "*"]
    assert lines[2].split()[1:3] == ["0", "source_only"] and len(lines) == 4


def test_when_every_trial_was_ruled_out_the_last_line_says_what_to_try():
    rows = [trial(0, "source_only", 4.0, -0.5, 0.99, state="pruned"),
            trial(1, "dann", 4.5, -0.2, 0.98, state="pruned")]
    lines = tuning.leaderboard(rows, "snd")
    assert lines[-1].startswith("Nothing chosen: none of the 2 trials was scored")
    assert "--trials" in lines[-1]
    assert lines[-3:-1] == ["trial 0 ruled out: the loss became NaN",
                            "trial 1 ruled out: the loss became NaN"]


def test_a_study_of_several_methods_says_which_and_may_choose_any():
    rows = [trial(0, "source_only", 4.0, -0.5, 0.99), trial(1, "dann", 4.5, -0.6, 0.99),
            trial(2, "mcc", 4.4, -0.7, 0.99, dev=-0.1), trial(3, "cdan", 4.2, -0.8, 0.99)]
    chosen, reason = choosing.choose(rows)
    assert chosen["trial"] == 0
    assert reason == ("kept source-only (trial 0): no cdan, dann or mcc trial beat it "
                      "on target_entropy and dev")
    rows[2]["val_target_entropy"] = -0.3
    chosen, reason = choosing.choose(rows)
    assert chosen["trial"] == 2 and reason.startswith("chose trial 2 (mcc): above")


def test_a_trial_is_ruled_out_at_the_first_epoch_that_shows_it():
    def row(epoch, accuracy=0.9, share=0.2):
        return {"epoch": epoch, "val_source_accuracy": accuracy,
                "monitor_top_class_share": share}

    # A slow start is not ruled out before EARLY_FROM_EPOCH, a collapse not before the
    # run's second half.
    assert tuning.ruled_out_early(row(tuning.EARLY_FROM_EPOCH - 1, 0.1), 20) is None
    assert tuning.ruled_out_early(row(tuning.EARLY_FROM_EPOCH, 0.1), 20) == (
        "source accuracy 0.100 on val is below 0.5: the source task was not learned "
        f"(at epoch {tuning.EARLY_FROM_EPOCH} of 20)")
    assert tuning.ruled_out_early(row(10, share=0.95), 20) is None
    assert tuning.ruled_out_early(row(11, share=0.95), 20).startswith(
        "95% of the val target images were given one class: collapsed (at epoch 11")
    assert tuning.ruled_out_early(row(11), 20) is None


def test_tune_help_states_the_rule_with_its_margins():
    text = open(os.path.join(os.path.dirname(choosing.__file__), "tune.py")).read()
    usage = text.split('"""')[1]
    assert f"{choosing.ACCURACY_MARGIN * 100:.0f} points below" in usage
    assert f"{choosing.SHARE_MARGIN * 100:.0f} points more" in usage
    for score in choosing.EVIDENCE:
        assert f"(a higher {score})" in usage
    assert "benchmarks/shifts.md" in usage


def test_a_stopped_trial_is_said_to_continue_with_the_same_command():
    rows = REAL_SHIFT + [trial(11, "dann", 4.0, -0.5, 0.9, state="stopped")]
    rows[-1]["ruled_out"] = ""
    lines = tuning.leaderboard(rows, "snd")
    assert ("trial 11 stopped before its end: the same command continues it from its "
            "latest checkpoint") in lines


def test_the_benchmark_judges_each_rule_against_source_only_and_the_best_trial():
    accuracy = {0: 0.2273, 1: 0.1703, 6: 0.2100}
    trials = [dict(row, target_test_accuracy=accuracy[row["trial"]])
              for row in MORE_CONFIDENT_AND_WRONG]
    helped = [dict(trials[0], target_test_accuracy=0.50),
              dict(trials[1], target_test_accuracy=0.70, val_dev=0.0)]
    judged = {"a/seed_1": shifts.judge_study({"trials": trials}),
              "b/seed_1": shifts.judge_study({"trials": helped})}
    assert judged["a/seed_1"]["oracle"] == 0.2273
    table = shifts.summary(judged)
    first_choice = table[shifts.FIRST_CHOICE]
    assert first_choice["worst_to_source_only"] == pytest.approx(-0.057)
    assert first_choice["mean_to_source_only"] == pytest.approx((-0.057 + 0.2) / 2)
    default = table[shifts.DEFAULT]
    assert shifts.DEFAULT.endswith("target_entropy and dev (default)")
    assert (default["worst_to_source_only"], default["kept_source_only"]) == (0.0, 1)
    assert default["mean_regret"] == pytest.approx(0.0)
    # snd keeps source-only in both studies, and so misses b's 20 points.
    assert table["snd"]["mean_regret"] == pytest.approx((0.0 + 0.2) / 2)


def test_the_pruning_replay_stops_a_trial_early_and_counts_a_folder_once(tmp_path):
    def history(run, accuracies):
        os.makedirs(run)
        with open(os.path.join(run, "history.json"), "w") as handle:
            json.dump([{"epoch": epoch, "epoch_seconds": 360.0, "val_source_accuracy": a,
                        "monitor_top_class_share": 0.2}
                       for epoch, a in enumerate(accuracies, 1)], handle)

    rows = [trial(0, "source_only", 4.0, -0.5, 0.99),
            trial(1, "dann", 4.5, -0.2, 0.2, state="pruned"),
            trial(2, "dann", 4.5, -0.2, 0.9, state="fail"),
            trial(3, "dann", 4.5, -0.2, 0.9)]
    rows[3]["run"] = rows[2]["run"]  # trial 3 resumed trial 2's folder
    for row in rows:
        row["run"] = str(tmp_path / row["run"])
    history(rows[0]["run"], [0.9] * 10)
    history(rows[1]["run"], [0.1] * 10)
    history(rows[2]["run"], [0.9] * 10)
    with open(tmp_path / tuning.TRIALS_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    record = pruning.study_record(str(tmp_path))
    assert [t["trial"] for t in record["trials"]] == [0, 1, 3]
    stopped = record["trials"][1]
    assert stopped["stops_at_epoch"] == tuning.EARLY_FROM_EPOCH
    assert stopped["saved_seconds"] == 360.0 * (10 - tuning.EARLY_FROM_EPOCH)
    assert record["chosen_before"] == record["chosen_after"]

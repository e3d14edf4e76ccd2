"""tune.py through its command line on tiny data: trials are ordinary run folders, a
stopped study continues, two processes share one study, target labels are never
read, and bad settings are one line."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import choosing

from conftest import (assert_one_line_error, run_script, snapshot, start_script,
                      with_unlabelled_val)

pytestmark = pytest.mark.slow  # processes: the fast tier leaves them to CI


def tune_args(data, study_dir, *extra, val="val"):
    return [f"--train_dir={data}/train", f"--val_dir={data}/{val}",
            f"--study_dir={study_dir}", "--batch_size=8", *extra]


def read_trials(study_dir):
    with open(os.path.join(study_dir, "trials.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tune_data(tiny_data, tmp_path_factory):
    """tiny_data with val/, a copy of test/ whose target has no labels."""
    return with_unlabelled_val(tiny_data, str(tmp_path_factory.mktemp("tune") / "data"),
                               "nested")


@pytest.fixture(scope="module")
def study(tune_data, tmp_path_factory):
    study_dir = str(tmp_path_factory.mktemp("study") / "study")
    result = run_script("tune.py", *tune_args(tune_data, study_dir, "--trials=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return study_dir, result


def test_a_study_is_a_set_of_ordinary_runs_scored_without_target_labels(study,
                                                                        tune_data):
    study_dir, result = study
    rows = read_trials(study_dir)
    assert [row["trial"] for row in rows] == ["0", "1", "2"]
    assert [row["mode"] for row in rows] == ["source_only", "dann", "dann"]
    # A trial drawn by the sampler may be ruled out (pruned) on this tiny data.
    assert [row["state"] for row in rows[:2]] == ["complete", "complete"]
    assert all(float(row["score"]) == float(row["val_snd"]) for row in rows
               if row["state"] == "complete")
    assert rows[2]["state"] in ("complete", "pruned")
    assert (rows[0]["lr"], rows[0]["gamma"], rows[0]["num_epochs"]) == ("0.01", "10.0",
                                                                        "20")
    verdict = [line for line in result.stdout.splitlines()
               if line.startswith("The rule ")]
    assert len(verdict) == 1 and "beats" not in result.stdout
    chosen = int(re.search(r"(?:chose|kept source-only \()trial (\d+)",
                           verdict[0]).group(1))
    assert chosen == choosing.choose(choosing.read_trials(
        os.path.join(study_dir, "trials.csv")))[0]["trial"]
    assert os.path.realpath(os.path.join(study_dir, "best")) == rows[chosen]["run"]
    with open(os.path.join(study_dir, "choice.txt")) as handle:
        assert verdict[0] in handle.read().splitlines()
    assert result.stdout.rstrip().endswith(f"best links to the chosen trial, "
                                           f"{rows[chosen]['run']}")
    assert os.path.getsize(os.path.join(study_dir, "trials.png")) > 10_000
    trial = os.path.join(study_dir, "best")
    assert run_script("eval.py", f"--model_dir={trial}",
                      f"--test_dir={tune_data}/test").returncode == 0
    assert run_script("predict.py", f"--model_dir={trial}",
                      f"--input={tune_data}/val/target").returncode == 0
    # A trial's flags.txt replays it with train.py.
    flags = open(os.path.join(rows[2]["run"], "flags.txt")).read().split()
    assert f"--lr={rows[2]['lr']}" in flags and "--mode=dann" in flags


def test_permuting_labelled_target_folders_changes_no_score(tune_data, tmp_path):
    permuted = str(tmp_path / "data")
    shutil.copytree(tune_data, permuted, ignore=shutil.ignore_patterns("val"))
    scores = []
    for name, val in (("labelled", "test"), ("permuted", "test")):
        if name == "permuted":
            target = os.path.join(permuted, "test", "target")
            os.rename(os.path.join(target, "class_0"), os.path.join(target, "moving"))
            os.rename(os.path.join(target, "class_1"), os.path.join(target, "class_0"))
            os.rename(os.path.join(target, "moving"), os.path.join(target, "class_1"))
        study_dir = str(tmp_path / name)
        result = run_script("tune.py", *tune_args(permuted, study_dir, "--trials=2",
                                                  val=val))
        assert result.returncode == 0, result.stderr[-3000:]
        scores.append([row["score"] for row in read_trials(study_dir)])
    assert scores[0] == scores[1]


def start_tune(args):
    return start_script("tune.py", *args, merged=True)


def test_ctrl_c_then_the_same_command_continues_without_counting_twice(tune_data,
                                                                       tmp_path):
    study_dir = str(tmp_path / "study")
    args = tune_args(tune_data, study_dir, "--trials=3")
    process = start_tune(args)
    for line in process.stdout:
        if "trial 1: dann" in line:
            process.send_signal(signal.SIGINT)
            break
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 130, output[-3000:]
    assert "run the same command again" in output
    assert "--restore_model" not in output  # not a tune.py flag
    again = run_script("tune.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"\] trial 1 resumes: dann", again.stderr)
    rows = read_trials(study_dir)
    # One row per run folder, numbered as its folder; the stopped trial's row is the
    # one that finished it (Optuna's trial 2), so the next new trial is trial 3.
    assert [row["trial"] for row in rows] == ["0", "1", "3"]
    assert {row["state"] for row in rows} <= {"complete", "pruned"}
    assert [row["run"] for row in rows] == [os.path.join(study_dir, f"trial_{number:04d}")
                                            for number in (0, 1, 3)]


def test_two_processes_share_one_study_and_run_no_trial_twice(tune_data, tmp_path):
    study_dir = str(tmp_path / "study")
    args = tune_args(tune_data, study_dir, "--trials=4")
    processes = [start_tune(args) for _ in range(2)]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    rows = read_trials(study_dir)
    finished = [row for row in rows if row["state"] in ("complete", "pruned")]
    assert len(rows) == len(finished) == 4 and len({row["run"] for row in rows}) == 4
    assert [row["mode"] for row in rows].count("source_only") == 1
    started = [set(re.findall(r"\] trial (\d+): ", output)) for output in outputs]
    assert not started[0] & started[1]  # no trial run by both processes
    assert started[0] | started[1] == {row["trial"] for row in rows}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_processes_draw_trials_one_at_a_time(tmp_path):
    # SQLite has no row locks: two processes asking at once could draw one queued trial.
    import study_store

    study = study_store.prepare_study(str(tmp_path), None, "snd", "tpe", 0)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; handle = open(sys.argv[1], 'a'); "
        "fcntl.flock(handle, fcntl.LOCK_EX); print('held', flush=True); time.sleep(3)"),
        str(tmp_path / study_store.STUDY_LOCK)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.perf_counter()
    trial = study.ask()
    assert time.perf_counter() - started > 1.5  # it waited for the other process
    assert trial.number == 0  # the first queued baseline, drawn once
    holder.wait(timeout=30)


@pytest.mark.parametrize("extra, fragments", [
    (["--val_dir="], ["--val_dir is needed"]),
    (["--lr=0.1"], ["--lr is searched by tune.py (common_flags.SEARCH_SPACE): leave it "
                    "out"]),
    (["--num_epochs", "2"], ["--num_epochs is searched by tune.py"]),
    (["--mode=cdan"], ["--mode is searched by tune.py (--methods)"]),
    (["--methods=dann,gan"], ["--methods", "comma-separated list of dann, cdan"]),
    (["--storage=journal:/no/such/folder/journal.log"],
     ["--storage journal:/no/such/folder/journal.log", "/no/such/folder is not a folder"]),
    (["--storage=nosuchdb://x"], ["--storage nosuchdb://x", "cannot open it"]),
])
def test_bad_tune_settings_are_one_line(tune_data, tmp_path, extra, fragments):
    result = run_script("tune.py", *tune_args(tune_data, str(tmp_path / "s")), *extra)
    assert_one_line_error(result, *fragments)


def test_collapsed_models_are_ruled_out_by_the_stated_rule():
    import tuning

    assert tuning.top_share({"a": 95, "b": 5}) == 0.95
    assert "collapsed" in tuning.ruled_out({"source_accuracy": 0.99,
                                            "target_top_share": 0.95})
    assert "not learned" in tuning.ruled_out({"source_accuracy": 0.4,
                                              "target_top_share": 0.8})
    assert tuning.ruled_out({"source_accuracy": 0.99, "target_top_share": 0.8}) is None


def test_a_study_dir_holding_the_users_files_is_refused_and_kept(tune_data, tmp_path):
    (tmp_path / "DATA" / "train").mkdir(parents=True)
    (tmp_path / "DATA" / "notes.txt").write_text("the user's")
    before = snapshot(str(tmp_path))
    result = run_script("tune.py", *tune_args(tune_data, str(tmp_path / "DATA"),
                                              "--trials=2"))
    assert_one_line_error(result, f"--study_dir {tmp_path}/DATA holds files this "
                          "command did not write (notes.txt, train)")
    assert snapshot(str(tmp_path)) == before


def test_a_study_of_another_objective_is_refused(study, tune_data):
    study_dir, _ = study
    result = run_script("tune.py", *tune_args(tune_data, study_dir, "--trials=3",
                                              "--objective=target_entropy"))
    assert_one_line_error(result, "has --objective snd, not target_entropy",
                          "pass --objective snd")


def test_a_study_searches_the_methods_it_is_given(tune_data, tmp_path):
    study_dir = str(tmp_path / "methods")
    result = run_script("tune.py", *tune_args(tune_data, study_dir, "--trials=4",
                                              "--methods=mcc,coral"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_trials(study_dir)
    assert [row["mode"] for row in rows[:2]] == ["source_only", "dann"]
    assert {row["mode"] for row in rows[2:]} <= {"mcc", "coral"} and len(rows) == 4
    for row in rows[2:]:
        with open(os.path.join(row["run"], "flags.txt")) as handle:
            assert f"--mode={row['mode']}" in handle.read().split()
    result = run_script("tune.py", *tune_args(tune_data, study_dir, "--trials=5"))
    assert_one_line_error(result, "has --methods mcc,coral, not dann",
                          "pass --methods mcc,coral")

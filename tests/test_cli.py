"""The real command lines, end to end on tiny generated data."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("cli") / "run")
    result = run_script("train.py", f"--train_dir={tiny_data}/train",
                        f"--val_dir={tiny_data}/test", f"--model_dir={model_dir}",
                        "--num_epochs=1", "--batch_size=8", "--log_rate=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def test_train_writes_the_whole_record_of_a_run(trained_run):
    names = set(os.listdir(trained_run))
    assert {"flags.txt", "model.keras", "history.csv", "history.json",
            "train_curves.png", "logs", "checkpoints"} <= names
    assert os.listdir(os.path.join(trained_run, "checkpoints")) == ["ckpt-00000006.keras"]
    assert not [n for n in names if n.startswith(".tmp")]
    header = open(os.path.join(trained_run, "history.csv")).readline().strip().split(",")
    assert {"epoch", "label_loss", "domain_loss", "lambda", "lr", "label_accuracy",
            "domain_accuracy", "val_target_accuracy"} <= set(header)


def test_eval_prints_a_table_and_writes_the_report(trained_run, tiny_data):
    result = run_script("eval.py", f"--model_dir={trained_run}",
                        f"--test_dir={tiny_data}/test")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "target" in result.stdout and "domain classifier accuracy" in result.stdout
    report = json.load(open(os.path.join(trained_run, "eval_report.json")))
    for key in ("source_accuracy", "target_accuracy", "domain_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["num_source"] == report["num_target"] == 24
    assert set(report["per_class"]) == {"source", "target"}
    assert set(report["per_class"]["target"]) == {"class_0", "class_1", "class_2"}
    for name in ("confusion_source.png", "confusion_target.png"):
        assert os.path.getsize(os.path.join(trained_run, name)) > 1000


def test_saved_flags_are_reusable_as_a_flagfile(trained_run, tiny_data):
    flags_file = os.path.join(trained_run, "flags.txt")
    assert "--num_epochs=1" in open(flags_file).read().split()
    result = run_script("eval.py", f"--flagfile={flags_file}",
                        f"--test_dir={tiny_data}/test")
    assert result.returncode == 0, result.stderr[-3000:]


def test_restore_model_continues_the_step_count(trained_run, tiny_data, tmp_path):
    flags_file = os.path.join(trained_run, "flags.txt")
    model_dir = str(tmp_path / "longer")
    first = run_script("train.py", f"--flagfile={flags_file}",
                       f"--model_dir={model_dir}", "--num_epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    os.remove(os.path.join(model_dir, "checkpoints", "ckpt-00000012.keras"))
    resumed = run_script("train.py", f"--flagfile={flags_file}",
                         f"--model_dir={model_dir}", "--num_epochs=2", "--restore_model")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 6" in resumed.stderr
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [
        "ckpt-00000006.keras", "ckpt-00000012.keras"]


@pytest.mark.parametrize("flag", ["--batch_size=0", "--num_epochs=-1", "--mode=magic"])
def test_bad_flag_values_are_refused_before_anything_loads(flag, tmp_path):
    result = run_script("train.py", flag, f"--model_dir={tmp_path}/run")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


def test_eval_without_a_model_is_one_clear_line(tmp_path, tiny_data):
    result = run_script("eval.py", f"--model_dir={tmp_path}", f"--test_dir={tiny_data}/test")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no model at")
    assert "Traceback" not in result.stderr


def test_eval_tsne_draws_the_features_of_both_domains(trained_run, tiny_data):
    result = run_script("eval.py", f"--model_dir={trained_run}",
                        f"--test_dir={tiny_data}/test", "--tsne")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.getsize(os.path.join(trained_run, "tsne.png")) > 5000

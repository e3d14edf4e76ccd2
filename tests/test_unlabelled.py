"""A target without labels, end to end through the real commands: training on it,
watching a run without target labels, evaluating splits that have no target labels or
only one domain, and evaluations that keep each other's files."""

import json
import os
import shutil

import numpy as np
import pytest

import monitor
from conftest import (assert_one_line_error, run_script, saved_weights, snapshot,
                      unlabel_target, with_unlabelled_val)


@pytest.fixture(scope="module")
def unlabelled_data(tiny_data, tmp_path_factory):
    """tiny_data with a flat unlabelled train/target, a nested unlabelled val/target
    (a copy of test/) and test/ as it is."""
    root = with_unlabelled_val(tiny_data, str(tmp_path_factory.mktemp("unlabelled") /
                                              "data"), "nested")
    unlabel_target(os.path.join(root, "train"), "flat")
    return root


def train(data, model_dir, *extra):
    return run_script("train.py", f"--train_dir={data}/train", f"--model_dir={model_dir}",
                      "--num_epochs=2", "--batch_size=8", *extra)


@pytest.fixture(scope="module")
def unlabelled_run(unlabelled_data, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("unlabelled_run") / "run")
    result = train(unlabelled_data, model_dir, f"--val_dir={unlabelled_data}/val")
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir, result


@pytest.mark.slow
def test_dann_trains_on_an_unlabelled_target_as_on_a_labelled_one(
        unlabelled_run, tiny_data, tmp_path):
    model_dir, result = unlabelled_run
    history = json.load(open(os.path.join(model_dir, "history.json")))
    for row in history:
        assert {"val_source_accuracy", "val_domain_accuracy", "monitor_domain_accuracy",
                "monitor_target_entropy", "monitor_snd",
                "monitor_top_class_share"} <= set(row)
        assert not [key for key in row if "target_accuracy" in key]
    header = open(os.path.join(model_dir, "history.csv")).readline()
    assert "monitor_snd" in header and "target_accuracy" not in header
    assert "target_accuracy" not in result.stdout
    # Target labels never reach training: the labelled layout trains the same weights.
    labelled = train(tiny_data, str(tmp_path / "labelled"))
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    for a, b in zip(saved_weights(os.path.join(model_dir, "model.keras")),
                    saved_weights(str(tmp_path / "labelled" / "model.keras"))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_source_only_trains_on_a_nested_unlabelled_target(unlabelled_data, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(unlabelled_data, data)
    shutil.rmtree(os.path.join(data, "train", "target"))
    shutil.copytree(os.path.join(data, "val", "target"),
                    os.path.join(data, "train", "target"))
    result = train(data, str(tmp_path / "run"), "--mode=source_only")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "monitor_domain_accuracy" in result.stdout


@pytest.mark.slow
def test_target_only_refuses_an_unlabelled_target(unlabelled_data, tmp_path):
    result = train(unlabelled_data, str(tmp_path / "run"), "--mode=target_only")
    assert_one_line_error(result, "--mode target_only", f"{unlabelled_data}/train/target",
                          "has none")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_a_target_of_both_layouts_is_refused_before_anything_is_written(
        unlabelled_data, tiny_data, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data)
    shutil.copy(os.path.join(data, "train", "source", "class_0", "00000.png"),
                os.path.join(data, "train", "target", "loose.png"))
    model_dir = str(tmp_path / "run")
    assert train(tiny_data, model_dir).returncode == 0
    before = snapshot(model_dir)
    result = train(data, model_dir, "--overwrite")
    assert_one_line_error(result, f"{data}/train/target", "only partly",
                          "images directly inside", "use one layout")
    assert snapshot(model_dir) == before


def eval_report(model_dir, split, name="eval_report.json"):
    with open(os.path.join(model_dir, "eval", split, name)) as handle:
        return json.load(handle)


@pytest.mark.slow
def test_eval_reports_no_accuracy_for_a_target_without_labels(unlabelled_run,
                                                              unlabelled_data):
    model_dir, _ = unlabelled_run
    result = run_script("eval.py", f"--model_dir={model_dir}",
                        f"--test_dir={unlabelled_data}/val", "--label_free")
    assert result.returncode == 0, result.stderr[-3000:]
    target_row = [line for line in result.stdout.splitlines()
                  if line.startswith("target ")][0]
    assert "no labels" in target_row and "nan" not in result.stdout.lower()
    report = eval_report(model_dir, "val")
    assert "target_accuracy" not in report and 0 <= report["source_accuracy"] <= 1
    assert set(report["confusion"]) == set(report["per_class"]) == {"source"}
    assert sum(report["predicted_counts"]["target"].values()) == report["num_target"]
    assert set(report["label_free_scores"]) == {"source_accuracy", "target_entropy",
                                                "snd", "dev", "iwcv"}
    written = set(os.listdir(os.path.join(model_dir, "eval", "val")))
    assert written == {"eval_report.json", "confusion_source.png", "pr_source.png",
                       "confusion_domain.png"}


@pytest.mark.slow
@pytest.mark.parametrize("kept", ["source", "target"])
def test_eval_takes_a_split_of_one_domain(unlabelled_run, unlabelled_data, tmp_path,
                                          kept):
    model_dir, _ = unlabelled_run
    split = str(tmp_path / f"only_{kept}")
    shutil.copytree(os.path.join(unlabelled_data, "val", kept), os.path.join(split, kept))
    result = run_script("eval.py", f"--model_dir={model_dir}", f"--test_dir={split}",
                        "--label_free")
    assert result.returncode == 0, result.stderr[-3000:]
    report = eval_report(model_dir, f"only_{kept}")
    assert set(report["domain_recognised"]) == {kept}
    assert "domain_accuracy" not in report and f"num_{kept}" in report
    scores = {"source": {"source_accuracy"}, "target": {"target_entropy", "snd"}}[kept]
    assert set(report["label_free_scores"]) == scores
    assert ("source_accuracy" in report) == (kept == "source")
    reverse = run_script("eval.py", f"--model_dir={model_dir}", f"--test_dir={split}",
                         "--reverse_validation")
    assert_one_line_error(reverse, "--reverse_validation needs both domains", split)


@pytest.mark.slow
def test_evaluations_of_different_splits_keep_each_others_files(unlabelled_run,
                                                                unlabelled_data,
                                                                tiny_data, tmp_path):
    model_dir, _ = unlabelled_run
    val, test = f"{unlabelled_data}/val", f"{unlabelled_data}/test"
    for split, extra in ((val, ["--tsne"]), (test, [])):
        assert run_script("eval.py", f"--model_dir={model_dir}", f"--test_dir={split}",
                          *extra).returncode == 0
    assert os.path.exists(os.path.join(model_dir, "eval", "val", "tsne.png"))
    assert eval_report(model_dir, "val")["test_dir"] == val
    assert eval_report(model_dir, "test")["test_dir"] == test
    # Again without --tsne: no t-SNE of the earlier evaluation is left beside it.
    assert run_script("eval.py", f"--model_dir={model_dir}",
                      f"--test_dir={val}").returncode == 0
    assert not os.path.exists(os.path.join(model_dir, "eval", "val", "tsne.png"))
    # Another data set's test/ gets a folder of its own.
    other = run_script("eval.py", f"--model_dir={model_dir}",
                       f"--test_dir={tiny_data}/test")
    assert other.returncode == 0, other.stderr[-3000:]
    folders = sorted(name for name in os.listdir(os.path.join(model_dir, "eval"))
                     if name.startswith("test"))
    assert len(folders) == 2 and folders[1].startswith("test-")
    assert eval_report(model_dir, "test")["test_dir"] == test


@pytest.mark.slow
def test_a_run_whose_features_stay_apart_warns_once(tiny_data, tmp_path):
    # gamma 0 keeps lambda at 0: the domain head learns, the features never align.
    result = run_script("train.py", f"--train_dir={tiny_data}/train",
                        f"--model_dir={tmp_path}/apart", "--num_epochs=4",
                        "--batch_size=8", "--gamma=0", "--lr=0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and "not being aligned" in warnings[0], warnings
    assert warnings[0].startswith("warning: the domain classifier told")  # no log prefix
    assert "1 warning" in result.stdout


@pytest.mark.slow
def test_a_target_the_domain_classifier_cannot_tell_apart_gives_no_warning(
        tiny_data, tmp_path):
    data = str(tmp_path / "same")
    shutil.copytree(os.path.join(tiny_data, "train", "source"),
                    os.path.join(data, "source"))
    shutil.copytree(os.path.join(tiny_data, "train", "source"),
                    os.path.join(data, "target", "copies"))
    result = run_script("train.py", f"--train_dir={data}", f"--model_dir={tmp_path}/run",
                        "--num_epochs=4", "--batch_size=8", "--gamma=0", "--lr=0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr.lower()
    history = json.load(open(tmp_path / "run" / "history.json"))
    assert {row["monitor_domain_accuracy"] for row in history} == {0.5}


def rows(domain_accuracies, top_shares, entropy=-0.1):
    return [{"epoch": epoch + 1, "monitor_domain_accuracy": accuracy,
             "monitor_top_class_share": share, "monitor_target_entropy": entropy}
            for epoch, (accuracy, share) in enumerate(zip(domain_accuracies, top_shares))]


def test_health_warnings_follow_their_stated_rules():
    def warned(history, mode="dann"):
        return monitor.health_warnings(history, 4, mode, num_classes=3)

    healthy = rows([0.62, 0.7, 0.66, 0.64], [0.2, 0.15, 0.12, 0.11])
    assert warned(healthy) == {}
    # The case that motivated the rule: about 0.9 from the second epoch on.
    apart = rows([0.7, 0.9, 0.91, 0.9], [0.2] * 4)
    assert set(warned(apart)) == {"domain"}
    assert warned(apart[:2]) == {}  # not yet most epochs
    assert warned(apart, "source_only") == {} and warned(apart, "mcc") == {}  # probes
    assert set(warned(apart, "cdan")) == {"domain"}
    collapsed = rows([0.6] * 4, [0.3, 0.5, 0.95, 0.97])
    assert set(warned(collapsed)) == {"collapse"}
    assert "epoch 3, 95%" in warned(collapsed)["collapse"]
    early = rows([0.6] * 4, [0.95, 0.3, 0.3, 0.3])
    assert warned(early) == {}
    # Nearly uniform predictions (entropy 1.0906 of ln 3 = 1.0986) are not a collapse,
    # whichever class their small leads favour.
    unsure = rows([0.6] * 4, [0.3, 0.5, 0.95, 0.97], entropy=-1.0906)
    assert warned(unsure) == {}


def test_monitor_signals_need_no_target_labels():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(3), size=(2, 40))
    source = (probabilities[0], np.r_[-np.ones(30), np.ones(10)])  # 30 of 40 right
    target = (probabilities[1], np.r_[np.ones(20), -np.ones(20)])  # 20 of 40 right
    logs = monitor.signals(source, target)
    assert logs["monitor_domain_accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    assert not [key for key in logs if key.startswith("val_")]
    labels = {"source": np.argmax(probabilities[0], axis=1)}
    logs = monitor.signals(source, target, labels)
    assert logs["val_source_accuracy"] == 1.0 and "val_target_accuracy" not in logs
    assert logs["val_domain_accuracy"] == pytest.approx(50 / 80)
    shuffled = rng.permutation(40)
    again = monitor.signals(source, (target[0][shuffled], target[1][shuffled]))
    assert again["monitor_snd"] == pytest.approx(logs["monitor_snd"])
    assert again["monitor_target_entropy"] == pytest.approx(logs["monitor_target_entropy"])

"""Label-free scores: their maths, and that they never read a target label."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import label_free
from conftest import REPO, run_script


def test_target_entropy_is_minus_the_mean_entropy():
    uniform = np.full((5, 4), 0.25)
    one_hot = np.eye(4)[[0, 1, 2, 3, 0]]
    assert label_free.target_entropy(uniform) == pytest.approx(-np.log(4))
    assert label_free.target_entropy(one_hot) == 0.0
    assert label_free.target_entropy(np.vstack([uniform, one_hot])) == pytest.approx(
        -np.log(4) / 2)


def naive_snd(probabilities, temperature):
    unit = probabilities / np.linalg.norm(probabilities, axis=1, keepdims=True)
    entropies = []
    for i in range(len(unit)):
        others = np.delete(unit @ unit[i], i) / temperature
        weights = np.exp(others - others.max())
        weights /= weights.sum()
        entropies.append(-np.sum(weights * np.log(weights)))
    return np.mean(entropies)


def test_snd_matches_its_definition_in_any_chunking():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(5) * 0.3, size=37)
    expected = naive_snd(probabilities, 0.05)
    for chunk in (1, 10, 1024):
        assert label_free.soft_neighbourhood_density(probabilities, 0.05, chunk) == \
            pytest.approx(expected, rel=1e-10)


def test_snd_is_higher_for_denser_neighbourhoods():
    two_clusters = np.eye(2)[[0] * 10 + [1] * 10] * 0.98 + 0.01
    spread = np.random.default_rng(1).dirichlet(np.ones(2), size=20)
    identical = np.full((20, 2), 0.5)
    # All alike: each image's neighbours are the 19 others, uniformly.
    assert label_free.soft_neighbourhood_density(identical) == pytest.approx(np.log(19))
    # Two tight clusters: about the 9 others of its cluster.
    assert label_free.soft_neighbourhood_density(two_clusters) == pytest.approx(
        np.log(9), abs=1e-3)
    assert label_free.soft_neighbourhood_density(spread) < np.log(19)


def test_dev_is_the_mean_source_loss_when_the_domains_cannot_be_told_apart():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(200, 6))
    losses = rng.exponential(size=200)
    weights = label_free.density_ratios(features, features.copy())
    assert weights == pytest.approx(np.ones(200), abs=0.05)
    score = label_free.deep_embedded_validation(weights, losses)
    assert score == pytest.approx(-losses.mean(), rel=1e-6)
    assert label_free.importance_weighted_loss(weights, losses) == pytest.approx(
        -losses.mean(), rel=0.05)


def test_iwcv_is_the_weighted_mean_loss_and_dev_corrects_it_by_the_weights_mean():
    weights, losses = np.array([0.5, 1.0, 2.5]), np.array([2.0, 1.0, 0.4])
    assert label_free.importance_weighted_loss(weights, losses) == pytest.approx(
        -(1.0 + 1.0 + 1.0) / 3)
    # By hand: weighted (1, 1, 1) has no covariance with the weights, so eta = 0.
    assert label_free.deep_embedded_validation(weights, losses) == pytest.approx(-1.0)


def test_dev_weights_the_source_images_that_look_like_the_target():
    rng = np.random.default_rng(3)
    source = rng.normal(size=(400, 2))
    target = rng.normal(loc=(1.5, 0.0), size=(400, 2))
    near_target = source[:, 0] > 0.75
    cheap_there = np.where(near_target, 0.1, 2.0)  # low loss where the target lies
    dear_there = np.where(near_target, 2.0, 0.1)
    weights = label_free.density_ratios(source, target)
    for score in (label_free.deep_embedded_validation,
                  label_free.importance_weighted_loss):
        assert score(weights, cheap_there) > score(weights, dear_there)


def run(script, *args):
    result = run_script(script, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_scores_never_read_target_labels(tiny_data, tmp_path):
    model_dir = str(tmp_path / "run")
    run("train.py", f"--train_dir={tiny_data}/train", f"--model_dir={model_dir}",
        "--num_epochs=1", "--batch_size=8")
    permuted = str(tmp_path / "permuted")
    shutil.copytree(f"{tiny_data}/test", permuted)
    target = os.path.join(permuted, "target")
    os.rename(os.path.join(target, "class_0"), os.path.join(target, "moving"))
    os.rename(os.path.join(target, "class_1"), os.path.join(target, "class_0"))
    os.rename(os.path.join(target, "moving"), os.path.join(target, "class_1"))
    scores = []
    for split in (f"{tiny_data}/test", permuted):
        printed = run("eval.py", f"--model_dir={model_dir}", f"--test_dir={split}",
                      "--reverse_validation").stdout
        report = json.load(open(os.path.join(model_dir, "eval", os.path.basename(split),
                                             "eval_report.json")))
        scores.append(report["label_free_scores"])
        assert "reverse_validation" in printed
    assert set(scores[0]) == {"source_accuracy", "target_entropy", "snd", "dev",
                              "iwcv", "reverse_validation"}
    assert scores[0] == scores[1]


@pytest.mark.slow
def test_reverse_validation_without_the_runs_flags_is_one_line(tiny_data, tmp_path):
    model_dir = str(tmp_path / "run")
    run("train.py", f"--train_dir={tiny_data}/train", f"--model_dir={model_dir}",
        "--num_epochs=1", "--batch_size=16")
    os.remove(os.path.join(model_dir, "flags.txt"))
    result = run_script("eval.py", f"--model_dir={model_dir}",
                        f"--test_dir={tiny_data}/test", "--reverse_validation")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --reverse_validation") and "flags.txt" in last
    assert not os.path.exists(os.path.join(model_dir, "eval"))


@pytest.mark.slow
def test_selection_benchmark_writes_the_documented_shape(tmp_path):
    from conftest import write_split

    data = tmp_path / "data"
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        write_split(data / split, per_class=8, seed=seed)
    prefix = str(tmp_path / "selection")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "selection.py"),
         f"--data_dir={data}", f"--runs_dir={tmp_path / 'runs'}", "--lrs=0.01,0.03",
         "--gammas=10", "--epochs=1", f"--output_prefix={prefix}"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.load(open(prefix + ".json"))
    assert [row["flags"] for row in table["configs"]] == [
        {"lr": 0.01, "gamma": 10.0, "num_epochs": 1},
        {"lr": 0.03, "gamma": 10.0, "num_epochs": 1}]
    accuracies = [row["target_test_accuracy"] for row in table["configs"]]
    assert table["oracle_target_accuracy"] == max(accuracies)
    assert set(table["validators"]) == {"source_accuracy", "target_entropy", "snd",
                                        "dev", "iwcv", "reverse_validation"}
    for name, row in table["validators"].items():
        scores = [config["label_free_scores"][name] for config in table["configs"]]
        assert row["picked"] == int(np.argmax(scores))
        assert row["regret"] == pytest.approx(max(accuracies) - accuracies[row["picked"]])
    assert set(table["seed_check"]["same_order"]) == set(table["validators"])
    # The scores were written before any test accuracy was read.
    scores_file = json.load(open(prefix + ".scores.json"))
    assert all("target_test_accuracy" not in row for row in scores_file)
    assert "| reverse_validation |" in open(prefix + ".md").read()


def test_tune_check_judges_each_score_and_the_agreement_of_two():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import tune_check

    rows = [{"trial": trial, "mode": mode, "val_snd": snd, "val_target_entropy": entropy,
             "val_source_accuracy": 0.9, "target_test_accuracy": accuracy}
            for trial, mode, snd, entropy, accuracy in (
                (0, "source_only", 3.0, -0.5, 0.6), (1, "dann", 5.0, -0.9, 0.7),
                (2, "dann", 4.0, -0.2, 0.9), (3, "dann", 1.0, -0.1, 0.8))]
    judged, oracle = tune_check.judge(rows)
    assert oracle == 0.9
    picks = {name: (row["picked_trial"], row["source_only_rank"])
             for name, row in judged.items()}
    # snd and entropy each pick a trial the other ranks last; their rank sum picks the
    # trial both rank second, and ranks source-only (3rd by each) last.
    assert picks == {"snd": (1, 3), "target_entropy": (3, 3), "source_accuracy": (0, 1),
                     "snd+target_entropy": (2, 4)}
    assert judged["snd"]["regret"] == pytest.approx(0.2)
    assert judged["snd+target_entropy"]["regret"] == 0.0

"""The losses of methods.py against small hand computations, and each method's
place in the model's step."""

import csv
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import methods
import models
import run_folder
from conftest import run_script, saved_weights

ADAPTING = ("cdan", "cdan_e", "mcc", "coral")


def test_coral_of_one_dimension_is_the_squared_variance_gap_over_four():
    source = tf.constant([[0.0], [2.0]])  # variance (unbiased) 2
    target = tf.constant([[1.0], [1.0]])  # variance 0
    assert float(methods.coral(source, target)) == pytest.approx((2.0 - 0.0) ** 2 / 4)


def test_coral_of_two_dimensions_by_hand():
    source = tf.constant([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    target = tf.constant([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    # Covariances (n - 1 = 3): source diag(2/3, 8/3); target all 4/3.
    difference = np.array([[2 / 3 - 4 / 3, -4 / 3], [-4 / 3, 8 / 3 - 4 / 3]])
    expected = float(np.sum(difference ** 2)) / (4 * 2 ** 2)
    assert float(methods.coral(source, target)) == pytest.approx(expected, rel=1e-6)
    assert float(methods.coral(source, source)) == pytest.approx(0.0, abs=1e-7)


def test_class_confusion_of_uniform_predictions_is_all_off_diagonal():
    # Every row of the normalised confusion matrix is 1/C: off-diagonal (C - 1)/C per
    # class, averaged over the C classes.
    for num_classes in (2, 5):
        logits = tf.zeros((7, num_classes))
        assert float(methods.minimum_class_confusion(logits)) == pytest.approx(
            (num_classes - 1) / num_classes, rel=1e-6)


def test_class_confusion_by_hand_for_two_images_and_two_classes():
    temperature = 2.5
    # Probabilities (3/4, 1/4) and (1/2, 1/2) at the temperature.
    logits = np.array([[2.5 * math.log(3.0), 0.0], [0.0, 0.0]])
    p = np.array([[0.75, 0.25], [0.5, 0.5]])
    entropies = -(p * np.log(p)).sum(axis=1)
    weights = 1 + np.exp(-entropies)
    weights = 2 * weights / weights.sum()
    confusion = np.zeros((2, 2))
    for image in range(2):
        for j in range(2):
            for k in range(2):
                confusion[j, k] += weights[image] * p[image, j] * p[image, k]
    normalised = confusion / confusion.sum(axis=1, keepdims=True)
    expected = (normalised[0, 1] + normalised[1, 0]) / 2
    got = methods.minimum_class_confusion(tf.constant(logits, tf.float32), temperature)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_confident_distinct_predictions_have_almost_no_class_confusion():
    logits = tf.constant(np.eye(4) * 60.0, tf.float32)
    assert float(methods.minimum_class_confusion(logits)) < 1e-6


def test_the_exact_multilinear_map_is_the_flattened_outer_product():
    layer = methods.MultilinearMap(2, 2)
    assert not layer.randomised and layer.output_size == 4
    mapped = layer(tf.constant([[1.0, 2.0]]), tf.constant([[0.25, 0.75]]))
    np.testing.assert_allclose(mapped.numpy(), [[0.25, 0.5, 0.75, 1.5]])


def test_the_map_is_randomised_above_the_stated_size():
    assert methods.domain_input_size("cdan", 409, 10) == 4090
    assert methods.domain_input_size("cdan", 768, 10) == methods.RANDOMISED_SIZE
    assert methods.domain_input_size("dann", 768, 10) == 768
    keras.utils.set_random_seed(0)
    layer = methods.MultilinearMap(768, 10)
    assert layer.randomised
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 768)).astype(np.float32)
    probabilities = rng.dirichlet(np.ones(10), 3).astype(np.float32)
    expected = ((features @ layer.feature_projection.numpy())
                * (probabilities @ layer.class_projection.numpy()) / math.sqrt(1024))
    np.testing.assert_allclose(layer(features, probabilities).numpy(), expected,
                               rtol=1e-4, atol=1e-5)


def test_entropy_weights_count_confident_images_more_with_a_mean_of_one():
    probabilities = tf.constant([[1.0, 0.0], [0.5, 0.5]])
    weights = methods.certainty_weights(probabilities).numpy()
    raw = np.array([2.0, 1.0 + 0.5])  # 1 + exp(-0), 1 + exp(-ln 2)
    np.testing.assert_allclose(weights, raw / raw.mean(), rtol=1e-6)


def test_the_entropy_weighted_domain_loss_by_hand():
    labels = tf.constant([0.0, 0.0, 1.0, 1.0])
    logits = tf.constant([-1.0, 2.0, 0.5, 0.0])
    probabilities = tf.constant([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    bce = [math.log1p(math.exp(x)) if y == 0 else math.log1p(math.exp(-x))
           for x, y in zip((-1.0, 2.0, 0.5, 0.0), (0, 0, 1, 1))]
    source_weights = np.array([2.0, 1.5]) / 1.75
    expected = (np.mean(source_weights * bce[:2]) + np.mean(bce[2:])) / 2
    got = methods.entropy_weighted_domain_loss(labels, logits, probabilities)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # Equally certain images: the plain mean of the domain losses.
    even = tf.fill((4, 2), 0.5)
    assert float(methods.entropy_weighted_domain_loss(labels, logits, even)) == \
        pytest.approx(np.mean(bce), rel=1e-5)


def batch(rng, n=8, size=28):
    return {"source_images": tf.constant(rng.integers(0, 255, (n, size, size, 3)),
                                         tf.uint8),
            "target_images": tf.constant(rng.integers(0, 255, (n, size, size, 3)),
                                         tf.uint8),
            "labels": tf.constant(rng.integers(0, 10, n))}


@pytest.mark.parametrize("mode", ADAPTING)
def test_each_method_adapts_with_the_scheduled_lambda(mode):
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, mode, 1000)
    model.optimizer.iterations.assign(500)
    assert float(model.adaptation_factor()) == pytest.approx(
        2 / (1 + math.exp(-5.0)) - 1, rel=1e-6)


@pytest.mark.parametrize("mode, domain_moves_features, extra_loss", [
    ("cdan", True, False), ("cdan_e", True, False),
    ("mcc", False, True), ("coral", False, True)])
def test_what_reaches_the_features_in_each_method(mode, domain_moves_features,
                                                  extra_loss):
    keras.utils.set_random_seed(0)
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, mode, 10)
    model.grl.lambda_.assign(1.0)
    with tf.GradientTape(persistent=True) as tape:
        losses = model._forward(batch(np.random.default_rng(1)), training=True)[0]
    assert ("adaptation_loss" in losses) == extra_loss
    gradients = tape.gradient(losses["domain_loss"], model.features.trainable_weights)
    moved = sum(float(tf.reduce_sum(tf.abs(g))) for g in gradients if g is not None)
    assert (moved > 0) == domain_moves_features
    if extra_loss:
        gradients = tape.gradient(losses["adaptation_loss"],
                                  model.features.trainable_weights)
        assert sum(float(tf.reduce_sum(tf.abs(g))) for g in gradients) > 0
        total = model.total_loss(losses)
        assert float(total) == pytest.approx(float(
            losses["label_loss"] + losses["domain_loss"] + losses["adaptation_loss"]))


@pytest.mark.parametrize("mode", ADAPTING)
def test_each_method_saves_and_reloads_with_its_predictions(mode, tmp_path):
    keras.utils.set_random_seed(0)
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, mode, 10)
    model.train_step(batch(np.random.default_rng(2)))
    images = np.random.default_rng(3).integers(0, 255, (4, 28, 28, 3)).astype(np.uint8)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.mode == mode
    for key in ("class_logits", "domain_logits"):
        np.testing.assert_allclose(loaded(images)[key].numpy(), model(images)[key].numpy(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ADAPTING)
def test_each_method_trains_resumes_evaluates_predicts_and_exports(mode, tiny_data,
                                                                   tmp_path):
    common = [f"--train_dir={tiny_data}/train", f"--val_dir={tiny_data}/test",
              f"--mode={mode}", "--num_epochs=2", "--batch_size=8", "--log_rate=1"]
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    for model_dir in (full, resumed):
        result = run_script("train.py", *common, f"--model_dir={model_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert f"Trained {mode} for 2 epochs" in result.stdout
    # As if the run had stopped after its first epoch.
    os.remove(run_folder.latest_checkpoint(resumed))
    os.remove(os.path.join(resumed, "model.keras"))
    result = run_script("train.py", *common, f"--model_dir={resumed}", "--restore_model")
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(saved_weights(os.path.join(full, "model.keras")),
                    saved_weights(os.path.join(resumed, "model.keras"))):
        np.testing.assert_array_equal(a, b)
    result = run_script("eval.py", f"--model_dir={full}", f"--test_dir={tiny_data}/test",
                        "--label_free")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(full, "eval", "test", "eval_report.json")) as handle:
        assert set(json.load(handle)["label_free_scores"]) >= {"snd", "dev", "iwcv"}
    output = str(tmp_path / "labels.csv")
    for command in (["predict.py", f"--input={tiny_data}/test/target",
                     f"--output={output}"], ["export.py"]):
        result = run_script(*command, f"--model_dir={full}")
        assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(output, newline="")))
    images = np.stack([np.asarray(Image.open(row["path"]).convert("RGB"))
                       for row in rows])
    served = tf.saved_model.load(os.path.join(full, "export", "saved_model")).signatures[
        "serving_default"](images=tf.constant(images))
    names = sorted(os.listdir(os.path.join(tiny_data, "train", "source")))
    np.testing.assert_allclose(
        served["probabilities"].numpy(),
        [[float(row[f"probability_{name}"]) for name in names] for row in rows],
        atol=1e-5)
    np.testing.assert_allclose(served["target_domain_probability"].numpy(),
                               [float(row["target_domain_probability"]) for row in rows],
                               atol=1e-5)

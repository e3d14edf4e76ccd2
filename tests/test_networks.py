"""The networks behind --model: their layers, learning rates and end-to-end runs."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
import networks
import training
from test_cli import run_script
from test_train import _config, _weights, run


def _layers(model, kind):
    return [layer for layer in model.layers if isinstance(layer, kind)]


def test_svhn_network_is_the_papers():
    parts = networks.build("svhn", (28, 28, 3), 10, [0.5] * 3)
    convolutions = _layers(parts.features, keras.layers.Conv2D)
    assert [(c.filters, c.kernel_size) for c in convolutions] == [
        (64, (5, 5)), (64, (5, 5)), (128, (5, 5))]
    pools = _layers(parts.features, keras.layers.MaxPooling2D)
    assert [(p.pool_size, p.strides) for p in pools] == [((3, 3), (2, 2))] * 2
    assert parts.features.output_shape[-1] == 6 * 6 * 128
    dense = [d.units for d in _layers(parts.label_head, keras.layers.Dense)]
    assert dense == [3072, 2048, 10]
    assert [d.units for d in _layers(parts.domain_head, keras.layers.Dense)] == [
        1024, 1024, 1]


def test_keras_dann_is_the_mnist_layout_with_dropout_and_random_normal_weights():
    mnist = networks.build("mnist", (28, 28, 3), 10, [0.5] * 3)
    variant = networks.build("keras_dann", (28, 28, 3), 10, [0.5] * 3)
    assert [w.shape for w in variant.features.weights] == [
        w.shape for w in mnist.features.weights]
    for head in (variant.label_head, variant.domain_head):
        dense, dropout = _layers(head, keras.layers.Dense), _layers(
            head, keras.layers.Dropout)
        assert [d.rate for d in dropout] == [0.5] * (len(dense) - 1)
        assert all(isinstance(d.kernel_initializer, keras.initializers.RandomNormal)
                   for d in dense)
    assert not _layers(mnist.label_head, keras.layers.Dropout)


def test_resnet50_recipe_has_a_bottleneck_and_the_1024_domain_head():
    parts = networks.build("resnet50", (32, 32, 3), 5, [0.0] * 3)
    assert parts.backbone.name == "resnet50"
    assert parts.features.output_shape[-1] == 256
    assert _layers(parts.features, keras.layers.BatchNormalization)
    assert [d.units for d in _layers(parts.label_head, keras.layers.Dense)] == [5]
    assert [d.units for d in _layers(parts.domain_head, keras.layers.Dense)] == [
        1024, 1024, 1]


def test_fixed_lambda_replaces_the_schedule_from_the_first_step():
    scheduled = models.build_dann((28, 28, 3), 10, [0.5] * 3, "dann", 100)
    fixed = models.build_dann((28, 28, 3), 10, [0.5] * 3, "dann", 100, fixed_lambda=1.0)
    assert float(scheduled.adaptation_factor()) == 0.0
    assert float(fixed.adaptation_factor()) == 1.0
    source_only = models.build_dann((28, 28, 3), 10, [0.5] * 3, "source_only", 100,
                                    fixed_lambda=1.0)
    assert float(source_only.adaptation_factor()) == 0.0


def test_the_backbone_learns_at_a_tenth_of_the_heads_rate():
    keras.utils.set_random_seed(0)
    model = models.build_dann((32, 32, 3), 3, [0.0] * 3, "dann", 100, lr=0.01,
                              momentum=0.0, network="resnet50")
    rng = np.random.default_rng(0)
    batch = {"source_images": tf.constant(rng.integers(0, 255, (4, 32, 32, 3)), tf.uint8),
             "target_images": tf.constant(rng.integers(0, 255, (4, 32, 32, 3)), tf.uint8),
             "labels": tf.constant([0, 1, 2, 0])}
    backbone_kernel = model.features.get_layer("resnet50").get_layer(
        "conv1_conv").kernel
    head_kernel = model.label_head.layers[-1].kernel
    with tf.GradientTape() as tape:
        loss = model.total_loss(model._forward(batch, training=True)[0])
    gradients = tape.gradient(loss, [backbone_kernel, head_kernel])
    before = [backbone_kernel.numpy(), head_kernel.numpy()]
    model.train_step(batch)
    rate = 0.01  # lr0: the schedule's value at the first step
    for kernel, old, gradient, scale in zip((backbone_kernel, head_kernel), before,
                                            gradients, (0.1, 1.0)):
        np.testing.assert_allclose(kernel.numpy() - old, -rate * scale * gradient.numpy(),
                                   rtol=1e-3, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [
    ("svhn", []), ("keras_dann", ["--fixed_lambda=1"]),
    ("resnet50", ["--img_width=32", "--img_height=32", "--weights=none"])])
def test_every_model_trains_saves_reloads_and_evaluates(tiny_data, tmp_path, model,
                                                        extra):
    model_dir = str(tmp_path / model)
    trained = run_script("train.py", f"--train_dir={tiny_data}/train",
                         f"--model_dir={model_dir}", f"--model={model}", "--num_epochs=1",
                         "--batch_size=8", *extra)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = run_script("eval.py", f"--model_dir={model_dir}",
                           f"--test_dir={tiny_data}/test")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    with open(os.path.join(model_dir, "eval", "test", "eval_report.json")) as handle:
        report = json.load(handle)
    assert 0.0 <= report["target_accuracy"] <= 1.0 and report["num_target"] == 24
    saved = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    assert saved.network == model


@pytest.mark.slow
def test_dropout_augmentation_and_disk_cache_resume_exactly(tiny_data, tmp_path):
    settings = dict(model="keras_dann", augment=True, cache="disk")
    run(_config(tiny_data, tmp_path / "full", **settings))
    interrupted = tmp_path / "resumed"
    run(_config(tiny_data, interrupted, **settings))
    steps = 48 // 8
    os.remove(os.path.join(interrupted, "checkpoints", f"ckpt-{2 * steps:08d}.keras"))
    os.remove(interrupted / "model.keras")
    run(_config(tiny_data, interrupted, restore_model=True, **settings))
    for a, b in zip(_weights(tmp_path / "full"), _weights(interrupted)):
        np.testing.assert_array_equal(a, b)
    assert os.listdir(interrupted / "decoded_cache")
    assert training.image_shape(_config(tiny_data, tmp_path, model="resnet50")) == (
        224, 224, 3)

"""The math of DANN: gradient reversal, schedules, the channel mean, saving."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import data_utils
import methods
import models
import networks


@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_gradient_reversal_is_identity_forward_and_negated_backward(lam):
    layer = models.GradientReversal(lam)
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 5)), tf.float32)
    upstream = tf.constant(np.random.default_rng(1).normal(size=(4, 5)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    grad = tape.gradient(y, x, output_gradients=upstream)
    np.testing.assert_allclose(grad.numpy(), -lam * upstream.numpy(), rtol=1e-6)


def test_lambda_change_takes_effect_in_a_compiled_function_without_retracing():
    layer = models.GradientReversal(1.0)
    traces = []

    @tf.function
    def gradient(x):
        traces.append(1)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x))
        return tape.gradient(y, x)

    x = tf.ones((2, 3))
    np.testing.assert_allclose(gradient(x).numpy(), -1.0)
    layer.lambda_.assign(0.25)
    np.testing.assert_allclose(gradient(x).numpy(), -0.25)
    layer.lambda_.assign(0.0)
    np.testing.assert_allclose(gradient(x).numpy(), 0.0)
    assert len(traces) == 1


def test_gradient_reversal_config_round_trip():
    layer = models.GradientReversal(0.7, name="grl")
    clone = models.GradientReversal.from_config(layer.get_config())
    assert clone.initial_lambda == pytest.approx(0.7)
    assert float(clone.lambda_.numpy()) == pytest.approx(0.7)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),
    (500, 2.0 / (1.0 + math.exp(-5.0)) - 1.0),
    (1000, 2.0 / (1.0 + math.exp(-10.0)) - 1.0),
    (3000, 2.0 / (1.0 + math.exp(-10.0)) - 1.0),
])
def test_lambda_schedule_follows_the_optimizer_step(step, expected):
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, "dann", 1000, gamma=10.0)
    model.optimizer.iterations.assign(step)
    assert float(model.adaptation_factor()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("step, expected", [
    (0, 0.01), (500, 0.01 / 6.0 ** 0.75), (1000, 0.01 / 11.0 ** 0.75),
    (5000, 0.01 / 11.0 ** 0.75),
])
def test_learning_rate_schedule_over_the_whole_run(step, expected):
    schedule = models.DANNLearningRate(0.01, total_steps=1000, alpha=10.0, beta=0.75)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def test_channel_mean_is_exact_over_many_batches():
    rng = np.random.default_rng(0)
    batches = [np.stack([np.full((64, 28, 28), v, np.uint8) for v in (10, 128, 250)],
                        axis=-1) for _ in range(3)]
    batches.append(rng.integers(0, 256, (10, 28, 28, 3), dtype=np.uint8))
    expected = np.concatenate(batches).reshape(-1, 3).astype(np.float64).mean(0) / 255
    np.testing.assert_allclose(models.channel_mean(batches), expected, rtol=1e-12)
    as_tensors = [tf.constant(batch) for batch in batches]
    assert models.channel_mean(as_tensors) == models.channel_mean(batches)


def test_channel_mean_does_not_saturate_where_float32_would():
    # 2**25 pixels of value 255: a float32 running sum stops growing at 2**24 * 255.
    batch = np.full((2 ** 25 // 1024, 32, 32, 1), 255, np.uint8)
    assert models.channel_mean([batch, batch]) == [1.0]
    assert np.float32(2 ** 24) + np.float32(1) == np.float32(2 ** 24)  # why float64


def _batch(rng, n=4):
    return {
        "source_images": tf.constant(rng.integers(0, 256, (n, 28, 28, 3)), tf.uint8),
        "target_images": tf.constant(rng.integers(0, 256, (n, 28, 28, 3)), tf.uint8),
        "labels": tf.constant(rng.integers(0, 10, n), tf.int32),
    }


def test_keras_file_round_trip_gives_identical_predictions(tmp_path):
    rng = np.random.default_rng(0)
    model = models.build_dann((28, 28, 3), 10, [0.2, 0.3, 0.4], "dann", 100,
                              class_names=[f"c{k}" for k in range(10)])
    model.fit(tf.data.Dataset.from_tensors(_batch(rng)).repeat(), steps_per_epoch=3,
              epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    images = rng.integers(0, 256, (16, 28, 28, 3)).astype(np.uint8)
    before, after = model.predict(images, verbose=0), loaded.predict(images, verbose=0)
    for key in ("class_logits", "domain_logits"):
        np.testing.assert_array_equal(before[key], after[key])
    assert isinstance(loaded, models.DANN)
    assert loaded.mean == pytest.approx([0.2, 0.3, 0.4])
    assert loaded.class_names == [f"c{k}" for k in range(10)]
    assert int(loaded.optimizer.iterations.numpy()) == 3
    assert loaded.total_steps == 100
    assert loaded.optimizer._learning_rate.total_steps == 100
    for saved, restored in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())


def test_normalisation_inside_the_model_subtracts_the_channel_mean():
    model = models.DANN((28, 28, 3), 10, [0.1, 0.5, 0.9])
    images = np.full((1, 28, 28, 3), 255, np.float32)
    inference_input, rescale, normalise = model.features.layers[:3]
    np.testing.assert_array_equal(inference_input(images), images)
    np.testing.assert_allclose(normalise(rescale(images))[0, 0, 0].numpy(),
                               [0.9, 0.5, 0.1], rtol=1e-6)


def test_the_model_resizes_and_centre_crops_only_outside_training():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 34, 3)).astype(np.uint8)
    resized = np.stack([data_utils.resized(tf.constant(image), (28, 28)).numpy()
                        for image in images])
    layer = networks.InferenceInput((28, 28), centre_crop=True)
    expected = data_utils.centre_crop(resized).numpy()
    np.testing.assert_array_equal(layer(images).numpy(), expected)
    np.testing.assert_array_equal(layer(resized).numpy(), expected)
    np.testing.assert_array_equal(layer(resized, training=True), resized)
    floats = layer(images.astype(np.float32)).numpy()
    np.testing.assert_array_equal(floats, expected.astype(np.float32))
    model = models.DANN((28, 28, 3), 4, [0.5] * 3, augment=True)
    np.testing.assert_allclose(model(images)["class_logits"],
                               model(resized)["class_logits"], atol=1e-6)
    plain = models.DANN((28, 28, 3), 4, [0.5] * 3)
    assert not np.allclose(plain(resized)["class_logits"],
                           plain(expected)["class_logits"])


@pytest.mark.parametrize("mode", ["source_only", "target_only"])
def test_no_adversarial_gradient_outside_dann_mode(mode):
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, mode, 10)
    model.optimizer.iterations.assign(5)
    assert float(model.adaptation_factor()) == 0.0


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_each_training_step_sets_lambda_from_its_own_step(steps_per_execution):
    rng = np.random.default_rng(0)
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, "dann", 20,
                              steps_per_execution=steps_per_execution)
    seen = []
    original = model.grl.call

    def recording_call(inputs):
        seen.append(tf.convert_to_tensor(model.grl.lambda_))
        return original(inputs)

    model.grl.call = recording_call
    model.run_eagerly = True
    model.fit(tf.data.Dataset.from_tensors(_batch(rng)).repeat(), steps_per_epoch=8,
              epochs=1, verbose=0, shuffle=False)
    expected = [2.0 / (1.0 + math.exp(-10.0 * step / 20)) - 1.0 for step in range(8)]
    np.testing.assert_allclose([float(v) for v in seen], expected, rtol=1e-5)


def test_domain_loss_reaches_the_features_only_in_dann_mode():
    rng = np.random.default_rng(3)
    batch = _batch(rng)
    for mode, lam, expect_change in (("dann", 1.0, True), ("source_only", 0.0, False)):
        model = models.build_dann((28, 28, 3), 10, [0.5] * 3, mode, 10)
        model.grl.lambda_.assign(lam)
        with tf.GradientTape() as tape:
            domain_loss = model._forward(batch, training=True)[0]["domain_loss"]
        grads = tape.gradient(domain_loss, model.features.trainable_weights)
        norm = sum(float(tf.reduce_sum(tf.abs(g))) for g in grads)
        assert (norm > 0) == expect_change, mode


def test_a_dann_step_raises_the_domain_loss_via_the_features_and_lowers_it_in_the_head():
    rng = np.random.default_rng(5)
    batch = _batch(rng, n=16)
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, "dann", 100, momentum=0.0)
    # A zero last label layer passes no label gradient back to the features, so only
    # the domain loss moves them; lambda is ~1 near the end of the run.
    for weight in model.label_head.layers[-1].weights:
        weight.assign(tf.zeros_like(weight))
    model.optimizer.iterations.assign(99)

    def domain_loss():
        return float(model._forward(batch, training=False)[0]["domain_loss"])

    def values(network):
        return [w.numpy() for w in network.weights]

    features_before, head_before, loss_before = (values(model.features),
                                                 values(model.domain_head), domain_loss())
    model.train_step(batch)
    features_after, head_after = values(model.features), values(model.domain_head)
    model.domain_head.set_weights(head_before)
    moved_features = domain_loss()
    model.features.set_weights(features_before)
    model.domain_head.set_weights(head_after)
    moved_head = domain_loss()
    assert moved_features > loss_before > moved_head
    assert not np.array_equal(features_after[0], features_before[0])


def test_flag_choices_are_the_models_modes_and_precisions():
    import common_flags

    assert common_flags.RUN["mode"].choices == models.MODES
    assert common_flags.ADAPTING_MODES == methods.ADAPTING
    assert common_flags.RUN["precision"].choices == models.PRECISIONS


def test_train_config_has_a_typed_field_per_train_flag_with_its_default():
    import dataclasses

    import common_flags

    fields = dataclasses.fields(common_flags.TrainConfig)
    assert [field.name for field in fields] == list(common_flags.TRAIN)
    for field in fields:
        default = common_flags.TRAIN[field.name].default
        assert field.default == default
        assert field.type == (str | None if default is None else type(default)), \
            field.name
    with pytest.raises(common_flags.UserError, match="--batch_size must be a positive"):
        common_flags.TrainConfig(batch_size=0)
    with pytest.raises(common_flags.UserError, match="--mode must be one of"):
        common_flags.TrainConfig(mode="adversarial")


def test_mixed_precision_keeps_normalisation_lambda_and_logits_in_float32():
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, "dann", 100,
                              precision="mixed_bfloat16")
    inference_input, rescale, normalise, first_conv = model.features.layers[:4]
    assert inference_input.compute_dtype == "float32"
    assert rescale.compute_dtype == normalise.compute_dtype == "float32"
    assert first_conv.compute_dtype == "bfloat16" and first_conv.variable_dtype == "float32"
    assert model.grl.compute_dtype == "float32"
    for head in (model.label_head, model.domain_head):
        assert head.layers[0].compute_dtype == "bfloat16"
        assert head.layers[-1].compute_dtype == "float32"
    outputs = model(_batch(np.random.default_rng(0))["source_images"])
    assert {tensor.dtype for tensor in outputs.values()} == {tf.float32}


def test_a_float16_step_whose_gradients_overflow_changes_nothing_but_counts():
    model = models.build_dann((28, 28, 3), 10, [0.5] * 3, "dann", 100,
                              precision="mixed_float16")
    weights = model.trainable_weights
    before = [w.numpy() for w in weights]
    gradients = [tf.fill(w.shape, np.inf) for w in weights]
    model.optimizer.apply(gradients, weights)
    assert int(model.optimizer.iterations.numpy()) == 1
    for old, weight in zip(before, weights):
        np.testing.assert_array_equal(old, weight.numpy())
    model.optimizer.apply([tf.zeros(w.shape) for w in weights], weights)
    assert int(model.optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("precision", models.PRECISIONS)
def test_a_saved_model_predicts_the_same_under_any_global_policy(precision, tmp_path):
    model = models.build_dann((28, 28, 3), 10, [0.4, 0.5, 0.6], "dann", 100,
                              precision=precision)
    model.fit(tf.data.Dataset.from_tensors(_batch(np.random.default_rng(1))).repeat(),
              steps_per_epoch=1, verbose=0, shuffle=False)
    path = str(tmp_path / "model.keras")
    model.save(path)
    images = _batch(np.random.default_rng(2), n=8)["source_images"]
    expected = model(images)["class_logits"].numpy()
    try:
        for policy in ("mixed_float16", "float32"):
            keras.mixed_precision.set_dtype_policy(policy)
            reloaded = keras.saving.load_model(path)
            assert reloaded.precision == precision
            np.testing.assert_array_equal(reloaded(images)["class_logits"].numpy(),
                                          expected)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")

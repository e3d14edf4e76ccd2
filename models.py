"""The DANN network, its gradient-reversal layer, training step and schedules.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation" (ICML 2015)
and "Domain-Adversarial Training of Neural Networks" (JMLR 2016). The same model
trains the methods of methods.py (`cdan`, `cdan_e`, `mcc`, `coral`).
"""

import keras
import numpy as np
import tensorflow as tf

import methods
import networks

MODES = ("dann", "source_only", "target_only", "cdan", "cdan_e", "mcc", "coral")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
SOURCE_DOMAIN, TARGET_DOMAIN = 0, 1


@keras.saving.register_keras_serializable(package="dann")
class GradientReversal(keras.layers.Layer):
    """Identity in the forward pass; multiplies the gradient by -lambda backward.

    lambda lives in a non-trainable variable, read each time the layer runs: the
    training step assigns it before every step, and a compiled function sees the new
    value without a retrace.
    """

    def __init__(self, initial_lambda=1.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_lambda = float(initial_lambda)
        self.lambda_ = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_lambda),
            trainable=False,
            name="lambda",
            # Every replica assigns the same value; the first one's is kept.
            aggregation="only_first_replica",
        )

    def call(self, inputs):
        scale = tf.convert_to_tensor(self.lambda_)

        @tf.custom_gradient
        def reverse(x):
            def grad(upstream):
                return -tf.cast(scale, upstream.dtype) * upstream

            return tf.identity(x), grad

        return reverse(inputs)

    def get_config(self):
        return {**super().get_config(), "initial_lambda": self.initial_lambda}


def training_progress(step, total_steps):
    """p in [0, 1]: the share of the run's `total_steps` done after `step` steps."""
    return tf.minimum(tf.cast(step, tf.float32) / float(total_steps), 1.0)


@keras.saving.register_keras_serializable(package="dann")
class DANNLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The paper's annealing: lr0 / (1 + alpha p)^beta, p = step / total_steps."""

    def __init__(self, initial_lr, total_steps, alpha=10.0, beta=0.75):
        self.initial_lr, self.total_steps = float(initial_lr), int(total_steps)
        self.alpha, self.beta = float(alpha), float(beta)

    def __call__(self, step):
        p = training_progress(step, self.total_steps)
        return self.initial_lr / tf.pow(1.0 + self.alpha * p, self.beta)

    def get_config(self):
        return {"initial_lr": self.initial_lr, "total_steps": self.total_steps,
                "alpha": self.alpha, "beta": self.beta}


class ScheduleLogger(keras.callbacks.Callback):
    """Adds the current gradient-reversal lambda and learning rate to the epoch logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lambda"] = float(self.model.grl.lambda_.numpy())
            logs["lr"] = float(self.model.optimizer.learning_rate)


@keras.saving.register_keras_serializable(package="dann")
class DANN(keras.Model):
    """Shared features, a label head and a domain head behind a gradient reversal.

    Training batches are dicts with `source_images`, `target_images` and `labels`.
    `labels` belong to the source images in `dann` and `source_only` mode and to the
    target images in `target_only` mode; the other domain's labels never enter a
    batch. The domain loss (source = 0, target = 1) always trains the domain head; only
    in `dann` mode does lambda > 0 let it push back into the features, so in the
    other modes the domain head is a probe of how separable the features are.

    `network` names the feature extractor and heads (`networks.NETWORKS`); a
    backbone's weights come from `weights` when the model is built and from the model
    file when it is loaded (so `weights` is not part of the config). `fixed_lambda` > 0
    replaces the lambda schedule; `augment` makes the network centre-crop its input
    outside training (`networks.InferenceInput`).

    Calling the model returns `{"class_logits", "domain_logits"}`.
    """

    def __init__(self, input_shape, num_classes, mean, mode="dann", class_names=None,
                 total_steps=1, gamma=10.0, precision="float32", network="mnist",
                 fixed_lambda=0.0, weights="none", augment=False, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision, self.network, self.augment = precision, network, bool(augment)
        self.image_shape = tuple(int(d) for d in input_shape)
        self.num_classes, self.mode = int(num_classes), mode
        self.mean = [float(m) for m in mean]
        self.total_steps, self.gamma = int(total_steps), float(gamma)
        self.fixed_lambda = float(fixed_lambda)
        self.class_names = list(class_names) if class_names else [
            str(k) for k in range(self.num_classes)]
        parts = networks.build(
            network, self.image_shape, self.num_classes, self.mean, precision, weights,
            centre_crop=self.augment, domain_input=lambda size: methods.domain_input_size(
                mode, size, self.num_classes))
        self.features, self.label_head = parts.features, parts.label_head
        self.conditioning = methods.MultilinearMap(
            self.features.output_shape[-1], self.num_classes, name="multilinear_map",
            dtype="float32") if mode in methods.CONDITIONED else None
        # float32, so lambda scales the reversed gradient in full precision.
        self.grl = GradientReversal(0.0, name="gradient_reversal", dtype="float32")
        self.domain_head = parts.domain_head
        self._slow_weight_ids = {id(weight) for weight in (
            parts.backbone.trainable_weights if parts.backbone else ())}
        self.labelled_domain = TARGET_DOMAIN if mode == "target_only" else SOURCE_DOMAIN
        losses = ("loss", "label_loss", "domain_loss") + (
            ("adaptation_loss",) if mode in methods.LOSS_BASED else ())
        self.trackers = {name: keras.metrics.Mean(name=name) for name in losses}
        self.accuracies = self.accuracy_metrics()
        # Every sub-network was built with its input shape above; marking the model
        # built lets Keras save and restore the optimiser state with it.
        self.built = True

    @staticmethod
    def accuracy_metrics():
        """{name: metric} of the accuracies training and evaluation report."""
        return {
            "label_accuracy": keras.metrics.SparseCategoricalAccuracy("label_accuracy"),
            "source_accuracy": keras.metrics.SparseCategoricalAccuracy("source_accuracy"),
            "target_accuracy": keras.metrics.SparseCategoricalAccuracy("target_accuracy"),
            # Logits: a domain logit above 0 says "target".
            "domain_accuracy": keras.metrics.BinaryAccuracy("domain_accuracy",
                                                            threshold=0.0),
        }

    def call(self, images, training=False):
        if isinstance(images, dict):  # a training batch, as Keras passes one to build
            images = tf.concat([images["source_images"], images["target_images"]], 0)
        features = self.features(images, training=training)
        class_logits = self.label_head(features, training=training)
        domain_input = self.domain_input(features, class_logits)
        return {
            "class_logits": class_logits,
            "domain_logits": self.domain_head(self.grl(domain_input), training=training),
        }

    def domain_input(self, features, class_logits):
        """What the domain classifier judges: the features; for CDAN their
        multilinear map with the class probabilities (constants to the map, as in the
        paper); for MCC and CORAL the features with no gradient back, so that their
        domain classifier only measures, as in source_only mode."""
        if self.mode in methods.CONDITIONED:
            probabilities = tf.stop_gradient(tf.nn.softmax(
                tf.cast(class_logits, tf.float32)))
            return self.conditioning(features, probabilities)
        if self.mode in methods.LOSS_BASED:
            return tf.stop_gradient(features)
        return features

    @property
    def metrics(self):
        return list(self.trackers.values()) + list(self.accuracies.values())

    def _forward(self, batch, training):
        """The step's losses ({"label_loss", "domain_loss"[, "adaptation_loss"]}),
        and the labelled images' class logits, the domain logits and labels."""
        source, target = batch["source_images"], batch["target_images"]
        features = self.features(tf.concat([source, target], axis=0), training=training)
        num_source = tf.shape(source)[0]
        if self.mode in methods.ADAPTING and self.mode != "dann":
            all_logits = self.label_head(features, training=training)
            class_logits = all_logits[:num_source]
        else:  # the labelled half alone: dann and the baselines as they always were
            all_logits = None
            class_logits = self.label_head(
                features[:num_source] if self.labelled_domain == SOURCE_DOMAIN
                else features[num_source:], training=training)
        domain_logits = self.domain_head(
            self.grl(self.domain_input(features, all_logits)), training=training)[:, 0]
        domain_labels = tf.concat(
            [tf.zeros_like(source[:, 0, 0, 0], tf.float32),
             tf.ones_like(target[:, 0, 0, 0], tf.float32)], axis=0)
        losses = {"label_loss": tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(
                batch["labels"], class_logits, from_logits=True))}
        if self.mode == "cdan_e":
            losses["domain_loss"] = methods.entropy_weighted_domain_loss(
                domain_labels, domain_logits, tf.nn.softmax(all_logits))
        else:
            losses["domain_loss"] = tf.reduce_mean(keras.losses.binary_crossentropy(
                domain_labels[:, None], domain_logits[:, None], from_logits=True))
        if self.mode in methods.LOSS_BASED:
            losses["adaptation_loss"] = methods.adaptation_loss(
                self.mode, all_logits[:num_source], all_logits[num_source:])
        return losses, class_logits, domain_logits, domain_labels

    def total_loss(self, losses):
        """The loss a step minimises: label and domain losses, plus lambda times a
        loss-based method's adaptation loss."""
        total = losses["label_loss"] + losses["domain_loss"]
        if "adaptation_loss" in losses:
            total += tf.cast(self.grl.lambda_, tf.float32) * losses["adaptation_loss"]
        return total

    def _update_metrics(self, batch, losses, class_logits, domain_logits,
                        domain_labels):
        self.trackers["loss"].update_state(self.total_loss(losses))
        for name, value in losses.items():
            self.trackers[name].update_state(value)
        self.accuracies["label_accuracy"].update_state(batch["labels"], class_logits)
        self.accuracies["domain_accuracy"].update_state(domain_labels, domain_logits)

    def adaptation_factor(self):
        """lambda for the coming step: for an adapting method (methods.ADAPTING) the
        paper's schedule, or `fixed_lambda` where it is above 0; 0 in the baselines."""
        if self.mode not in methods.ADAPTING:
            return tf.constant(0.0)
        if self.fixed_lambda > 0:
            return tf.constant(self.fixed_lambda)
        p = training_progress(self.optimizer.iterations, self.total_steps)
        return 2.0 / (1.0 + tf.exp(-self.gamma * p)) - 1.0

    def train_step(self, batch):
        # Set inside the compiled step, from the optimiser's own step counter: exact
        # for every step even when Keras runs several steps per call, and continued
        # by a resumed run.
        self.grl.lambda_.assign(self.adaptation_factor())
        with tf.GradientTape() as tape:
            losses, *outputs = self._forward(batch, training=True)
            # Replicas see equal slices of one batch and their gradients are summed:
            # dividing by their number makes the update the one-device update.
            replicas = tf.distribute.get_replica_context().num_replicas_in_sync
            loss = self.optimizer.scale_loss(self.total_loss(losses) / replicas)
        weights = self.trainable_weights
        gradients = tape.gradient(loss, weights)
        # With SGD and momentum, a gradient scaled by s is a learning rate scaled by s.
        gradients = [gradient * networks.BACKBONE_LR_SCALE
                     if id(weight) in self._slow_weight_ids else gradient
                     for gradient, weight in zip(gradients, weights)]
        self.optimizer.apply(gradients, weights)
        self._update_metrics(batch, losses, *outputs)
        return self.training_logs()

    def training_logs(self):
        """{name: value} of the training metrics since they were last reset."""
        results = {name: tracker.result() for name, tracker in self.trackers.items()}
        for name in ("label_accuracy", "domain_accuracy"):
            results[name] = self.accuracies[name].result()
        return results

    def test_step(self, batch):
        """Batches of `images`, `labels`, `domains` (0/1) mixing both domains."""
        outputs = self(batch["images"], training=False)
        labels, logits = batch["labels"], outputs["class_logits"]
        is_target = tf.cast(batch["domains"], tf.float32)
        self.accuracies["source_accuracy"].update_state(labels, logits, 1.0 - is_target)
        self.accuracies["target_accuracy"].update_state(labels, logits, is_target)
        self.accuracies["domain_accuracy"].update_state(is_target,
                                                        outputs["domain_logits"][:, 0])
        return {name: self.accuracies[name].result()
                for name in ("source_accuracy", "target_accuracy", "domain_accuracy")}

    def get_config(self):
        return {**super().get_config(), "input_shape": list(self.image_shape),
                "num_classes": self.num_classes, "mean": self.mean, "mode": self.mode,
                "class_names": self.class_names, "total_steps": self.total_steps,
                "gamma": self.gamma, "precision": self.precision,
                "network": self.network, "fixed_lambda": self.fixed_lambda,
                "augment": self.augment}


@keras.saving.register_keras_serializable(package="dann")
class StepCountingLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras's dynamic loss scaling for float16, where a skipped step still counts.

    A step whose scaled gradients overflow changes no weight, as in Keras, but it
    used a batch: counting it keeps the optimiser's step equal to the batches seen,
    which the schedules, checkpoint names and exact resume rely on.
    """

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.iterations.assign_add(1)


def build_dann(input_shape, num_classes, mean, mode, total_steps, lr=0.01,
               momentum=0.9, lr_alpha=10.0, lr_beta=0.75, gamma=10.0, class_names=None,
               steps_per_execution=1, precision="float32", **network_options):
    """A compiled `DANN` with the paper's SGD and learning-rate annealing.

    Args:
        input_shape: (height, width, channels) of the images.
        mean: per-channel mean of the training pixels, scaled to [0, 1].
        total_steps: optimiser steps of the whole run, the schedules' horizon.
        lr, momentum, lr_alpha, lr_beta, gamma: as the flags of the same names.
        precision: one of PRECISIONS, the Keras dtype policy of the hidden layers;
            `mixed_float16` adds dynamic loss scaling.
        **network_options: `network`, `weights`, `fixed_lambda`, `augment` of `DANN`.
    """
    model = DANN(input_shape, num_classes, mean, mode, class_names=class_names,
                 total_steps=total_steps, gamma=gamma, precision=precision,
                 **network_options)
    schedule = DANNLearningRate(lr, total_steps, lr_alpha, lr_beta)
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=momentum)
    if precision == "mixed_float16":
        optimizer = StepCountingLossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, steps_per_execution=steps_per_execution)
    return model


def dann_from_recipe(recipe, input_shape, num_classes, mean, total_steps,
                     class_names=None):
    """A compiled `DANN` as a run's recipe says: `recipe` holds train.py's flags
    ({name: value}: mode, model, lr, momentum, lr_alpha, lr_beta, gamma, precision,
    weights, fixed_lambda, augment); the other arguments are `build_dann`'s."""
    return build_dann(
        input_shape, num_classes, mean, recipe["mode"], total_steps, recipe["lr"],
        recipe["momentum"], recipe["lr_alpha"], recipe["lr_beta"], recipe["gamma"],
        class_names, precision=recipe["precision"], network=recipe["model"],
        weights=recipe["weights"], fixed_lambda=recipe["fixed_lambda"],
        augment=recipe["augment"])


def input_mean(network, domains):
    """The per-channel mean `network` normalises its input by: for the digit networks
    that of the training images of `domains` (`cache.DomainImages`), one decoding pass;
    for a backbone, which brings its own preprocessing, zeros and no pass."""
    if not networks.uses_channel_mean(network):
        return [0.0] * domains[0].channels
    return channel_mean(images for domain in domains for images, _ in domain.batches())


def channel_mean(batches):
    """Per-channel mean of uint8/float pixel batches (arrays, tensors), scaled to [0, 1].

    Integer pixels are summed exactly in int64, others in float64: a float32 running
    sum over tens of millions of pixels stops growing and gives a wrong mean. Each
    batch is summed by TensorFlow, so the pass costs little beside decoding.
    """
    total, count = None, 0
    for images in batches:
        images = tf.convert_to_tensor(images)
        pixel_axes = list(range(images.shape.rank - 1))
        sums = tf.reduce_sum(
            tf.cast(images, tf.int64 if images.dtype.is_integer else tf.float64),
            axis=pixel_axes).numpy()
        total = sums if total is None else total + sums
        count += int(np.prod(images.shape[:-1]))
    if not count:
        raise ValueError("no images to compute the channel mean from")
    return (total / count / 255.0).tolist()

"""The adaptation methods beside DANN, trained by the same model, step and recipe.

- `cdan`, `cdan_e`: conditional adversarial adaptation (Long et al., NeurIPS 2018,
  "Conditional Adversarial Domain Adaptation"). The domain classifier judges the
  multilinear map of the features f and the class probabilities g (section 3.1),
  computed exactly while f and g have at most EXACT_MAP_LIMIT products, else as the
  randomised map of section 3.2 with RANDOMISED_SIZE outputs. `cdan_e` weights each
  image's domain loss by 1 + exp(-H(g)) (section 3.3, "CDAN+E"), normalised to a mean
  of 1 within each domain, so that confident images count more.
- `mcc`: minimum class confusion (Jin et al., ECCV 2020, section 3): a loss on the
  class-confusion matrix of the target predictions (temperature MCC_TEMPERATURE,
  entropy-weighted images, category-normalised); no domain classifier.
- `coral`: Deep CORAL (Sun & Saenko, ECCV 2016 workshops, section 3.1): the squared
  Frobenius distance of the source and target covariances of the last layer (the
  class logits), divided by 4 d^2; no domain classifier.

Every method's adaptation is weighted by the same lambda (the paper's schedule or
--fixed_lambda): CDAN's through the gradient reversal, as DANN's; MCC's and CORAL's as
the factor of their loss. Losses that are not a mean over images (the entropy weights
of `cdan_e`, MCC's matrix, CORAL's covariances) are computed over the whole batch of
a step, gathered from every replica, so that N devices give the one-device update.
"""

import keras
import numpy as np
import tensorflow as tf

ADVERSARIAL = ("dann", "cdan", "cdan_e")  # a domain classifier trains the features
CONDITIONED = ("cdan", "cdan_e")  # the domain classifier sees f and g
LOSS_BASED = ("mcc", "coral")  # a loss on the predictions or logits, no adversary
ADAPTING = ADVERSARIAL + LOSS_BASED
EXACT_MAP_LIMIT = 4096
RANDOMISED_SIZE = 1024
MCC_TEMPERATURE = 2.5


def domain_input_size(mode, feature_size, num_classes):
    """The width of what the domain classifier of `mode` judges."""
    if mode not in CONDITIONED:
        return feature_size
    exact = feature_size * num_classes
    return exact if exact <= EXACT_MAP_LIMIT else RANDOMISED_SIZE


@keras.saving.register_keras_serializable(package="dann")
class MultilinearMap(keras.layers.Layer):
    """CDAN's map of features f (batch, F) and class probabilities g (batch, C).

    Exact: the outer product g f^T, flattened to F * C values. Randomised (when
    F * C > EXACT_MAP_LIMIT): (f R_f) * (g R_g) / sqrt(d), with fixed random normal
    matrices R_f (F, d) and R_g (C, d) kept in the model file.
    """

    def __init__(self, feature_size, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.feature_size, self.num_classes = int(feature_size), int(num_classes)
        self.output_size = domain_input_size("cdan", self.feature_size, self.num_classes)
        self.randomised = self.output_size != self.feature_size * self.num_classes
        if self.randomised:
            normal = keras.initializers.RandomNormal(stddev=1.0)
            self.feature_projection = self.add_weight(
                shape=(self.feature_size, self.output_size), initializer=normal,
                trainable=False, name="feature_projection")
            self.class_projection = self.add_weight(
                shape=(self.num_classes, self.output_size), initializer=normal,
                trainable=False, name="class_projection")

    def call(self, features, probabilities):
        features = tf.cast(features, tf.float32)
        probabilities = tf.cast(probabilities, tf.float32)
        if self.randomised:
            return (tf.matmul(features, self.feature_projection)
                    * tf.matmul(probabilities, self.class_projection)
                    / np.sqrt(float(self.output_size)))
        outer = probabilities[:, :, None] * features[:, None, :]
        return tf.reshape(outer, (-1, self.output_size))

    def get_config(self):
        return {**super().get_config(), "feature_size": self.feature_size,
                "num_classes": self.num_classes}


def gathered(tensor):
    """`tensor` with the rows of every replica of this step (itself on one device).
    The gathering passes gradients back to each replica's own rows."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    return context.all_gather(tensor, axis=0)


def entropy(probabilities):
    """The entropy (nats) of each row of class probabilities."""
    return -tf.reduce_sum(tf.math.multiply_no_nan(
        tf.math.log(probabilities), probabilities), axis=1)


def certainty_weights(probabilities):
    """1 + exp(-H(p)) per image, divided by their mean: constants, not trained."""
    weights = 1.0 + tf.exp(-entropy(tf.stop_gradient(probabilities)))
    return weights / tf.reduce_mean(weights)


def entropy_weighted_domain_loss(domain_labels, domain_logits, probabilities):
    """CDAN+E's domain loss on a step's images (source first, then target, equal
    halves): each domain's binary cross-entropies weighted by `certainty_weights`
    normalised within that domain, averaged over the two domains."""
    labels, logits, probabilities = (gathered(tensor) for tensor in (
        domain_labels, domain_logits, probabilities))
    losses = keras.losses.binary_crossentropy(labels[:, None], logits[:, None],
                                              from_logits=True)
    domain_means = []
    for domain in (0.0, 1.0):
        mask = tf.equal(labels, domain)
        weights = certainty_weights(tf.boolean_mask(probabilities, mask))
        domain_means.append(tf.reduce_mean(weights * tf.boolean_mask(losses, mask)))
    return (domain_means[0] + domain_means[1]) / 2.0


def minimum_class_confusion(target_logits, temperature=MCC_TEMPERATURE):
    """MCC's loss: the mean over classes of the off-diagonal mass of the target
    batch's category-normalised class-confusion matrix."""
    logits = gathered(tf.cast(target_logits, tf.float32))
    probabilities = tf.nn.softmax(logits / temperature, axis=1)
    weights = certainty_weights(probabilities)
    confusion = tf.matmul(probabilities * weights[:, None], probabilities,
                          transpose_a=True)
    confusion = confusion / tf.reduce_sum(confusion, axis=1, keepdims=True)
    num_classes = tf.cast(tf.shape(confusion)[0], tf.float32)
    return (tf.reduce_sum(confusion) - tf.linalg.trace(confusion)) / num_classes


def covariance(rows):
    """The unbiased covariance matrix of the rows of a (n, d) tensor."""
    centred = rows - tf.reduce_mean(rows, axis=0, keepdims=True)
    count = tf.cast(tf.shape(rows)[0], rows.dtype)
    return tf.matmul(centred, centred, transpose_a=True) / (count - 1.0)


def coral(source, target):
    """Deep CORAL's loss: ||C_source - C_target||_F^2 / (4 d^2) of two (n, d)
    batches."""
    source, target = (gathered(tf.cast(rows, tf.float32)) for rows in (source, target))
    size = tf.cast(tf.shape(source)[1], tf.float32)
    difference = covariance(source) - covariance(target)
    return tf.reduce_sum(tf.square(difference)) / (4.0 * size * size)


def adaptation_loss(mode, source_logits, target_logits):
    """The loss `mode` adds to the label loss (times lambda), or None for a method
    whose adaptation is adversarial or for no adaptation."""
    if mode == "mcc":
        return minimum_class_confusion(target_logits)
    if mode == "coral":
        return coral(source_logits, target_logits)
    return None

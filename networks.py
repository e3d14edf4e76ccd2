"""The networks DANN trains: feature extractor, label head and domain head of each.

- `mnist`: the paper's MNIST network (Ganin & Lempitsky 2015), the default.
- `svhn`: the paper's network for the SVHN and synthetic-digit experiments (JMLR 2016).
- `keras_dann`: the MNIST layout as the original Keras DANN repository built it:
  random-normal initialisers and dropout 0.5 after every hidden layer of both heads.
- `resnet50`: a `keras.applications` backbone, the common recipe for photos: pooled
  backbone features, a 256-unit bottleneck (Dense - BatchNorm - ReLU), a linear label
  head and a 1024-1024-1 domain head; the backbone learns at a tenth of the heads'
  rate, and its own ImageNet preprocessing is part of the network.

BatchNorm (the backbone's and the bottleneck's) sees each step's source and target
images together, as one batch: the features the domain head judges are then computed
the same way for both domains, and its statistics at test time are those of the
mixture the network was trained on.
"""

import dataclasses
import os

import keras

import data_utils
from file_utils import UserError

NETWORKS = ("mnist", "svhn", "keras_dann", "resnet50")
# name: (constructor, its preprocessing, the weights file Keras downloads for it)
BACKBONES = {
    "resnet50": (keras.applications.ResNet50, keras.applications.resnet50.preprocess_input,
                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}
BACKBONE_LR_SCALE = 0.1
DEFAULT_IMAGE_SIZE = {"mnist": 28, "svhn": 28, "keras_dann": 28, "resnet50": 224}
MIN_BACKBONE_IMAGE_SIZE = 32


@dataclasses.dataclass
class Network:
    """The parts of one network; `backbone` (or None) learns at BACKBONE_LR_SCALE."""
    features: keras.Model
    label_head: keras.Model
    domain_head: keras.Model
    backbone: keras.Model = None


@keras.saving.register_keras_serializable(package="dann")
class InferenceInput(keras.layers.Layer):
    """A network's first layer: decoded images (uint8, or float pixel values in
    [0, 255]) of any size made into what the network was trained on.

    Outside training it resizes images to `image_size` (`data_utils.resized`, as
    decoding does) and, for a run trained with random crops (`centre_crop`), takes the
    central 87.5 % resized back, so that the model alone gives evaluation's
    predictions. In training it passes its input on: the input pipeline has resized
    and randomly cropped the images.
    """

    def __init__(self, image_size, centre_crop=False, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.centre_crop = tuple(image_size), bool(centre_crop)

    def call(self, images, training=False):
        if training:
            return images
        images = data_utils.resized(images, self.image_size)
        return data_utils.centre_crop(images) if self.centre_crop else images

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.image_size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "image_size": list(self.image_size),
                "centre_crop": self.centre_crop}


def network_input(input_shape, centre_crop):
    """An input of images of any size with `input_shape`'s channels, and the
    `InferenceInput` layer that makes them `input_shape` images."""
    return [keras.Input(shape=(None, None, input_shape[2])),
            InferenceInput(input_shape[:2], centre_crop, name="inference_input",
                           dtype="float32")]


@keras.saving.register_keras_serializable(package="dann")
class BackbonePreprocessing(keras.layers.Layer):
    """A `keras.applications` backbone's own input preprocessing of [0, 255] pixels."""

    def __init__(self, backbone, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, images):
        # Keras casts only floating inputs to a layer's dtype; the images are uint8.
        return BACKBONES[self.backbone][1](keras.ops.cast(images, self.compute_dtype))

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


@keras.saving.register_keras_serializable(package="dann")
class ResumableDropout(keras.layers.Dropout):
    """Keras's Dropout with its random state saved in the model file (Keras 3.15 does
    not save it), so a resumed run draws the masks an uninterrupted one draws."""

    def save_own_variables(self, store):
        store["seed_state"] = self.seed_generator.state

    def load_own_variables(self, store):
        self.seed_generator.state.assign(store["seed_state"])


def uses_channel_mean(network):
    """Whether `network` normalises its input by the training images' channel mean."""
    return network not in BACKBONES


def dense_head(feature_dim, hidden_units, outputs, name, precision="float32",
               dropout=0.0, initializer="glorot_uniform"):
    """FC-ReLU layers of `hidden_units` in `precision` (each followed by dropout if
    `dropout` > 0), then FC(`outputs`) float32 logits."""
    layers = [keras.Input(shape=(feature_dim,))]
    for units in hidden_units:
        layers.append(keras.layers.Dense(units, activation="relu", dtype=precision,
                                         kernel_initializer=initializer))
        if dropout:
            layers.append(ResumableDropout(dropout, dtype=precision))
    layers.append(keras.layers.Dense(outputs, dtype="float32",
                                     kernel_initializer=initializer))
    return keras.Sequential(layers, name=name)


def normalised_input(input_shape, mean, centre_crop=False):
    """`network_input`, then pixels in [0, 255] -> [0, 1] minus the training mean, in
    float32 whatever the precision of the layers after them."""
    return [*network_input(input_shape, centre_crop),
            keras.layers.Rescaling(1.0 / 255.0, dtype="float32"),
            keras.layers.Normalization(mean=list(mean), variance=[1.0] * len(mean),
                                       dtype="float32")]


def digit_features(input_shape, mean, convolutions, pool, precision, padding="valid",
                   initializer="glorot_uniform", centre_crop=False):
    """Normalised input, then a 5x5 ReLU convolution per entry of `convolutions`
    (its filters), the first two each followed by max-pooling of `pool` (size,
    stride); flattened."""
    layers = normalised_input(input_shape, mean, centre_crop)
    for index, filters in enumerate(convolutions):
        layers.append(keras.layers.Conv2D(filters, 5, activation="relu", padding=padding,
                                          kernel_initializer=initializer,
                                          dtype=precision))
        if index < 2:
            layers.append(keras.layers.MaxPooling2D(*pool, dtype=precision))
    layers.append(keras.layers.Flatten(dtype=precision))
    return keras.Sequential(layers, name="features")


def digit_network(network, input_shape, num_classes, mean, precision, centre_crop,
                  domain_input):
    """The `mnist`, `keras_dann` or `svhn` network."""
    if network == "svhn":
        # The paper does not state the padding: "same" convolutions keep 28x28 digits
        # large enough for three of them (28 -> 13 -> 6, 6x6x128 features).
        features = digit_features(input_shape, mean, (64, 64, 128), (3, 2), precision,
                                  padding="same", centre_crop=centre_crop)
        size = features.output_shape[-1]
        return Network(features,
                       dense_head(size, (3072, 2048), num_classes, "label_classifier",
                                  precision),
                       dense_head(domain_input(size), (1024, 1024), 1,
                                  "domain_classifier", precision))
    extra = {"dropout": 0.5, "initializer": "random_normal"} \
        if network == "keras_dann" else {}
    features = digit_features(input_shape, mean, (32, 48), (2, 2), precision,
                              initializer=extra.get("initializer", "glorot_uniform"),
                              centre_crop=centre_crop)
    size = features.output_shape[-1]
    return Network(features,
                   dense_head(size, (100, 100), num_classes, "label_classifier",
                              precision, **extra),
                   dense_head(domain_input(size), (100,), 1, "domain_classifier",
                              precision, **extra))


def check(network, input_shape, weights):
    """Raises UserError where `weights` or `input_shape` do not suit `network`: checked
    before any image is read."""
    if network not in BACKBONES:
        if weights != "none":
            raise UserError(f"--weights {weights}: --model {network} has no pretrained "
                            f"weights; use --weights none or --model "
                            f"{' or '.join(BACKBONES)}")
        return
    if min(input_shape[:2]) < MIN_BACKBONE_IMAGE_SIZE or input_shape[2] != 3:
        raise UserError(
            f"--model {network} needs rgb images of at least {MIN_BACKBONE_IMAGE_SIZE}"
            f"x{MIN_BACKBONE_IMAGE_SIZE}, not {input_shape}: pass --img_mode rgb and "
            f"--img_width/--img_height (default {DEFAULT_IMAGE_SIZE[network]})")
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise UserError(f"--weights {weights}: no such file; pass the Keras weights "
                        f"file ({BACKBONES[network][2]}), imagenet or none")


def backbone_model(network, input_shape, precision, weights):
    """The pooled `keras.applications` backbone, its weights from ImageNet, a file or
    none; raises UserError where they cannot be had."""
    constructor, _, file_name = BACKBONES[network]
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)  # keras.applications take no dtype
    try:
        return constructor(include_top=False, input_shape=input_shape, pooling="avg",
                           weights=None if weights == "none" else weights)
    except Exception as error:  # a failed download or a foreign file, many types
        where = "ImageNet weights could not be downloaded" if weights == "imagenet" \
            else f"{weights} does not hold {network} weights"
        raise UserError(f"--weights {weights}: {where} ({type(error).__name__}): pass "
                        f"the file {file_name} (Keras's download, kept in "
                        "~/.keras/models) with --weights, or --weights none") from None
    finally:
        keras.config.set_dtype_policy(previous)


def backbone_network(network, input_shape, num_classes, precision, weights,
                     centre_crop, domain_input):
    """The `resnet50` recipe: backbone, bottleneck, label and domain heads."""
    backbone = backbone_model(network, input_shape, precision, weights)
    features = keras.Sequential(
        [*network_input(input_shape, centre_crop),
         BackbonePreprocessing(network, dtype="float32"), backbone,
         keras.layers.Dense(256, dtype=precision),
         keras.layers.BatchNormalization(dtype=precision),
         keras.layers.ReLU(dtype=precision)], name="features")
    return Network(features, dense_head(256, (), num_classes, "label_classifier"),
                   dense_head(domain_input(256), (1024, 1024), 1, "domain_classifier",
                              precision),
                   backbone)


def build(network, input_shape, num_classes, mean, precision="float32", weights="none",
          centre_crop=False, domain_input=None):
    """The named network's parts.

    Args:
        network: one of NETWORKS.
        input_shape: (height, width, channels) of the images.
        mean: per-channel training mean in [0, 1] (unused by backbones).
        precision: the Keras dtype policy of the hidden layers.
        weights: for a backbone, "imagenet", "none" or a weights file.
        centre_crop: whether evaluation centre-crops (a run trained with random
            crops); see `InferenceInput`.
        domain_input: the domain head's input width as a function of the features'
            (default: the features' own; CDAN's head judges a wider map).

    Raises:
        UserError: as `check`, or backbone weights that cannot be downloaded or read.
    """
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
    check(network, input_shape, weights)
    domain_input = domain_input or (lambda size: size)
    if network in BACKBONES:
        return backbone_network(network, input_shape, num_classes, precision, weights,
                                centre_crop, domain_input)
    return digit_network(network, input_shape, num_classes, mean, precision, centre_crop,
                         domain_input)

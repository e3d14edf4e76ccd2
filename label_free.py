"""Scores that rank trained runs without target labels: higher is better for each.

A score may read a split's source images with their labels, its target images
without theirs, and the trained model; never a target label. Images are taken in the
order of their files' contents (SHA-256), so a score depends neither on file names
nor on class folders: renaming or permuting the target's class folders (its labels)
leaves every score identical (tested).
"""

import hashlib

import keras
import numpy as np
from scipy import special
from sklearn import linear_model, preprocessing

import cache
import data_utils
import folders
import methods
import models

SND_TEMPERATURE = 0.05  # Saito et al. (2021)'s default
DEV_REGULARISATION = 1.0  # C of the logistic-regression domain classifier (sklearn's)


def in_content_order(files):
    """`files` (DomainFiles) sorted by the SHA-256 of each file's bytes."""
    digests = []
    for path in files.paths:
        with open(path, "rb") as handle:
            digests.append(hashlib.sha256(handle.read()).hexdigest())
    order = sorted(range(len(files)), key=digests.__getitem__)
    return folders.DomainFiles([files.paths[i] for i in order],
                                  [files.labels[i] for i in order])


def embed(model, files, batch_size=512):
    """(shared features, class logits) of the images of `files`, in their order."""
    batches = data_utils.image_batches(files, model.image_shape[:2], model.image_shape[2],
                                       batch_size)
    features = model.features.predict(batches, verbose=0)
    logits = model.label_head.predict(features, batch_size=batch_size, verbose=0)
    return features.astype(np.float64), logits.astype(np.float64)


def target_entropy(probabilities):
    """Minus the mean entropy (in nats) of the target predictions."""
    return float(np.mean(special.xlogy(probabilities, probabilities).sum(axis=1)))


def soft_neighbourhood_density(probabilities, temperature=SND_TEMPERATURE, chunk=1024):
    """SND (Saito et al., ICCV 2021): the mean entropy of each target image's soft
    neighbourhood, a softmax over its cosine similarities (of L2-normalised class
    probabilities) to the other target images, divided by `temperature`."""
    unit = probabilities / np.linalg.norm(probabilities, axis=1, keepdims=True)
    total = 0.0
    for start in range(0, len(unit), chunk):
        similarity = unit[start:start + chunk] @ unit.T / temperature
        rows = np.arange(len(similarity))
        similarity[rows, start + rows] = -np.inf  # not its own neighbour
        neighbours = special.softmax(similarity, axis=1)
        total -= special.xlogy(neighbours, neighbours).sum()
    return float(total / len(unit))


def density_ratios(source_features, target_features):
    """p_target(x) / p_source(x) at each source image's features, from a
    logistic-regression domain classifier (C = DEV_REGULARISATION) fitted on the
    standardised features of both domains' images; their mean is about 1."""
    features = np.concatenate([source_features, target_features])
    domains = np.r_[np.zeros(len(source_features)), np.ones(len(target_features))]
    scaler = preprocessing.StandardScaler().fit(features)
    classifier = linear_model.LogisticRegression(C=DEV_REGULARISATION, max_iter=2000)
    classifier.fit(scaler.transform(features), domains)
    odds = np.exp(classifier.decision_function(scaler.transform(source_features)))
    return odds * len(source_features) / len(target_features)


def importance_weighted_loss(weights, source_losses):
    """Minus IWCV (Sugiyama et al., JMLR 2007): the mean source loss, each image's
    loss weighted by its density ratio (`density_ratios`)."""
    return -float(np.mean(weights * source_losses))


def deep_embedded_validation(weights, source_losses):
    """Minus DEV (You et al., ICML 2019): the importance-weighted source loss with the
    control variate that lowers its variance (weights: `density_ratios`)."""
    weighted = weights * source_losses
    covariance = np.cov(np.stack([weighted, weights]))
    eta = -covariance[0, 1] / covariance[1, 1] if covariance[1, 1] > 0 else 0.0
    return -float(np.mean(weighted) + eta * np.mean(weights) - eta)


def reverse_validation(model, source, target, pseudo_labels, recipe):
    """The paper's reverse validation (JMLR 2016, section 5.1.2): a model trained with
    `recipe` (DANN for a baseline) from the target images, labelled by `model`
    (`pseudo_labels`), to the unlabelled source images, then scored on the source
    images' labels.

    Args:
        recipe: the run's own train.py flags ({name: value}); of them, what
            `models.dann_from_recipe` reads and batch_size, num_epochs, seed.
    """
    shape = model.image_shape
    keras.utils.set_random_seed(recipe["seed"])
    reverse_source = cache.DomainImages(
        folders.DomainFiles(target.paths, list(pseudo_labels)), shape[:2], shape[2])
    reverse_target = cache.DomainImages(source, shape[:2], shape[2])
    steps = data_utils.steps_per_epoch(len(target), len(source), recipe["batch_size"])
    mean = models.input_mean(model.network, (reverse_source, reverse_target))
    # As the evaluated model was built: an older run's flags.txt may lack --model. A
    # baseline's reverse model adapts with DANN, an adapting run's with its method.
    mode = model.mode if model.mode in methods.ADAPTING else "dann"
    reverse = models.dann_from_recipe(
        {**recipe, "mode": mode, "model": model.network, "augment": model.augment},
        shape, model.num_classes, mean, steps * recipe["num_epochs"])
    batches = data_utils.training_dataset(reverse_source, reverse_target, "source",
                                          recipe["batch_size"], recipe["seed"],
                                          augment=model.augment)
    reverse.fit(batches, epochs=recipe["num_epochs"], steps_per_epoch=steps, verbose=0,
                shuffle=False)
    _, logits = embed(reverse, source)
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(source.labels)))


def scores(model, split, recipe=None):
    """{score: value} for `model` on a scanned split, those its domains allow:
    `source_accuracy` needs its source, `target_entropy` and `snd` its target, `dev`
    and `iwcv` both; with `recipe` (the run's flags) and both domains,
    `reverse_validation` too, which trains a model."""
    result, source, target = {}, None, None
    if split.source is not None:
        source = in_content_order(split.source)
        source_features, source_logits = embed(model, source)
        labels = np.asarray(source.labels)
        source_losses = -special.log_softmax(source_logits, axis=1)[
            np.arange(len(labels)), labels]
        result["source_accuracy"] = float(np.mean(np.argmax(source_logits, axis=1)
                                                  == labels))
    if split.target is not None:
        target = in_content_order(split.target)
        target = folders.DomainFiles(target.paths, [folders.UNLABELLED] * len(target),
                                        labelled=False)  # never read
        target_features, target_logits = embed(model, target)
        probabilities = special.softmax(target_logits, axis=1)
        result["target_entropy"] = target_entropy(probabilities)
        result["snd"] = soft_neighbourhood_density(probabilities)
    if source is not None and target is not None:
        weights = density_ratios(source_features, target_features)
        result["dev"] = deep_embedded_validation(weights, source_losses)
        result["iwcv"] = importance_weighted_loss(weights, source_losses)
        if recipe is not None:
            result["reverse_validation"] = reverse_validation(
                model, source, target, np.argmax(target_logits, axis=1), recipe)
    return result

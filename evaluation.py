"""Evaluating a trained run on a two-domain test split: accuracy per domain, the
domain classifier's accuracy, confusion matrices and a t-SNE of the features.
"""

import json
import os

import keras
import numpy as np
from scipy import special
from sklearn import manifold, metrics

import common_flags
import data_utils
import models
import plots
import run_folder
from file_utils import UserError, write_atomically
from label_free import scores as label_free_scores

EVAL_BATCH_SIZE = 512
# Keras's predict spends much of a small network's time between calls; several
# batches per compiled call roughly doubled evaluation speed on 2 CPU cores.
EVAL_STEPS_PER_CALL = 8


def load_trained_model(path):
    """Loads a DANN `.keras` file, or raises UserError saying what is wrong."""
    if not os.path.isfile(path):
        raise UserError(
            f"no model at {path}: train one with train.py --model_dir, or pass "
            "--weights_fname naming an existing .keras file")
    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a foreign file.
        raise UserError(
            f"{path} is not a model saved by dann-keras ({type(error).__name__}): "
            "pass a .keras file written by train.py") from None
    if not isinstance(model, models.DANN):
        raise UserError(
            f"{path} holds a {type(model).__name__}, not a DANN model: pass a .keras "
            "file written by train.py")
    model.steps_per_execution = EVAL_STEPS_PER_CALL
    return model


def predict_domain(model, files, batch_size=EVAL_BATCH_SIZE):
    """Class logits (N, classes) and domain logits (N,) for the images of one domain."""
    batches = data_utils.image_batches(files, model.image_shape[:2],
                                       model.image_shape[2], batch_size, crop=model.augment)
    outputs = model.predict(batches, verbose=0)
    return outputs["class_logits"], outputs["domain_logits"][:, 0]


def predict_split(model, split, batch_size=EVAL_BATCH_SIZE):
    """{domain: (labels, class probabilities, domain logits)} for a scanned split."""
    predictions = {}
    for domain in data_utils.DOMAINS:
        files = getattr(split, domain)
        class_logits, domain_logits = predict_domain(model, files, batch_size)
        predictions[domain] = (np.asarray(files.labels),
                               special.softmax(class_logits, axis=-1), domain_logits)
    return predictions


def evaluate(model, split, batch_size=EVAL_BATCH_SIZE):
    """Accuracy report of `model` on a scanned split (`data_utils.SplitFiles`).

    Returns:
        A dict with `source_accuracy`, `target_accuracy`, `domain_accuracy`,
        `num_source`, `num_target`, `per_class` ({domain: {class: accuracy}}),
        `confusion` ({domain: matrix as nested lists}), `domain_confusion` (rows:
        true source / target, normalised) and `average_precision` ({domain: the
        label classifier's mean over classes, one class against the rest}).
    """
    return report_of(predict_split(model, split, batch_size), split.class_names)


def report_of(predictions, class_names):
    """The report `evaluate` returns, from `predict_split`'s predictions."""
    report = {"per_class": {}, "confusion": {}, "average_precision": {}}
    classes = list(range(len(class_names)))
    for domain, (labels, probabilities, _) in predictions.items():
        predicted = np.argmax(probabilities, axis=-1)
        report[f"{domain}_accuracy"] = float(metrics.accuracy_score(labels, predicted))
        report[f"num_{domain}"] = len(labels)
        matrix = metrics.confusion_matrix(labels, predicted, labels=classes)
        report["confusion"][domain] = matrix.tolist()
        report["per_class"][domain] = {
            name: float(matrix[k, k] / matrix[k].sum()) if matrix[k].sum() else None
            for k, name in enumerate(class_names)}
        present = [k for k in classes if matrix[k].sum()]
        report["average_precision"][domain] = float(np.mean([
            metrics.average_precision_score(labels == k, probabilities[:, k])
            for k in present]))
    is_target = np.concatenate([np.full(len(predictions[d][0]), d == "target")
                                for d in data_utils.DOMAINS])
    says_target = np.concatenate([predictions[d][2] > 0 for d in data_utils.DOMAINS])
    report["domain_accuracy"] = float(np.mean(says_target == is_target))
    report["domain_confusion"] = metrics.confusion_matrix(
        is_target, says_target, labels=[False, True], normalize="true").tolist()
    return report


def sample_files(files, count, seed=0):
    """Up to `count` images of one domain, drawn without replacement."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(files))[:count])
    return data_utils.DomainFiles([files.paths[i] for i in chosen],
                                  [files.labels[i] for i in chosen])


def tsne_figure(model, split, path, per_domain=1000, seed=0):
    """t-SNE of the shared features of source and target test images, by domain."""
    features, domains = [], []
    for index, domain in enumerate(data_utils.DOMAINS):
        files = sample_files(getattr(split, domain), per_domain, seed)
        batches = data_utils.image_batches(files, model.image_shape[:2],
                                           model.image_shape[2], EVAL_BATCH_SIZE,
                                           crop=model.augment)
        features.append(model.features.predict(batches, verbose=0))
        domains.append(np.full(len(files), index))
    embedding = manifold.TSNE(n_components=2, init="pca", random_state=seed,
                              perplexity=min(30.0, (len(features[0]) * 2 - 1) / 3)
                              ).fit_transform(np.concatenate(features))
    plots.domain_scatter(embedding, np.concatenate(domains), data_utils.DOMAINS,
                         f"t-SNE of the features ({model.mode})", path)


def write_report(report, predictions, outputs, class_names, label):
    """Writes the JSON report and the figures where `outputs` say: per domain the
    confusion matrix and the precision-recall curves, and the domain classifier's
    confusion matrix."""
    write_atomically(outputs["report"], lambda handle: json.dump(report, handle, indent=1))
    for domain, (labels, probabilities, _) in predictions.items():
        title = f"{label}: {domain} ({report[f'{domain}_accuracy']:.4f})"
        plots.confusion_matrix(report["confusion"][domain], class_names, title,
                               outputs[f"confusion_{domain}"])
        plots.precision_recall(labels, probabilities, class_names, title,
                               outputs[f"pr_{domain}"])
    plots.confusion_matrix(report["domain_confusion"], list(data_utils.DOMAINS),
                           f"{label}: domain classifier, normalised by true domain",
                           outputs["confusion_domain"], normalised_only=True)


def run_recipe(model_dir):
    """The train.py flags a run recorded in its flags.txt, as {name: value}."""
    path = os.path.join(model_dir, run_folder.FLAGS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--reverse_validation trains with the run's recipe, but {path} "
                        "is missing: evaluate a run folder written by train.py")
    return common_flags.recorded_values(path, common_flags.TRAIN)


def summary_table(report):
    """The short text table eval.py prints."""
    rows = [f"{'domain':<8} {'images':>8} {'label accuracy':>15}"]
    for domain in data_utils.DOMAINS:
        rows.append(f"{domain:<8} {report[f'num_{domain}']:>8} "
                    f"{report[f'{domain}_accuracy']:>15.4f}")
    rows.append(f"domain classifier accuracy (both domains): "
                f"{report['domain_accuracy']:.4f}")
    scores = report.get("label_free_scores", {})
    if scores:
        rows.append("label-free scores (higher is better): " + ", ".join(
            f"{name} {value:.4f}" for name, value in scores.items()))
    return "\n".join(rows)


def run(model_dir, test_dir, weights_fname=None, skip_bad_images=False, tsne=False,
        label_free=False, reverse_validation=False):
    """Evaluates a model of the run in `model_dir` on `test_dir`; writes the report.

    `weights_fname` picks a checkpoint (see `run_folder.model_to_evaluate`); its
    outputs carry its name. With `tsne`, also draws a t-SNE of the features of up to
    1,000 test images per domain. With `label_free` (or `reverse_validation`, which
    adds the score that trains a model), adds `label_free_scores` (see label_free.py).

    Returns:
        The report (a dict); its `outputs` lists the files written.
    """
    path = run_folder.model_to_evaluate(model_dir, weights_fname)
    recipe = run_recipe(model_dir) if reverse_validation else None
    model = load_trained_model(path)
    channels = model.image_shape[2]
    split, skipped = data_utils.scan_and_log(test_dir, model.class_names,
                                             skip_bad_images, channels)
    outputs = run_folder.eval_outputs(model_dir, path)
    if not tsne:
        del outputs["tsne"]
    with data_utils.naming_unreadable([split], channels):
        predictions = predict_split(model, split)
        report = {"model": path, "test_dir": test_dir, "mode": model.mode,
                  "skipped_images": skipped,
                  **report_of(predictions, split.class_names),
                  "outputs": sorted(outputs.values())}
        if tsne:
            tsne_figure(model, split, outputs["tsne"])
        if label_free or reverse_validation:
            report["label_free_scores"] = label_free_scores(model, split, recipe)
    write_report(report, predictions, outputs, split.class_names, model.mode)
    return report

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
import folders
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


def image_batches(model, files, batch_size=EVAL_BATCH_SIZE):
    """The images of `files` (DomainFiles) as `model` takes them, in their order:
    decoded and resized as in training; the rest (a centre crop, the normalisation)
    the model does itself."""
    return data_utils.image_batches(files, model.image_shape[:2], model.image_shape[2],
                                    batch_size)


def predict_domain(model, files, batch_size=EVAL_BATCH_SIZE, verbose=0):
    """Class logits (N, classes) and domain logits (N,) for the images of `files`
    (DomainFiles), in their order; `verbose` is Keras's progress output."""
    outputs = model.predict(image_batches(model, files, batch_size), verbose=verbose)
    return outputs["class_logits"], outputs["domain_logits"][:, 0]


def predict_features(model, files):
    """The shared features (N, dimensions) of the images of `files`, in their order."""
    return model.features.predict(image_batches(model, files), verbose=0)


def predict_split(model, split, batch_size=EVAL_BATCH_SIZE):
    """{domain: (labels or None where it has none, class probabilities, domain
    logits)} for the domains a scanned split holds."""
    predictions = {}
    for domain, files in split.domains():
        class_logits, domain_logits = predict_domain(model, files, batch_size)
        predictions[domain] = (np.asarray(files.labels) if files.labelled else None,
                               special.softmax(class_logits, axis=-1), domain_logits)
    return predictions


def evaluate(model, split, batch_size=EVAL_BATCH_SIZE):
    """The report of `model` on a scanned split (`folders.SplitFiles`).

    Returns:
        A dict; for each domain the split holds, `num_<domain>` and in
        `predicted_counts` and `domain_recognised` ({domain: the share of its images
        the domain classifier gives to it}); for each labelled domain,
        `<domain>_accuracy` and in `per_class` ({class: accuracy}), `confusion` (a
        matrix as nested lists) and `average_precision` (the label classifier's mean
        over classes, one class against the rest); with both domains,
        `domain_accuracy` and `domain_confusion` (rows: true source / target,
        normalised). Nothing that needs labels is given for a domain without them.
    """
    return report_of(predict_split(model, split, batch_size), split.class_names)


def labelled_figures(labels, probabilities, num_classes):
    """Accuracy, confusion matrix, per-class accuracy and mean average precision of
    one labelled domain's predictions."""
    classes = list(range(num_classes))
    predicted = np.argmax(probabilities, axis=-1)
    matrix = metrics.confusion_matrix(labels, predicted, labels=classes)
    per_class = [float(matrix[k, k] / matrix[k].sum()) if matrix[k].sum() else None
                 for k in classes]
    precision = np.mean([metrics.average_precision_score(labels == k,
                                                         probabilities[:, k])
                         for k in classes if matrix[k].sum()])
    return (float(metrics.accuracy_score(labels, predicted)), matrix.tolist(),
            per_class, float(precision))


def report_of(predictions, class_names):
    """The report `evaluate` returns, from `predict_split`'s predictions."""
    report = {"per_class": {}, "confusion": {}, "average_precision": {},
              "predicted_counts": {}, "domain_recognised": {}}
    for domain, (labels, probabilities, domain_logits) in predictions.items():
        report[f"num_{domain}"] = len(probabilities)
        counts = np.bincount(np.argmax(probabilities, axis=-1),
                             minlength=len(class_names))
        report["predicted_counts"][domain] = dict(zip(class_names, counts.tolist()))
        report["domain_recognised"][domain] = float(np.mean(
            (domain_logits > 0) == (domain == "target")))
        if labels is not None:
            (report[f"{domain}_accuracy"], report["confusion"][domain], per_class,
             report["average_precision"][domain]) = labelled_figures(
                labels, probabilities, len(class_names))
            report["per_class"][domain] = dict(zip(class_names, per_class))
    if len(predictions) == len(folders.DOMAINS):
        is_target = np.concatenate([np.full(len(predictions[d][1]), d == "target")
                                    for d in folders.DOMAINS])
        says_target = np.concatenate([predictions[d][2] > 0 for d in folders.DOMAINS])
        report["domain_accuracy"] = float(np.mean(says_target == is_target))
        report["domain_confusion"] = metrics.confusion_matrix(
            is_target, says_target, labels=[False, True], normalize="true").tolist()
    return report


def tsne_figure(model, split, path, per_domain=1000, seed=0):
    """t-SNE of the shared features of the split's images, up to `per_domain` of each
    domain it holds, coloured by domain."""
    features, domains = [], []
    for domain, files in split.domains():
        files = folders.sample_files(files, per_domain, seed)
        features.append(predict_features(model, files))
        domains.append(np.full(len(files), folders.DOMAINS.index(domain)))
    features = np.concatenate(features)
    embedding = manifold.TSNE(n_components=2, init="pca", random_state=seed,
                              perplexity=min(30.0, (len(features) - 1) / 3)
                              ).fit_transform(features)
    plots.domain_scatter(embedding, np.concatenate(domains), folders.DOMAINS,
                         f"t-SNE of the features ({model.mode})", path)


def figure_outputs(outputs, report, tsne):
    """{key: path} of the files this evaluation writes: the report, and the figures
    its domains allow."""
    keys = ["report"] + (["tsne"] if tsne else [])
    keys += [f"{kind}_{domain}" for domain in report["confusion"]
             for kind in ("confusion", "pr")]
    if "domain_confusion" in report:
        keys.append("confusion_domain")
    return {key: outputs[key] for key in keys}


def write_report(report, predictions, outputs, class_names, label):
    """Writes the JSON report and the figures where `outputs` say: per labelled
    domain the confusion matrix and the precision-recall curves, and with both
    domains the domain classifier's confusion matrix."""
    write_atomically(outputs["report"], lambda handle: json.dump(report, handle, indent=1))
    for domain in report["confusion"]:
        labels, probabilities, _ = predictions[domain]
        title = f"{label}: {domain}, accuracy {report[f'{domain}_accuracy']:.4f}"
        plots.confusion_matrix(report["confusion"][domain], class_names, title,
                               outputs[f"confusion_{domain}"])
        plots.precision_recall(labels, probabilities, class_names, title,
                               outputs[f"pr_{domain}"])
    if "confusion_domain" in outputs:
        plots.confusion_matrix(report["domain_confusion"], list(folders.DOMAINS),
                               f"{label}: domain classifier",
                               outputs["confusion_domain"], normalised_only=True,
                               kind="domain")


def run_recipe(model_dir):
    """The train.py flags a run recorded in its flags.txt, as {name: value}."""
    path = os.path.join(model_dir, run_folder.FLAGS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"--reverse_validation trains with the run's recipe, but {path} "
                        "is missing: evaluate a run folder written by train.py")
    return common_flags.recorded_values(path, common_flags.TRAIN)


def summary_table(report):
    """The short text table eval.py prints; "no labels" where a domain has none."""
    rows = [f"{'domain':<8} {'images':>8} {'label accuracy':>15} "
            f"{'recognised by the domain classifier':>36}"]
    for domain, recognised in report["domain_recognised"].items():
        accuracy = report.get(f"{domain}_accuracy")
        rows.append(f"{domain:<8} {report[f'num_{domain}']:>8} "
                    f"{'no labels' if accuracy is None else f'{accuracy:.4f}':>15} "
                    f"{recognised:>36.4f}")
    if "domain_accuracy" in report:
        rows.append(f"domain classifier accuracy (both domains): "
                    f"{report['domain_accuracy']:.4f}")
    for domain, counts in report["predicted_counts"].items():
        if f"{domain}_accuracy" not in report:
            rows.append(f"{domain} images per predicted class: " + ", ".join(
                f"{name} {count}" for name, count in counts.items()))
    scores = report.get("label_free_scores", {})
    if scores:
        rows.append("label-free scores (higher is better): " + ", ".join(
            f"{name} {value:.4f}" for name, value in scores.items()))
    return "\n".join(rows)


def run(model_dir, test_dir, weights_fname=None, skip_bad_images=False, tsne=False,
        label_free=False, reverse_validation=False):
    """Evaluates a model of the run in `model_dir` on `test_dir`; writes the report.

    `test_dir` may hold both domains or one; a target without labels gets no
    accuracy. Outputs go to `run_folder.eval_folder`, a checkpoint's (`weights_fname`)
    carrying its name; what an earlier evaluation of the same model and split left
    there and this one does not write is removed. With `tsne`, also draws a t-SNE of
    up to 1,000 images per domain; with `label_free` (or `reverse_validation`, which
    trains a model), adds `label_free_scores` (see label_free.py).

    Returns:
        The report (a dict); its `outputs` lists the files written.
    """
    path = run_folder.model_to_evaluate(model_dir, weights_fname)
    recipe = run_recipe(model_dir) if reverse_validation else None
    model = load_trained_model(path)
    channels = model.image_shape[2]
    split, skipped = data_utils.scan_and_log(test_dir, model.class_names,
                                             skip_bad_images, channels, required=())
    if reverse_validation and len(split.domains()) < 2:
        raise UserError(f"--reverse_validation needs both domains, but {test_dir} holds "
                        f"only {split.domains()[0][0]}: pass a split with both")
    every_output = run_folder.eval_outputs(model_dir, path, test_dir)
    with data_utils.naming_unreadable(data_utils.file_groups([split]), channels):
        predictions = predict_split(model, split)
        report = {"model": path, "test_dir": os.path.abspath(test_dir),
                  "mode": model.mode, "skipped_images": skipped,
                  **report_of(predictions, split.class_names)}
        outputs = figure_outputs(every_output, report, tsne)
        report["outputs"] = sorted(outputs.values())
        os.makedirs(os.path.dirname(outputs["report"]), exist_ok=True)
        if tsne:
            tsne_figure(model, split, outputs["tsne"])
        if label_free or reverse_validation:
            report["label_free_scores"] = label_free_scores(model, split, recipe)
    write_report(report, predictions, outputs, split.class_names, model.mode)
    remove_stale(set(every_output.values()) - set(outputs.values()))
    return report


def remove_stale(paths):
    """Removes those of `paths` an earlier evaluation left: everything beside a
    report belongs to it."""
    for path in paths:
        if os.path.exists(path):
            os.remove(path)

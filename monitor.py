"""A run's health without target labels: signals after every epoch, warnings once.

After each epoch `HealthMonitor` predicts a fixed set of images, the validation
split's when the run has one, else a fixed sample of the training split, and adds to
the epoch's logs (so to history.csv, the curves and TensorBoard):

- `monitor_domain_accuracy`: the domain classifier's accuracy, the mean of the shares
  of source and of target images it recognises (0.5 is chance whatever the sizes);
- `monitor_target_entropy`, `monitor_snd`: `label_free`'s scores of the target
  predictions (higher: more confident, denser neighbourhoods);
- `monitor_top_class_share`: the share of target images given the most given class;
- with a validation split, `val_source_accuracy`, `val_domain_accuracy` and, only
  where its target has labels, `val_target_accuracy`.

No target label is read for any `monitor_*` signal. `health_warnings` turns them into
plain-worded warnings of the known failures.
"""

import keras
import numpy as np
import tensorflow as tf
from scipy import special

import file_utils
import folders
import label_free
import methods

MONITOR_IMAGES = 1000  # per domain, from the training split when there is no val/
SCORED_IMAGES = 2000  # at most, of the target images entropy and SND are computed on
# A healthy MNIST -> MNIST-M run keeps it near 0.6-0.7; a run whose features stay
# apart sits near 0.9 from its second epoch on.
DOMAIN_ALARM = 0.8
COLLAPSE_SHARE = 0.9
# A collapse is confident as well as one-class: the mean entropy of the target
# predictions is below this share of a uniform prediction's (ln of the classes).
COLLAPSE_ENTROPY = 0.5
WARNING_NAMES = {"domain": "the features are not being aligned",
                 "collapse": "the target predictions collapsed"}
README_SECTION = "see the README's 'Watching a run without target labels'"


def forward_pass(model):
    """`model`'s outputs for a batch of images, compiled once.

    A plain forward pass, not Keras's predict: the chief of a multi-worker run calls
    it alone, where a distributed predict would wait for the other workers.
    """
    return tf.function(lambda batch: model(batch, training=False),
                       reduce_retracing=True)


def predictions(forward, images):
    """(class probabilities, domain logits) of a `forward_pass` for the images of a
    `cache.DomainImages`, in their order."""
    probabilities, domain_logits = [], []
    for batch, _ in images.batches():
        outputs = forward(batch)
        probabilities.append(special.softmax(outputs["class_logits"].numpy(), axis=-1))
        domain_logits.append(outputs["domain_logits"].numpy()[:, 0])
    return np.concatenate(probabilities), np.concatenate(domain_logits)


def signals(source, target, labels=None):
    """The monitor's figures from (class probabilities, domain logits) of source and
    target images; `labels` ({domain: labels}, a validation split's) add the `val_`
    accuracies, the target's only when given."""
    source_recognised = source[1] <= 0  # a domain logit above 0 says "target"
    target_recognised = target[1] > 0
    scored = np.sort(np.random.default_rng(0).permutation(len(target[0]))[:SCORED_IMAGES])
    target_probabilities = target[0][scored]
    predicted = np.argmax(target[0], axis=-1)
    logs = {
        "monitor_domain_accuracy": float((np.mean(source_recognised)
                                          + np.mean(target_recognised)) / 2),
        "monitor_target_entropy": label_free.target_entropy(target_probabilities),
        "monitor_snd": label_free.soft_neighbourhood_density(target_probabilities),
        "monitor_top_class_share": float(np.bincount(predicted).max() / len(predicted)),
    }
    if labels is not None:
        logs["val_domain_accuracy"] = float(np.mean(np.concatenate(
            [source_recognised, target_recognised])))
        for domain, (probabilities, _) in (("source", source), ("target", target)):
            if labels.get(domain) is not None:
                logs[f"val_{domain}_accuracy"] = float(np.mean(
                    np.argmax(probabilities, axis=-1) == labels[domain]))
    return logs


def collapsed(row, num_classes):
    """Whether a history row shows collapsed target predictions: COLLAPSE_SHARE of
    them given one class, confidently (COLLAPSE_ENTROPY)."""
    entropy = -row.get("monitor_target_entropy", 0.0)
    return (row.get("monitor_top_class_share", 0) >= COLLAPSE_SHARE
            and entropy <= COLLAPSE_ENTROPY * np.log(num_classes))


def health_warnings(rows, num_epochs, mode, num_classes):
    """{kind: message} of the known failures the history `rows` show so far."""
    found = {}
    high = [row["epoch"] for row in rows
            if row.get("monitor_domain_accuracy", 0) >= DOMAIN_ALARM]
    if mode in methods.ADVERSARIAL and len(high) > num_epochs / 2:
        found["domain"] = (
            f"the domain classifier told source from target images apart with accuracy "
            f">= {DOMAIN_ALARM} in {len(high)} of the run's {num_epochs} epochs (0.5 is "
            "chance): the features are not being aligned, and this run may do no "
            "better than --mode source_only; try a larger --gamma or --lr, more "
            f"target images or more epochs ({README_SECTION})")
    late = [row for row in rows if row["epoch"] > num_epochs / 2
            and collapsed(row, num_classes)]
    if late:
        found["collapse"] = (
            f"at epoch {late[0]['epoch']}, {late[0]['monitor_top_class_share']:.0%} of "
            "the monitored target images were given one class, confidently: the target "
            "predictions have collapsed (unless the target really is nearly all that "
            f"class); try a lower --lr or --gamma ({README_SECTION})")
    return found


class HealthMonitor(keras.callbacks.Callback):
    """Adds the signals to every epoch's logs and logs each warning once.

    Args:
        monitored: (source, target) `cache.DomainImages` predicted after each epoch.
        labelled: whether they are a validation split (its labels then give the
            `val_` accuracies; a target's only where it has labels).
        history: the run's history rows (resumed epochs included), which the
            warnings read; the `HistoryWriter` after this callback appends to it.
        num_epochs, mode: the run's.
    """

    def __init__(self, monitored, labelled, history, num_epochs, mode):
        super().__init__()
        self.monitored, self.labelled, self.history = monitored, labelled, history
        self.num_epochs, self.mode = num_epochs, mode
        self.warned, self.forward = set(), None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        self.forward = self.forward or forward_pass(self.model)
        source, target = (predictions(self.forward, images) for images in self.monitored)
        labels = None
        if self.labelled:
            labels = {domain: np.asarray(images.files.labels)
                      for domain, images in zip(folders.DOMAINS, self.monitored)
                      if images.files.labelled}
        logs.update(signals(source, target, labels))
        rows = self.history + [{"epoch": epoch + 1, **logs}]
        for kind, message in health_warnings(rows, self.num_epochs, self.mode,
                                             self.model.num_classes).items():
            if kind not in self.warned:
                self.warned.add(kind)
                file_utils.tell("warning", message)

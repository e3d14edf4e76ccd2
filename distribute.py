"""The devices a run trains on: tf.distribute strategies and a loop for several machines.

Keras's `fit` trains on one device or under `MirroredStrategy` (the GPUs of one machine)
but does not run under `MultiWorkerMirroredStrategy` (keras-team/keras issue 20585), so
a run over several machines uses `fit_multi_worker`: the same train step, callbacks and
checkpoints, driven by `strategy.run`.

Whatever the devices, `--batch_size` is the per-domain batch of one optimiser step:
every replica takes its own equal slice of the same batch, and the train step divides
its loss by the number of replicas before their gradients are summed.
"""

import json
import os

import keras
import tensorflow as tf
from absl import logging

from file_utils import UserError

# Seconds a worker waits for the others in a collective step before giving up: long
# enough for a slow worker's start (decoding its data), short enough to end a run
# whose peer died.
COLLECTIVE_TIMEOUT_S = 600


# What a collective step raises when a peer worker died or stopped answering.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                      tf.errors.AbortedError, tf.errors.CancelledError)


def tf_config_workers():
    """The worker addresses TF_CONFIG names (empty without TF_CONFIG)."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as error:
        raise UserError(f"TF_CONFIG is not valid JSON ({error}): see "
                        "docs/distributed.md for its form") from None
    return config.get("cluster", {}).get("worker", [])


def choose(name):
    """The `tf.distribute` strategy of --distribute `name` and the name it resolved to.

    `auto` is multi_worker when TF_CONFIG names several workers, mirrored when more than
    one GPU is visible, and none (TensorFlow's default strategy) otherwise.
    """
    if name == "auto":
        if len(tf_config_workers()) > 1:
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "none"
    if name == "multi_worker":
        if not tf_config_workers():
            raise UserError("--distribute=multi_worker needs TF_CONFIG naming the "
                            "workers on every machine: see docs/distributed.md")
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=COLLECTIVE_TIMEOUT_S)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=options)
    elif name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    logging.info("Training on %d replica(s) (--distribute=%s)",
                 strategy.num_replicas_in_sync, name)
    return strategy, name


def is_chief(strategy):
    """Whether this process writes the run folder: the only one, or worker 0."""
    resolver = strategy.cluster_resolver
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def is_multi_worker(strategy):
    """Whether `strategy` spans several processes (and so needs `fit_multi_worker`)."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def steps_per_call(requested, strategy):
    """Steps per compiled call: 1 under MirroredStrategy with several replicas, where
    Keras 3's multi-step call fails ("You must feed a value for placeholder tensor",
    keras-team/keras issue 19246); else `requested`."""
    if strategy.num_replicas_in_sync > 1 and not is_multi_worker(strategy):
        return 1
    return requested


def for_keras_fit(make_batches, strategy):
    """The training batches `make_batches()` for `model.fit` under `strategy`.

    Under a strategy other than the default one, Keras's `fit` first takes a batch
    from one iterator to build the model, then trains from another (Keras 3.15,
    `TensorFlowTrainer._maybe_symbolic_build`). A second iterator of one dataset
    shuffles differently, so the dataset is built anew inside each iterator: every
    iterator, the one training uses among them, gives the batches of a one-device run.
    """
    with strategy.scope():
        builds_on_a_batch = tf.distribute.has_strategy()
    if not builds_on_a_batch:
        return make_batches()
    return tf.data.Dataset.from_tensors(0).flat_map(lambda _: make_batches())


def check_batch_size(batch_size, strategy):
    """Raises UserError unless `batch_size` splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise UserError(f"--batch_size {batch_size} does not split evenly over "
                        f"{replicas} replicas: use a multiple of {replicas}")


def replica_slices(batches, input_context, global_batch_size):
    """This worker's replicas' slices of every global batch, one replica's at a time.

    Every worker builds the same stream of global batches (the same seed); worker k
    of n keeps the k-th n-th of each domain's images and labels.
    """
    per_worker = global_batch_size // input_context.num_input_pipelines
    start = input_context.input_pipeline_id * per_worker
    per_replica = input_context.get_per_replica_batch_size(global_batch_size)
    mine = batches.map(lambda batch: {key: value[start:start + per_worker]
                                      for key, value in batch.items()})
    return mine.rebatch(per_replica).prefetch(tf.data.AUTOTUNE)


def fit_multi_worker(model, strategy, batches, batch_size, epochs, steps_per_epoch,
                     callbacks, verbose):
    """`model.fit(batches, ...)` for MultiWorkerMirroredStrategy.

    Args:
        model: a compiled `models.DANN` built under `strategy`.
        batches: the global training batches (`data_utils.training_dataset`).
        batch_size: images per domain in a global batch.
        epochs: (initial epoch, end epoch), as `fit`'s `initial_epoch` and `epochs`.
        steps_per_epoch, callbacks, verbose: as `fit`'s; every worker reads the
            metrics (a collective step) and gives them to its callbacks.
    """
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda context: replica_slices(batches, context, batch_size)))
    per_call = model.steps_per_execution

    @tf.function
    def train_steps(iterator):
        for _ in tf.range(per_call):
            strategy.run(model.train_step, args=(next(iterator),))

    callback_list = keras.callbacks.CallbackList(
        callbacks, add_progbar=verbose != 0, model=model, verbose=verbose,
        epochs=epochs[1], steps=steps_per_epoch)
    callback_list.on_train_begin()
    model.stop_training = False  # a callback may set it, as in `fit`
    for epoch in range(*epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        for first_step in range(0, steps_per_epoch, per_call):
            callback_list.on_train_batch_begin(first_step)
            train_steps(iterator)
            logs = {name: float(value) for name, value in model.training_logs().items()}
            callback_list.on_train_batch_end(first_step + per_call - 1, logs)
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)

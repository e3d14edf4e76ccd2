"""Training runs in-process: honesty of the protocol and resumption."""

import errno
import os
import signal

import keras
import numpy as np
import pytest

import data_utils
import folders
import run_folder
import training
from conftest import saved_weights
from file_utils import DiskFull, UserError


def _config(tiny_data, model_dir, **overrides):
    settings = dict(train_dir=os.path.join(tiny_data, "train"), model_dir=str(model_dir),
                    num_epochs=2, batch_size=8, log_rate=1, seed=7)
    settings.update(overrides)
    return training.TrainConfig(**settings)


def run(config):
    return training.run(config, verbose=0)


def _weights(model_dir, name="model.keras"):
    return saved_weights(os.path.join(model_dir, name))


def _permute_labels(monkeypatch, domain):
    original = folders.scan_split

    def scan_with_permuted_labels(split_dir, class_names=None, *args):
        split = original(split_dir, class_names, *args)
        files = getattr(split, domain)
        files.labels = list(np.random.default_rng(99).permutation(files.labels))
        return split

    monkeypatch.setattr(folders, "scan_split", scan_with_permuted_labels)


@pytest.mark.parametrize("mode", ["dann", "source_only", *(
    pytest.param(mode, marks=pytest.mark.slow) for mode in ("cdan", "cdan_e", "mcc",
                                                            "coral"))])
def test_target_labels_never_reach_the_training_loss(tiny_data, tmp_path, monkeypatch,
                                                     mode):
    run(_config(tiny_data, tmp_path / "true", mode=mode, num_epochs=1))
    _permute_labels(monkeypatch, "target")
    run(_config(tiny_data, tmp_path / "permuted", mode=mode, num_epochs=1))
    for a, b in zip(_weights(tmp_path / "true"), _weights(tmp_path / "permuted")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_permuted_source_labels_do_change_the_weights(tiny_data, tmp_path, monkeypatch):
    # The control for the test above: the comparison can detect label use.
    run(_config(tiny_data, tmp_path / "true", num_epochs=1))
    _permute_labels(monkeypatch, "source")
    run(_config(tiny_data, tmp_path / "permuted", num_epochs=1))
    pairs = zip(_weights(tmp_path / "true"), _weights(tmp_path / "permuted"))
    assert any(not np.array_equal(a, b) for a, b in pairs)


@pytest.mark.slow
def test_steps_per_execution_does_not_change_the_result(tiny_data, tmp_path):
    run(_config(tiny_data, tmp_path / "one", steps_per_execution=1))
    run(_config(tiny_data, tmp_path / "four", steps_per_execution=4))
    for a, b in zip(_weights(tmp_path / "one"), _weights(tmp_path / "four")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_same_seed_gives_identical_weights(tiny_data, tmp_path):
    run(_config(tiny_data, tmp_path / "a", num_epochs=1))
    run(_config(tiny_data, tmp_path / "b", num_epochs=1))
    for a, b in zip(_weights(tmp_path / "a"), _weights(tmp_path / "b")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_resuming_after_epoch_one_gives_the_uninterrupted_weights(tiny_data, tmp_path,
                                                                 steps_per_execution):
    run(_config(tiny_data, tmp_path / "full"))
    steps = data_utils.steps_per_epoch(48, 48, 8)
    interrupted = tmp_path / "resumed"
    run(_config(tiny_data, interrupted))
    # Leave the run as if it had stopped after epoch 1 of 2.
    os.remove(run_folder.checkpoint_path(str(interrupted), 2 * steps))
    os.remove(interrupted / "model.keras")
    history = run(_config(tiny_data, interrupted, restore_model=True,
                                steps_per_execution=steps_per_execution))
    assert [row["epoch"] for row in history] == [1, 2]
    # The clock goes on from the kept epoch's time.
    first, second = history
    assert second["run_seconds"] >= first["run_seconds"] + second["epoch_seconds"]
    model = keras.saving.load_model(interrupted / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == 2 * steps
    for a, b in zip(_weights(tmp_path / "full"), _weights(interrupted)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_refuses_to_overwrite_an_existing_run(tiny_data, tmp_path):
    run(_config(tiny_data, tmp_path / "run", num_epochs=1))
    before = sorted(os.listdir(tmp_path / "run"))
    with pytest.raises(data_utils.UserError, match="already holds a run"):
        run(_config(tiny_data, tmp_path / "run", num_epochs=1))
    assert sorted(os.listdir(tmp_path / "run")) == before
    run(_config(tiny_data, tmp_path / "run", num_epochs=1, overwrite=True))


def test_resume_with_a_different_run_length_is_refused(tiny_data, tmp_path):
    run(_config(tiny_data, tmp_path / "run", num_epochs=1))
    with pytest.raises(data_utils.UserError, match="resume with --flagfile"):
        run(_config(tiny_data, tmp_path / "run", num_epochs=3, restore_model=True))


def test_history_records_the_schedules_and_validation(tiny_data, tmp_path):
    history = run(_config(tiny_data, tmp_path / "run",
                                val_dir=os.path.join(tiny_data, "test")))
    assert [row["epoch"] for row in history] == [1, 2]
    for key in ("loss", "label_loss", "domain_loss", "label_accuracy",
                "domain_accuracy", "lambda", "lr", "val_source_accuracy",
                "val_target_accuracy", "val_domain_accuracy"):
        assert key in history[-1], key
    assert 0 < history[0]["lambda"] < history[1]["lambda"] < 1
    assert history[0]["lr"] > history[1]["lr"]
    first, second = history
    # run_seconds counts the setup before epoch 1 as well as the epochs.
    assert first["run_seconds"] > first["epoch_seconds"] > 0
    assert second["run_seconds"] >= first["run_seconds"] + second["epoch_seconds"]


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resuming_gives_the_uninterrupted_weights(
        tiny_data, tmp_path, monkeypatch):
    run(_config(tiny_data, tmp_path / "full"))
    interrupted = tmp_path / "interrupted"
    original = training.StopGuard.on_train_batch_end
    handler_before = signal.getsignal(signal.SIGINT)

    def interrupt_at_step_9(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 9:
            os.kill(os.getpid(), signal.SIGINT)
        original(self, batch, logs)

    monkeypatch.setattr(training.StopGuard, "on_train_batch_end", interrupt_at_step_9)
    with pytest.raises(training.TrainingStopped, match="SIGINT at epoch 2, step 9") as stop:
        run(_config(tiny_data, interrupted, steps_per_execution=1))
    assert stop.value.exit_code == 130
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) == handler_before
    assert os.path.exists(training.checkpoint_path(str(interrupted), 9))
    assert not os.path.exists(interrupted / "model.keras")
    history = run(_config(tiny_data, interrupted, restore_model=True))
    assert [row["epoch"] for row in history] == [1, 2]
    # The resumed epoch's row says its metrics cover only the steps after the resume.
    assert [row["steps"] for row in history] == [6, 3]
    for a, b in zip(_weights(tmp_path / "full"), _weights(interrupted)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_signals_at_epoch_ends_keep_every_epochs_history_row(tiny_data, tmp_path,
                                                              monkeypatch):
    run(_config(tiny_data, tmp_path / "full", num_epochs=3))
    interrupted = tmp_path / "interrupted"
    original = training.StopGuard.on_train_batch_end
    stop_at = [6, 12]  # the last steps of epochs 1 and 2

    def interrupt_at_epoch_ends(self, batch, logs=None):
        if stop_at and int(self.model.optimizer.iterations.numpy()) == stop_at[0]:
            stop_at.pop(0)
            os.kill(os.getpid(), signal.SIGINT)
        original(self, batch, logs)

    monkeypatch.setattr(training.StopGuard, "on_train_batch_end", interrupt_at_epoch_ends)
    for resume, where in ((False, "epoch 1, step 6"), (True, "epoch 2, step 12")):
        with pytest.raises(training.TrainingStopped, match=f"SIGINT at {where}"):
            run(_config(tiny_data, interrupted, num_epochs=3, steps_per_execution=1,
                        restore_model=resume))
    history = run(_config(tiny_data, interrupted, num_epochs=3, restore_model=True))
    assert [(row["epoch"], row["steps"]) for row in history] == [(1, 6), (2, 6), (3, 6)]
    for a, b in zip(_weights(tmp_path / "full"), _weights(interrupted)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_signal_recorded_before_training_stops_it_at_its_first_steps(tiny_data,
                                                                       tmp_path):
    # tune.py records Ctrl-C while it loads a trial's data: Python's KeyboardInterrupt
    # could land in a finaliser there and be lost.
    with training.SignalsRecorded():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(training.TrainingStopped, match="SIGINT at epoch 1, step 6"):
            run(_config(tiny_data, tmp_path / "run", num_epochs=2))
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["ckpt-00000006.keras"]
    assert training.SignalsRecorded.received is None  # nothing left for the next run


def test_a_diverging_loss_stops_with_the_epoch_and_step(tiny_data, tmp_path):
    model_dir = tmp_path / "run"
    with pytest.raises(training.TrainingStopped, match=r"loss became (nan|inf) at epoch 1"):
        run(_config(tiny_data, model_dir, lr=1e12, momentum=0.0))
    assert not os.path.exists(model_dir / "model.keras")


def test_epoch_segments_finish_a_partial_epoch_first():
    assert training.epoch_segments(0, 10, 3) == [(0, 3, 10)]
    assert training.epoch_segments(20, 10, 3) == [(2, 3, 10)]
    assert training.epoch_segments(23, 10, 3) == [(2, 3, 7)]
    assert training.epoch_segments(13, 10, 3) == [(1, 2, 7), (2, 3, 10)]
    assert training.epoch_segments(30, 10, 3) == []


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 0}, "--batch_size must be a positive integer, not 0"),
    ({"mode": "magic"}, "--mode must be one of dann, source_only, target_only"),
    ({"lr": "0.1"}, "--lr must be int or float, not '0.1'"),
    ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
])
def test_a_config_built_in_code_is_checked_like_the_flags(tiny_data, tmp_path, override,
                                                           message):
    with pytest.raises(UserError, match=message):
        _config(tiny_data, tmp_path / "run", **override)


@pytest.mark.slow
def test_grayscale_trains_saves_and_evaluates_on_one_channel(tiny_data, tmp_path):
    import evaluation

    model_dir = str(tmp_path / "gray")
    run(_config(tiny_data, model_dir, num_epochs=1, img_mode="grayscale"))
    model = evaluation.load_trained_model(os.path.join(model_dir, "model.keras"))
    assert model.image_shape == (28, 28, 1) and len(model.mean) == 1
    report = evaluation.run(model_dir, os.path.join(tiny_data, "test"))
    assert report["num_source"] == report["num_target"] == 24


def test_a_full_disk_names_the_file_and_the_checkpoint_kept(tiny_data, tmp_path,
                                                             monkeypatch):
    model_dir = tmp_path / "run"
    original = keras.Model.save

    def save_until_the_disk_fills(model, path, *args, **kwargs):
        if os.path.basename(path) == f".tmp-{os.getpid()}-model.keras":
            raise OSError(errno.ENOSPC, "No space left on device")
        original(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save_until_the_disk_fills)
    with pytest.raises(DiskFull) as error:
        run(_config(tiny_data, model_dir, num_epochs=1))
    kept = training.checkpoint_path(str(model_dir), 6)
    assert str(error.value) == (
        f"the disk is full: could not write {model_dir / 'model.keras'} (none was "
        f"left; the latest checkpoint kept is {kept}); free some space and continue "
        "with --restore_model")
    assert os.path.exists(kept)
    assert not [n for n in os.listdir(model_dir) if n.startswith(".tmp")]


def test_training_builds_the_default_data_set_only_when_training_on_it(tmp_path,
                                                                      monkeypatch):
    import common_flags
    import mnist_m

    default = str(tmp_path / "data" / "mnist_mnistm")
    monkeypatch.setattr(common_flags, "DEFAULT_DATA_DIR", default)
    built = []
    monkeypatch.setattr(mnist_m, "build_mnist_mnistm",
                        lambda output_dir, **kwargs: built.append(output_dir))
    training.build_default_data_if_missing(str(tmp_path / "mine" / "train"))
    assert built == []
    training.build_default_data_if_missing(os.path.join(default, "train"))
    assert built == [default]


@pytest.mark.parametrize("override, fragment", [
    ({"val_dir": "{tmp}/no_val"}, "no_val is not a folder"),
    ({"mode": "target_only", "train_dir": "{tmp}/unlabelled"}, "--mode target_only"),
])
def test_unusable_splits_are_refused_before_any_image_is_decoded(
        tiny_data, tmp_path, monkeypatch, override, fragment):
    import shutil

    shutil.copytree(os.path.join(tiny_data, "train", "source"),
                    tmp_path / "unlabelled" / "source")
    shutil.copytree(os.path.join(tiny_data, "train", "source", "class_0"),
                    tmp_path / "unlabelled" / "target")

    def decoding(*args, **kwargs):
        raise AssertionError("an image was decoded before the splits were checked")

    monkeypatch.setattr(data_utils, "readable_only", decoding)
    settings = {key: value.format(tmp=tmp_path) for key, value in override.items()}
    with pytest.raises(UserError, match=fragment):
        run(_config(tiny_data, tmp_path / "run", skip_bad_images=True, **settings))
    assert not os.path.exists(tmp_path / "run")

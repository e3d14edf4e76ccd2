"""Each bad input gives one clear line, a non-zero exit, and leaves the run intact."""

import json
import os
import shutil
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import models  # noqa: F401  (registers the DANN classes, for loading saved runs)
from conftest import (REPO, assert_one_line_error, run_script, snapshot, start_script,
                      write_split)

pytestmark = pytest.mark.slow  # processes: the fast tier leaves them to CI


@pytest.fixture(scope="module")
def existing_run(tiny_data, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("bad") / "run")
    result = run_script("train.py", f"--train_dir={tiny_data}/train",
                        f"--model_dir={model_dir}", "--num_epochs=1", "--batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def train_into(existing_run, train_dir, *extra):
    return run_script("train.py", f"--train_dir={train_dir}",
                      f"--model_dir={existing_run}", "--overwrite", "--num_epochs=1",
                      "--batch_size=16", *extra)


def start_training(args, until_line, signum=None):
    """Starts train.py with `args`; once it prints a line starting with `until_line`,
    sends it `signum` (if given) and returns the running process."""
    process = start_script("train.py", *args)
    for line in process.stdout:
        if line.startswith(until_line):
            if signum is not None:
                process.send_signal(signum)
            break
    return process


def broken_copy(tiny_data, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(tiny_data, root)
    return root


@pytest.mark.parametrize("breakage, fragments", [
    (lambda root: shutil.rmtree(root), ["is not a folder"]),
    (lambda root: [shutil.rmtree(os.path.join(root, d)) for d in ("source", "target")],
     ["source is missing"]),
    (lambda root: shutil.rmtree(os.path.join(root, "target")), ["target is missing"]),
    (lambda root: os.rename(os.path.join(root, "target", "class_2"),
                            os.path.join(root, "target", "class_9")),
     ["target match the source's only partly", "missing class_2", "extra class_9",
      "one layout"]),
    (lambda root: [os.remove(os.path.join(root, "target", "class_1", f))
                   for f in os.listdir(os.path.join(root, "target", "class_1"))],
     ["class_1 holds no images"]),
])
def test_bad_training_folders(existing_run, tiny_data, tmp_path, breakage, fragments):
    root = broken_copy(tiny_data, tmp_path)
    breakage(os.path.join(root, "train"))
    before = snapshot(existing_run)
    result = train_into(existing_run, os.path.join(root, "train"))
    assert_one_line_error(result, os.path.join(root, "train"), *fragments)
    assert snapshot(existing_run) == before


def test_classes_that_differ_between_train_and_val(existing_run, tiny_data, tmp_path):
    root = broken_copy(tiny_data, tmp_path)
    for domain in ("source", "target"):
        shutil.rmtree(os.path.join(root, "test", domain, "class_0"))
    before = snapshot(existing_run)
    result = train_into(existing_run, os.path.join(root, "train"),
                        f"--val_dir={root}/test")
    assert_one_line_error(result, "differ from the training classes", "missing class_0")
    assert snapshot(existing_run) == before


def test_corrupt_image_is_named_and_can_be_skipped(tiny_data, tmp_path):
    root = broken_copy(tiny_data, tmp_path)
    bad = os.path.join(root, "train", "target", "class_1", "00003.png")
    with open(bad, "r+b") as handle:
        handle.truncate(60)
    result = run_script("train.py", f"--train_dir={root}/train",
                        f"--model_dir={tmp_path}/run", "--num_epochs=1",
                        "--batch_size=16")
    assert_one_line_error(result, bad, "--skip_bad_images")
    result = run_script("train.py", f"--train_dir={root}/train",
                        f"--model_dir={tmp_path}/run2", "--num_epochs=1",
                        "--batch_size=16", "--skip_bad_images")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "left out 1 unreadable image\n" in result.stderr


def test_stray_files_are_ignored_and_mixed_sizes_resized(tiny_data, tmp_path):
    root = broken_copy(tiny_data, tmp_path)
    open(os.path.join(root, "train", "source", "class_0", "README.txt"), "w").write("x")
    open(os.path.join(root, "train", "target", "class_2", ".DS_Store"), "w").write("x")
    big = np.random.default_rng(0).integers(0, 256, (40, 36, 3)).astype(np.uint8)
    Image.fromarray(big).save(os.path.join(root, "train", "target", "class_0", "big.jpg"))
    result = run_script("train.py", f"--train_dir={root}/train",
                        f"--model_dir={tmp_path}/run", "--num_epochs=1",
                        "--batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ": ignored 2 files that are not images" in result.stderr
    # eval.py says as much about the split it evaluates.
    shutil.rmtree(os.path.join(root, "test"))
    shutil.copytree(os.path.join(root, "train"), os.path.join(root, "test"))
    result = run_script("eval.py", f"--model_dir={tmp_path}/run",
                        f"--test_dir={root}/test")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ": ignored 2 files that are not images" in result.stderr


def test_an_existing_run_is_refused_before_the_default_data_is_built(existing_run):
    default_data = os.path.join(REPO, "data", "mnist_mnistm")
    had_data = os.path.exists(default_data)
    result = run_script("train.py", f"--model_dir={existing_run}")
    assert_one_line_error(result, existing_run, "already holds a run")
    assert os.path.exists(default_data) == had_data
    assert "building MNIST -> MNIST-M" not in result.stdout


def test_plots_py_without_the_default_data_is_one_clear_line(tmp_path):
    for name in ("plots.py", "common_flags.py", "folders.py", "file_utils.py"):
        shutil.copy(os.path.join(REPO, name), tmp_path)
    result = subprocess.run([sys.executable, str(tmp_path / "plots.py")],
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, str(tmp_path / "data" / "mnist_mnistm" / "train"),
                          "python mnist_m.py")
    assert not os.path.exists(tmp_path / "img")


def test_model_dir_that_is_a_file(tiny_data, tmp_path):
    path = tmp_path / "afile"
    path.write_text("keep me")
    result = run_script("train.py", f"--train_dir={tiny_data}/train",
                        f"--model_dir={path}", "--num_epochs=1")
    assert_one_line_error(result, str(path), "is a file")
    assert path.read_text() == "keep me"


def test_model_dir_that_cannot_be_created(tiny_data, tmp_path):
    (tmp_path / "afile").write_text("x")
    model_dir = tmp_path / "afile" / "run"
    result = run_script("train.py", f"--train_dir={tiny_data}/train",
                        f"--model_dir={model_dir}", "--num_epochs=1")
    assert_one_line_error(result, str(model_dir), "writable folder")


def test_existing_run_is_not_overwritten(existing_run, tiny_data):
    before = snapshot(existing_run)
    result = run_script("train.py", f"--train_dir={tiny_data}/train",
                        f"--model_dir={existing_run}", "--num_epochs=1")
    assert_one_line_error(result, existing_run, "--restore_model", "--overwrite")
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("make", ["garbage", "foreign_model"])
def test_eval_refuses_a_keras_file_from_another_program(tmp_path, tiny_data, make):
    path = tmp_path / "model.keras"
    if make == "garbage":
        path.write_bytes(b"PK\x03\x04 definitely not a keras archive")
    else:
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    result = run_script("eval.py", f"--model_dir={tmp_path}",
                        f"--test_dir={tiny_data}/test")
    assert_one_line_error(result, str(path), "train.py")


def test_sigterm_saves_a_checkpoint_and_restore_finishes_the_run(tiny_data, tmp_path):
    model_dir = str(tmp_path / "run")
    process = start_training([f"--train_dir={tiny_data}/train", f"--model_dir={model_dir}",
                              "--num_epochs=100", "--batch_size=8", "--log_rate=1000"],
                             "Epoch 3/", signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: SIGTERM at epoch") and "--restore_model" in last
    saved = os.listdir(os.path.join(model_dir, "checkpoints"))
    assert len(saved) == 1 and not os.path.exists(os.path.join(model_dir, "model.keras"))
    resumed = run_script("train.py", f"--train_dir={tiny_data}/train",
                         f"--model_dir={model_dir}", "--num_epochs=100",
                         "--batch_size=8", "--log_rate=1000", "--restore_model")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    assert int(final.optimizer.iterations.numpy()) == 100 * 6


def test_eval_on_a_test_dir_with_other_classes(existing_run, tmp_path):
    test_dir = write_split(tmp_path / "other", per_class=2, num_classes=2)
    result = run_script("eval.py", f"--model_dir={existing_run}", f"--test_dir={test_dir}")
    assert_one_line_error(result, test_dir, "missing class_2")


def test_a_run_that_diverged_before_any_checkpoint_says_to_overwrite(tiny_data, tmp_path):
    common = [f"--train_dir={tiny_data}/train", f"--model_dir={tmp_path}/run",
              "--num_epochs=1", "--batch_size=16"]
    diverged = run_script("train.py", *common, "--lr=1e12", "--momentum=0")
    assert diverged.returncode == 1
    assert "stopped: the loss became" in diverged.stderr.strip().splitlines()[-1]
    assert_one_line_error(run_script("train.py", *common), "saved no checkpoint",
                          "--overwrite")
    assert_one_line_error(run_script("train.py", *common, "--restore_model"),
                          "no checkpoint to resume from", "--overwrite")
    assert run_script("train.py", *common, "--overwrite").returncode == 0


def test_a_second_run_in_the_same_folder_is_refused_at_once(tiny_data, tmp_path):
    model_dir = str(tmp_path / "run")
    args = [f"--train_dir={tiny_data}/train", f"--model_dir={model_dir}"]
    first = start_training([*args, "--num_epochs=100", "--batch_size=8"], "Epoch 2/")
    second = run_script("train.py", *args, "--seed=2")
    first.send_signal(signal.SIGKILL)  # a killed run must not block the folder
    first.communicate(timeout=60)
    assert_one_line_error(second, model_dir, f"in use by process {first.pid}")
    again = run_script("train.py", *args, "--num_epochs=1", "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not os.path.exists(os.path.join(model_dir, ".lock"))


def test_ctrl_c_at_epoch_boundaries_keeps_one_history_row_per_epoch(tiny_data, tmp_path):
    # 6 steps an epoch, all in one compiled call: every stop lands on an epoch's end.
    common = [f"--train_dir={tiny_data}/train", "--num_epochs=3", "--batch_size=8",
              "--log_rate=1000"]
    reference = run_script("train.py", *common, f"--model_dir={tmp_path}/reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    model_dir = str(tmp_path / "interrupted")
    stops = 0
    for attempt in range(6):
        process = start_training([*common, f"--model_dir={model_dir}"]
                                 + (["--restore_model"] if attempt else []),
                                 "Epoch ", signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
        if process.returncode == 0:
            break
        assert process.returncode == 130, stderr[-3000:]
        stops += 1
    assert stops >= 2
    history = json.load(open(os.path.join(model_dir, "history.json")))
    assert [(row["epoch"], row["steps"]) for row in history] == [
        (epoch, 6) for epoch in (1, 2, 3)]
    final = [keras.saving.load_model(os.path.join(folder, "model.keras")).weights
             for folder in (f"{tmp_path}/reference", model_dir)]
    for a, b in zip(*final):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_resume_inside_an_epoch_marks_that_rows_partial_steps(tiny_data, tmp_path):
    common = [f"--train_dir={tiny_data}/train", "--num_epochs=2", "--batch_size=8",
              "--steps_per_execution=1", "--log_rate=1000"]
    model_dir = str(tmp_path / "run")
    process = start_training([*common, f"--model_dir={model_dir}"], "Epoch 2/",
                             signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    resumed = run_script("train.py", *common, f"--model_dir={model_dir}",
                         "--restore_model")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.load(open(os.path.join(model_dir, "history.json")))
    # One row per epoch; wherever the stop landed, the rows' steps add up to the run's.
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[0]["steps"] == 6 and 1 <= history[1]["steps"] <= 6
    stopped_at = int(stderr.strip().splitlines()[-1].split("step ")[1].split(":")[0])
    assert history[1]["steps"] == 12 - stopped_at or stopped_at == 12


@pytest.mark.parametrize("flags, fragments", [
    (["--weights=imagenet"], ["--model mnist has no pretrained weights"]),
    (["--model=resnet50", "--weights=missing.h5"], ["missing.h5: no such file",
                                                    "resnet50_weights"]),
    (["--model=resnet50", "--img_width=16", "--img_height=16"], ["at least 32x32"]),
    (["--model=resnet50", "--img_mode=grayscale"], ["needs rgb images"]),
    (["--model=resnet50", "--img_width=32", "--img_height=32", "--weights=WEIGHTS"],
     ["does not hold resnet50 weights", "--weights none"]),
])
def test_weights_and_image_sizes_that_do_not_suit_the_model(existing_run, tiny_data,
                                                            tmp_path, flags, fragments):
    not_weights = tmp_path / "notes.h5"
    not_weights.write_text("not an HDF5 file")
    before = snapshot(existing_run)
    result = train_into(existing_run, f"{tiny_data}/train",
                        *(flag.replace("WEIGHTS", str(not_weights)) for flag in flags))
    assert_one_line_error(result, *fragments)
    assert snapshot(existing_run) == before

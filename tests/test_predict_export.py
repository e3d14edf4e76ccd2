"""predict.py and export.py through their command lines: predictions are eval.py's,
the saved model alone gives them, and the exported model gives them in a process
that cannot import this project."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, assert_one_line_error, run_script, snapshot

pytestmark = pytest.mark.slow  # processes: the fast tier leaves them to CI

CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def cropped_run(tiny_data, tmp_path_factory):
    """A run trained with random crops at 24x24 on 28x28 images: evaluation resizes
    and centre-crops, all inside the model."""
    model_dir = str(tmp_path_factory.mktemp("predict") / "run")
    result = run_script("train.py", f"--train_dir={tiny_data}/train",
                        f"--model_dir={model_dir}", "--num_epochs=2", "--batch_size=8",
                        "--augment", "--img_width=24", "--img_height=24")
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def probabilities(rows):
    return np.array([[float(row[f"probability_{name}"]) for name in CLASSES]
                     for row in rows])


@pytest.fixture(scope="module")
def predicted(cropped_run, tiny_data, tmp_path_factory):
    """predict.py on the test target, a folder tree (read without its class folders)."""
    output = str(tmp_path_factory.mktemp("predicted") / "out" / "labels.csv")
    features = os.path.join(os.path.dirname(output), "features.npy")
    result = run_script("predict.py", f"--model_dir={cropped_run}",
                        f"--input={tiny_data}/test/target", f"--output={output}",
                        f"--features={features}")
    assert result.returncode == 0, result.stderr[-3000:]
    return read_csv(output), np.load(features), result


def test_predict_writes_a_row_per_image_in_sorted_order(predicted, tiny_data):
    rows, features, result = predicted
    paths = [row["path"] for row in rows]
    assert len(rows) == 24 and paths == sorted(paths)
    assert paths[0] == os.path.join(tiny_data, "test", "target", "class_0", "00000.png")
    assert list(rows[0]) == ["path", "predicted_class", "probability",
                             *(f"probability_{name}" for name in CLASSES),
                             "target_domain_probability"]
    table = probabilities(rows)
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-6)
    for row, probability in zip(rows, table):
        assert row["predicted_class"] == CLASSES[int(np.argmax(probability))]
        assert float(row["probability"]) == probability.max()
        assert 0 <= float(row["target_domain_probability"]) <= 1
    assert features.shape == (24, 432)  # 24x24 images: 3 x 3 x 48 features
    assert "Predicted 24 images" in result.stdout and "images/s" in result.stdout
    counts = {name: sum(row["predicted_class"] == name for row in rows)
              for name in CLASSES}
    assert ", ".join(f"{name} {count}" for name, count in counts.items()) in result.stdout


def test_predictions_are_eval_pys(predicted, cropped_run, tiny_data):
    rows, _, _ = predicted
    result = run_script("eval.py", f"--model_dir={cropped_run}",
                        f"--test_dir={tiny_data}/test")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(cropped_run, "eval", "test", "eval_report.json")) as handle:
        report = json.load(handle)
    labels = [CLASSES.index(os.path.basename(os.path.dirname(row["path"])))
              for row in rows]
    matrix = np.zeros((3, 3), int)
    for label, row in zip(labels, rows):
        matrix[label, CLASSES.index(row["predicted_class"])] += 1
    assert matrix.tolist() == report["confusion"]["target"]
    from scipy import special

    import evaluation
    import folders

    model = evaluation.load_trained_model(os.path.join(cropped_run, "model.keras"))
    files = folders.scan_split(os.path.join(tiny_data, "test")).target
    class_logits, domain_logits = evaluation.predict_domain(model, files)
    np.testing.assert_allclose(probabilities(rows), special.softmax(class_logits, axis=1),
                               rtol=1e-7, atol=1e-9)


def decoded(rows):
    """The images of `rows` as PIL decodes them: 28x28, grayscale made RGB."""
    return np.stack([np.asarray(Image.open(row["path"]).convert("RGB")) for row in rows])


def test_the_saved_model_alone_gives_the_predictions(predicted, cropped_run):
    import keras

    import models  # noqa: F401  (what the README says to import)

    rows, _, _ = predicted
    model = keras.saving.load_model(os.path.join(cropped_run, "model.keras"))
    images = decoded(rows)
    assert images.shape[1:] == (28, 28, 3) and model.image_shape == (24, 24, 3)
    logits = model.predict(images, verbose=0)["class_logits"]
    np.testing.assert_allclose(keras.ops.softmax(logits).numpy(), probabilities(rows),
                               atol=1e-5)


# Runs where this project cannot be imported: its own folder, no PYTHONPATH (-I).
OUTSIDE = """
import json, sys
import numpy as np, tensorflow as tf
try:
    import models
    sys.exit("this project's modules were importable")
except ImportError:
    pass
export, images = sys.argv[1], np.load(sys.argv[2])
served = tf.saved_model.load(export + "/saved_model").signatures["serving_default"]
saved = {k: v.numpy().tolist() for k, v in served(images=tf.constant(images)).items()}
interpreter = tf.lite.Interpreter(model_path=export + "/model.tflite")
runner = interpreter.get_signature_runner("serving_default")
lite = {k: v.tolist() for k, v in runner(images=images).items()}
names = open(export + "/class_names.txt").read().split()
print(json.dumps({"saved_model": saved, "tflite": lite, "class_names": names}))
"""


def test_the_export_gives_the_predictions_without_this_project(predicted, cropped_run,
                                                               tmp_path):
    rows, _, _ = predicted
    result = run_script("export.py", f"--model_dir={cropped_run}")
    assert result.returncode == 0, result.stderr[-3000:]
    export = os.path.join(cropped_run, "export")
    assert result.stdout.strip() == "Wrote " + ", ".join(
        os.path.join(export, name) for name in ("saved_model", "model.tflite",
                                                "class_names.txt"))
    np.save(tmp_path / "images.npy", decoded(rows))
    outside = subprocess.run([sys.executable, "-I", "-c", OUTSIDE, export,
                              str(tmp_path / "images.npy")], capture_output=True,
                             text=True, cwd=tmp_path, timeout=300)
    assert outside.returncode == 0, outside.stderr[-3000:]
    served = json.loads(outside.stdout.strip().splitlines()[-1])
    assert served["class_names"] == CLASSES
    expected = probabilities(rows)
    for kind, tolerance in (("saved_model", 1e-5), ("tflite", 1e-4)):
        np.testing.assert_allclose(served[kind]["probabilities"], expected,
                                   atol=tolerance)
        assert [CLASSES[k] for k in served[kind]["class_index"]] == [
            row["predicted_class"] for row in rows]
        np.testing.assert_allclose(served[kind]["target_domain_probability"],
                                   [float(row["target_domain_probability"])
                                    for row in rows], atol=tolerance)


def test_a_bad_image_is_named_or_skipped_and_no_csv_is_half_written(cropped_run,
                                                                    tiny_data, tmp_path):
    images = str(tmp_path / "images")
    shutil.copytree(os.path.join(tiny_data, "test", "target"), os.path.join(images, "a"))
    bad = os.path.join(images, "a", "class_1", "00003.png")
    with open(bad, "r+b") as handle:
        handle.truncate(60)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    output = str(tmp_path / "labels.csv")
    earlier = "path,predicted_class,probability\nkept\n"  # an earlier prediction's CSV
    with open(output, "w") as handle:
        handle.write(earlier)
    args = [f"--model_dir={cropped_run}", f"--input={images}", f"--output={output}"]
    result = run_script("predict.py", *args)
    assert_one_line_error(result, bad, "--skip_bad_images")
    assert open(output).read() == earlier
    result = run_script("predict.py", *args, "--skip_bad_images")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "note: --input: left out 1 unreadable image\n" in result.stderr
    assert bad in result.stderr
    assert "note: --input: ignored 1 file that is not an image" in result.stderr
    rows = read_csv(output)
    assert len(rows) == 23 and bad not in [row["path"] for row in rows]


def test_several_inputs_follow_one_flag(cropped_run, tiny_data, tmp_path):
    one = os.path.join(tiny_data, "test", "source", "class_2", "00001.png")
    output = str(tmp_path / "labels.csv")
    result = run_script("predict.py", f"--model_dir={cropped_run}", "--input", one,
                        os.path.join(tiny_data, "test", "target", "class_0"),
                        f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["path"] for row in read_csv(output)][0] == one  # source/ < target/
    assert len(read_csv(output)) == 9


@pytest.mark.parametrize("args, fragments", [
    ([], ["no images to predict", "--input"]),
    (["--input=/no/such/folder"], ["/no/such/folder does not exist"]),
    (["--input={data}/test/target", "--output={tmp}"], ["--output", "is a folder"]),
])
def test_bad_predict_inputs_are_one_line(cropped_run, tiny_data, tmp_path, args,
                                         fragments):
    args = [arg.format(data=tiny_data, tmp=tmp_path) for arg in args]
    result = run_script("predict.py", f"--model_dir={cropped_run}", *args)
    assert_one_line_error(result, *fragments)


def test_export_into_a_file_is_refused(cropped_run, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_script("export.py", f"--model_dir={cropped_run}",
                        f"--output={tmp_path}/file")
    assert_one_line_error(result, f"{tmp_path}/file is a file")
    assert (tmp_path / "file").read_text() == "x"


def test_outputs_holding_the_users_files_are_refused_and_left_as_they_were(
        cropped_run, tiny_data, tmp_path):
    data = tmp_path / "DATA"
    (data / "train").mkdir(parents=True)
    (data / "train" / "x.png").write_text("the user's")
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's")
    before = snapshot(str(tmp_path))
    target = f"--input={tiny_data}/test/target"
    for command, fragment in (
            (["export.py", f"--output={data}"],
             f"--output {data} holds files this command did not write (train)"),
            (["predict.py", target, f"--output={notes}"],
             f"--output {notes} is a file this command did not write"),
            (["predict.py", target, f"--output={tmp_path}/labels.csv",
              f"--features={notes}"],
             f"--features {notes} is a file this command did not write")):
        result = run_script(command[0], f"--model_dir={cropped_run}", *command[1:])
        assert_one_line_error(result, fragment)
    assert snapshot(str(tmp_path)) == before


def test_an_earlier_export_and_predictions_are_replaced(cropped_run, tiny_data,
                                                         tmp_path):
    for _ in range(2):
        for command in (["export.py", f"--output={tmp_path}/export"],
                        ["predict.py", f"--input={tiny_data}/test/target",
                         f"--output={tmp_path}/labels.csv",
                         f"--features={tmp_path}/features.npy"]):
            result = run_script(command[0], f"--model_dir={cropped_run}", *command[1:])
            assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "export")) == ["class_names.txt",
                                                       "model.tflite", "saved_model"]


LITERT = """
import json, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
try:
    import tensorflow
    sys.exit("TensorFlow was importable")
except ImportError:
    pass
runner = Interpreter(model_path=sys.argv[1]).get_signature_runner("serving_default")
result = runner(images=np.load(sys.argv[2]))
print(json.dumps({key: value.tolist() for key, value in result.items()}))
"""


@pytest.mark.network  # installs LiteRT from PyPI into a virtual environment
def test_the_tflite_file_runs_with_litert_where_tensorflow_is_not(predicted, cropped_run,
                                                                  tmp_path):
    rows, _, _ = predicted
    result = run_script("export.py", f"--model_dir={cropped_run}",
                        f"--output={tmp_path}/export")
    assert result.returncode == 0, result.stderr[-3000:]
    venv = tmp_path / "litert"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "ai-edge-litert==2.3.0"],
                   check=True, timeout=600, capture_output=True)
    np.save(tmp_path / "images.npy", decoded(rows))
    lite = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", LITERT,
                           str(tmp_path / "export" / "model.tflite"),
                           str(tmp_path / "images.npy")], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert lite.returncode == 0, lite.stderr[-3000:]
    served = json.loads(lite.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(served["probabilities"], probabilities(rows), atol=1e-4)


def test_the_export_takes_grey_and_rgba_images(cropped_run, tmp_path):
    import tensorflow as tf

    result = run_script("export.py", f"--model_dir={cropped_run}",
                        f"--output={tmp_path}/export")
    assert result.returncode == 0, result.stderr[-3000:]
    serve = tf.saved_model.load(str(tmp_path / "export" / "saved_model")).signatures[
        "serving_default"]
    grey = np.random.default_rng(0).integers(0, 256, (3, 30, 26, 1)).astype(np.uint8)
    rgb = np.repeat(grey, 3, axis=-1)
    rgba = np.concatenate([rgb, np.full(grey.shape, 255, np.uint8)], axis=-1)
    expected = serve(images=tf.constant(rgb))["probabilities"].numpy()
    for images in (grey, rgba):  # as PIL's convert("RGB") would give them
        np.testing.assert_allclose(serve(images=tf.constant(images))["probabilities"],
                                   expected, atol=1e-6)


README_SNIPPET = "## The model without this repository"


def test_the_readmes_model_snippet_runs_as_written(cropped_run, tiny_data, tmp_path):
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index(README_SNIPPET):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = (code.replace("path/to/dann-keras", REPO)
            .replace("runs/mine", cropped_run)
            .replace("NEW_IMAGES", os.path.join(tiny_data, "test", "target", "class_1")))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.strip().splitlines()
    assert len(printed) == 8 and all(line.split()[-1] in CLASSES for line in printed)

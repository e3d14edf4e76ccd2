"""The real command lines, end to end on tiny generated data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("cli") / "run")
    result = run_script("train.py", f"--train_dir={tiny_data}/train",
                        f"--val_dir={tiny_data}/test", f"--model_dir={model_dir}",
                        "--num_epochs=1", "--batch_size=8", "--log_rate=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


def test_train_writes_the_whole_record_of_a_run(trained_run):
    names = set(os.listdir(trained_run))
    assert {"flags.txt", "model.keras", "history.csv", "history.json",
            "train_curves.png", "logs", "checkpoints"} <= names
    assert os.listdir(os.path.join(trained_run, "checkpoints")) == ["ckpt-00000006.keras"]
    assert not [n for n in names if n.startswith(".tmp")]
    header = open(os.path.join(trained_run, "history.csv")).readline().strip().split(",")
    assert {"epoch", "label_loss", "domain_loss", "lambda", "lr", "label_accuracy",
            "domain_accuracy", "val_target_accuracy"} <= set(header)


def test_eval_prints_a_table_and_writes_the_report(trained_run, tiny_data):
    result = run_script("eval.py", f"--model_dir={trained_run}",
                        f"--test_dir={tiny_data}/test")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "target" in result.stdout and "domain classifier accuracy" in result.stdout
    report = json.load(open(os.path.join(trained_run, "eval_report.json")))
    for key in ("source_accuracy", "target_accuracy", "domain_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["num_source"] == report["num_target"] == 24
    assert set(report["per_class"]) == {"source", "target"}
    assert set(report["per_class"]["target"]) == {"class_0", "class_1", "class_2"}
    for name in ("confusion_source.png", "confusion_target.png"):
        assert os.path.getsize(os.path.join(trained_run, name)) > 1000


def test_saved_flags_are_reusable_as_a_flagfile(trained_run, tiny_data):
    flags_file = os.path.join(trained_run, "flags.txt")
    assert "--num_epochs=1" in open(flags_file).read().split()
    result = run_script("eval.py", f"--flagfile={flags_file}",
                        f"--test_dir={tiny_data}/test")
    assert result.returncode == 0, result.stderr[-3000:]


def test_restore_model_continues_the_step_count(trained_run, tiny_data, tmp_path):
    flags_file = os.path.join(trained_run, "flags.txt")
    model_dir = str(tmp_path / "longer")
    first = run_script("train.py", f"--flagfile={flags_file}",
                       f"--model_dir={model_dir}", "--num_epochs=2")
    assert first.returncode == 0, first.stderr[-3000:]
    os.remove(os.path.join(model_dir, "checkpoints", "ckpt-00000012.keras"))
    resumed = run_script("train.py", f"--flagfile={flags_file}",
                         f"--model_dir={model_dir}", "--num_epochs=2", "--restore_model")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 6" in resumed.stderr
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == [
        "ckpt-00000006.keras", "ckpt-00000012.keras"]


@pytest.mark.parametrize("flag", ["--batch_size=0", "--num_epochs=-1", "--mode=magic"])
def test_bad_flag_values_are_refused_before_anything_loads(flag, tmp_path):
    result = run_script("train.py", flag, f"--model_dir={tmp_path}/run")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


def test_eval_without_a_model_is_one_clear_line(tmp_path, tiny_data):
    result = run_script("eval.py", f"--model_dir={tmp_path}", f"--test_dir={tiny_data}/test")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no model at")
    assert "Traceback" not in result.stderr


def test_eval_tsne_draws_the_features_of_both_domains(trained_run, tiny_data):
    result = run_script("eval.py", f"--model_dir={trained_run}",
                        f"--test_dir={tiny_data}/test", "--tsne")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.getsize(os.path.join(trained_run, "tsne.png")) > 5000


def test_paper_table_writes_the_documented_shape(tiny_data, tmp_path):
    prefix = str(tmp_path / "table")

    def paper_table(output_prefix, *extra):
        return run_script("benchmarks/paper_table.py", "--seeds=2", "--num_epochs=1",
                          f"--data_dir={tiny_data}", f"--runs_dir={tmp_path}/runs",
                          f"--output_prefix={output_prefix}", *extra, timeout=900)

    result = paper_table(prefix, "--parallel=2")
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.load(open(prefix + ".json"))
    assert set(table) >= {"modes", "seeds", "num_epochs", "data", "machine", "versions",
                          "wall_seconds"}
    assert table["seeds"] == [0, 1] and table["num_epochs"] == 1
    assert set(table["modes"]) == {"source_only", "dann", "target_only"}
    for row in table["modes"].values():
        for key in ("target_accuracy", "source_accuracy", "domain_accuracy"):
            values = row[f"{key}_per_seed"]
            assert len(values) == 2 and all(0 <= v <= 1 for v in values)
        assert all(seconds > 0 for seconds in row["training_seconds_per_seed"])
        assert row["mean"] == pytest.approx(np.mean(row["target_accuracy_per_seed"]))
        assert row["std"] == pytest.approx(np.std(row["target_accuracy_per_seed"]))
    text = open(prefix + ".md").read()
    assert "0.5225" in text and "0.9891" in text and "gap closed" in text
    assert "2 at a time" in text

    model = tmp_path / "runs" / "dann-seed1" / "model.keras"
    trained_at = model.stat().st_mtime_ns
    result = paper_table(f"{prefix}-again", "--reuse_finished")
    assert result.returncode == 0, result.stderr[-3000:]
    assert model.stat().st_mtime_ns == trained_at
    assert json.load(open(prefix + "-again.json"))["modes"] == table["modes"]


def test_gap_closed():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import paper_table

    assert paper_table.gap_closed(0.5, 0.8, 0.9) == pytest.approx(0.75)


def test_evaluation_predicts_what_the_model_computes_image_by_image(trained_run,
                                                                    tiny_data):
    import data_utils
    import eval as evaluation

    model = evaluation.load_trained_model(os.path.join(trained_run, "model.keras"))
    files = data_utils.scan_split(os.path.join(tiny_data, "test")).target
    # 24 images in batches of 2, 8 batches per call: two full calls and a partial one.
    predicted, says_target = evaluation.predict_domain(model, files, batch_size=2)
    images = np.stack([data_utils.decode_image(path, (28, 28), 3).numpy()
                       for path in files.paths])
    outputs = model(images, training=False)
    np.testing.assert_array_equal(predicted,
                                  np.argmax(outputs["class_logits"], axis=-1))
    np.testing.assert_array_equal(says_target, outputs["domain_logits"][:, 0] > 0)


def test_bench_measures_evaluation_and_its_decoding_alone(trained_run, tiny_data):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench

    evaluate, decode = bench.eval_path(trained_run, os.path.join(tiny_data, "test"))
    assert 0 < evaluate < np.inf and 0 < decode < np.inf

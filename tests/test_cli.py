"""The real command lines, end to end on tiny generated data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_script, saved_weights


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
    report = json.load(open(os.path.join(trained_run, "eval", "test", "eval_report.json")))
    for key in ("source_accuracy", "target_accuracy", "domain_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["num_source"] == report["num_target"] == 24
    assert set(report["per_class"]) == {"source", "target"}
    assert set(report["per_class"]["target"]) == {"class_0", "class_1", "class_2"}
    for name in ("confusion_source.png", "confusion_target.png", "confusion_domain.png",
                 "pr_source.png", "pr_target.png"):
        assert os.path.getsize(os.path.join(trained_run, "eval", "test", name)) > 1000
    rows = np.asarray(report["domain_confusion"])
    np.testing.assert_allclose(rows.sum(axis=1), [1.0, 1.0])
    # Its diagonal, weighted by the domains' sizes (equal here), is the domain accuracy.
    assert np.mean(np.diag(rows)) == pytest.approx(report["domain_accuracy"])
    assert set(report["average_precision"]) == {"source", "target"}


def test_saved_flags_are_train_py_flags_only(trained_run):
    recorded = {line.split("=")[0].lstrip("-")
                for line in open(os.path.join(trained_run, "flags.txt")).read().split()}
    assert "--num_epochs=1" in open(os.path.join(trained_run, "flags.txt")).read().split()
    assert {"train_dir", "val_dir", "mode", "lr", "gamma"} <= recorded
    # The recipe, not where it lives: a replay cannot train into the recorded run.
    assert not recorded & {"test_dir", "tsne", "weights_fname", "output_dir", "num_test",
                           "mnist_path", "model_dir", "overwrite", "restore_model"}


@pytest.mark.slow
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


@pytest.mark.slow
def test_eval_without_a_model_is_one_clear_line(tmp_path, tiny_data):
    result = run_script("eval.py", f"--model_dir={tmp_path}",
                        f"--test_dir={tiny_data}/test")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no model at")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_eval_of_a_missing_checkpoint_lists_the_saved_ones(trained_run, tiny_data):
    result = run_script("eval.py", f"--model_dir={trained_run}", "--weights_fname=5",
                        f"--test_dir={tiny_data}/test")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --weights_fname 5: no such model in")
    assert "model.keras, checkpoints/ckpt-00000006.keras" in last, last


@pytest.mark.slow
def test_eval_tsne_draws_the_features_of_both_domains(trained_run, tiny_data):
    result = run_script("eval.py", f"--model_dir={trained_run}",
                        f"--test_dir={tiny_data}/test", "--tsne")
    assert result.returncode == 0, result.stderr[-3000:]
    tsne = os.path.join(trained_run, "eval", "test", "tsne.png")
    assert os.path.getsize(tsne) > 5000 and tsne in result.stdout


def assert_documented_table(prefix, stdout, tmp_path):
    """paper_table.py's files and log lines for 2 seeds of 1 epoch, 2 at a time;
    returns its table."""
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
    for mode in ("dann", "source_only", "target_only"):
        log = tmp_path / "runs" / f"{mode}-seed1.log"
        assert f"{mode} seed 1: training into" in stdout and "--overwrite" in stdout
        assert f"log {log}" in stdout and log.stat().st_size > 0
        assert f"{mode} seed 1: target accuracy" in stdout
    text = open(prefix + ".md").read()
    assert "0.5225" in text and "0.9891" in text and "gap closed" in text
    assert "2 at a time" in text
    return table


@pytest.mark.slow
def test_paper_table_writes_the_documented_shape(tiny_data, tmp_path):
    prefix = str(tmp_path / "table")

    def paper_table(output_prefix, *extra):
        return run_script("benchmarks/paper_table.py", "--seeds=2", "--num_epochs=1",
                          f"--data_dir={tiny_data}", f"--runs_dir={tmp_path}/runs",
                          f"--output_prefix={output_prefix}", *extra, timeout=900)

    result = paper_table(prefix, "--parallel=2")
    assert result.returncode == 0, result.stderr[-3000:]
    table = assert_documented_table(prefix, result.stdout, tmp_path)

    model = tmp_path / "runs" / "dann-seed1" / "model.keras"
    trained_at = model.stat().st_mtime_ns
    result = paper_table(f"{prefix}-again", "--reuse_finished")
    assert result.returncode == 0, result.stderr[-3000:]
    assert model.stat().st_mtime_ns == trained_at
    assert json.load(open(prefix + "-again.json"))["modes"] == table["modes"]

    # Killed after its last checkpoint, before the final save and the evaluation.
    log = tmp_path / "runs" / "dann-seed1.log"
    first_log = log.read_text()
    os.remove(model)
    os.remove(tmp_path / "runs" / "dann-seed1" / "eval" / "test" / "eval_report.json")
    result = paper_table(f"{prefix}-resumed", "--reuse_finished")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dann seed 1: resuming" in result.stdout and "training into" not in \
        result.stdout
    assert log.read_text().startswith(first_log) and "Resuming from" in log.read_text()
    assert json.load(open(prefix + "-resumed.json"))["modes"]["dann"] == \
        table["modes"]["dann"]


def test_gap_closed():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import paper_table

    assert paper_table.gap_closed(0.5, 0.8, 0.9) == pytest.approx(0.75)


def test_a_one_seed_table_says_so_and_shows_no_spread():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import paper_table

    row = {"mean": 0.9676, "std": 0.0, "training_seconds_per_seed": [6444.2]}
    table = {"modes": {"dann": row}, "seeds": [0], "model": "svhn", "num_epochs": 40,
             "data": {"path": "data"}, "machine": {"cpu": "cpu", "cores": 2},
             "parallel": 1, "wall_seconds": 3.0}
    text = paper_table.markdown(table)
    assert "seed 0 only (svhn network, 40 epochs" in text and "+-" not in text
    assert "| dann | 0.9676 | 0.7666 | 0.8149 |" in text
    table["seeds"] = [0, 1]
    assert "mean +- std over 2 seeds" in paper_table.markdown(table)


def test_paper_table_resumes_only_a_run_of_the_same_flags(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import paper_table
    import run_folder

    run = tmp_path / "dann-seed0"
    args = ["--train_dir=data/train", "--model=svhn", "--seed=0"]
    os.makedirs(run / run_folder.CHECKPOINT_DIR)
    (run / run_folder.FLAGS_FILE).write_text(
        f"--model=svhn\n--seed=0\n--train_dir={tmp_path}/data/train\n")
    assert not paper_table.resumable(str(run), args)  # no checkpoint yet
    open(run_folder.checkpoint_path(str(run), 938), "w").close()
    monkeypatch.chdir(tmp_path)
    assert paper_table.resumable(str(run), args)
    assert not paper_table.resumable(str(run), args[:1] + ["--model=mnist"])
    assert not paper_table.resumable(str(run), args + ["--precision=float32"])


def test_evaluation_predicts_what_the_model_computes_image_by_image(trained_run,
                                                                    tiny_data):
    import data_utils
    import evaluation
    import folders

    model = evaluation.load_trained_model(os.path.join(trained_run, "model.keras"))
    files = folders.scan_split(os.path.join(tiny_data, "test")).target
    # 24 images in batches of 2, 8 batches per call: two full calls and a partial one.
    class_logits, domain_logits = evaluation.predict_domain(model, files, batch_size=2)
    images = np.stack([data_utils.decode_image(path, (28, 28), 3).numpy()
                       for path in files.paths])
    outputs = model(images, training=False)
    np.testing.assert_allclose(class_logits, outputs["class_logits"], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(domain_logits, outputs["domain_logits"][:, 0], rtol=1e-5,
                               atol=1e-5)


def test_bench_measures_evaluation_and_its_decoding_alone(trained_run, tiny_data):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench

    evaluate, decode = bench.eval_path(trained_run, os.path.join(tiny_data, "test"))
    assert 0 < evaluate < np.inf and 0 < decode < np.inf


@pytest.mark.slow
def test_replaying_flags_txt_from_elsewhere_gives_the_same_weights(tiny_data, tmp_path):
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    for folder in (first, elsewhere):
        folder.mkdir()
    relative = os.path.relpath(tiny_data, first)
    trained = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--train_dir={relative}/train",
         "--model_dir=runs/a", "--num_epochs=1", "--batch_size=16"], cwd=first,
        capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    flags_file = first / "runs" / "a" / "flags.txt"
    assert f"--train_dir={tiny_data}/train" in flags_file.read_text().split()
    # The README's replay command, from another folder.
    replayed = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--flagfile={flags_file}",
         "--model_dir=runs/again"], cwd=elsewhere, capture_output=True, text=True,
        timeout=600)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    for a, b in zip(saved_weights(first / "runs" / "a" / "model.keras"),
                    saved_weights(elsewhere / "runs" / "again" / "model.keras")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_replaying_a_run_with_overwrite_trains_elsewhere_and_keeps_it(trained_run,
                                                                      tmp_path):
    victim = os.path.join(trained_run, "model.keras")
    before = open(victim, "rb").read()
    model_dir = str(tmp_path / "new")
    # absl lets a later flag win: a --model_dir in flags.txt would have replaced the run.
    result = run_script("train.py", f"--model_dir={model_dir}",
                        f"--flagfile={trained_run}/flags.txt", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.exists(os.path.join(model_dir, "model.keras"))
    assert open(victim, "rb").read() == before


@pytest.mark.parametrize("script", ["train.py", "eval.py", "predict.py", "export.py",
                                    "tune.py", "mnist_m.py", "plots.py"])
def test_help_lists_the_commands_own_flags_and_exits_0(script):
    result = run_script(script, "--help")
    assert result.returncode == 0
    own = {"train.py": "--gamma", "eval.py": "--tsne", "predict.py": "--features",
           "export.py": "saved_model/", "tune.py": "--sampler_seed",
           "mnist_m.py": "--mnistm_path", "plots.py": "architecture.png"}
    assert all((flag in result.stdout) == (name == script) for name, flag in own.items())


@pytest.mark.slow
def test_plots_py_draws_where_told_and_says_so(tiny_data, tmp_path):
    unknown = run_script("plots.py", "--no_such_flag", f"--output_dir={tmp_path}/a")
    assert unknown.returncode == 2 and not os.path.exists(tmp_path / "a")
    result = run_script("plots.py", f"--data_dir={tiny_data}", f"--output_dir={tmp_path}/b")
    assert result.returncode == 0, result.stderr[-3000:]
    written = [str(tmp_path / "b" / name) for name in ("architecture.png", "samples.png")]
    assert f"Wrote {', '.join(written)}" in result.stdout
    assert all(os.path.getsize(path) > 0 for path in written)


@pytest.mark.slow
def test_overwrite_replaces_the_whole_run_eval_outputs_included(tiny_data, tmp_path):
    model_dir = str(tmp_path / "run")
    common = [f"--train_dir={tiny_data}/train", f"--model_dir={model_dir}",
              "--num_epochs=1", "--batch_size=16"]
    assert run_script("train.py", *common).returncode == 0
    for extra in ("--tsne", "--weights_fname=3"):
        assert run_script("eval.py", f"--model_dir={model_dir}",
                          f"--test_dir={tiny_data}/test", extra).returncode == 0
    before = saved_weights(f"{model_dir}/model.keras")
    result = run_script("train.py", *common, "--seed=3", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    left = set(os.listdir(model_dir))
    assert "eval" not in left and not [name for name in left if name.startswith(
        ("eval_report", "confusion", "tsne"))], left
    assert "--seed=3" in open(f"{model_dir}/flags.txt").read().split()
    after = saved_weights(f"{model_dir}/model.keras")
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["checkpoints/ckpt-00000006.keras",
                                  "ckpt-00000006.keras", "ckpt-6.keras", "6"])
def test_eval_of_a_checkpoint_keeps_the_final_models_report(trained_run, tiny_data,
                                                            name):
    final_report = os.path.join(trained_run, "eval", "test", "eval_report.json")
    before = open(final_report).read() if os.path.exists(final_report) else None
    result = run_script("eval.py", f"--model_dir={trained_run}",
                        f"--test_dir={tiny_data}/test", f"--weights_fname={name}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = [os.path.join(trained_run, "eval", "test", f"{stem}-ckpt-00000006.{ext}")
               for stem, ext in
               (("confusion_domain", "png"), ("confusion_source", "png"),
                ("confusion_target", "png"), ("eval_report", "json"),
                ("pr_source", "png"), ("pr_target", "png"))]
    assert f"Wrote {', '.join(written)}" in result.stdout
    assert (open(final_report).read() if os.path.exists(final_report) else None) == before
    report = json.load(open(written[3]))
    assert report["model"] == os.path.join(trained_run, "checkpoints",
                                           "ckpt-00000006.keras")


@pytest.mark.slow
def test_eval_of_a_checkpoint_reports_its_exact_accuracy(trained_run, tiny_data):
    import data_utils
    import evaluation
    import folders

    checkpoint = os.path.join("checkpoints", "ckpt-00000006.keras")
    result = run_script("eval.py", f"--model_dir={trained_run}",
                        f"--test_dir={tiny_data}/test", f"--weights_fname={checkpoint}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(os.path.join(trained_run, "eval", "test",
                                         "eval_report-ckpt-00000006.json")))
    assert report["model"] == os.path.join(trained_run, checkpoint)
    model = evaluation.load_trained_model(report["model"])
    split = folders.scan_split(os.path.join(tiny_data, "test"))
    for domain in ("source", "target"):
        files = getattr(split, domain)
        images = np.stack([data_utils.decode_image(p, (28, 28), 3).numpy()
                           for p in files.paths])
        predicted = np.argmax(model(images)["class_logits"], axis=-1)
        assert report[f"{domain}_accuracy"] == pytest.approx(
            np.mean(predicted == np.asarray(files.labels)))


def test_flags_are_checked_before_tensorflow_loads(tmp_path):
    for script, flag in (("train.py", "--batch_size=0"), ("eval.py", "--tsne=maybe"),
                         ("predict.py", "--skip_bad_images=maybe"),
                         ("tune.py", "--trials=0"),
                         ("mnist_m.py", "--num_test=-1")):
        result = subprocess.run(
            [sys.executable, "-X", "importtime", os.path.join(REPO, script), flag],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr[-3000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: flag {flag}"), last
        assert "tensorflow" not in result.stderr


def test_importing_the_library_defines_and_reads_no_flag():
    # TensorFlow defines absl flags of its own when it loads: count only ours.
    code = ("from absl import flags, logging; import keras, tensorflow; "
            "before = set(flags.FLAGS); "
            "import common_flags, data_utils, evaluation, exporting, folders, mnist_m, "
            "mnist_readers, models, monitor, plots, prediction, training, tuning; "
            "print(sorted(set(flags.FLAGS) - before))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"

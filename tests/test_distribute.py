"""Several devices and machines give the one-device result; precision policies.

The devices are this machine's: two logical CPU devices under MirroredStrategy, and
two train.py processes on localhost joined by TF_CONFIG.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, run_script, saved_model, start_script
COMMON = ["--num_epochs=2", "--batch_size=8", "--seed=3", "--steps_per_execution=2"]


def train(args, env=None):
    return start_script("train.py", *args, env=env)


def finished(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def weights(path):
    model = saved_model(path)
    return [w.numpy() for w in model.weights], int(model.optimizer.iterations.numpy())


def assert_same_weights(path_a, path_b, tolerance=1e-4):
    (a, steps_a), (b, steps_b) = weights(path_a), weights(path_b)
    assert steps_a == steps_b
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=tolerance, rtol=0)


@pytest.fixture(scope="module")
def one_device_run(tiny_data, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("one") / "run")
    code, _, err = finished(train([f"--train_dir={tiny_data}/train",
                                   f"--model_dir={model_dir}", "--distribute=none",
                                   *COMMON]))
    assert code == 0, err[-3000:]
    return model_dir


@pytest.mark.slow
def test_two_mirrored_devices_give_the_one_device_weights(one_device_run, tiny_data,
                                                           tmp_path):
    model_dir = str(tmp_path / "mirrored")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import training
        config = training.TrainConfig(train_dir={tiny_data + '/train'!r},
            model_dir={model_dir!r}, num_epochs=2, batch_size=8, seed=3,
            steps_per_execution=2)
        training.run(config, verbose=0,
                     strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(os.path.join(one_device_run, "model.keras"),
                        os.path.join(model_dir, "model.keras"))
    rows = [json.load(open(os.path.join(d, "history.json")))
            for d in (one_device_run, model_dir)]
    assert rows[0][-1]["label_loss"] == pytest.approx(rows[1][-1]["label_loss"], 1e-5)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(args, count=2):
    workers = [f"localhost:{port}" for port in free_ports(count)]
    return [train(args, env={"TF_CONFIG": json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})})
        for index in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["auto", "disk"])
def test_two_workers_give_the_one_process_weights(one_device_run, tiny_data, tmp_path,
                                                  cache):
    model_dir = str(tmp_path / "workers")
    processes = start_workers([f"--train_dir={tiny_data}/train",
                               f"--model_dir={model_dir}", f"--cache={cache}", *COMMON])
    outs = []
    for process in processes:
        code, out, err = finished(process)
        assert code == 0, err[-3000:]
        outs.append(out)
    assert "(--distribute=multi_worker)" in err  # auto chose it from TF_CONFIG
    said = sorted("as a worker; the chief wrote the run" in out for out in outs)
    assert said == [False, True], outs  # the chief prints the run's summary instead
    assert_same_weights(os.path.join(one_device_run, "model.keras"),
                        os.path.join(model_dir, "model.keras"))
    history = json.load(open(os.path.join(model_dir, "history.json")))
    assert [row["epoch"] for row in history] == [1, 2]  # written once, by the chief
    assert "--distribute" not in open(os.path.join(model_dir, "flags.txt")).read()
    if cache == "disk":  # the chief's files only: one per domain, none half-written
        assert len(os.listdir(os.path.join(model_dir, "decoded_cache"))) == 2


@pytest.mark.slow
def test_a_worker_that_dies_stops_the_other_with_one_clear_line(tiny_data, tmp_path):
    chief, other = start_workers([f"--train_dir={tiny_data}/train",
                                  f"--model_dir={tmp_path / 'run'}", "--num_epochs=500",
                                  "--batch_size=8", "--steps_per_execution=1"])
    for line in chief.stdout:
        if line.startswith("Epoch 2/"):
            other.send_signal(signal.SIGKILL)
            break
    code, _, err = finished(chief, timeout=120)
    other.wait()
    assert code == 1
    assert "stopped: another worker stopped or cannot be reached" in err
    assert "--restore_model" in err


@pytest.mark.parametrize("env, args, fragment", [
    ({"TF_CONFIG": "{not json"}, [], "TF_CONFIG is not valid JSON"),
    ({"TF_CONFIG": ""}, ["--distribute=multi_worker"], "needs TF_CONFIG"),
])
@pytest.mark.slow
def test_bad_distribution_settings_are_one_line(tiny_data, tmp_path, env, args,
                                                fragment):
    code, _, err = finished(train([f"--train_dir={tiny_data}/train",
                                   f"--model_dir={tmp_path / 'run'}", *args], env=env))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error:") and fragment in lines[-1]
    assert not os.path.exists(tmp_path / "run")


def test_a_batch_that_does_not_split_over_the_replicas_is_refused():
    import tensorflow as tf

    import distribute
    from file_utils import UserError

    class TwoReplicas:
        num_replicas_in_sync = 2

    distribute.check_batch_size(8, TwoReplicas())
    with pytest.raises(UserError, match="--batch_size 7 does not split evenly over 2"):
        distribute.check_batch_size(7, TwoReplicas())
    distribute.check_batch_size(7, tf.distribute.get_strategy())


@pytest.mark.slow
def test_a_bfloat16_run_trains_evaluates_and_resumes_only_in_bfloat16(tiny_data,
                                                                      tmp_path):
    model_dir = str(tmp_path / "bf16")
    args = [f"--train_dir={tiny_data}/train", f"--model_dir={model_dir}",
            "--precision=mixed_bfloat16", "--num_epochs=1", "--batch_size=8"]
    code, _, err = finished(train(args))
    assert code == 0, err[-3000:]
    assert "--precision=mixed_bfloat16" in open(os.path.join(model_dir, "flags.txt")).read()
    evaluated = run_script("eval.py", f"--model_dir={model_dir}",
                           f"--test_dir={tiny_data}/test", timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    code, _, err = finished(train([*args[:2], "--num_epochs=1", "--batch_size=8",
                                   "--restore_model"]))
    assert code == 2
    assert ("in mixed_bfloat16, but these flags ask for a mnist dann run of 6 steps in "
            "float32") in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_workers_stopped_by_a_signal_resume_to_the_one_process_weights(
        one_device_run, tiny_data, tmp_path):
    args = [f"--train_dir={tiny_data}/train", f"--model_dir={tmp_path / 'run'}", *COMMON]
    chief, other = start_workers(args)
    for line in chief.stdout:
        if line.startswith("Epoch 2/"):
            chief.send_signal(signal.SIGINT)
            break
    code, _, err = finished(chief)
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert "saved" in err and "--restore_model" in err
    assert finished(other)[0] == 1
    for process in start_workers([*args, "--restore_model"]):
        code, _, err = finished(process)
        assert code == 0, err[-3000:]
    assert_same_weights(os.path.join(one_device_run, "model.keras"),
                        str(tmp_path / "run" / "model.keras"))


TWO_CPUS = """
import sys
sys.path.insert(0, {repo!r})
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""


@pytest.mark.slow
def test_each_method_on_two_mirrored_devices_gives_the_one_device_weights(
        tiny_data, tmp_path):
    script = TWO_CPUS.format(repo=REPO) + textwrap.dedent(f"""
        import training
        # One strategy of each kind: two MirroredStrategy objects in one process would
        # share the keys of their collective operations.
        strategies = (("one", tf.distribute.OneDeviceStrategy("/cpu:0")),
                      ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])))
        for mode in ("cdan", "cdan_e", "mcc", "coral"):
            for name, strategy in strategies:
                config = training.TrainConfig(train_dir={tiny_data + '/train'!r},
                    model_dir={str(tmp_path)!r} + f"/{{mode}}-{{name}}", mode=mode,
                    num_epochs=2, batch_size=8, seed=3, steps_per_execution=2)
                training.run(config, verbose=0, strategy=strategy)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for mode in ("cdan", "cdan_e", "mcc", "coral"):
        # Round-off here: under 1e-7; without gathering the batch, cdan_e, mcc and
        # coral differ by more than 1e-6.
        assert_same_weights(str(tmp_path / f"{mode}-one" / "model.keras"),
                            str(tmp_path / f"{mode}-two" / "model.keras"), 1e-6)


# Halves of very different certainty and spread: a loss computed on each replica's
# half alone would differ from the whole batch's.
BATCH_LOSSES = """
import numpy as np
import methods
rng = np.random.default_rng(0)
logits = tf.constant(np.r_[rng.normal(0, 4, (4, 3)), rng.normal(0, 0.3, (4, 3))],
                     tf.float32)
domains = tf.constant([0, 0, 1, 1, 0, 0, 1, 1], tf.float32)
scale = tf.Variable(1.5)
losses = {
    "cdan_e": lambda x: methods.entropy_weighted_domain_loss(
        domains, x[:, 0], tf.nn.softmax(x * [[4.0, 1, 1]])),
    "mcc": methods.minimum_class_confusion,
    "coral": lambda x: methods.coral(x[::2], x[1::2])}
two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
halves = two.experimental_distribute_values_from_function(
    lambda context: logits[4 * context.replica_id_in_sync_group:][:4])
for name, loss in losses.items():
    with tf.GradientTape() as tape:
        value = loss(scale * logits)
    gradient = tape.gradient(value, scale)

    def replica(half):
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.GradientTape() as tape:
            value = loss(scale * half) / replicas
        return value, tape.gradient(value, scale)

    value_two, gradient_two = (two.reduce("SUM", v, None) for v in
                               two.run(tf.function(replica), args=(halves,)))
    np.testing.assert_allclose([value_two, gradient_two], [value, gradient], rtol=1e-5)
    print(name, float(value), float(gradient))
"""


def test_batch_level_losses_and_gradients_on_two_replicas_are_the_one_device_ones():
    result = subprocess.run([sys.executable, "-c", TWO_CPUS.format(repo=REPO)
                             + BATCH_LOSSES], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[0] for line in result.stdout.splitlines()] == [
        "cdan_e", "mcc", "coral"]


@pytest.mark.slow
def test_two_workers_give_the_one_process_weights_of_a_batch_level_method(
        tiny_data, tmp_path):
    args = [f"--train_dir={tiny_data}/train", "--mode=mcc", *COMMON]
    code, _, err = finished(train([*args, f"--model_dir={tmp_path / 'one'}",
                                   "--distribute=none"]))
    assert code == 0, err[-3000:]
    for process in start_workers([*args, f"--model_dir={tmp_path / 'workers'}"]):
        code, _, err = finished(process)
        assert code == 0, err[-3000:]
    assert_same_weights(str(tmp_path / "one" / "model.keras"),
                        str(tmp_path / "workers" / "model.keras"))

"""One tune.py study shared by two processes with separate study folders, as two
machines would share it: through a real PostgreSQL server (a throwaway cluster on a
localhost port) and through a journal file in a shared folder."""

import csv
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile

import pytest

from conftest import start_script, with_unlabelled_val

pytestmark = pytest.mark.slow  # processes: the fast tier leaves them to CI


def postgres_program(name):
    """The path of one of PostgreSQL's server programs (Debian keeps them off PATH)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.fail(f"PostgreSQL's {name} is not installed: apt-get install -y "
                    "postgresql (.ci/run installs it)")
    return found


def free_port():
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own, in a temporary folder: the URL of its `dann`
    database. The server refuses to run as root: as root it runs as `postgres`."""
    folder = tempfile.mkdtemp(prefix="dann-postgres-")
    as_user = []
    if os.geteuid() == 0:
        os.chown(folder, pwd.getpwnam("postgres").pw_uid, -1)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(folder, "data"), free_port()

    def run(name, *args):
        subprocess.run([*as_user, postgres_program(name), *args], check=True,
                       capture_output=True, timeout=120)

    run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    run("pg_ctl", "-D", data, "-l", os.path.join(folder, "server.log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=localhost", "start")
    try:
        run("createdb", "-h", "localhost", "-p", str(port), "-U", "postgres", "dann")
        yield f"postgresql+psycopg://postgres@localhost:{port}/dann"
    finally:
        run("pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_data(tiny_data, tmp_path_factory):
    """tiny_data with val/, a copy of test/ whose target has no labels."""
    return with_unlabelled_val(tiny_data,
                               str(tmp_path_factory.mktemp("shared") / "data"), "flat")


def read_rows(study_dir):
    with open(os.path.join(study_dir, "trials.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_two_machines_share_one_study(kind, shared_data, tmp_path, request):
    storage = (request.getfixturevalue("postgres_url") if kind == "postgresql" else
               f"journal:{tmp_path}/shared/journal.log")
    if kind == "journal":
        os.makedirs(tmp_path / "shared")
    machines = [str(tmp_path / f"machine_{index}") for index in range(2)]
    processes = [start_script(
        "tune.py", f"--train_dir={shared_data}/train", f"--val_dir={shared_data}/val",
        f"--study_dir={study_dir}", "--batch_size=8", "--trials=4",
        f"--storage={storage}", merged=True) for study_dir in machines]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    started = [set(re.findall(r"\] trial (\d+): ", output)) for output in outputs]
    assert not started[0] & started[1]  # no trial ran on both machines
    tables = [read_rows(study_dir) for study_dir in machines]
    assert tables[0] == tables[1]  # each machine lists every trial, all finished
    rows = tables[0]
    assert {row["trial"] for row in rows} == started[0] | started[1]
    assert len(rows) == 4 and {row["state"] for row in rows} <= {"complete", "pruned"}
    assert [row["mode"] for row in rows].count("source_only") == 1
    for row in rows:  # each trial's run folder is on the machine that ran it
        machine = 0 if row["trial"] in started[0] else 1
        folder = f"trial_{int(row['trial']):04d}"
        assert row["run"] == os.path.join(machines[machine], folder)
        assert os.path.exists(os.path.join(row["run"], "model.keras"))
        if row["state"] == "complete":
            assert row["val_snd"] and row["val_source_accuracy"]
    choices = [open(os.path.join(study_dir, "choice.txt")).read().splitlines()[-1]
               for study_dir in machines]
    assert choices[0] == choices[1] and choices[0].startswith("The rule ")

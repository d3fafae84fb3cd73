"""What production throws at a run: kill -9 mid-tuning, a record line cut short, MLflow or S3
unreachable (before or during a run), an unwritable or full artifact directory, two runs at once.

Each case runs the ``harlflow`` executable in a subprocess on a home of this module, as a user or
a CI job would, and checks the exit code, the one-line error, and what is left on disk.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from services import (
    BIN,
    embedded_env,
    free_port,
    harlflow,
    kill_tree,
    mlflow_runs,
    record_lines,
    start_mlflow_server,
    wait_for,
)

from tasks.pulling import verify_directory

pytestmark = pytest.mark.slow
QUICK = ["--rewrite", "none", "--no-measure", "--ci"]


@pytest.fixture(scope="module")
def env(prefect_api, tmp_path_factory) -> dict:
    """The embedded stores (sqlite MLflow, local artifacts) in a fresh home; flow runs on the
    session's Prefect server rather than a temporary one per command (~9 s each)."""
    return {**embedded_env(tmp_path_factory.mktemp("faults-home")), "PREFECT_API_URL": prefect_api}


@pytest.fixture(scope="module")
def model(env, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults-models") / "tiny.onnx"
    assert harlflow(env, "export-example", "tiny_mlp", "--out", str(path)).returncode == 0
    return path


def matmul_model(path: Path, m: int, k: int, n: int) -> Path:
    """A one-MatMul ONNX model: a new workload (tuning task) for each shape."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((k, n)).astype("float32"), "w"
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_kill_9_during_tuning_then_the_same_command_resumes(env, model, tmp_path):
    """SIGKILL mid-tuning keeps every committed trial; the same command again resumes: the trials
    measured before count against the budget and are not measured again. A record line cut
    short by the crash is dropped with a warning instead of breaking the database."""
    cmd = [
        str(BIN / "harlflow"),
        "optimize",
        str(model),
        "--name",
        "resumable",
        "--trials",
        "16",
        "--min-trials-per-task",
        "2",
        *QUICK,
    ]
    with open(tmp_path / "killed.log", "wb") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            # the warm-up trials are in; the search rounds take ~30 s more: kill in between
            wait_for(lambda: len(record_lines(env)) >= 4 or p.poll() is not None, 400, "trials")
            time.sleep(3)
        finally:
            os.killpg(p.pid, signal.SIGKILL)  # the run and its build/measure workers
            p.wait()
            kill_tree(p.pid)
    assert p.returncode == -9, (tmp_path / "killed.log").read_text()[-2000:]
    measured = len(record_lines(env))
    assert 4 <= measured < 16
    runs = Path(env["HARLFLOW_HOME"]) / "tuning_db" / "runs"
    assert len(list(runs.glob("*.json"))) == 1  # the interrupted run's journal
    orphans = mlflow_runs(env, "resumable")["RUNNING"]
    assert sorted(orphans) == ["optimize resumable", "tune"]  # nobody could end them
    with open(Path(env["HARLFLOW_HOME"]) / "tuning_db" / "database_tuning_record.json", "ab") as f:
        f.write(b'[0,[[["GetSBlock",[],["matmul"')  # what a kill during a write leaves

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout)
    assert "resuming an interrupted run" in r.stderr and "dropped a partial last record" in r.stderr
    assert s["resumed_trials"] == measured
    lines = record_lines(env)
    assert s["trials"] == len(lines) - measured and measured + s["trials"] == 16
    assert all(json.loads(line) for line in lines)  # every line parses again
    assert not list(runs.glob("*.json"))  # the run finished: no journal left
    assert "closed 2 MLflow run(s) left RUNNING by killed harlflow processes" in r.stderr
    statuses = mlflow_runs(env, "resumable")
    assert sorted(statuses["KILLED"]) == sorted(orphans) and "RUNNING" not in statuses
    verify_directory(Path(s["artifact"]))


def test_mlflow_unreachable_fails_fast_and_writes_nothing(env, model):
    """A tracking server that does not answer: exit 5 naming it, before any import or tuning."""
    url = f"http://127.0.0.1:{free_port()}"
    e = {
        **env,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    }
    before = record_lines(env)
    r = harlflow(e, "optimize", model, "--name", "nostore", "--trials", "4", *QUICK)
    assert r.returncode == 5, r.stderr[-2000:]
    err = json.loads(r.stdout)
    assert err["error"] == "StoreError" and url in err["message"]
    assert "Traceback" not in r.stderr
    assert record_lines(env) == before and not (Path(env["HARLFLOW_HOME"]) / "nostore").exists()


def test_mlflow_dies_mid_run_and_nothing_measured_is_lost(env, tmp_path):
    """The MLflow server dies while the run tunes: the run fails with one line (exit 5), its
    measurements are in the tuning database, and the rerun after the server is back measures
    nothing again."""
    server, url = start_mlflow_server(tmp_path)
    e = {
        **env,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    }
    mm = matmul_model(tmp_path / "mm.onnx", 16, 48, 40)
    start = len(record_lines(env))
    cmd = [
        str(BIN / "harlflow"),
        "optimize",
        str(mm),
        "--name",
        "survivor",
        "--trials",
        "8",
        "--min-trials-per-task",
        "4",
        *QUICK,
    ]
    p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(record_lines(env)) > start or p.poll() is not None, 400, "trials")
    finally:
        server.stop()
    out, err = p.communicate(timeout=600)
    assert p.returncode == 5, err[-3000:]
    assert json.loads(out)["error"] == "StoreError" and url in json.loads(out)["message"]
    measured = len(record_lines(env)) - start
    assert measured >= 4

    server, url = start_mlflow_server(tmp_path)  # the same backend store, back up
    try:
        r = harlflow({**e, "MLFLOW_TRACKING_URI": url}, *cmd[1:])
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads(r.stdout)
        assert s["trials"] == 0 and len(record_lines(env)) - start == measured
    finally:
        server.stop()


def test_s3_unreachable_retries_then_fails_and_the_local_artifact_stays(env, model):
    """An S3 endpoint that refuses connections: each attempt is logged with its backoff, then one
    line (exit 5); the verified local artifact is intact and nothing is registered."""
    e = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "HARLFLOW_S3_ATTEMPTS": "3"}
    r = harlflow(
        e,
        "optimize",
        model,
        "--name",
        "nos3",
        "--trials",
        "0",
        "--s3-uri",
        "s3://models/prod",
        *QUICK,
    )
    assert r.returncode == 5, r.stderr[-3000:]
    msg = json.loads(r.stdout)["message"]
    assert "failed after 3 attempts" in msg and "is intact" in msg
    assert "attempt 2/3 in 1 s" in r.stderr and "attempt 3/3 in 2 s" in r.stderr
    art = Path(env["HARLFLOW_HOME"]) / "nos3" / "1"
    assert art.is_dir() and verify_directory(art)["name"] == "nos3"
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{env['HARLFLOW_HOME']}/mlflow.db")
    assert c.search_model_versions("name = 'nos3'") == []


def test_unwritable_artifact_directory_is_one_line_before_any_work(env, model, tmp_path):
    if os.geteuid() == 0:  # root writes through permissions: use a file system that refuses it
        home = Path("/sys/harlflow-test-home")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        home = tmp_path / "ro" / "home"
    r = harlflow({**env, "HARLFLOW_HOME": str(home)}, "optimize", model, "--trials", "0", *QUICK)
    assert r.returncode == 5 and "is not writable" in json.loads(r.stdout)["message"]
    assert "Traceback" not in r.stderr


_PACKAGE_WITH_FULL_DISK = """
import resource, sys
from harlflow.core.targets import resolve_target
from harlflow.core import config
from tasks.importing import import_model
from tasks.packaging import package
from harlflow.core.errors import HarlflowError

m = import_model(sys.argv[1], cache_dir=config.import_cache_dir(), name="fulldisk")
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file may grow past this
try:
    package(m, resolve_target("cpu"), database_dir=config.tuning_db_dir(), home=config.home(),
            tune_summary={}, measure=False)
except HarlflowError as e:
    print(type(e).__name__, e)
    sys.exit(e.exit_code)
"""


def test_full_disk_while_packaging_leaves_nothing_half_written(env, model):
    """The disk fills up while the library is written (a file-size limit makes every write past
    4 kB fail, as a full disk does). The first write to fail is LLVM's object file, on which
    LLVM ends the process it runs in; the export runs in a forked child, so this is one line,
    StoreError, exit 5. No version directory appears, and the next run packages (removing any
    temporary directory a killed run left)."""
    r = subprocess.run(
        [sys.executable, "-c", _PACKAGE_WITH_FULL_DISK, str(model), "4000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
    )
    assert r.returncode == 5, r.stdout + r.stderr[-3000:]
    error = r.stdout.splitlines()[-1]  # after the stage's progress lines
    assert error.startswith("StoreError") and error.endswith("nothing was written"), r.stdout
    assert "(LLVM ERROR: IO failure on output stream: File too large)" in error, r.stdout
    parent = Path(env["HARLFLOW_HOME"]) / "fulldisk"
    assert not [p for p in parent.iterdir() if not p.name.startswith(".tmp-")]

    r = subprocess.run(
        [sys.executable, "-c", _PACKAGE_WITH_FULL_DISK, str(model), str(1 << 40)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert [p.name for p in parent.iterdir()] == ["1"]
    verify_directory(parent / "1")


def test_two_runs_at_once_on_one_store(env, tmp_path):
    """Two optimise runs of a new model start together on one home: both succeed with distinct
    versions, the second waits for the tuning database and reuses what the first measured,
    and the database, both artifacts and the registry are intact."""
    mm = matmul_model(tmp_path / "twin.onnx", 24, 40, 56)
    cmd = [
        str(BIN / "harlflow"),
        "optimize",
        str(mm),
        "--trials",
        "6",
        "--min-trials-per-task",
        "3",
        *QUICK,
    ]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out) for out, _ in outs]
    assert sorted(s["version"] for s in summaries) == ["1", "2"]
    assert sorted(s["trials"] for s in summaries)[0] == 0  # the later one found it all tuned
    assert any("waiting for another run" in err for _, err in outs)
    for s in summaries:
        verify_directory(Path(s["artifact"]))
    assert all(json.loads(line) for line in record_lines(env))
    from harl import database

    database.open_database(Path(env["HARLFLOW_HOME"]) / "tuning_db")  # loads
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{env['HARLFLOW_HOME']}/mlflow.db")
    assert len(c.search_model_versions("name = 'twin'")) == 2

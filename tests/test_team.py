"""A team's set-up on one machine: a Prefect server, an MLflow server, the tuning store in
PostgreSQL, and two process workers on one work pool, each with a home and a machine cache of
its own as if on machines of their own. One retune optimises two models at once; the flow run
of one is killed mid-tuning, and the next retune resumes it from the shared store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
from services import BIN, Service, embedded_env, harlflow, start_mlflow_server
from test_faults import matmul_model

from tasks.pulling import verify_directory

pytestmark = pytest.mark.slow
QUICK = ["--trials", "8", "--min-trials-per-task", "3", "--rewrite", "none", "--no-measure"]


def _count(url: str, sql: str) -> int:
    try:
        with sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://")).connect() as c:
            return c.execute(sa.text(sql)).scalar_one()
    except sa.exc.ProgrammingError:  # no table yet
        return 0


def _flow_run_process(worker: Service) -> psutil.Process | None:
    """The flow run a process worker started (its child running Prefect's engine), if any."""
    try:
        kids = psutil.Process(worker.proc.pid).children()
    except psutil.Error:
        return None
    return kids[0] if kids else None


def test_two_workers_on_one_pool_retune_two_models_and_a_killed_run_resumes(
    prefect_api, pg_store, tmp_path
):
    mlflow, mlflow_url = start_mlflow_server(tmp_path)
    team = {"PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_url,
            "HARLFLOW_TUNING_DB": pg_store}  # fmt: skip
    me = {**embedded_env(tmp_path / "me"), **team}
    pool = f"team-{os.getpid()}"
    workers = []
    try:
        r = harlflow(me, "deploy", "--pool", pool)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"deployed optimize/harlflow-{pool}" in r.stdout
        models = tmp_path / "models"
        models.mkdir()
        matmul_model(models / "alpha.onnx", 16, 40, 48)
        matmul_model(models / "beta.onnx", 24, 36, 52)
        for i in range(2):
            env = {**embedded_env(tmp_path / f"machine{i}"), **team,
                   "HARLFLOW_MACHINE_CACHE": str(tmp_path / f"machine{i}" / "cache"),
                   "PREFECT_WORKER_QUERY_SECONDS": "1"}  # fmt: skip
            cmd = ["worker", "start", "--pool", pool, "--work-queue", "optimize", "--limit", "1"]
            workers.append(Service(f"worker{i}", [str(BIN / "prefect"), *cmd], tmp_path, env))

        retune = [str(BIN / "harlflow"), "retune", str(models), "--pool", pool, *QUICK]
        first = subprocess.Popen(retune, env=me, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
        # both models tune at once; once both have measured trials, kill worker 0's flow run
        deadline, victim = time.monotonic() + 400, None
        both = "select count(distinct workload_id) from ms_records"
        while time.monotonic() < deadline and first.poll() is None:
            victim = _flow_run_process(workers[0])
            if victim is not None and _count(pg_store, both) >= 2:
                break
            time.sleep(0.3)
        assert victim is not None, "worker 0 never ran a flow run"
        for p in [victim, *victim.children(recursive=True)]:
            p.send_signal(signal.SIGKILL)
        _, err = first.communicate(timeout=600)
        killed_records = _count(pg_store, "select count(*) from ms_records")
        # one model failed: the retune says which, in one line, and exits non-zero
        assert first.returncode == 1, err[-3000:]
        failed = [n for n in ("alpha", "beta") if f"{n}: flow run crashed" in err]
        assert len(failed) == 1 and "retune: 1 of 2 models failed" in err, err[-3000:]
        redo = failed[0]
        done = ({"alpha", "beta"} - {redo}).pop()
        assert f"{done}: flow run" in err and "completed" in err
        assert _count(pg_store, "select count(distinct workload_id) from ms_records") == 2

        again = harlflow(me, "retune", str(models), "--pool", pool, *QUICK, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"{redo}: submitted flow run" in again.stderr
        rows = {
            ln.split()[0]: ln.split()[1] for ln in again.stdout.splitlines() if ln[:1].isalpha()
        }
        assert rows[redo] == "optimised" and rows[done] == "skipped"
        # nothing measured was lost: the killed run's records are all still there
        assert _count(pg_store, "select count(*) from ms_records") >= killed_records
        # the retune's MLflow run lists each model's decision, flow run and MLflow run
        from mlflow import MlflowClient

        c = MlflowClient(tracking_uri=mlflow_url)
        exp = c.get_experiment_by_name("harlflow")
        last = c.search_runs([exp.experiment_id], "tags.`harlflow.flow` = 'retune'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]  # fmt: skip
        assert last.data.tags[f"decision.{redo}"] == "optimised"
        listed = json.loads(Path(c.download_artifacts(last.info.run_id, "retune.json",
                                                      str(tmp_path))).read_text())  # fmt: skip
        assert listed[redo]["flow_run_id"] and listed[redo]["version"] == "1"
        optimise_run = c.get_run(listed[redo]["mlflow_run_id"])
        assert optimise_run.data.tags["harlflow.flow_run_id"] == listed[redo]["flow_run_id"]

        for name in ("alpha", "beta"):
            dest = tmp_path / "deploy" / name
            r = harlflow(me, "pull", name, "--dest", str(dest))
            assert r.returncode == 0, r.stderr[-2000:]
            verify_directory(dest)
            manifest = json.loads((dest / "manifest.json").read_text())
            assert manifest["name"] == name
    finally:
        for w in workers:
            w.stop()
        mlflow.stop()
    worker_logs = [Path(w.log).read_text(errors="replace") for w in workers]
    assert all("Worker 'ProcessWorker" in log for log in worker_logs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deploy", "--pool", "tuning"], "a work pool needs a Prefect server its workers reach"),
        (["retune", ".", "--pool", "tuning"], "a work pool needs a Prefect server"),
        (["deploy", "--pool", "no/slash"], "invalid work pool name 'no/slash'"),
        (["serve", "--job", "cost-model-train", "--pool", "tuning"], "--pool is for retune"),
    ],
)
def test_pool_commands_refuse_bad_input_in_one_line(args, message, monkeypatch, capsys):
    from harlflow.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harlflow: error:") and message in err and len(err.splitlines()) == 1

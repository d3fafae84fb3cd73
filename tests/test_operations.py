"""Operations on real services started here on 127.0.0.1: scheduled retuning on a Prefect server
with an MLflow server as the store, the CI gate against that server, and measurement through a
TVM RPC tracker with a server killed mid-run.

Every command runs as a user would run it: the ``harlflow`` executable in a subprocess, its own
HARLFLOW_HOME, the servers given through PREFECT_API_URL and MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import slow_mlp
from onnx import numpy_helper
from services import (
    BIN,
    harlflow,
    kill_tree,
    start_mlflow_server,
    start_rpc,
)

from harlflow.core.hashing import sha256_file

pytestmark = pytest.mark.slow
FAST = ["--trials", "4", "--min-trials-per-task", "2", "--rewrite", "none", "--no-measure"]


@pytest.fixture(scope="module")
def servers(prefect_api, tmp_path_factory):
    """A real Prefect server (the session's) and a real MLflow server (sqlite backend, proxied
    artifacts)."""
    mlflow, tracking = start_mlflow_server(tmp_path_factory.mktemp("servers"))
    yield {"PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": tracking}
    mlflow.stop()


@pytest.fixture(scope="module")
def ops_env(servers, tmp_path_factory):
    """Environment of the harlflow commands: the servers and a home of their own."""
    home = tmp_path_factory.mktemp("ops-home")
    return {
        **os.environ,
        **servers,
        "HARLFLOW_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
    }


def _mlflow(env: dict):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])


def _perturb(path: Path, seed: int) -> None:
    """A new checkpoint of the same architecture: every weight nudged, the graph unchanged."""
    m = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    for i, t in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            a = a + rng.normal(0, 1e-2, a.shape).astype(np.float32)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(m, str(path))


def _flow_runs(api: str, deployment: str) -> list[dict]:
    import httpx

    r = httpx.post(
        f"{api}/flow_runs/filter",
        timeout=10,
        json={"deployments": {"name": {"any_": [deployment]}}},
    )
    r.raise_for_status()
    return r.json()


def _wait_for_run(api: str, deployment: str, done: set[str], timeout: float, **match) -> dict:
    """The first finished flow run of ``deployment`` not in ``done`` whose fields match."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for run in _flow_runs(api, deployment):
            if run["id"] in done or any(run.get(k) != v for k, v in match.items()):
                continue
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
        time.sleep(2)
    raise AssertionError(f"no finished run of {deployment} within {timeout} s")


def _retune_runs(c) -> list:
    exp = c.get_experiment_by_name("harlflow")
    runs = c.search_runs(
        [exp.experiment_id],
        "tags.`harlflow.flow` = 'retune'",
        order_by=["attributes.start_time DESC"],
    )
    return runs


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "0s"], "invalid --interval '0s': it must be more than 0 seconds"),
        (["--interval", "6x"], "invalid --interval '6x': expected a number with s, m or h"),
        (["--cron", "every night"], "invalid --cron 'every night'"),
        (["--cron", "0 3 * * *", "--interval", "6h"], "either --cron or --interval, not both"),
        (["--job", "cost-model-train"], "takes --param KEY=VALUE, not a SOURCE"),
        (["--param", "epochs=2"], "--param is for a training job's flow"),
    ],
)
def test_serve_refuses_a_bad_schedule_before_contacting_anything(args, message, tmp_path, capsys):
    from harlflow.cli import main

    assert main(["serve", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harlflow: error:") and message in err and len(err.splitlines()) == 1


def test_schedule_fires_on_prefect_server_retunes_changed_skips_unchanged(ops_env, tmp_path):
    """`harlflow serve` registers a scheduled deployment on a real Prefect server (every hour,
    the first run 30 s after the start); when the schedule fires, the changed model is optimised
    (from the tuning records of earlier runs: no new trials) and the unchanged one is skipped, as
    recorded in the MLflow server. `prefect deployment run` then triggers the same deployment by
    hand: both unchanged, both skipped."""
    env, api = ops_env, ops_env["PREFECT_API_URL"]
    watch = tmp_path / "models"
    watch.mkdir()
    for name in ("alpha", "beta"):
        r = harlflow(env, "export-example", "tiny_mlp", "--out", str(watch / f"{name}.onnx"))
        assert r.returncode == 0, r.stderr
    _perturb(watch / "beta.onnx", seed=1)

    first = harlflow(env, "retune", str(watch), *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    c = _mlflow(env)
    v_alpha = c.search_model_versions("name = 'alpha'")
    assert len(v_alpha) == 1 and v_alpha[0].tags["source_sha256"] == sha256_file(
        watch / "alpha.onnx"
    )

    _perturb(watch / "beta.onnx", seed=2)  # a new checkpoint lands for beta only
    new_beta_sha = sha256_file(watch / "beta.onnx")
    serve = subprocess.Popen(
        [str(BIN / "harlflow"), "serve", str(watch), "--interval", "1h", *FAST],
        env=env,
        stdout=open(tmp_path / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        scheduled = _wait_for_run(api, "harlflow-retune", set(), timeout=240, auto_scheduled=True)
        assert scheduled["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]

        versions = {
            n: sorted(c.search_model_versions(f"name = '{n}'"), key=lambda v: int(v.version))
            for n in ("alpha", "beta")
        }
        assert len(versions["alpha"]) == 1 and len(versions["beta"]) == 2
        assert versions["beta"][-1].tags["source_sha256"] == new_beta_sha
        run = _retune_runs(c)[0]
        decisions = json.loads(
            Path(c.download_artifacts(run.info.run_id, "retune.json")).read_text()
        )
        assert (
            decisions["alpha"]["decision"] == "skipped"
            and decisions["beta"]["decision"] == "optimised"
        )
        assert run.data.metrics["retune/skipped"] == 1 and run.data.metrics["retune/optimised"] == 1
        # beta's architecture was tuned before: its tune stage measured nothing new
        tune = c.search_runs(
            [run.info.experiment_id],
            f"tags.mlflow.parentRunId = '{decisions['beta']['mlflow_run_id']}' "
            "and tags.mlflow.runName = 'tune'",
        )[0]
        assert tune.data.metrics["tuning/trials"] == 0
        assert tune.data.metrics["tuning/tasks_from_database"] == tune.data.metrics["tuning/tasks"]

        trig = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "retune/harlflow-retune"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert trig.returncode == 0, trig.stdout + trig.stderr
        manual = _wait_for_run(
            api, "harlflow-retune", {scheduled["id"]}, timeout=240, auto_scheduled=False
        )
        assert manual["state_type"] == "COMPLETED"
        latest = _retune_runs(c)[0]
        assert latest.info.run_id != run.info.run_id
        assert (
            latest.data.metrics["retune/skipped"] == 2
            and latest.data.metrics["retune/optimised"] == 0
        )
        assert len(c.search_model_versions("name = 'beta'")) == 2  # nothing new was published
    finally:
        kill_tree(serve.pid)


@pytest.mark.alone
def test_ci_gate_measures_production_side_by_side_and_refuses_a_slowed_version(ops_env, tmp_path):
    """The CI trigger against the MLflow server: `optimize --ci --promote` prints one JSON object.
    The first version (a deliberately slow model) takes the production alias unmeasured; a fast
    checkpoint of the same interface is measured side by side with production's artifact, pulled
    from the registry, and promoted (the ratio's interval below the limit); the slow one again is
    refused (exit 6, the interval above it, the gate's numbers in the JSON and the tags) and the
    alias stays. --promote without measuring is bad input (exit 2)."""
    fast = tmp_path / "fast.onnx"
    assert harlflow(ops_env, "export-example", "tiny_mlp", "--out", str(fast)).returncode == 0
    slow = slow_mlp(tmp_path / "slow.onnx")

    def optimize(model: Path):
        return harlflow(
            ops_env, "optimize", model, "--name", "gated-ci", "--trials", "0", "--rewrite",
            "none", "--measure-seconds", "0.3", "--ci", "--promote",
        )  # fmt: skip

    first = optimize(slow)
    assert first.returncode == 0, first.stderr[-3000:]
    ok = json.loads(first.stdout)  # stdout holds exactly one JSON object, the logs are on stderr
    assert ok["status"] == "ok" and ok["gate"] == {
        "compared": False,
        "reason": "no production version yet",
    }
    v1 = ok["published"]["mlflow"].rsplit("/", 1)[1]
    c = _mlflow(ops_env)
    assert c.get_model_version_by_alias("gated-ci", "production").version == v1

    faster = optimize(fast)
    assert faster.returncode == 0, faster.stderr[-3000:]
    g = json.loads(faster.stdout)["gate"]
    v2 = json.loads(faster.stdout)["published"]["mlflow"].rsplit("/", 1)[1]
    assert g["compared"] and g["decision"] == "promote" and g["production_version"] == v1
    assert g["ratio_ci"][1] < 1.05 and g["basis"] == "interval" and g["session"]["blocks"] >= 3
    assert c.get_model_version_by_alias("gated-ci", "production").version == v2
    tags = c.get_model_version("gated-ci", v2).tags
    assert tags["promotion"] == "promoted" and tags["gate_production_version"] == v1
    assert float(tags["gate_ratio"]) == pytest.approx(g["ratio"], rel=1e-3)

    refused = optimize(slow)
    assert refused.returncode == 6, refused.stderr[-3000:]
    verdict = json.loads(refused.stdout)
    assert verdict["status"] == "error" and verdict["error"] == "RegressionError"
    assert f"stays on v{v2}" in verdict["message"] and "side by side" in verdict["message"]
    g = verdict["gate"]
    assert g["decision"] == "refuse" and g["ratio_ci"][0] > 1.05 and g["production_version"] == v2
    assert g["new_ms"]["median_ms"] > g["production_ms"]["median_ms"]
    assert c.get_model_version_by_alias("gated-ci", "production").version == v2
    v3 = max(c.search_model_versions("name = 'gated-ci'"), key=lambda v: int(v.version))
    assert v3.version not in (v1, v2) and v3.tags["promotion"].startswith("refused")
    assert float(v3.tags["gate_ratio_ci"].split("-")[0]) > 1.05

    bad = harlflow(ops_env, "optimize", str(fast), "--promote", "--no-measure", "--ci")
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"] == "BadInputError"


def test_rpc_measurement_survives_a_server_killed_mid_run(ops_env, tmp_path):
    """`optimize --rpc` measures on two RPC servers behind a tracker; the server that accepts the
    third session is SIGKILLed while it holds it: that trial fails, tuning finishes on the other
    server, the artifact is made. (The kill comes from inside the server, see
    rpc_server_that_dies.py, so that it always lands while a trial is in flight.)"""
    # a home of its own: in the module's home the schedule test has tuned tiny_mlp already, and a
    # run would compile from those records without measuring anything
    env = {
        **ops_env,
        "HARLFLOW_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "home" / "prefect"),
    }
    tracker, rpc_servers, spec = start_rpc(tmp_path, "cpu-test", servers=2, die_on_session=3)
    try:
        model = tmp_path / "tiny.onnx"
        assert harlflow(env, "export-example", "tiny_mlp", "--out", str(model)).returncode == 0
        r = harlflow(
            env,
            "optimize",
            str(model),
            "--name",
            "over-rpc",
            "--rpc",
            spec,
            "--trials",
            "8",
            "--min-trials-per-task",
            "2",
            "--rewrite",
            "none",
            "--no-measure",
            "--seed",
            "7",
            "--ci",
        )
        assert r.returncode == 0, r.stderr[-3000:]
        dead = [s for s in rpc_servers if s.proc.poll() is not None]
        assert [s.proc.returncode for s in dead] == [-signal.SIGKILL], "one server must have died"
        assert len((tmp_path / "rpc-sessions").read_text().splitlines()) > 3  # work went on
        summary = json.loads(r.stdout)
        assert summary["trials"] >= 8 and summary["resumed_trials"] == 0
        assert 1 <= summary["trials_failed"] < summary["trials"]  # the killed session's trial(s)

        from harl.runners import count_servers, parse_rpc

        assert count_servers(parse_rpc(spec)) == 1  # the tracker dropped the dead server
        c = _mlflow(env)
        tune = c.search_runs(
            [c.get_experiment_by_name("harlflow").experiment_id],
            f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}' "
            "and tags.mlflow.runName = 'tune'",
        )[0]
        assert tune.data.params["runner"] == f"rpc {spec}"
        assert tune.data.metrics["tuning/trials_failed"] == summary["trials_failed"]
        manifest = json.loads((Path(summary["artifact"]) / "manifest.json").read_text())
        assert manifest["verification"]["output"]["within_tolerance"]
    finally:
        for s in [tracker, *rpc_servers]:
            s.stop()


def test_rpc_errors_are_one_line(ops_env, tmp_path):
    """A malformed --rpc is bad input (exit 2); an unreachable tracker fails before tuning."""
    model = tmp_path / "tiny.onnx"
    assert harlflow(ops_env, "export-example", "tiny_mlp", "--out", str(model)).returncode == 0
    r = harlflow(ops_env, "optimize", str(model), "--rpc", "localhost:9190")
    assert r.returncode == 2 and "expected HOST:PORT:KEY" in r.stderr
    from services import free_port

    r = harlflow(ops_env, "optimize", str(model), "--rpc", f"127.0.0.1:{free_port()}:k", "--ci")
    assert r.returncode == 3 and json.loads(r.stdout)["error"] == "TuningError"
    assert "is unreachable" in r.stderr and "Traceback" not in r.stderr

"""Stopping on request: SIGINT (Ctrl-C) and SIGTERM (a Prefect cancellation, a CI timeout,
``docker stop``) sent to a running ``harlflow optimize`` in each stage. The run must exit 130 /
143, keep every measured trial, leave no child process (build and measure workers, the temporary
Prefect server) and end its MLflow runs KILLED, not RUNNING.

Each case starts the real executable on a home of this module and signals it when the stage has
begun (a line in its log, or, for the import, a file the model factory writes before it stalls).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import psutil
import pytest
from services import BIN, embedded_env, mlflow_runs, record_lines, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("signals-home")
    models = tmp_path_factory.mktemp("signals-models")
    (models / "stalling.py").write_text(
        textwrap.dedent(
            """
            import os, pathlib, time

            def net():  # an export that takes minutes: the import stage is where the signal lands
                pathlib.Path(os.environ["STALL_MARKER"]).write_text("importing")
                time.sleep(600)
            """
        )
    )
    e = embedded_env(home)
    e["PYTHONPATH"] = os.pathsep.join([str(models), e.get("PYTHONPATH", "")])
    e["STALL_MARKER"] = str(models / "started")
    return e


def stop_during(env: dict, log: Path, args: list[str], started, sig: int) -> tuple[int, list]:
    """Run ``harlflow optimize ARGS``, send ``sig`` once ``started(log_text)`` holds; returns the
    exit code and the processes it had started (all must be gone)."""
    with open(log, "wb") as out:
        p = subprocess.Popen(
            [str(BIN / "harlflow"), "optimize", *args],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        wait_for(lambda: started(log.read_text(errors="replace")) or p.poll() is not None, 600, log)
        assert p.poll() is None, log.read_text()[-3000:]
        children = psutil.Process(p.pid).children(recursive=True)
        os.kill(p.pid, sig)
        code = p.wait(timeout=120)  # a hang guard, not a measurement
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return code, children


def assert_stopped(env: dict, log: Path, code: int, sig: int, children: list, model: str | None):
    text = log.read_text(errors="replace")
    assert code == 128 + sig, text[-3000:]
    assert f"harlflow: stopped by {signal.Signals(sig).name}" in text
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [c.cmdline() for c in alive]
    if model is not None:
        runs = mlflow_runs(env, model)
        assert "RUNNING" not in runs and f"optimize {model}" in runs.get("KILLED", []), runs


def test_sigint_during_import(env, tmp_path):
    """The model is imported (and checked) before any store is written: nothing to end."""
    marker = Path(env["STALL_MARKER"])
    code, children = stop_during(
        env, tmp_path / "log", ["stalling:net", "--input", "x:1x4:float32"],
        lambda _: marker.is_file(), signal.SIGINT,
    )  # fmt: skip
    assert_stopped(env, tmp_path / "log", code, signal.SIGINT, children, None)
    assert not (Path(env["HARLFLOW_HOME"]) / "mlflow.db").exists()


def test_sigterm_during_rewrite(env, tmp_path, bundled):
    code, children = stop_during(
        env, tmp_path / "log", [str(bundled("squeezenet_small")), "--trials", "8", "--no-measure"],
        lambda t: "rewrite: greedy over" in t, signal.SIGTERM,
    )  # fmt: skip
    assert_stopped(env, tmp_path / "log", code, signal.SIGTERM, children, "squeezenet_small")
    assert "rewrite" in mlflow_runs(env, "squeezenet_small")["KILLED"]


def test_sigint_during_tuning_keeps_every_measured_trial(env, tmp_path, bundled):
    before = len(record_lines(env))
    code, children = stop_during(
        env, tmp_path / "log",
        [str(bundled("small_cnn")), "--trials", "200", "--rewrite", "none", "--no-measure"],
        lambda t: "tuning: " in t and "trials |" in t, signal.SIGINT,
    )  # fmt: skip
    assert_stopped(env, tmp_path / "log", code, signal.SIGINT, children, "small_cnn")
    lines = record_lines(env)
    assert len(lines) > before and all(json.loads(line) for line in lines)
    assert "tune" in mlflow_runs(env, "small_cnn")["KILLED"]


def test_sigterm_during_packaging_leaves_no_artifact(env, tmp_path, bundled):
    code, children = stop_during(
        env, tmp_path / "log",
        [str(bundled("tiny_mlp")), "--trials", "0", "--rewrite", "none", "--name", "packaged"],
        lambda t: "compiling packaged" in t, signal.SIGTERM,
    )  # fmt: skip
    assert_stopped(env, tmp_path / "log", code, signal.SIGTERM, children, "packaged")
    assert "package" in mlflow_runs(env, "packaged")["KILLED"]
    versions = Path(env["HARLFLOW_HOME"]) / "packaged"
    assert not versions.exists() or not [p for p in versions.iterdir() if p.name.isdigit()]


@pytest.fixture(scope="module")
def bundled(env, tmp_path_factory):
    """ONNX files of the bundled examples (exported once)."""
    out = tmp_path_factory.mktemp("signals-onnx")

    def path(name: str) -> Path:
        dest = out / f"{name}.onnx"
        if not dest.is_file():
            r = subprocess.run(
                [str(BIN / "harlflow"), "export-example", name, "--out", str(dest)],
                env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
        return dest

    return path

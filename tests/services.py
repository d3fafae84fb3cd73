"""Real services on 127.0.0.1 for the operations tests: a Prefect server, an MLflow server, a TVM
RPC tracker with servers. Each runs in its own process group and is stopped with its whole tree."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def embedded_env(home: Path) -> dict[str, str]:
    """The environment of harlflow commands on the embedded stores (sqlite MLflow, local
    artifacts, a temporary Prefect) of ``home``: no server or S3 endpoint from the outside."""
    e = {**os.environ, "HARLFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    for k in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL"):
        e.pop(k, None)
    return e


def record_lines(env: dict) -> list[bytes]:
    """The tuning database's record lines in the home of ``env`` (one per measured trial)."""
    path = Path(env["HARLFLOW_HOME"]) / "tuning_db" / "database_tuning_record.json"
    return path.read_bytes().splitlines() if path.is_file() else []


def mlflow_runs(env: dict, model_name: str) -> dict[str, list[str]]:
    """Status -> run names of the MLflow runs of ``optimize <model_name>`` (parent and stages)."""
    from mlflow import MlflowClient

    home = Path(env["HARLFLOW_HOME"])
    c = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    exp = c.get_experiment_by_name("harlflow")
    parents = {
        r.info.run_id
        for r in c.search_runs(
            [exp.experiment_id], f"tags.mlflow.runName = 'optimize {model_name}'"
        )
    }
    out: dict[str, list[str]] = {}
    for r in c.search_runs([exp.experiment_id], max_results=1000):
        if r.info.run_id in parents or r.data.tags.get("mlflow.parentRunId") in parents:
            out.setdefault(r.info.status, []).append(r.data.tags["mlflow.runName"])
    return out


def wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (TVM's servers leave popen workers otherwise)."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


class Service:
    """A started process, its log file, and a way to stop it."""

    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = open(self.log, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> float:
        """Poll ``ready`` until true; the seconds it took. Fails with the log's tail."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                break
            try:
                if ready():
                    return time.monotonic() - t0
            except Exception:
                pass
            time.sleep(0.5)
        self.stop()
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} did not become ready in {timeout} s:\n{tail}")

    def stop(self) -> None:
        kill_tree(self.proc.pid)
        self._log_file.close()


def harlflow(env: dict, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """The ``harlflow`` executable with these arguments, as a user or CI job runs it."""
    return subprocess.run(
        [str(BIN / "harlflow"), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=2).status_code == 200


def start_prefect_server(tmp: Path) -> tuple[Service, str]:
    port = free_port()
    env = {
        "PREFECT_HOME": str(tmp / "prefect-server"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    s = Service(
        "prefect-server",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        tmp,
        env,
    )
    api = f"http://127.0.0.1:{port}/api"
    s.wait_until(lambda: http_ok(f"{api}/health"), timeout=180)
    return s, api


def start_mlflow_server(tmp: Path) -> tuple[Service, str]:
    port = free_port()
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    s = Service(
        "mlflow-server",
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow-server.db'}",
            "--artifacts-destination",
            str(tmp / "mlflow-artifacts"),
        ],
        tmp,
        env,
    )
    url = f"http://127.0.0.1:{port}"
    s.wait_until(lambda: http_ok(f"{url}/health"), timeout=180)
    return s, url


def start_rpc(
    tmp: Path, key: str, servers: int, die_on_session: int | None = None
) -> tuple[Service, list[Service], str]:
    """A tracker and ``servers`` RPC servers registered under ``key``; returns HOST:PORT:KEY.

    With ``die_on_session=N`` the servers are ``rpc_server_that_dies.py``: real TVM RPC servers
    counting accepted sessions together, and the one that accepts the N-th kills itself
    (SIGKILL) with that trial in flight."""
    from harl.runners import count_servers, parse_rpc

    port = free_port()
    tracker = Service(
        "rpc-tracker",
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        tmp,
    )
    spec = f"127.0.0.1:{port}:{key}"
    tracker.wait_until(lambda: socket.create_connection(("127.0.0.1", port), 1).close() is None, 60)
    if die_on_session is None:
        server = [sys.executable, "-m", "tvm.exec.rpc_server"]
    else:
        server = [
            sys.executable,
            str(Path(__file__).with_name("rpc_server_that_dies.py")),
            "--session-count",
            str(tmp / "rpc-sessions"),
            "--die-on-session",
            str(die_on_session),
        ]
    started = []
    for i in range(servers):
        p = free_port()
        started.append(
            Service(
                f"rpc-server-{i}",
                [
                    *server,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(p),
                    "--port-end",
                    str(p + 1),
                    "--tracker",
                    f"127.0.0.1:{port}",
                    "--key",
                    key,
                ],
                tmp,
            )
        )
    tracker.wait_until(lambda: count_servers(parse_rpc(spec)) == servers, 120)
    return tracker, started, spec

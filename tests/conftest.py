"""Shared fixtures: an isolated HARLFLOW_HOME, a Prefect test harness, an S3 endpoint (moto)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports Prefect or MLflow: every store of the session lives in a temp home.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="harlflow-tests-"))
os.environ["HARLFLOW_HOME"] = str(_SESSION_HOME / "home")
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
# what the machine measured about itself (a target's profile) outlives the session, as it would
# for a user: the suite's workers measure it once per machine, not once per home
os.environ["HARLFLOW_MACHINE_CACHE"] = str(Path(tempfile.gettempdir()) / "harlflow-tests-machine")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
# distinctive credentials, so tests can prove they never reach a store, a log or a manifest
AWS_ACCESS_KEY_ID = os.environ["AWS_ACCESS_KEY_ID"] = "AKIAHARLFLOWTEST0001"
AWS_SECRET = os.environ["AWS_SECRET_ACCESS_KEY"] = "harlflow-test-secret-7f3a9c"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def session_home() -> Path:
    return Path(os.environ["HARLFLOW_HOME"])


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server for the session's command-line runs that are not about Prefect's
    temporary server: each command on the embedded default starts its own (~9 s a run here);
    tests/test_signals.py keeps testing that path."""
    from services import start_prefect_server

    server, api = start_prefect_server(tmp_path_factory.mktemp("prefect-api"))
    yield api
    server.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server for the session (tests/postgres.py)."""
    import postgres as pg

    server = pg.start(tmp_path_factory.mktemp("pgdata"))
    yield server
    if server.server is not None:
        server.server.cleanup()


@pytest.fixture
def pg_store(postgres):
    """A database of this test's own on that server, as a tuning-store URL; dropped after."""
    url = postgres.create()
    yield url
    postgres.drop(url)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server over real HTTP on loopback; boto3 finds it through AWS_ENDPOINT_URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = url
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="models")
    yield url
    server.stop()
    os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    """The tiny MLP example as an ONNX file (exported by the CLI, as a user would)."""
    from harlflow.cli import main

    path = tmp_path / "tiny.onnx"
    assert main(["export-example", "tiny_mlp", "--out", str(path)]) == 0
    return path


# ------------------------------------------------------------------ tests that time, run alone
# The suite runs on two pytest-xdist workers (the README's test command). A test marked
# ``alone`` times runtimes side by side (or tunes on a short time budget) and asserts on what it
# measured; with another test compiling on the other core its intervals widened past any limit
# (a fast model's ratio to a 2 000x slower one came out with an interval up to 2.7). So every
# test holds a shared lock on one file from its setup to its teardown and an ``alone`` test
# holds it exclusively: it waits for the other worker's test to end, and the other worker waits
# for it. A second file is a turnstile that keeps a waiting ``alone`` test from being starved by
# the next shared holders.
def _lock_files() -> tuple[Path, Path] | None:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
    if run is None:
        return None  # one process: nothing runs beside the test
    base = Path(tempfile.gettempdir()) / f"harlflow-tests-{run}"
    return base.with_suffix(".turnstile"), base.with_suffix(".lock")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import fcntl

    files = _lock_files()
    if files is None:
        yield
        return
    alone = item.get_closest_marker("alone") is not None
    with open(files[0], "a") as turnstile, open(files[1], "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)

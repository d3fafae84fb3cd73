"""MLflow helpers: one parent run per flow run, one nested child run per stage.

Runs are driven through ``MlflowClient`` with explicit run ids rather than MLflow's thread-local
"active run", because Prefect may run a task on another thread than its flow.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harlflow.core import config, signals
from harlflow.core.errors import StoreError, first_line
from harlflow.core.locks import file_lock

EXPERIMENT = "harlflow"
HOST, PID = "harlflow.host", "harlflow.pid"  # who runs a run, to close it if that process died


def _host() -> str:
    """This machine and pid namespace: containers that share a hostname (host networking) have
    pid namespaces of their own, and a pid is only meaningful inside its namespace."""
    try:
        return f"{socket.gethostname()} pidns:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (not Linux)
        return socket.gethostname()


def client() -> StoreClient:
    """An ``MlflowClient`` on the configured store (sqlite under the home by default)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow import MlflowClient

    uri = config.mlflow_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return StoreClient(MlflowClient(tracking_uri=uri), uri)
    # the first client creates and migrates the sqlite file: two runs doing that at once fail
    db = Path(uri.removeprefix("sqlite:///"))
    with file_lock(db.with_name(db.name + ".lock"), f"the MLflow store {uri}"):
        c = StoreClient(MlflowClient(tracking_uri=uri), uri)
        c.search_registered_models(max_results=1)  # the registry's store, too
    return c


# MLflow's answers about the data (not about the store being reachable): left as they are
_ANSWERS = {
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_PARAMETER_VALUE",
    "NOT_FOUND",
    "BAD_REQUEST",
    "INVALID_STATE",
}


class StoreClient:
    """An ``MlflowClient`` whose store failures (server down after MLflow's own HTTP retries,
    database locked, disk full) are :class:`StoreError`s naming the store, so that the CLI
    reports them in one line with exit code 5 instead of a traceback."""

    def __init__(self, client, uri: str):
        self._client, self.uri = client, uri

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            try:
                return attr(*args, **kwargs)
            except MlflowException as e:
                if e.error_code in _ANSWERS:
                    raise
                raise StoreError(
                    f"MLflow store {self.uri}: {name} failed: {first_line(e)}"
                ) from None
            except Exception as e:
                if not isinstance(e, OSError) and not type(e).__module__.startswith(
                    ("sqlalchemy", "requests", "urllib3")
                ):
                    raise  # a bug, not the store: keep its traceback
                raise StoreError(
                    f"MLflow store {self.uri}: {name} failed: {first_line(e)}"
                ) from None

        return call


def experiment_id(c, name: str = EXPERIMENT) -> str:
    """The experiment's id, created with an artifact root under the home on the embedded store."""
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # not "MLFLOW_TRACKING_URI" in os.environ: mlflow.set_tracking_uri exports that itself
        embedded = config.mlflow_tracking_uri() == config.embedded_tracking_uri()
        return c.create_experiment(
            name, artifact_location=config.mlflow_artifact_root() if embedded else None
        )
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(
            f"MLflow tracking store {config.mlflow_tracking_uri()} is unreachable: "
            f"{type(e).__name__}: {first_line(e)}"
        ) from None


def _str(v: Any) -> str:
    return str(v)[:6000]  # MLflow's param value limit


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    c.log_batch(run_id, params=[Param(k, _str(v)) for k, v in params.items() if v is not None])


def log_metrics(c, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None],
    )


def register_version(
    c, name: str, run_id: str, artifact_path: str, *, description: str, tags: dict[str, str]
) -> str:
    """Register what ``run_id`` logged under ``artifact_path`` as a new version of the registered
    model ``name`` (created, with ``description``, the first time); the version number.
    MLflow's registry takes arbitrary files this way (``mlflow.register_model`` on plain
    artifacts fails and leaves an empty registered model behind)."""
    try:
        try:
            c.get_registered_model(name)
        except Exception:
            try:
                c.create_registered_model(name, description=description)
            except Exception as e:  # another run (a pool's other worker) created it just now
                if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                    raise
        mv = c.create_model_version(
            name,
            source=f"{c.get_run(run_id).info.artifact_uri}/{artifact_path}",
            run_id=run_id,
            tags=tags,
        )
        return str(mv.version)
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"registering {name} in MLflow failed: {e}") from None


@contextlib.contextmanager
def run(
    c, name: str, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None
) -> Iterator[str]:
    """A run that ends FINISHED, or FAILED (with the error as a tag) if the block raises, or
    KILLED if the process was asked to stop (:mod:`harlflow.core.signals`).

    A top-level run first closes the runs that processes on this host left RUNNING when they
    were killed (see :func:`close_orphans`)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    all_tags = {MLFLOW_RUN_NAME: name, HOST: _host(), PID: str(os.getpid()), **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    else:
        close_orphans(c)
    r = c.create_run(experiment_id(c), tags=all_tags, run_name=name)
    try:
        yield r.info.run_id
    except BaseException as e:
        # stopped on request (SIGINT/SIGTERM, Prefect's TerminationSignal): KILLED, not FAILED
        stopped = isinstance(e, KeyboardInterrupt) or signals.requested() or hasattr(e, "signal")
        try:
            c.set_tag(r.info.run_id, "error", _str(f"{type(e).__name__}: {e}"))
            c.set_terminated(r.info.run_id, status="KILLED" if stopped else "FAILED")
        except StoreError:  # the store itself failed: report the original error, not this
            pass
        raise
    c.set_terminated(r.info.run_id, status="FINISHED")


def close_orphans(c) -> list[str]:
    """Mark KILLED the runs left RUNNING by harlflow processes on this host (and pid namespace)
    that no longer exist.

    A process killed with ``kill -9`` (or by the OOM killer) cannot end its MLflow runs; without
    this they stay RUNNING forever in the UI. A process is taken as the run's owner only if it
    exists and started before the run did (a pid can be reused). Returns the ids closed."""
    import psutil
    from mlflow.entities import RunStatus

    host = _host()
    running = c.search_runs(
        [experiment_id(c)],
        f"attributes.status = 'RUNNING' and tags.`{HOST}` = '{host}'",
        max_results=1000,
    )
    closed = []
    for r in running:
        try:
            pid = int(r.data.tags.get(PID, ""))
            alive = psutil.Process(pid).create_time() * 1000 <= r.info.start_time + 1000
        except (ValueError, psutil.Error):
            alive = False
        if alive:
            continue
        c.set_tag(
            r.info.run_id,
            "error",
            f"process {r.data.tags.get(PID)} on {host} ended without closing this run "
            "(killed?); closed by the next harlflow run",
        )
        c.set_terminated(r.info.run_id, status=RunStatus.to_string(RunStatus.KILLED))
        closed.append(r.info.run_id)
    if closed:
        print(f"closed {len(closed)} MLflow run(s) left RUNNING by killed harlflow processes")
    return closed


def find_run(c, tag: str, value: str) -> str | None:
    """The id of the newest run of the experiment with this tag value, or None."""
    found = c.search_runs(
        [experiment_id(c)], f"tags.`{tag}` = '{value}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    return found[0].info.run_id if found else None


def load_dict(c, run_id: str, path: str) -> Any:
    """A JSON artifact of a run (as ``log_dict`` wrote it), read back."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = c.download_artifacts(run_id, path, tmp)
        return json.loads(Path(local).read_text())

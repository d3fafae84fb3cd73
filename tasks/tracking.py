"""MLflow helpers: one parent run per flow run, one nested child run per stage.

Runs are driven through ``MlflowClient`` with explicit run ids rather than MLflow's thread-local
"active run", because Prefect may run a task on another thread than its flow.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from harlflow import config
from harlflow.errors import StoreError

EXPERIMENT = "harlflow"


def client():
    """An ``MlflowClient`` on the configured store (sqlite under the home by default)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow import MlflowClient

    uri = config.mlflow_tracking_uri()
    if uri.startswith("sqlite:///"):
        config.home().mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str = EXPERIMENT) -> str:
    """The experiment's id, created with an artifact root under the home on the embedded store."""
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        embedded = "MLFLOW_TRACKING_URI" not in os.environ
        return c.create_experiment(
            name, artifact_location=config.mlflow_artifact_root() if embedded else None
        )
    except Exception as e:
        raise StoreError(
            f"MLflow tracking store {config.mlflow_tracking_uri()} is unreachable: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
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


@contextlib.contextmanager
def run(c, name: str, *, parent_run_id: str | None = None,
        tags: dict[str, str] | None = None) -> Iterator[str]:  # fmt: skip
    """A run that ends FINISHED, or FAILED (with the error as a tag) if the block raises."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    r = c.create_run(experiment_id(c), tags=all_tags, run_name=name)
    try:
        yield r.info.run_id
    except BaseException as e:
        c.set_tag(r.info.run_id, "error", _str(f"{type(e).__name__}: {e}"))
        c.set_terminated(r.info.run_id, status="FAILED")
        raise
    c.set_terminated(r.info.run_id, status="FINISHED")

"""Retunes fanned out over a Prefect work pool: ``harlflow deploy --pool NAME`` puts the
``optimize`` and ``retune`` flows on a process work pool, and a retune with a pool submits one
``optimize`` flow run per changed model (``run_deployment``) and waits for them all.

Prefect does the scheduling: each machine runs a worker,
``prefect worker start --pool NAME --work-queue optimize --limit 1`` (one tuning at a time, so
two never share a machine's cores), and takes the next flow run when it is free. The workers
share the team's stores through their environment: ``HARLFLOW_TUNING_DB`` (the tuning records),
``MLFLOW_TRACKING_URI`` (runs and the registry) and ``PREFECT_API_URL``.

The ``retune`` deployment has a queue of its own (``retune``): a retune only waits for the
flow runs it submitted, and on the ``optimize`` queue it would hold a tuning worker's one slot
while it waits. ``harlflow retune SOURCE --pool NAME`` runs that coordinator in the command's
own process instead.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from flows.settings import RunSettings
from harlflow.core.errors import BadInputError, StoreError, first_line

OPTIMIZE_QUEUE = "optimize"
RETUNE_QUEUE = "retune"
POLL_S = 2.0
"""how often a retune asks the Prefect server about the flow runs it waits for"""
ROOT = Path(__file__).resolve().parent.parent
"""the project's directory: the deployments' code, as every worker's machine has it"""


def deployment_name(pool: str) -> str:
    return f"harlflow-{pool}"


def deploy(pool: str, log=print) -> list[str]:
    """Create the process work pool ``pool`` if it does not exist and deploy ``optimize``
    (queue ``optimize``) and ``retune`` (queue ``retune``) to it; returns the deployments'
    names (``flow/deployment``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import Flow
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
            if found.type != "process":
                raise BadInputError(
                    f"work pool {pool!r} exists with type {found.type!r}; harlflow's flows run "
                    "on a 'process' pool: choose another name"
                )
            log(f"work pool {pool!r} (process) exists")
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="harlflow: optimize flow runs, one per worker at a time",
                )
            )
            log(f"created work pool {pool!r} (process)")
    names = []
    for entry, queue, params in (
        ("flows/optimize.py:optimize", OPTIMIZE_QUEUE, {}),
        ("flows/retune.py:retune", RETUNE_QUEUE, {"pool": pool}),
    ):
        # loaded from the entry point, as the workers will load it (and no import cycle
        # with flows.retune, which imports this module)
        fl = Flow.from_source(source=str(ROOT), entrypoint=entry)
        fl.deploy(
            name=deployment_name(pool),
            work_pool_name=pool,
            work_queue_name=queue,
            parameters=params,
            build=False,
            push=False,
            print_next_steps=False,
            ignore_warnings=True,  # "a process pool: try .serve": a pool is the point here
        )
        names.append(f"{fl.name}/{deployment_name(pool)}")
        log(f"deployed {names[-1]} to pool {pool!r}, queue {queue!r}")
    return names


def submit(pool: str, models: list, settings: RunSettings, log) -> dict[str, Any]:
    """One ``optimize`` flow run per model on the pool's deployment; returns flow run ids by
    model name. ``settings`` go as given (unresolved): each worker resolves ``cpu`` to its
    own host."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"optimize/{deployment_name(pool)}"
    params = dataclasses.asdict(settings)
    for m in models:  # all checked before any flow run is submitted
        if str(m.path).startswith("s3://") or m.origin.startswith("s3://"):
            raise BadInputError(
                f"retune --pool: {m.origin} is in S3; give workers a directory they all see"
            )
    runs = {}
    for m in models:
        try:
            fr = run_deployment(
                name,
                parameters={"model": str(m.path), "settings": params, "name": m.name},
                timeout=0,
                flow_run_name=f"optimize {m.name}",
                tags=["harlflow-retune"],
            )
        except ObjectNotFound:
            raise BadInputError(
                f"no deployment {name!r}: run 'harlflow deploy --pool {pool}' first"
            ) from None
        runs[m.name] = fr.id
        log(f"{m.name}: submitted flow run {fr.id} to pool {pool!r}")
    return runs


def wait(runs: dict[str, Any], log, timeout_s: float | None = None) -> dict[str, Any]:
    """Wait until every flow run is final (completed, failed, crashed, cancelled); returns
    their final states by model name. Logs each as it ends."""
    from prefect.client.orchestration import get_client

    pending, done = dict(runs), {}
    start = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            for name, fid in list(pending.items()):
                try:
                    fr = client.read_flow_run(fid)
                except Exception as e:  # noqa: BLE001 - the server restarting: ask again
                    log(f"{name}: reading flow run {fid} failed ({first_line(e)}); retrying")
                    continue
                if fr.state is not None and fr.state.is_final():
                    done[name] = fr.state
                    del pending[name]
                    log(f"{name}: flow run {fid} {fr.state.type.value.lower()}")
            if pending:
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise StoreError(
                        f"retune: {len(pending)} flow runs not finished after {timeout_s:.0f} s "
                        f"(is a worker polling the pool?): {', '.join(pending)}"
                    )
                time.sleep(POLL_S)
    return done

"""The offline training jobs as Prefect flows, run by their commands and schedulable like
``retune`` (``harlflow serve --job NAME``, :mod:`flows.jobs`):

- ``dataset-generate``: measure the workload suite on each target into the cost model's dataset;
- ``cost-model-train``: fine-tune the team's cost model on the store's tuning records (or on
  dataset files): scheduled every night, it is the team's cost-model refresh;
- ``harl-train``: pre-train HARL's parameter-level agent in imagination;
- ``rewrite-train``: train a rewrite agent (X-RLflow or RLFlow) on a set of models.

Each flow runs its stages as Prefect tasks (:mod:`tasks.stages`); each stage checks its
parameters before any work (the check its command runs before Prefect starts). A flow makes one
MLflow run, with the file it
produced registered as a new version of a registered model (``harlflow-dataset``,
``harlflow-cost-model``, ``harl-agent``, ``xrlflow-agent`` / ``rlflow-agent``). Parameters are
plain JSON values, so that a deployment can hold them; paths left out default to the home's.
Progress goes to the flow run's log.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger

from harlflow.core import config
from harlflow.core.targets import target_key
from tasks import cost_model, rewrite_training
from tasks.datasets import DEFAULT_TARGETS, REGISTERED_NAME, check_generate
from tasks.stages import (
    cost_model_task,
    generate_task,
    harl_agent_task,
    load_graphs_task,
    log_dataset_task,
    rewrite_agent_task,
    store_records_task,
)


@flow(name="dataset-generate")
def dataset_generate(
    out: str | None = None,
    work: str | None = None,
    targets: list[str | dict[str, Any]] | None = None,
    units: list[str] | None = None,
    trials_per_task: int = 32,
    warm_up: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure the suite's ``units`` (default: all) on ``targets`` (default: the three
    stand-ins) into ``out``; run again, it resumes. Returns counts per target, the MLflow run
    and the dataset's registered version."""
    log = get_run_logger().info
    out = out or str(config.dataset_path())
    work = work or str(config.dataset_work_dir())
    targets = targets or list(DEFAULT_TARGETS)
    resolved = check_generate(
        targets, units=units, trials_per_task=trials_per_task, warm_up=warm_up
    )
    summary = generate_task(
        out, work, resolved, units=units, trials_per_task=trials_per_task, warm_up=warm_up,
        seed=seed, on_progress=log,
    )  # fmt: skip
    params = {
        "out": out,
        "work": work,
        "targets": ",".join(target_key(t) for t in resolved),
        "units": ",".join(units) if units else "suite",
        "trials_per_task": trials_per_task,
        "warm_up": warm_up,
        "seed": seed,
    }
    summary["version"] = log_dataset_task(out, summary, params)
    log(f"registered {REGISTERED_NAME} version {summary['version']} "
        f"(run {summary['run_id']})")  # fmt: skip
    return {"path": out, **summary}


@flow(name="cost-model-train")
def cost_model_train(
    datasets: list[str] | None = None,
    start: str = "transfer",
    out: str | None = None,
    epochs: int | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    to_registry: bool = True,
    recipe: str = "full",
) -> dict[str, Any]:
    """Fine-tune the cost model (``start``: ``"transfer"``, ``"scratch"`` or a model file) on
    ``datasets``, default the store's tuning records collected first; saved to ``out``
    (default: the team's model, which ``--cost-model transfer`` then uses) and, with
    ``to_registry``, logged and registered in MLflow."""
    log = get_run_logger().info
    # checked here, not only by the training stage: the store's records are collected before it
    cost_model.check_train(
        datasets or (), start=start, epochs=epochs, holdout=holdout, recipe=recipe
    )
    files = datasets or [str(store_records_task(log=log))]
    result = cost_model_task(
        files, start=start, out=out, epochs=epochs, holdout=holdout, seed=seed,
        register=to_registry, log=log, recipe=recipe,
    )  # fmt: skip
    return dataclasses.asdict(result)


@flow(name="harl-train")
def harl_train(
    out: str | None = None,
    units: list[str] | None = None,
    held_out: list[str] | None = None,
    target: str | dict[str, Any] | None = None,
    cost_model: str = "transfer",
    start: str | None = None,
    epochs: int = 2,
    rounds: int = 6,
    seed: int = 0,
) -> dict[str, Any]:
    """Pre-train HARL's agent on the suite's ``units`` against ``cost_model``, scored on
    ``held_out`` networks before and after; saved to ``out`` (default: where HARL runs start
    from) and registered."""
    return harl_agent_task(
        out, units=units, held_out=held_out, target=target, cost_model=cost_model, start=start,
        epochs=epochs, rounds=rounds, seed=seed, log=get_run_logger().info,
    )  # fmt: skip


@flow(name="rewrite-train")
def rewrite_train(
    models: list[str],
    agent: str = "xrlflow",
    oracle: str = "tvm",
    target: str | dict[str, Any] | None = None,
    out: str | None = None,
    iterations: int = 30,
    episodes: int = 4,
    max_steps: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the ``agent`` rewrite agent on ``models`` (as ``optimize`` takes them) judged by
    ``oracle``; saved to ``out`` (default: where ``--rewrite AGENT`` finds it) and
    registered."""
    from tasks.rewrite_methods import make_oracle

    # checked here, not only by the training stage: the models are imported before it
    rewrite_training.check(agent, iterations=iterations, episodes=episodes, max_steps=max_steps)
    graphs = load_graphs_task(models, seed=seed)
    judge = make_oracle(oracle, target, config.tuning_db() if oracle == "tvm" else None)
    default = config.rlflow_agent_path() if agent == "rlflow" else config.xrlflow_agent_path()
    return rewrite_agent_task(
        graphs, agent, judge, out=out or str(default), iterations=iterations, episodes=episodes,
        max_steps=max_steps, seed=seed, log=get_run_logger().info,
    )  # fmt: skip

"""The ``optimize`` flow: import → rewrite → tune → verify + package → publish, one MLflow run
per stage under one parent run.

The flow orchestrates: each stage's logic and its MLflow logging live in ``tasks/``.
"""

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.budget import COMPILE_S_PER_TASK, RunClock
from flows.settings import RunSettings
from harlflow.core.config import (
    harl_agent_path,
    home,
    rewrite_dir,
    rlflow_agent_path,
    tuning_db,
    validate_name,
    xrlflow_agent_path,
)
from harlflow.core.durations import format_duration
from harlflow.core.signature import TensorSpec
from tasks import tracking
from tasks.importing import default_name, log_import
from tasks.packaging import log_package, versions
from tasks.report import run_summary
from tasks.rewriting import log_rewrite
from tasks.stages import import_task, package_task, publish_task, rewrite_task, tune_task
from tasks.tuning import log_tuning

FLOW_RUN_TAG = "harlflow.flow_run_id"
"""the optimize run's Prefect flow run, on its MLflow parent run: a pool's retune finds it"""


@flow(name="optimize")
def optimize(
    model: str,
    settings: RunSettings | None = None,
    name: str | None = None,
    inputs: list[TensorSpec] | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Optimise one model end to end; returns a summary (artifact, version, latencies)."""
    logger = get_run_logger()
    s = (settings or RunSettings()).checked()
    clock = RunClock(s.time_budget_s)  # --time-budget bounds import to package
    name = validate_name(name or default_name(model))
    c = tracking.client()
    tags = {"model": name, FLOW_RUN_TAG: str(flow_run.id or "")}
    with tracking.run(c, f"optimize {name}", tags=tags) as parent:
        tracking.log_params(
            c,
            parent,
            {
                "model": model,
                "name": name,
                "target": json.dumps(s.target),
                "budget": s.trials,
                "time_budget_s": s.time_budget_s,
                "strategy": s.strategy,
                "task_scheduler": s.task_scheduler,
                "rewrite": s.rewrite,
                "rewrite_oracle": s.rewrite_oracle,
                "promote": s.promote,
                "cost_model": s.cost_model,
                "seed": s.seed,
                "s3_uri": s.s3_uri,
                "rpc": s.rpc,
                **{f"version_{k}": v for k, v in versions().items()},
            },
        )

        with tracking.run(c, "import", parent_run_id=parent) as rid, clock.stage("import"):
            imported = import_task(model, inputs, checkpoint, s.seed, name)
            log_import(c, rid, imported)
        logger.info(
            "imported %s: %d nodes, inputs %s",
            name,
            imported.num_nodes,
            ", ".join(map(str, imported.inputs)),
        )

        with tracking.run(c, "rewrite", parent_run_id=parent) as rid, clock.stage("rewrite"):
            rewritten = rewrite_task(
                imported,
                s.rewrite,
                work_dir=rewrite_dir(),
                agent_path=xrlflow_agent_path(),
                rlflow_agent_path=rlflow_agent_path(),
                oracle=s.rewrite_oracle,
                target=s.target,
                database_dir=tuning_db(),
                seed=s.seed,
                time_budget_s=clock.rewrite_s(),
                log=logger.info,
            )
            log_rewrite(c, rid, rewritten)

        with tracking.run(c, "tune", parent_run_id=parent) as rid, clock.stage("tune"):
            spec = s.tuning_spec(
                time_budget_s=clock.tune_s(s.measure_seconds if s.measure else 0.0),
                reserve_s_per_task=COMPILE_S_PER_TASK if s.time_budget_s else 0.0,
                agent_path=harl_agent_path(),
            )
            tuned = tune_task(
                rewritten.model,
                s.target,
                database_dir=tuning_db(),
                spec=spec,
                rpc=s.rpc,
                log=logger.info,
            )
            log_tuning(c, rid, tuned, s.min_trials_per_task, harl_agent_path())

        with tracking.run(c, "package", parent_run_id=parent) as rid, clock.stage("package"):
            artifact = package_task(
                rewritten.model,
                s.target,
                database_dir=tuning_db(),
                home=home(),
                tune_summary=tuned.summary(),
                seed=s.seed,
                measure=s.measure,
                max_seconds=s.measure_seconds,
                measure_untuned=s.measure_untuned,
                log=logger.info,
            )
            log_package(c, rid, artifact)

        with tracking.run(c, "publish", parent_run_id=parent) as rid, clock.stage("publish"):
            published = publish_task(
                rid,
                artifact,
                s.s3_uri,
                promote=s.promote,
                max_regression=s.max_regression,
                measure_seconds=s.measure_seconds,
                log=logger.info,
            )

        summary = run_summary(imported, rewritten, tuned, artifact, published, parent)
        summary |= clock.summary()
        summary["time_budget"] = format_duration(s.time_budget_s) if s.time_budget_s else None
        tracking.log_metrics(c, parent, {f"speedup/{k}": v for k, v in summary["speedup"].items()})
        tracking.log_metrics(c, parent, {f"time/{k}_s": v for k, v in clock.seconds.items()})
        logger.info(
            "%s in %.0f s%s: %s",
            name,
            summary["total_seconds"],
            f" of a {s.time_budget_s:.0f} s budget" if s.time_budget_s else "",
            ", ".join(f"{k} {v:.0f} s" for k, v in clock.seconds.items()),
        )
        c.set_tag(parent, "artifact", artifact.directory)
        c.log_dict(parent, summary, "summary.json")  # what a pool's retune reads back
        return summary

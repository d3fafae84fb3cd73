"""The ``optimize`` flow: import → rewrite → tune → verify + package → publish, one MLflow run
per stage.

The flow orchestrates and logs; each stage's logic lives in ``tasks/``.
"""

import dataclasses
import json
from typing import Any

from prefect import flow, get_run_logger

from harl.budget import format_duration
from harlflow.core.targets import resolve_target
from harlflow.core.config import (
    harl_agent_path,
    home,
    rewrite_dir,
    tuning_db_dir,
    validate_name,
    xrlflow_agent_path,
)
from harlflow.core.signature import TensorSpec
from tasks import tracking
from tasks.importing import default_name, import_task, log_import
from tasks.packaging import log_package, package_task, versions
from tasks.publishing import promote as promote_version
from tasks.publishing import publish_task
from tasks.rewriting import log_rewrite, rewrite_task
from tasks.tuning import log_tuning, tune_task


@flow(name="optimize")
def optimize(
    model: str,
    name: str | None = None,
    trials: int = 64,
    time_budget_s: float | None = None,
    strategy: str = "evolutionary",
    target: str | dict | None = None,
    s3_uri: str | None = None,
    inputs: list[TensorSpec] | None = None,
    checkpoint: str | None = None,
    seed: int = 0,
    min_trials_per_task: int = 4,
    measure: bool = True,
    measure_seconds: float = 10.0,
    rewrite: str = "greedy",
    promote: bool = False,
    max_regression: float = 0.05,
    rpc: str | None = None,
) -> dict[str, Any]:
    """Optimise one model end to end; returns a summary (artifact, version, latencies)."""
    logger = get_run_logger()
    name = validate_name(name or default_name(model))
    target_dict = resolve_target(target)
    c = tracking.client()
    with tracking.run(c, f"optimize {name}", tags={"model": name}) as parent:
        tracking.log_params(c, parent, {
            "model": model, "name": name, "target": json.dumps(target_dict), "budget": trials,
            "time_budget_s": time_budget_s,
            "strategy": strategy, "rewrite": rewrite, "promote": promote, "seed": seed, "s3_uri": s3_uri,
            "rpc": rpc,
            **{f"version_{k}": v for k, v in versions().items()},
        })  # fmt: skip

        with tracking.run(c, "import", parent_run_id=parent) as rid:
            stage = import_task()
            imported = stage(model, inputs, checkpoint, seed, name)
            if not imported.onnx_path.is_file():  # cache entry outlived its files: import again
                imported = stage.with_options(refresh_cache=True)(
                    model, inputs, checkpoint, seed, name
                )
            # the import cache is keyed by content, not name: a cached result may carry another
            imported = dataclasses.replace(imported, name=name)
            log_import(c, rid, imported)
        logger.info("imported %s: %d nodes, inputs %s", name, imported.num_nodes,
                    ", ".join(map(str, imported.inputs)))  # fmt: skip

        with tracking.run(c, "rewrite", parent_run_id=parent) as rid:
            rewritten = rewrite_task()(imported, rewrite, work_dir=rewrite_dir(),
                                       agent_path=xrlflow_agent_path(), seed=seed, log=logger.info)  # fmt: skip
            log_rewrite(c, rid, rewritten)
        original, imported = imported, rewritten.model

        with tracking.run(c, "tune", parent_run_id=parent) as rid:
            result = tune_task()(imported, target_dict, database_dir=tuning_db_dir(), trials=trials,
                                 time_budget_s=time_budget_s, strategy=strategy, seed=seed,
                                 min_trials_per_task=min_trials_per_task,
                                 agent_path=harl_agent_path(), rpc=rpc, log=logger.info)  # fmt: skip
            log_tuning(c, rid, result, min_trials_per_task, harl_agent_path())

        with tracking.run(c, "package", parent_run_id=parent) as rid:
            artifact = package_task()(imported, target_dict, database_dir=tuning_db_dir(),
                                      home=home(), tune_summary=result.summary(), seed=seed,
                                      measure=measure, max_seconds=measure_seconds,
                                      log=logger.info)  # fmt: skip
            log_package(c, rid, artifact)

        with tracking.run(c, "publish", parent_run_id=parent) as rid:
            where = publish_task()(rid, artifact, s3_uri, log=logger.info)
            if promote:  # the regression gate: not retried, a refusal is an answer
                version = where["mlflow"].rsplit("/", 1)[1]
                where["production"] = f"models:/{name}@production -> v" + promote_version(
                    c, name, version, max_regression, log=logger.info
                )

        summary = {
            "name": name,
            "version": artifact.version,
            "artifact": artifact.directory,
            "published": where,
            "target": target_dict,
            "rewrite": {
                k: rewritten.summary.get(k)
                for k in (
                    "method",
                    "speedup",
                    "latency_before_ms",
                    "latency_after_ms",
                    "rules_applied",
                )
            },
            "nodes": {"imported": original.num_nodes, "rewritten": imported.num_nodes},
            "trials": result.trials,
            "trials_failed": result.summary()["trials_failed"],
            "resumed_trials": result.resumed_trials,
            "tuning_seconds": round(result.seconds, 1),
            "time_budget": format_duration(time_budget_s) if time_budget_s else None,
            "seconds_per_trial": result.summary()["seconds_per_trial"],
            "latency_ms": {
                k: v["median_ms"] for k, v in artifact.manifest.get("latency_ms", {}).items()
            },
            "speedup": artifact.manifest.get("speedup", {}),
            "ratio_to_onnxruntime": artifact.manifest.get("ratio_to_onnxruntime"),
            "mlflow_run_id": parent,
        }
        tracking.log_metrics(c, parent, {f"speedup/{k}": v for k, v in summary["speedup"].items()})
        c.set_tag(parent, "artifact", artifact.directory)
        return summary

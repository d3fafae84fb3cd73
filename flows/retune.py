"""The ``retune`` flow: optimise every model of a source whose content changed since it was last
optimised for this target, and skip the rest.

What was last optimised is read from the MLflow registry (each published version carries the
``source_sha256`` of the file it came from and its ``target``), so a retune costs nothing for an
unchanged model and survives restarts of whatever schedules it. Tuning records are shared through
the home's tuning database: a changed model with the same operators is compiled from it without
new measurements. ``harlflow serve`` registers this flow with a cron schedule on a Prefect server.

With a ``pool`` (:mod:`flows.pool`), the changed models are optimised at once by that work
pool's workers, one ``optimize`` flow run each, and the retune waits for them all; its summary
and MLflow run list every model's decision, flow run and MLflow run the same way.
"""

import json
from typing import Any

from prefect import flow, get_run_logger

from flows.optimize import FLOW_RUN_TAG, optimize
from flows.settings import RunSettings
from harlflow.core import config
from harlflow.core.errors import HarlflowError
from tasks import tracking
from tasks.sources import last_optimised, list_models


@flow(name="retune")
def retune(
    source: str, settings: RunSettings | None = None, pool: str | None = None
) -> dict[str, Any]:
    """Optimise the changed models of ``source`` (directory or ``s3://`` prefix), here one after
    another or, with ``pool``, at once on that Prefect work pool's workers; returns, per model,
    ``{"decision": "skipped" | "optimised" | "failed", ...}``."""
    logger = get_run_logger()
    given = settings or RunSettings()
    s = given.checked()
    c = tracking.client()
    decisions: dict[str, dict[str, Any]] = {}
    with tracking.run(c, f"retune {source}", tags={"harlflow.flow": "retune"}) as run_id:
        tracking.log_params(
            c,
            run_id,
            {
                "source": source,
                "budget": s.trials,
                "time_budget_s": s.time_budget_s,
                "strategy": s.strategy,
                "rewrite": s.rewrite,
                "rewrite_oracle": s.rewrite_oracle,
                "target": json.dumps(s.target),
                "promote": s.promote,
                "seed": s.seed,
                "rpc": s.rpc,
                "pool": pool,
            },
        )
        models = list_models(source, config.sources_cache_dir())
        logger.info("retune %s: %d models", source, len(models))
        changed = []
        for m in models:
            last = last_optimised(c, m.name, s.target)
            entry: dict[str, Any] = {"origin": m.origin, "sha256": m.sha256}
            if last is not None and last["source_sha256"] == m.sha256:
                entry.update(decision="skipped", version=last["version"])
                logger.info(
                    "%s: unchanged since v%s (sha256 %s…): skipped, no tuning",
                    m.name,
                    last["version"],
                    m.sha256[:12],
                )
            else:
                why = "new" if last is None else f"changed since v{last['version']}"
                logger.info("%s: %s (sha256 %s…): optimising", m.name, why, m.sha256[:12])
                if pool is not None:
                    changed.append(m)
                    decisions[m.name] = entry
                    continue
                try:
                    r = optimize(model=m.path, settings=s, name=m.name)
                    entry.update(
                        decision="optimised",
                        version=r["version"],
                        trials=r["trials"],
                        published=r["published"],
                        mlflow_run_id=r["mlflow_run_id"],
                    )
                except HarlflowError as e:  # one bad model must not stop the others
                    entry.update(decision="failed", error=f"{type(e).__name__}: {e}")
                    logger.error("%s: failed: %s", m.name, e)
            decisions[m.name] = entry
            c.set_tag(run_id, f"decision.{m.name}", entry["decision"])
        if changed:
            _fan_out(c, pool, changed, given, decisions, logger)
            for m in changed:
                c.set_tag(run_id, f"decision.{m.name}", decisions[m.name]["decision"])
        counts = {
            d: sum(e["decision"] == d for e in decisions.values())
            for d in ("optimised", "skipped", "failed")
        }
        tracking.log_metrics(
            c,
            run_id,
            {"retune/models": len(models), **{f"retune/{k}": v for k, v in counts.items()}},
        )
        c.log_dict(run_id, decisions, "retune.json")
        logger.info(
            "retune done: %d optimised, %d skipped, %d failed",
            counts["optimised"],
            counts["skipped"],
            counts["failed"],
        )
        failed = {k: e for k, e in decisions.items() if e["decision"] == "failed"}
        if failed:
            raise HarlflowError(
                f"retune: {len(failed)} of {len(models)} models failed: "
                + "; ".join(f"{k}: {e['error']}" for k, e in failed.items())
            )
    return decisions


def _fan_out(c, pool: str, models: list, settings: RunSettings, decisions: dict, logger) -> None:
    """Optimise ``models`` as flow runs on the work pool, wait for them, and fill in each one's
    decision from its flow run's final state and its MLflow run's summary."""
    from flows import pool as pools

    runs = pools.submit(pool, models, settings, logger.info)
    states = pools.wait(runs, logger.info)
    for m in models:
        entry, state = decisions[m.name], states[m.name]
        entry["flow_run_id"] = str(runs[m.name])
        found = tracking.find_run(c, FLOW_RUN_TAG, str(runs[m.name]))
        if found is not None:
            entry["mlflow_run_id"] = found
        if state.is_completed() and found is not None:
            r = tracking.load_dict(c, found, "summary.json")
            entry.update(
                decision="optimised", version=r["version"], trials=r["trials"],
                published=r["published"],
            )  # fmt: skip
        else:
            why = state.message or state.type.value.lower()
            entry.update(decision="failed", error=f"flow run {state.type.value.lower()}: {why}")
            logger.error("%s: failed: %s", m.name, entry["error"])

"""The ``retune`` flow: optimise every model of a source whose content changed since it was last
optimised for this target, and skip the rest.

What was last optimised is read from the MLflow registry (each published version carries the
``source_sha256`` of the file it came from and its ``target``), so a retune costs nothing for an
unchanged model and survives restarts of whatever schedules it. Tuning records are shared through
the home's tuning database: a changed model with the same operators is compiled from it without
new measurements. ``harlflow serve`` registers this flow with a cron schedule on a Prefect server.
"""

import json
from typing import Any

from prefect import flow, get_run_logger

from flows.optimize import optimize
from flows.settings import RunSettings
from harlflow.core import config
from harlflow.core.errors import HarlflowError
from tasks import tracking
from tasks.sources import last_optimised, list_models


@flow(name="retune")
def retune(source: str, settings: RunSettings | None = None) -> dict[str, Any]:
    """Optimise the changed models of ``source`` (directory or ``s3://`` prefix); returns, per
    model, ``{"decision": "skipped" | "optimised" | "failed", ...}``."""
    logger = get_run_logger()
    s = (settings or RunSettings()).checked()
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
            },
        )
        models = list_models(source, config.sources_cache_dir())
        logger.info("retune %s: %d models", source, len(models))
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

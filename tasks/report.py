"""What an optimisation run reports: the summary the CLI prints (and ``--ci`` emits as JSON)."""

from __future__ import annotations

from typing import Any

from harl.tuning import TuneResult
from harlflow.core.durations import format_duration
from tasks.importing import ImportedModel
from tasks.packaging import Artifact
from tasks.publishing import Publication
from tasks.rewriting import RewriteOutcome

REWRITE_KEYS = (
    "method",
    "speedup",
    "latency_before_ms",
    "latency_after_ms",
    "rules_applied",
    "stopped",
)


def run_summary(
    imported: ImportedModel,
    rewritten: RewriteOutcome,
    tuned: TuneResult,
    artifact: Artifact,
    published: Publication,
    run_id: str,
) -> dict[str, Any]:
    """One run's outcome: artifact and version, where it was published, what the rewrite and
    the tuning did, and the measured latencies and speedups."""
    t = tuned.summary()
    m = artifact.manifest
    return {
        "name": artifact.name,
        "version": artifact.version,
        "artifact": artifact.directory,
        "published": published.locations,
        "target": tuned.target,
        "rewrite": {k: rewritten.summary.get(k) for k in REWRITE_KEYS},
        "nodes": {"imported": imported.num_nodes, "rewritten": rewritten.model.num_nodes},
        "trials": tuned.trials,
        "trials_failed": t["trials_failed"],
        "resumed_trials": tuned.resumed_trials,
        "tuning_seconds": round(tuned.seconds, 1),
        "time_budget": format_duration(tuned.time_budget_s) if tuned.time_budget_s else None,
        "seconds_per_trial": t["seconds_per_trial"],
        "latency_ms": {k: v["median_ms"] for k, v in m.get("latency_ms", {}).items()},
        "latency_ci_ms": {k: v["ci_ms"] for k, v in m.get("latency_ms", {}).items()},
        "speedup": m.get("speedup", {}),
        "speedup_ci": m.get("speedup_ci", {}),
        "ratio_to_onnxruntime": m.get("ratio_to_onnxruntime"),
        "ratio_ci": m.get("ratio_ci"),
        "measurement": m.get("measurement"),
        "gate": published.gate,
        "mlflow_run_id": run_id,
    }

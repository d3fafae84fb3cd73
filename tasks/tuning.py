"""Tune stage: HARL/MetaSchedule tuning of the imported model, with progress and MLflow logging."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from harl import tuning
from harl.runners import make_runner
from harl.tuning import Progress, TuneResult
from tasks.importing import ImportedModel, to_relax


def tune_model(imported: ImportedModel, target: dict[str, Any], *, database_dir: str | Path,
               trials: int, strategy: str, seed: int, min_trials_per_task: int,
               agent_path: str | Path | None = None, rpc: str | None = None,
               log=print) -> TuneResult:  # fmt: skip
    """Tune every new workload of the model, measured locally or on the RPC tracker ``rpc``
    (``HOST:PORT:KEY``); progress after each measured batch."""

    def progress(p: Progress) -> None:
        best = f"{p.weighted_us / 1e3:.3f} ms" if p.weighted_us is not None else "n/a"
        log(f"tuning: {p.trials}/{p.budget} trials | best weighted latency {best} | "
            f"last task {p.task} | {p.elapsed_s:.0f} s")  # fmt: skip

    mod = tuning.prepare(to_relax(imported.onnx_path, imported.inputs))
    result = tuning.tune(mod, target, database_dir, trials=trials, strategy=strategy, seed=seed,
                         min_trials_per_task=min_trials_per_task, on_progress=progress,
                         agent_path=agent_path, runner=make_runner(rpc))  # fmt: skip
    result.runner = f"rpc {rpc}" if rpc else "local"
    s = result.summary()
    log(f"tuning done: {s['trials']} trials ({s['trials_failed']} failed) in "
        f"{s['tuning_seconds']:.0f} s; "
        f"{s['tasks_tuned']} tasks tuned now, {s['tasks_from_database']} from the database, "
        f"{s['tasks_fallback']} on the fallback schedule")  # fmt: skip
    return result


def tune_task():
    """The tune stage as a Prefect task (no retries: measurements are not I/O that flakes)."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    return task(name="tune", cache_policy=NO_CACHE)(tune_model)


def log_tuning(c, run_id: str, result: TuneResult, min_trials_per_task: int,
               agent_path: str | Path | None = None) -> None:  # fmt: skip
    """Tune stage → MLflow: settings, totals, best latency vs trials (stepped), plot, task table."""
    from tasks import tracking

    tracking.log_params(c, run_id, {
        "strategy": result.strategy, "budget": result.budget, "target": json.dumps(result.target),
        "min_trials_per_task": min_trials_per_task, "runner": result.runner,
    })  # fmt: skip
    s = result.summary()
    tracking.log_metrics(c, run_id, {
        "tuning/trials": s["trials"], "tuning/trials_failed": s["trials_failed"],
        "tuning/resumed_trials": s["resumed_trials"],
        "tuning/seconds": s["tuning_seconds"],
        "tuning/tasks": s["tasks"], "tuning/tasks_tuned": s["tasks_tuned"],
        "tuning/tasks_from_database": s["tasks_from_database"],
        "tuning/tasks_fallback": s["tasks_fallback"],
        "tuning/weighted_latency_us": s["weighted_latency_us"],
    })  # fmt: skip
    for p in result.history:
        tracking.log_metrics(
            c, run_id, {"charts/best_weighted_latency_us": p.weighted_us}, step=p.trials
        )
    c.log_dict(run_id, [t.__dict__ for t in result.tasks], "tasks.json")
    for step, m in enumerate(result.agent_metrics):  # HARL's PPO updates, CleanRL-style names
        tracking.log_metrics(c, run_id, m, step=step)
    if result.agent_metrics and agent_path and Path(agent_path).is_file():
        c.log_artifact(run_id, str(agent_path), "harl_agent")
    if result.history:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "convergence.png"
            convergence_plot(result, png)
            c.log_artifact(run_id, str(png), "plots")


def convergence_plot(result: TuneResult, path: Path) -> None:
    """Best weighted latency (Σ weight × best task latency) against trials spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(p.trials, p.weighted_us / 1e3) for p in result.history if p.weighted_us is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.step([x for x, _ in pts], [y for _, y in pts], where="post")
    ax.set_xlabel("trials")
    ax.set_ylabel("best weighted latency (ms)")
    ax.set_title(f"{result.strategy}: {result.trials} trials")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

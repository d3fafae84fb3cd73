"""Tune stage: HARL/MetaSchedule tuning of the imported model, with progress and MLflow logging."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from harl import compilation, tuning
from harl.budget import UNLIMITED_TRIALS
from harl.runners import make_runner
from harl.spec import TuningSpec
from harl.tuning import Progress, TuneResult
from harlflow.core import tvmlog
from harlflow.core.durations import format_duration
from tasks.importing import ImportedModel, to_relax


@tvmlog.collecting  # TVM's warnings once per kind
def tune_model(
    imported: ImportedModel,
    target: dict[str, Any],
    *,
    database_dir: str | Path,
    spec: TuningSpec,
    rpc: str | None = None,
    log=print,
) -> TuneResult:
    """Tune every new workload of the model as ``spec`` says, measured locally or on the RPC
    tracker ``rpc`` (``HOST:PORT:KEY``); progress as trials are measured, with the best latency
    so far against onnxruntime's. ``spec.time_budget_s`` counts from this call (onnxruntime's
    timing and the model's preparation included)."""
    started = time.monotonic()
    ort_ms = _onnxruntime_ms(imported, target)
    last = [0.0]

    def progress(p: Progress) -> None:
        if p.elapsed_s - last[0] < PROGRESS_EVERY_S and p.trials < p.budget:
            return  # a line every few seconds, not one per trial
        last[0] = p.elapsed_s
        log(progress_line(p, ort_ms))

    mod = compilation.prepare(to_relax(imported.onnx_path, imported.inputs))
    runner = make_runner(rpc, target)
    try:
        left = dataclasses.replace(spec, time_budget_s=_left(spec.time_budget_s, started))
        result = tuning.tune(mod, target, database_dir, left, on_progress=progress, runner=runner)
    finally:
        if getattr(runner, "pool", None) is not None:
            runner.pool.shutdown()  # the runner's worker process ends with the stage
    result.runner = f"rpc {rpc}" if rpc else "local"
    s = result.summary()
    per = f" ({s['seconds_per_trial']:.2f} s/trial)" if s["seconds_per_trial"] else ""
    budget = f" of a {format_duration(spec.time_budget_s)} budget" if spec.time_budget_s else ""
    log(
        f"tuning done: {s['trials']} trials ({s['trials_failed']} failed) in "
        f"{s['tuning_seconds']:.0f} s{budget}{per}; "
        f"{s['tasks_tuned']} tasks tuned now, {s['tasks_from_database']} from the database, "
        f"{s['tasks_fallback']} on the fallback schedule"
    )
    return result


PROGRESS_EVERY_S = 5.0


def progress_line(p: Progress, ort_ms: float | None) -> str:
    """``tuning: 120/∞ trials | 1m40s elapsed, 3m20s left | best 2.310 ms (1.4x onnxruntime)``."""
    budget = str(p.budget) if p.budget < UNLIMITED_TRIALS else "-"
    clock = f"{format_duration(p.elapsed_s)} elapsed"
    if p.remaining_s is not None:
        clock += f", {format_duration(p.remaining_s)} left"
    best = "n/a"
    if p.weighted_us is not None and p.tasks_measured < p.tasks_total:
        best = f"{p.tasks_measured}/{p.tasks_total} kernels measured"
    elif p.weighted_us is not None:  # Σ weight × best kernel latency: the model's kernel time
        best = f"{p.weighted_us / 1e3:.3f} ms"
        if ort_ms:
            best += f" ({p.weighted_us / 1e3 / ort_ms:.2f}x onnxruntime)"
    return f"tuning: {p.trials}/{budget} trials | {clock} | best {best} | last task {p.task}"


def _left(budget_s: float | None, started: float) -> float | None:
    if budget_s is None:
        return None
    return max(tuning.MIN_TUNING_S, budget_s - (time.monotonic() - started))


def _onnxruntime_ms(imported: ImportedModel, target: dict) -> float | None:
    """onnxruntime's latency on this model, measured briefly in a fresh process (the yardstick
    for progress lines); ``None`` if it cannot be measured."""
    from harlflow.measure import Runtime, side_by_side
    from tasks.packaging import measure_threads

    try:
        m = side_by_side(
            [Runtime("onnxruntime", "ort", str(imported.original_onnx_path))],
            imported.reference_path,
            threads=measure_threads(target),
            max_seconds=2,
            min_blocks=1,
            stop=None,
        )
        return m.estimate("onnxruntime").median_ms
    except Exception:  # only a progress yardstick: tuning goes on without it
        return None


def log_tuning(
    c,
    run_id: str,
    result: TuneResult,
    min_trials_per_task: int,
    agent_path: str | Path | None = None,
) -> None:
    """Tune stage → MLflow: settings, totals, best latency vs trials (stepped), plot, task table."""
    from tasks import tracking

    tracking.log_params(
        c,
        run_id,
        {
            "strategy": result.strategy,
            "budget": result.budget,
            "target": json.dumps(result.target),
            "min_trials_per_task": min_trials_per_task,
            "runner": result.runner,
            "time_budget_s": result.time_budget_s,
        },
    )
    s = result.summary()
    tracking.log_metrics(
        c,
        run_id,
        {
            "tuning/trials": s["trials"],
            "tuning/trials_failed": s["trials_failed"],
            "tuning/resumed_trials": s["resumed_trials"],
            "tuning/seconds": s["tuning_seconds"],
            "tuning/tasks": s["tasks"],
            "tuning/tasks_tuned": s["tasks_tuned"],
            "tuning/tasks_from_database": s["tasks_from_database"],
            "tuning/tasks_fallback": s["tasks_fallback"],
            "tuning/weighted_latency_us": s["weighted_latency_us"],
            "tuning/seconds_per_trial": s["seconds_per_trial"],
            **{f"tuning/phase_{k}": v for k, v in result.phases.items()},
        },
    )
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

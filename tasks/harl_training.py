"""``harlflow harl-train``: pre-train HARL's parameter-level agent offline, in imagination.

The workload suite's tasks (:mod:`tasks.datasets`: the bundled networks and the operator shape
packs) get rounds of HARL's exploration with the learned cost model's predictions as the
reward (:mod:`harl.pretraining`): nothing is measured, so an epoch over the suite's 115 tasks
takes about ten minutes on 2 cores.
Before and after, the agent is scored on the held-out networks' tasks (never trained on) by its
mean predicted gain per trajectory. The agent is saved where HARL runs start from
(``$HARLFLOW_HOME/harl/agent.pt`` by default; ``--out harl/pretrained_agent.pt`` regenerates the
one the package ships). Each run is one MLflow run (its settings, the per-epoch training gain,
the held-out gain before and after, the agent file), and the agent is registered as a new
version of ``harl-agent``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from harlflow.core import config
from harlflow.core.errors import BadInputError
from harlflow.core.targets import resolve_target, target_key

REGISTERED_NAME = "harl-agent"
ARTIFACT_PATH = "agent"


def _tasks(names: Iterable[str] | None, target: dict[str, Any], work: Path, seen: set) -> list:
    """The units' tuning tasks, each distinct workload once (``seen``: structural hashes)."""
    from tvm_ffi import structural_hash

    from harl import compilation
    from tasks.datasets import suite, unit_module

    out = []
    for unit in suite(names):
        for task in compilation.extract_tasks(unit_module(unit, work), target):
            h = int(structural_hash(task.dispatched[0]))
            if h not in seen:
                seen.add(h)
                out.append(task)
    return out


def check_train(
    *,
    units: Iterable[str] | None = None,
    held_out: Iterable[str] | None = None,
    target: str | dict[str, Any] | None = None,
    cost_model: str = "transfer",
    start: str | Path | None = None,
    epochs: int = 2,
    rounds: int = 6,
) -> None:
    """What :func:`train` would refuse, refused before any work (the CLI calls it before
    Prefect starts): a ``BadInputError`` naming the value. A ``start`` agent is loaded."""
    from harl.agent import EditAgent
    from tasks.datasets import HELD_OUT_NETWORKS, suite

    held_out = HELD_OUT_NETWORKS if held_out is None else list(held_out)
    for names in (units, held_out):
        suite(names)  # unknown names fail here, before any import or extraction
    if units is not None and set(units) <= set(held_out):
        raise BadInputError("no tasks to train on: every unit is in the held-out set")
    if epochs < 1 or rounds < 1:
        raise BadInputError(f"--epochs and --rounds must be >= 1, got {epochs} and {rounds}")
    if cost_model == "xgb":
        raise BadInputError("harl-train needs a learned cost model: 'transfer' or a model file")
    if cost_model != "transfer" and not Path(cost_model).is_file():
        raise BadInputError(f"--cost-model: no cost model file at {cost_model}")
    if start is not None:
        if not Path(start).is_file():
            raise BadInputError(f"--from: no agent file at {start}")
        EditAgent.load(start)  # a corrupt or foreign file: one line naming it
    resolve_target(target)


def train(
    out: str | Path | None = None,
    *,
    units: Iterable[str] | None = None,
    held_out: Iterable[str] | None = None,
    target: str | dict[str, Any] | None = None,
    cost_model: str = "transfer",
    start: str | Path | None = None,
    epochs: int = 2,
    rounds: int = 6,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pre-train HARL's agent on ``units`` (default: the whole suite) for ``target`` (default:
    this machine) against ``cost_model``; score it on ``held_out`` networks (default: the
    suite's held-out ones) before and after; save it to ``out``. ``start``: an agent file to
    continue from (default: a fresh agent)."""
    from harl.agent import EditAgent
    from harl.pretraining import imagine
    from harlflow import rl
    from tasks.datasets import HELD_OUT_NETWORKS

    held_out = HELD_OUT_NETWORKS if held_out is None else held_out
    check_train(
        units=units, held_out=held_out, cost_model=cost_model, start=start, epochs=epochs,
        rounds=rounds,
    )  # fmt: skip
    target = resolve_target(target)
    out = Path(out) if out else config.harl_agent_path()
    t0 = time.monotonic()
    rl.setup(seed)
    agent = EditAgent.load(start, seed=seed) if start else EditAgent(seed=seed)
    with tempfile.TemporaryDirectory(prefix="harl-train-") as tmp:
        seen: set = set()
        test = _tasks(held_out, target, Path(tmp), seen)
        train_tasks = _tasks(units, target, Path(tmp), seen)
    if not train_tasks:
        raise BadInputError("no tasks to train on: every unit's tasks are in the held-out set")
    from tasks import tracking

    tracking.experiment_id(tracking.client())  # MLflow answers before the training, not after
    log(
        f"harl-train: {len(train_tasks)} tasks to train on, {len(test)} held out, "
        f"target {target_key(target)}, cost model {cost_model}"
    )

    def score(label: str) -> float | None:
        if not test:
            return None
        r = imagine(test, target, agent, cost_model, rounds=3, learn=False, seed=seed + 10_000)
        log(f"harl-train: {label}: mean predicted gain per trajectory {r['mean_return']:+.4f}")
        return r["mean_return"]

    before = score("held-out tasks, before")
    curve = []
    for epoch in range(epochs):

        def progress(i: int, name: str, stats: dict, epoch: int = epoch) -> None:
            if (i + 1) % 10 == 0 or i + 1 == len(train_tasks):
                log(
                    f"harl-train: epoch {epoch + 1}/{epochs}, task {i + 1}/{len(train_tasks)} "
                    f"({name}): gain {stats['return']:+.4f}, {agent.updates} updates, "
                    f"{time.monotonic() - t0:.0f} s"
                )

        r = imagine(
            train_tasks,
            target,
            agent,
            cost_model,
            rounds=rounds,
            seed=seed + 1000 * epoch,
            on_task=progress,
        )
        curve.append(r["mean_return"])
        log(f"harl-train: epoch {epoch + 1}/{epochs}: mean gain {r['mean_return']:+.4f}")
    after = score("held-out tasks, after")
    agent.save(out)
    log(f"harl-train: saved the agent ({agent.updates} updates) to {out}")
    summary = {
        "path": str(out),
        "tasks": len(train_tasks),
        "held_out_tasks": len(test),
        "before": before,
        "after": after,
        "train_curve": curve,
        "updates": agent.updates,
        "seconds": round(time.monotonic() - t0, 1),
    }
    params = {
        "units": ",".join(units) if units else "suite",
        "held_out": ",".join(held_out),
        "target": target_key(target),
        "cost_model": str(cost_model),
        "start": str(start or "fresh"),
        "epochs": epochs,
        "rounds": rounds,
        "seed": seed,
    }
    summary["run_id"], summary["version"] = _register(out, summary, params)
    log(f"harl-train: registered {REGISTERED_NAME} version {summary['version']} "
        f"(run {summary['run_id']})")  # fmt: skip
    return summary


def _register(out: Path, summary: dict[str, Any], params: dict[str, Any]) -> tuple[str, str]:
    """One MLflow run for the training (settings, curve, gains, the agent file) and the agent
    registered as a new version of :data:`REGISTERED_NAME`; returns (run id, version)."""
    from tasks import tracking

    c = tracking.client()
    with tracking.run(c, "harl-train", tags={"harlflow.kind": "harl-agent"}) as run_id:
        tracking.log_params(c, run_id, params)
        for step, gain in enumerate(summary["train_curve"]):
            tracking.log_metrics(c, run_id, {"train_gain": gain}, step=step)
        metrics = {k: summary[k] for k in ("tasks", "held_out_tasks", "updates", "seconds")}
        metrics |= {
            f"held_out_gain_{k}": summary[k] for k in ("before", "after") if summary[k] is not None
        }
        tracking.log_metrics(c, run_id, metrics)
        c.log_artifact(run_id, str(out), ARTIFACT_PATH)
        tags = {"updates": str(summary["updates"]), "target": params["target"]}
        version = tracking.register_version(
            c, REGISTERED_NAME, run_id, ARTIFACT_PATH,
            description="HARL's parameter-level agent, pre-trained in imagination (harl-train).",
            tags=tags,
        )  # fmt: skip
    return run_id, version

"""Offline pre-training of HARL's parameter-level agent, in imagination.

HARL's reward for an edit is the cost model's predicted improvement, so with a pre-trained cost
model (:mod:`harl.cost_model`) the agent can learn which edits make programs faster before any
run measures anything: every task of a workload suite gets rounds of HARL's own exploration
(:meth:`HARLSearchStrategy.imagine_round`), where the frozen cost model's predictions stand in
for measurements. The agent that results starts every tuning run that has no agent of its own
(:data:`harl.agent.PRETRAINED`, :func:`harl.strategies.harl`), so the first rounds of a new
operator are not spent learning that moving a factor into the vectorised loop helps.

:func:`imagine` runs the rounds over a list of extracted tasks, with or without learning; with
``learn=False`` it measures an agent: the mean predicted gain of its trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from harl.agent import EditAgent
from harl.cost_model.online import create_cost_model


def imagine(
    tasks: list,
    target: dict[str, Any],
    agent: EditAgent,
    cost_model: Any = "transfer",
    *,
    rounds: int = 4,
    learn: bool = True,
    seed: int = 0,
    on_task: Callable[[int, str, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """``rounds`` imagined HARL rounds on each of ``tasks`` (MetaSchedule ``ExtractedTask``s)
    for ``target``, rewards from ``cost_model`` (``"transfer"``, a path or a
    :class:`~harl.cost_model.model.CostModel`; frozen: nothing is measured, so it never
    updates). Updates ``agent`` when ``learn``. Returns the mean trajectory return (predicted
    gain) per task and overall; ``on_task(index, name, stats)`` after each task."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from harl._fast_import import import_tensor_intrinsics
    from harl.search_strategy import ExplorationConfig, HARLSearchStrategy, _Shared

    import_tensor_intrinsics()  # before the first TuneContext (see harl._fast_import)

    if not isinstance(cost_model, ms.cost_model.CostModel):
        cost_model = create_cost_model(cost_model, target)
        if cost_model == "xgb":
            raise ValueError("imagined rounds need a learned cost model, not 'xgb'")
    shared = _Shared(agent)
    per_task: dict[str, float] = {}
    for i, task in enumerate(tasks):
        # the agent learns from the walks; the neighbours only widen what a round measures,
        # and imagined rounds measure nothing: pre-training walks as it did before them
        walks_only = ExplorationConfig(neighbours=0)
        strategy = HARLSearchStrategy(seed=seed + i, exploration=walks_only, _shared=shared)
        ctx = ms.TuneContext(
            mod=task.dispatched[0],
            target=tvm.target.Target(target),
            space_generator="post-order-apply",
            search_strategy=strategy,
            task_name=task.task_name,
            rand_state=seed + i,
            num_threads=int(target.get("num-cores", 1)),
        )
        spaces = ctx.generate_design_space()
        ctx.pre_tuning(1 << 30, 16, spaces, None, cost_model)
        returns = []
        for _ in range(rounds):
            returns.append(strategy.imagine_round(learn=learn)["return"])
        ctx.post_tuning()
        stats = {"return": float(np.mean(returns)), "first": returns[0], "last": returns[-1]}
        per_task[task.task_name] = stats["return"]
        if on_task:
            on_task(i, task.task_name, stats)
    values = list(per_task.values())
    return {
        "mean_return": float(np.mean(values)) if values else math.nan,
        "per_task": per_task,
        "updates": agent.updates,
    }

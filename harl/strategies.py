"""Search strategies by name: the one place a new strategy is added.

A strategy is what a tuning run searches with: a MetaSchedule ``SearchStrategy`` (which
candidates a task measures next), a task scheduler (which task gets the next round) and, for
learning strategies, the agent that is saved after the run. :func:`create_strategy` takes a name
from :data:`STRATEGIES`, a :class:`Strategy`, or a MetaSchedule ``SearchStrategy`` instance, as
MetaSchedule's own entry points do. To add one, write a function like :func:`evolutionary` and
register it in :data:`STRATEGIES`; the CLI's ``--strategy`` choices come from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harlflow.core.errors import BadInputError

# MetaSchedule's evolutionary search evolves 512 schedules for 4 generations every round: ~10 s
# on 2 cores, more than building and running the round's 8-32 trials. A smaller population
# starting from the measured best (the register-blocked warm-up) costs a fifth of that;
# bench/trial_profile.py compares it with the stock settings at equal trials.
EVOLUTIONARY = {"population_size": 128, "genetic_num_iters": 3}


@dataclass
class Strategy:
    """A search strategy, the task scheduler it pairs with, and its learning agent if any."""

    name: str
    search: Any
    """a MetaSchedule ``SearchStrategy``"""
    task_scheduler: Any = "gradient"
    """a MetaSchedule ``TaskScheduler`` or its name"""
    agent: Any = None
    """an agent with ``save(path)``, saved after the run (warm start of the next)"""
    metrics: list[dict[str, float]] = field(default_factory=list)
    """the agent's training metrics, appended during the run"""


def evolutionary(
    *, seed: int = 0, agent_path: str | Path | None = None, pretrained: bool = True
) -> Strategy:
    """MetaSchedule's evolutionary search (at :data:`EVOLUTIONARY`) and gradient task scheduler
    (nothing to warm-start: ``agent_path`` and ``pretrained`` are ignored)."""
    from tvm.s_tir import meta_schedule as ms

    return Strategy("evolutionary", ms.search_strategy.EvolutionarySearch(**EVOLUTIONARY))


def harl(
    *, seed: int = 0, agent_path: str | Path | None = None, pretrained: bool = True
) -> Strategy:
    """HARL: learned task scheduling, sketch bandit and PPO edits. The agent starts from
    ``agent_path`` when that file exists (and is saved there after the run), else, with
    ``pretrained``, from the one the package ships (:data:`harl.agent.PRETRAINED`, pre-trained
    offline on the learned cost model's rewards), else fresh."""
    import logging

    from harl.agent import PRETRAINED, EditAgent
    from harl.search_strategy import HARLSearchStrategy
    from harl.task_scheduler import HARLTaskScheduler

    candidates = (agent_path, PRETRAINED if pretrained else None)
    start = next((p for p in candidates if p and Path(p).is_file()), None)
    if start is not None:
        agent = EditAgent.load(start, seed=seed)
        logging.getLogger("harl.strategies").info(
            "HARL agent warm-started from %s (%d updates)", start, agent.updates
        )
    else:
        agent = EditAgent(seed=seed)
    search = HARLSearchStrategy(agent=agent, seed=seed)
    return Strategy("harl", search, HARLTaskScheduler(seed=seed), agent, search.shared.metrics)


STRATEGIES: dict[str, Callable[..., Strategy]] = {"evolutionary": evolutionary, "harl": harl}


def create_strategy(
    strategy: str | Strategy | Any,
    *,
    seed: int = 0,
    agent_path: str | Path | None = None,
    pretrained: bool = True,
    task_scheduler: str | None = None,
) -> Strategy:
    """A :class:`Strategy` from a name in :data:`STRATEGIES`, a :class:`Strategy`, or a
    MetaSchedule ``SearchStrategy`` instance (run with the gradient task scheduler).
    ``pretrained``: a learning strategy without an agent file starts from the shipped agent.
    ``task_scheduler`` (``harl`` or ``gradient``) replaces the strategy's own task scheduler:
    HARL's search with MetaSchedule's task level, or the other way round."""
    chosen = _create(strategy, seed=seed, agent_path=agent_path, pretrained=pretrained)
    if task_scheduler is None:
        return chosen
    from harl.task_scheduler import create_task_scheduler

    return dataclasses.replace(
        chosen,
        name=f"{chosen.name}/{task_scheduler}",
        task_scheduler=create_task_scheduler(task_scheduler, seed=seed),
    )


def _create(strategy, *, seed, agent_path, pretrained) -> Strategy:
    if isinstance(strategy, Strategy):
        return strategy
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            choices = ", ".join(STRATEGIES)
            raise BadInputError(f"unknown strategy {strategy!r}: choose one of {choices}")
        return STRATEGIES[strategy](seed=seed, agent_path=agent_path, pretrained=pretrained)
    from tvm.s_tir import meta_schedule as ms

    if isinstance(strategy, ms.search_strategy.SearchStrategy):
        return Strategy(type(strategy).__name__, strategy)
    raise BadInputError(
        f"strategy must be a name ({', '.join(STRATEGIES)}), a Strategy or a MetaSchedule "
        f"SearchStrategy, got {type(strategy).__name__}"
    )

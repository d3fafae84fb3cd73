"""What a tuning run is asked to do: one :class:`TuningSpec`, checked once, where it is made.

The CLI and ``flows.settings.RunSettings`` build it from the user's options, the tuning stage
hands it to :func:`harl.tuning.tune` (with the time left of the run's budget), and nothing on
the way checks the numbers again. It imports nothing heavy: a bad option is refused before TVM
loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harlflow.core.errors import BadInputError

TASK_SCHEDULERS = ("harl", "gradient")
"""``--task-scheduler`` choices: HARL's deadline-aware bandit (:mod:`harl.task_scheduler`) or
MetaSchedule's gradient scheduler"""


@dataclass(frozen=True)
class TuningSpec:
    """A tuning run's budget and search. Invalid values raise :class:`BadInputError` naming
    the command-line option."""

    trials: int
    """trials to measure at most (``harl.budget.UNLIMITED_TRIALS``: the time budget decides)"""
    time_budget_s: float | None = None
    """stop at the first batch boundary after this many seconds"""
    strategy: Any = "evolutionary"
    """a name in ``harl.strategies.STRATEGIES``, a ``Strategy`` or a MetaSchedule
    ``SearchStrategy``"""
    seed: int = 0
    """what the run samples and the agent's initial weights"""
    min_trials_per_task: int = 4
    """measured warm-up samples each new task gets first"""
    cost_model: Any = "xgb"
    """``"xgb"``, a ``CostModel`` or the path of a saved one"""
    agent_path: str | Path | None = None
    """a learning strategy's agent: loaded from here if it exists, saved here after the run"""
    reserve_s_per_task: float = 0.0
    """seconds per task the caller needs after tuning (compiling), taken off the time budget"""
    task_scheduler: str | None = None
    """``harl`` or ``gradient`` (MetaSchedule's): which task gets the next round; None: the
    strategy's own (HARL's for ``harl``, gradient for ``evolutionary``)"""

    def __post_init__(self) -> None:
        if self.trials < 0:
            raise BadInputError(f"--trials must be >= 0, got {self.trials}")
        if self.min_trials_per_task < 0:
            raise BadInputError(
                f"--min-trials-per-task must be >= 0, got {self.min_trials_per_task}"
            )
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise BadInputError(
                f"--time-budget must be more than 0 seconds, got {self.time_budget_s}"
            )
        if self.task_scheduler is not None and self.task_scheduler not in TASK_SCHEDULERS:
            raise BadInputError(
                f"unknown --task-scheduler {self.task_scheduler!r}: choose one of "
                f"{', '.join(TASK_SCHEDULERS)}"
            )

"""Tuning budgets in wall time: ``--time-budget 20m`` next to ``--trials``.

A :class:`Deadline` is checked before every measured batch (warm-up chunks and search rounds), and
a batch is cut to the trials that fit in the time left at the run's pace, so tuning ends close to
the deadline and keeps everything measured. Every search strategy runs as a
:class:`harl.tuning.BudgetedStrategy`, whose rounds are also cut to the trials left of ``--trials``
(MetaSchedule itself lets the last round overshoot its global budget) and which ends a task's
search (``None``: no more candidates) when not one more trial fits, the way MetaSchedule ends a
converged task.
MetaSchedule's evolutionary search counts the trials it was told about
(``notify_runner_results``), so a cut round is safe.
"""

from __future__ import annotations

import math
import time

UNLIMITED_TRIALS = 1_000_000  # --time-budget without --trials: the deadline decides


class Deadline:
    """A point in (monotonic) time after which no new batch of trials starts."""

    def __init__(self, seconds: float | None, start: float | None = None):
        self.seconds = seconds
        self.start = time.monotonic() if start is None else start
        self.per_trial_s: float | None = None  # the run's wall seconds per trial so far

    def affordable(self, wanted: int) -> int:
        """How many of ``wanted`` trials fit in the time left at the run's pace (all of them
        without a deadline or before any trial was timed; 0 once it has passed)."""
        if self.seconds is None or self.per_trial_s is None:
            return 0 if self.expired() else wanted
        return max(0, min(wanted, int(self.remaining() / self.per_trial_s)))

    @property
    def unlimited(self) -> bool:
        return self.seconds is None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        """Seconds left (``inf`` without a deadline, never negative)."""
        if self.seconds is None:
            return math.inf
        return max(0.0, self.seconds - self.elapsed())

    def expired(self) -> bool:
        return self.remaining() <= 0.0


class Allowance:
    """What a search may still spend: trials (issued, not yet measured, count) and time."""

    def __init__(self, trials: int, deadline: Deadline):
        self.trials, self.deadline = trials, deadline

    def available(self, wanted: int) -> int:
        return max(0, min(wanted, self.trials, self.deadline.affordable(wanted)))

    def take(self, wanted: int) -> int:
        n = self.available(wanted)
        self.trials -= n
        return n

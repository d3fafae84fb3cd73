"""``--time-budget`` for the whole ``optimize`` run: what each stage may spend, and what each
stage spent.

The budget covers import to package. The rewrite stage gets :data:`REWRITE_SHARE` of it (its
search stops there with the best graph so far); tuning gets what is left once the package
stage's reserve is set aside (compiling and measuring the artifact: the measuring protocol's
time limit, plus :data:`COMPILE_SHARE` of the budget for compilation).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

REWRITE_SHARE = 0.2
COMPILE_SHARE = 0.05
MIN_COMPILE_S = 5.0
MIN_TUNE_S = 1.0  # tuning with less measures nothing: every kernel gets its fallback


@dataclass
class RunClock:
    """Seconds spent per stage, and what is left of ``budget_s`` (None: no time budget)."""

    budget_s: float | None
    started: float = field(default_factory=time.monotonic)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(time.monotonic() - t0, 1)

    def left(self) -> float | None:
        if self.budget_s is None:
            return None
        return self.budget_s - (time.monotonic() - self.started)

    def rewrite_s(self) -> float | None:
        """The rewrite stage's share (what is left, if the import took more)."""
        if self.budget_s is None:
            return None
        return max(0.0, min(REWRITE_SHARE * self.budget_s, self.left() or 0.0))

    def tune_s(self, measure_s: float) -> float | None:
        """What tuning may spend: what is left less the package stage's reserve."""
        if self.budget_s is None:
            return None
        reserve = measure_s + max(MIN_COMPILE_S, COMPILE_SHARE * self.budget_s)
        return max(MIN_TUNE_S, (self.left() or 0.0) - reserve)

    def summary(self) -> dict:
        return {
            "stage_seconds": dict(self.seconds),
            "total_seconds": round(time.monotonic() - self.started, 1),
            "time_budget_s": self.budget_s,
        }

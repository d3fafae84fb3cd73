"""``--time-budget`` for the whole ``optimize`` run: what each stage may spend, and what each
stage spent.

The budget covers import to package. The rewrite stage gets :data:`REWRITE_SHARE` of it (its
search stops pricing candidates there with the best graph so far); tuning gets what is left
once the package stage's reserve is set aside: :data:`PACKAGE_FIXED_S` (verification in a
fresh process, the kernel table), the measuring protocol's time limit with a fifth more for its
minimum blocks, and :data:`COMPILE_S_PER_TASK` per kernel, which tuning subtracts once it knows
the model's kernels (a ResNet-50-depth CNN's 29 kernels took 45-55 s to compile here).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from harl.tuning import MIN_TUNING_S

REWRITE_SHARE = 0.2
PACKAGE_FIXED_S = 8.0
COMPILE_S_PER_TASK = 2.0


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
        """What tuning may spend, before its per-kernel reserve (:data:`COMPILE_S_PER_TASK`):
        what is left less the package stage's fixed reserve and its measurement."""
        if self.budget_s is None:
            return None
        reserve = PACKAGE_FIXED_S + 1.2 * measure_s
        return max(MIN_TUNING_S, (self.left() or 0.0) - reserve)

    def summary(self) -> dict:
        return {
            "stage_seconds": dict(self.seconds),
            "total_seconds": round(time.monotonic() - self.started, 1),
            "time_budget_s": self.budget_s,
        }

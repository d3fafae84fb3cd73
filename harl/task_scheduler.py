"""HARL's task level: which task (fused kernel) gets the next round of measurements.

A bandit over tasks that spends wall time, not trials. After each round of task i, its reward is
the drop in the model's weighted latency, as a fraction of the current total, per second the
round took (search, build and run):

    r_i = w_i · (best_i before − best_i after) / (Σ_j w_j · best_j) / round seconds

so a kernel whose trials build slowly has to earn more per trial. Every task gets one round first.
Then the next task maximises

    mean of its last rewards + c · (share_i / pace_i) · sqrt(ln N / n_i)

where ``share_i`` is the task's part of the weighted latency (a big kernel deserves exploration),
``pace_i`` the seconds its rounds take (a moving average of its own rounds) and ``n_i`` its rounds
so far: both terms are a fraction of the model's latency per second.

Under a deadline (``--time-budget``, :meth:`use_deadline`) the minutes left decide too:

- exploration shrinks with the share of the time budget left (``c`` at the start, 0 at the
  deadline): late rounds go where the measured gain is;
- a task whose rounds take longer than the time left is not chosen while another fits.

A task whose last ``patience`` rounds brought no gain is terminated: converged tasks stop
receiving time. When every task has converged the tuning ends early.

:class:`TaskBandit` holds these decisions, free of TVM; :func:`HARLTaskScheduler` plugs it into
MetaSchedule (``PyTaskScheduler.next_task_id``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence

import numpy as np

from harl.database import mean_run_secs
from harl.spec import TASK_SCHEDULERS
from harlflow.core.errors import BadInputError

PACE_MEMORY = 0.5  # weight of a task's newest round in its moving-average round seconds


class TaskBandit:
    """Which of ``n`` tasks (with MetaSchedule task weights ``weights``) gets the next round.

    ``choose`` returns a task index (or -1 when none is alive); ``learn`` takes what a round of
    it measured and how long it took, and says whether the task has converged.
    """

    def __init__(
        self,
        weights: Sequence[float],
        *,
        seed: int = 0,
        c: float = 0.5,
        window: int = 3,
        patience: int = 3,
        deadline=None,
    ):
        n = len(weights)
        self.weights = [float(w) for w in weights]
        self.rng = np.random.default_rng(seed)
        self.c, self.window, self.patience = c, window, patience
        self.deadline = deadline  # a harl.budget.Deadline, or None: no time budget
        self.best = [math.inf] * n
        self.rewards: list[list[float]] = [[] for _ in range(n)]
        self.rounds = [0] * n
        self.pace_s: list[float | None] = [None] * n  # seconds per round, moving average

    def _total(self) -> float:
        return sum(w * b for w, b in zip(self.weights, self.best, strict=True) if math.isfinite(b))

    def _share(self, i: int, total: float) -> float:
        if not total or not math.isfinite(self.best[i]):
            return 1.0
        return self.weights[i] * self.best[i] / total

    def exploration(self) -> float:
        """``c``, scaled by the share of the time budget still left under a deadline."""
        d = self.deadline
        if d is None or d.unlimited or not d.seconds:
            return self.c
        return self.c * min(1.0, d.remaining() / d.seconds)

    def _fits(self, alive: list[int]) -> list[int]:
        """The alive tasks whose rounds (as measured so far) fit in the time left."""
        d = self.deadline
        if d is None or d.unlimited:
            return alive
        left = d.remaining()
        return [i for i in alive if self.pace_s[i] is None or self.pace_s[i] <= left]

    def scores(self, alive: list[int]) -> list[float]:
        """Each alive task's value of a round: recent gain per second plus exploration."""
        total = self._total()
        big_n = sum(self.rounds) + 1
        c = self.exploration()
        known = [p for p in self.pace_s if p]
        typical = float(np.median(known)) if known else 1.0
        out = []
        for i in alive:
            mean = float(np.mean(self.rewards[i][-self.window :])) if self.rewards[i] else 0.0
            pace = self.pace_s[i] or typical
            bonus = self._share(i, total) / pace * math.sqrt(math.log(big_n) / self.rounds[i])
            out.append(mean + c * bonus)
        return out

    def choose(self, alive: list[int]) -> int:
        """The task of the next round (the counting is done here): one round each first, then
        the best score among the tasks that fit in the time left (all, if none fits)."""
        if not alive:
            return -1
        unseen = [i for i in alive if self.rounds[i] == 0]
        if unseen:
            choice = unseen[0]
        else:
            pool = self._fits(alive) or alive
            scores = self.scores(pool)
            top = max(scores)
            choice = pool[int(self.rng.choice([k for k, s in enumerate(scores) if s == top]))]
        self.rounds[choice] += 1
        return choice

    def learn(self, i: int, secs: Sequence[float], trials: int, seconds: float) -> bool:
        """A round of task ``i``: ``secs`` its valid measured run times (of ``trials`` trials)
        in ``seconds`` of wall time. True when the task has converged (no gain for
        ``patience`` rounds): it should get no more rounds."""
        seconds = max(seconds, 1e-3)
        old = self.pace_s[i]
        self.pace_s[i] = seconds if old is None else PACE_MEMORY * seconds + (1 - PACE_MEMORY) * old
        before = self.best[i]
        after = min([before, *secs])
        self.best[i] = after
        total = self._total() or 1.0
        gain = 0.0 if not math.isfinite(before) else self.weights[i] * (before - after) / total
        self.rewards[i].append(gain / seconds if trials else 0.0)
        recent = self.rewards[i][-self.patience :]
        return len(self.rewards[i]) > self.patience and all(r <= 1e-9 for r in recent)


@functools.cache
def _make_scheduler_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class HARLTaskScheduler(ms.task_scheduler.PyTaskScheduler):
        """MetaSchedule's task loop asking a :class:`TaskBandit` for the next task."""

        def __init__(self, *, seed: int = 0, c: float = 0.5, window: int = 3, patience: int = 3):
            super().__init__()
            self.settings = {"seed": seed, "c": c, "window": window, "patience": patience}
            self.deadline = None
            self.bandit: TaskBandit | None = None
            self.last: int | None = None
            self.started = 0.0  # when the last round was handed out (monotonic seconds)

        def use_deadline(self, deadline) -> None:
            """Spend the time left of ``deadline`` (a :class:`harl.budget.Deadline`)."""
            self.deadline = deadline
            if self.bandit is not None:
                self.bandit.deadline = deadline

        def next_task_id(self) -> int:
            outer = self._outer()
            tasks = outer.tasks_
            n = len(tasks)
            if self.bandit is None:
                weights = [float(t.task_weight) for t in tasks]
                self.bandit = TaskBandit(weights, deadline=self.deadline, **self.settings)
            if self.last is not None and not tasks[self.last].is_terminated:
                results = outer.join_running_task(self.last)
                secs = [
                    mean_run_secs(r.run_secs) for r in results if r.error_msg is None and r.run_secs
                ]
                took = time.monotonic() - self.started
                if self.bandit.learn(self.last, secs, len(results), took):
                    outer.terminate_task(self.last)
            for i in range(n):
                outer.touch_task(i)
            choice = self.bandit.choose([i for i in range(n) if not tasks[i].is_terminated])
            self.last = None if choice < 0 else choice
            self.started = time.monotonic()
            return choice

    return HARLTaskScheduler


def HARLTaskScheduler(**kwargs):  # noqa: N802 (a factory that reads like the class it builds)
    """Build HARL's task scheduler (the TVM-derived class is created on first use)."""
    return _make_scheduler_class()(**kwargs)


def create_task_scheduler(name: str, *, seed: int = 0):
    """A task scheduler by name (one of :data:`harl.spec.TASK_SCHEDULERS`): HARL's
    (:func:`HARLTaskScheduler`) or MetaSchedule's ``gradient`` (its name: ``ms.tune_tasks``
    builds it)."""
    if name == "harl":
        return HARLTaskScheduler(seed=seed)
    if name == "gradient":
        return "gradient"
    raise BadInputError(
        f"unknown task scheduler {name!r}: choose one of {', '.join(TASK_SCHEDULERS)}"
    )

"""HARL's task level: which task (fused kernel) gets the next round of measurements.

A bandit over tasks. After each round of task i, its reward is the drop in the model's weighted
latency per trial spent, relative to the current total:

    r_i = w_i · (best_i before − best_i after) / (Σ_j w_j · best_j) / trials

Every task gets one round first. Then the next task maximises
``mean of its last rewards + c · share_i · sqrt(ln N / n_i)``, where ``share_i`` is the task's
part of the weighted latency (big kernels deserve exploration) and ``n_i`` its rounds so far.
A task whose last ``patience`` rounds brought no gain is terminated: converged tasks stop
receiving trials. When every task has converged the tuning ends early.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from harl.database import mean_run_secs


@functools.cache
def _make_scheduler_class():
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class HARLTaskScheduler(ms.task_scheduler.PyTaskScheduler):
        """UCB-style learned task selection rewarded by weighted-latency drop per trial."""

        def __init__(self, *, seed: int = 0, c: float = 0.5, window: int = 3, patience: int = 3):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.c, self.window, self.patience = c, window, patience
            self.best: list[float] = []
            self.rewards: list[list[float]] = []
            self.rounds: list[int] = []
            self.last: int | None = None

        def next_task_id(self) -> int:
            outer = self._outer()
            tasks = outer.tasks_
            n = len(tasks)
            if not self.best:
                self.best, self.rewards, self.rounds = (
                    [math.inf] * n,
                    [[] for _ in range(n)],
                    [0] * n,
                )
            if self.last is not None and not tasks[self.last].is_terminated:
                self._learn(self.last, outer.join_running_task(self.last), tasks)
            for i in range(n):
                outer.touch_task(i)
            alive = [i for i in range(n) if not tasks[i].is_terminated]
            if not alive:
                return -1
            unseen = [i for i in alive if self.rounds[i] == 0]
            if unseen:
                choice = unseen[0]
            else:
                total = sum(
                    tasks[i].task_weight * self.best[i]
                    for i in range(n)
                    if math.isfinite(self.best[i])
                )
                big_n = sum(self.rounds) + 1
                scores = []
                for i in alive:
                    share = (
                        tasks[i].task_weight * self.best[i] / total
                        if total and math.isfinite(self.best[i])
                        else 1.0
                    )
                    mean = (
                        float(np.mean(self.rewards[i][-self.window :])) if self.rewards[i] else 0.0
                    )
                    scores.append(
                        mean + self.c * share * math.sqrt(math.log(big_n) / self.rounds[i])
                    )
                top = max(scores)
                choice = alive[int(self.rng.choice([k for k, s in enumerate(scores) if s == top]))]
            self.rounds[choice] += 1
            self.last = choice
            return choice

        def _learn(self, i: int, results, tasks) -> None:
            secs = [
                mean_run_secs(r.run_secs) for r in results if r.error_msg is None and r.run_secs
            ]
            before = self.best[i]
            after = min([before, *secs])
            self.best[i] = after
            finite = [tasks[j].task_weight * b for j, b in enumerate(self.best) if math.isfinite(b)]
            total = sum(finite) or 1.0
            gain = (
                0.0
                if not math.isfinite(before)
                else tasks[i].task_weight * (before - after) / total
            )
            reward = gain / max(1, len(results))
            self.rewards[i].append(reward)
            recent = self.rewards[i][-self.patience :]
            if len(self.rewards[i]) > self.patience and all(r <= 1e-6 for r in recent):
                self._outer().terminate_task(i)

    return HARLTaskScheduler


def HARLTaskScheduler(**kwargs):  # noqa: N802 (a factory that reads like the class it builds)
    """Build HARL's task scheduler (the TVM-derived class is created on first use)."""
    return _make_scheduler_class()(**kwargs)

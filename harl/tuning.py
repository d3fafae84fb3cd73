"""The tuning loop: every new task of a model gets a measured warm-up, then the search strategy
spends what is left of the budget, and every measurement lands in the shared database.

This module is a library: plain inputs (a prepared Relax IRModule, a target dict, a database
directory, a budget, a seed), plain outputs (:class:`TuneResult`), progress through a callback.
The pieces it drives live in their own modules: :mod:`harl.compilation` (tasks, compiling),
:mod:`harl.database`, :mod:`harl.journal` (resuming), :mod:`harl.warmup`, :mod:`harl.budget`
and :mod:`harl.strategies` (what searches).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from harl._fast_import import import_tensor_intrinsics
from harl.budget import Allowance, Deadline
from harl.builders import default_builder
from harl.compilation import extract_tasks, task_flop
from harl.cost_model.online import create_cost_model
from harl.database import (
    best_records,
    count_records,
    local_dir,
    locked,
    mean_run_secs,
    open_database,
)
from harl.journal import RunJournal
from harl.spec import TuningSpec
from harl.strategies import Strategy, create_strategy
from harl.warmup import measure_random
from harlflow import rl
from harlflow.core.errors import StoreError, TuningError, first_line
from harlflow.core.targets import use_target_threads

log = logging.getLogger("harl.tuning")

TINY_SHARE = 0.01  # tasks under 1% of the model's FLOPs: two warm-up trials, and no search
# unless they measure at 1% of the model's time or more (still_tiny)


@dataclass
class TaskSummary:
    """One MetaSchedule task (a fused kernel) and how its schedule was obtained."""

    name: str
    weight: float
    flop: float
    trials: int = 0  # trials measured for it in this run
    failed: int = 0  # of those, trials whose build or run failed (e.g. an RPC server died)
    best_us: float | None = None  # best measured latency, this run or an earlier one
    schedule: str = "fallback"  # "tuned" (this run) | "database" (earlier run) | "fallback"


@dataclass
class Progress:
    """One progress report: after every measured batch."""

    trials: int
    budget: int
    task: str
    best_task_us: float | None
    weighted_us: float | None  # Σ weight × best latency over tasks measured so far
    elapsed_s: float
    remaining_s: float | None = None  # time left of --time-budget (None: a trial budget only)
    tasks_measured: int = 0  # tasks with a measured latency (weighted_us sums only these)
    tasks_total: int = 0


@dataclass
class TuneResult:
    """What :func:`tune` did: per-task summaries, trials spent, convergence history."""

    target: dict[str, Any]
    strategy: str
    budget: int
    trials: int
    seconds: float
    tasks: list[TaskSummary]
    history: list[Progress] = field(default_factory=list)
    agent_metrics: list[dict[str, float]] = field(default_factory=list)  # HARL's PPO updates
    runner: str = "local"  # where trials were measured: "local" or "rpc HOST:PORT:KEY"
    resumed_trials: int = 0  # trials an interrupted run of the same command had measured
    time_budget_s: float | None = None  # --time-budget, when given
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds per tuning phase

    @property
    def weighted_latency_us(self) -> float | None:
        """Σ weight × best measured latency, over the tasks that have a measurement."""
        known = [t.weight * t.best_us for t in self.tasks if t.best_us is not None]
        return sum(known) if known else None

    def summary(self) -> dict[str, Any]:
        counts = {
            s: sum(t.schedule == s for t in self.tasks) for s in ("tuned", "database", "fallback")
        }
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "trials": self.trials,
            "trials_failed": sum(t.failed for t in self.tasks),
            "resumed_trials": self.resumed_trials,
            "tuning_seconds": round(self.seconds, 2),
            "time_budget_s": self.time_budget_s,
            "seconds_per_trial": round(self.seconds / self.trials, 3) if self.trials else None,
            "tasks": len(self.tasks),
            "tasks_tuned": counts["tuned"],
            "tasks_from_database": counts["database"],
            "tasks_fallback": counts["fallback"],
            "weighted_latency_us": self.weighted_latency_us,
        }


def importance(summaries: list[TaskSummary]) -> list[float]:
    """Each task's share of the model's FLOPs (weight × FLOP / Σ), 0 when unknown."""
    work = [s.weight * s.flop if math.isfinite(s.flop) else 0.0 for s in summaries]
    total = sum(work)
    return [w / total if total > 0 else 1.0 / max(1, len(work)) for w in work]


def tiny_by_flops(summaries: list[TaskSummary]) -> set[str]:
    """The tasks under :data:`TINY_SHARE` of the model's FLOPs (:func:`importance`): two
    warm-up trials each, and a search only if :func:`still_tiny` lets them go."""
    shares = importance(summaries)
    return {s.name for s, share in zip(summaries, shares, strict=True) if share < TINY_SHARE}


def still_tiny(tiny: set[str], summaries: list[TaskSummary]) -> set[str]:
    """Of the tasks ``tiny`` by FLOPs, those still under :data:`TINY_SHARE` of the model's
    measured time (Σ weight × best latency) once the warm-up has measured them. A reduction or
    a pooling does few FLOPs per byte: inception's global mean took 8 % of the kernel time
    with 0.1 % of the FLOPs, and a search took it from 21 to 7 µs. An unmeasured task stays
    tiny."""
    measured = {s.name: s.weight * s.best_us for s in summaries if s.best_us is not None}
    total = sum(measured.values())
    kept = {n for n in tiny if n not in measured or measured[n] < TINY_SHARE * total}
    if kept != tiny:
        promoted = ", ".join(sorted(tiny - kept))
        log.info("searched after all, at %.0f%% of the measured time or more: %s",
                 100 * TINY_SHARE, promoted)  # fmt: skip
    return kept


class _Tracker:
    """Counts trials, keeps each task's best latency and reports progress after every trial."""

    def __init__(
        self,
        summaries: list[TaskSummary],
        budget: int,
        history: list[Progress],
        on_progress: Callable[[Progress], None] | None,
        deadline,
    ):
        self.summaries, self.budget, self.history = summaries, budget, history
        self.on_progress = on_progress
        self.deadline = deadline
        self.trials = 0
        self.measured_now = 0  # trials measured by this process (not resumed ones)
        self.t0 = deadline.elapsed()  # when measuring started (after task extraction)

    def measured(self, summary: TaskSummary, run_secs: list[float] | None) -> None:
        """One trial of ``summary``'s task: ``run_secs`` measured, or None when it failed."""
        summary.trials += 1
        if run_secs:
            us = mean_run_secs(run_secs) * 1e6
            if summary.best_us is None or us < summary.best_us:
                summary.best_us = us
        else:
            summary.failed += 1
        self.trials += 1
        self.measured_now += 1
        self.deadline.per_trial_s = (self.deadline.elapsed() - self.t0) / self.measured_now
        known = [t.weight * t.best_us for t in self.summaries if t.best_us is not None]
        event = Progress(
            trials=self.trials,
            budget=self.budget,
            task=summary.name,
            best_task_us=summary.best_us,
            weighted_us=sum(known) if known else None,
            elapsed_s=self.deadline.elapsed(),
            remaining_s=None if self.deadline.unlimited else self.deadline.remaining(),
            tasks_measured=len(known),
            tasks_total=len(self.summaries),
        )
        self.history.append(event)
        if self.on_progress is not None:
            self.on_progress(event)

    def callback(self, summaries: list[TaskSummary]):
        """A MetaSchedule measure callback feeding this tracker (``summaries`` in task order)."""
        return ProgressCallback(self, summaries)


@derived_object
class ProgressCallback(ms.measure_callback.PyMeasureCallback):
    """Reports every measured trial of a MetaSchedule search to a :class:`_Tracker`."""

    def __init__(self, tracker: _Tracker, summaries: list[TaskSummary]):
        self.tracker, self.summaries = tracker, summaries

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        summary = self.summaries[task_id]
        for br, rr in zip(builder_results, runner_results, strict=True):
            ok = br.error_msg is None and rr.error_msg is None and rr.run_secs
            self.tracker.measured(summary, [float(x) for x in rr.run_secs] if ok else None)


@derived_object
class BudgetedStrategy(ms.search_strategy.PySearchStrategy):
    """Wraps a search strategy: its rounds are cut to what the shared allowance still has,
    and it ends (``None``) when not one more trial fits."""

    def __init__(self, inner, allowance: Allowance):
        self.inner, self.allowance = inner, allowance

    def _initialize_with_tune_context(self, context) -> None:
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(
        self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None
    ) -> None:
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        if self.allowance.available(1) == 0:
            return None
        candidates = self.inner.generate_measure_candidates()
        if candidates is None:
            return None
        keep = self.allowance.take(len(candidates))  # the search itself took time
        return list(candidates)[:keep] if keep else None

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self):
        return BudgetedStrategy(self.inner.clone(), self.allowance)


def trials_per_round(budget: int, num_tasks: int) -> int:
    """Measurements per search round: every task gets about two rounds of a small budget; large
    budgets batch up to 32, amortising each round's ~5-10 s of evolutionary search (on 2 cores)
    over more trials."""
    return max(8, min(32, budget // max(1, 2 * num_tasks)))


MIN_TUNING_S = 1.0  # a reserve larger than the budget still leaves the warm-up's first chunk
SECONDS_PER_TRIAL_GUESS = 0.7  # sizes search rounds under --time-budget before warm-up measured


def tune(
    mod,
    target: dict[str, Any],
    database_dir: str | Path,
    spec: TuningSpec | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    builder=None,
    runner=None,
    work_dir: str | Path | None = None,
    **fields: Any,
) -> TuneResult:
    """Tune the tasks of a prepared module whose workloads the database has not measured yet,
    as ``spec`` says (a :class:`~harl.spec.TuningSpec`; or its fields as keywords).

    Workloads with valid records for this target are not measured again; the budget goes to new
    ones. Each new task first gets ``min_trials_per_task`` measured samples, most of them
    register-blocked, as far as ``trials`` goes (a small ``trials`` measures the heaviest tasks'
    first samples; trials spent never exceed ``trials``); tasks under
    ``TINY_SHARE`` of the model's FLOPs get one sample plus their unscheduled kernel, and no
    search unless they measured at ``TINY_SHARE`` of the model's time or more
    (:func:`still_tiny`). What remains of ``trials`` goes to the search ``strategy`` (a name in
    :data:`harl.strategies.STRATEGIES`, a :class:`~harl.strategies.Strategy` or a MetaSchedule
    ``SearchStrategy``). ``time_budget_s`` stops tuning at the first batch boundary after that
    many seconds, whatever is left of ``trials``, less ``reserve_s_per_task`` per task (what
    the caller needs after tuning, e.g. compiling every kernel). ``trials=0`` measures nothing.
    Every
    measurement lands in the database. A module with no task (every operator a VM builtin)
    has nothing to tune: the result is empty.

    ``cost_model`` is what both strategies rank candidates with: ``"xgb"`` (MetaSchedule's
    XGBoost), a :class:`~harl.cost_model.model.CostModel` or the path of a saved one, which keeps
    learning from the run's measurements (:mod:`harl.cost_model.online`).

    A learning strategy's agent starts from ``agent_path`` when that file exists and is saved
    there afterwards (warm start across runs); without one, HARL with a learned cost model starts
    from the agent pre-trained offline on its rewards (:mod:`harl.pretraining`). ``seed`` seeds
    the run: what it samples and the agent's initial weights (:func:`harlflow.rl.setup`).
    """
    if spec is None:
        spec = TuningSpec(**fields)
    elif fields:
        raise TypeError(f"tune() takes a spec or its fields, not both: {sorted(fields)}")
    rl.setup(spec.seed)  # before the agent's network is built
    # the shipped HARL agent learned from the learned cost model's rewards; with XGBoost's (a
    # different ranking) it measured worse than a fresh agent (bench/harl_vs_ms.py, measured
    # before rewards were normalised by ScoreScale, which removed the difference in scale)
    learned = not (isinstance(spec.cost_model, str) and spec.cost_model == "xgb")
    chosen = create_strategy(
        spec.strategy,
        seed=spec.seed,
        agent_path=spec.agent_path,
        pretrained=learned,
        task_scheduler=spec.task_scheduler,
    )
    ranker = create_cost_model(spec.cost_model, target)
    import_tensor_intrinsics()
    use_target_threads(target)  # before the runner's worker process starts: it inherits it
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # tables go to files
    with locked(database_dir):
        return _tune(
            mod, target, database_dir, spec, chosen, ranker, on_progress, builder, runner, work_dir
        )


def _tune(
    mod, target, database_dir, spec: TuningSpec, strategy: Strategy, cost_model, on_progress,
    builder, runner, work_dir,
) -> TuneResult:  # fmt: skip
    """:func:`tune`'s body, run while holding the database's lock."""
    from harl.runners import make_runner

    trials, time_budget_s, seed = spec.trials, spec.time_budget_s, spec.seed
    min_trials_per_task, reserve_s_per_task = spec.min_trials_per_task, spec.reserve_s_per_task

    deadline = Deadline(time_budget_s)
    tasks = extract_tasks(mod, target)
    if time_budget_s is not None and reserve_s_per_task:
        left = max(MIN_TUNING_S, time_budget_s - reserve_s_per_task * len(tasks))
        deadline = Deadline(left, start=deadline.start)
    result = TuneResult(
        target=target,
        strategy=strategy.name,
        budget=trials,
        trials=0,
        seconds=0.0,
        tasks=[],
        time_budget_s=time_budget_s,
    )
    if not tasks:
        log.info("no tuning task: every operator of the model runs as a VM builtin")
        return result
    db = open_database(database_dir)
    journal = RunJournal(
        local_dir(database_dir),
        tasks,
        target,
        strategy=strategy.name,
        budget=trials,
        seed=seed,
        min_trials_per_task=min_trials_per_task,
        time_budget_s=time_budget_s,
    )
    interrupted = journal.load() if trials else None
    result.tasks, new = _summaries(tasks, db, target, interrupted)
    result.phases["extract_s"] = round(deadline.elapsed(), 2)
    log.info("%d tasks: %d in the database, %d new", len(tasks), len(tasks) - len(new), len(new))
    if trials == 0 or not new:
        journal.finish()
        result.seconds = deadline.elapsed()
        return result
    recorded = count_records(db, [t for t, _ in new], target)
    if interrupted:
        result.resumed_trials = recorded - interrupted["records"]
        log.info(
            "resuming an interrupted run: %d of its %d trials were measured before it "
            "stopped and are not measured again",
            result.resumed_trials,
            trials,
        )
    else:
        journal.start([t.task_name for t, _ in new], recorded)
    share = dict(zip([s.name for s in result.tasks], importance(result.tasks), strict=True))
    new.sort(key=lambda ts: -share[ts[1].name])  # the heaviest kernels first
    tracker = _Tracker(result.tasks, trials, result.history, on_progress, deadline)
    tracker.trials = result.resumed_trials
    own_builder, own_runner = builder is None, runner is None
    builder = builder or default_builder(time_budget_s=time_budget_s)
    runner = runner or make_runner(None)
    try:
        tiny = tiny_by_flops(result.tasks) & {s.name for _, s in new}
        jobs = [
            (t, s, 1 if s.name in tiny else min_trials_per_task)
            for t, s in new
            if s.best_us is None
        ]
        if min_trials_per_task and jobs:
            measure_random(
                jobs,
                db,
                target,
                seed,
                builder,
                runner,
                tracker.measured,
                deadline,
                tiny=tiny,
                limit=trials - tracker.trials,
            )
        result.phases["warm_up_s"] = round(deadline.elapsed() - result.phases["extract_s"], 2)
        tiny = still_tiny(tiny, result.tasks)
        searched = [(t, s) for t, s in new if s.name not in tiny]
        remaining = trials - tracker.trials
        if searched and remaining > 0 and not deadline.expired():
            _search(
                strategy,
                searched,
                target,
                db,
                builder,
                runner,
                tracker,
                deadline,
                remaining=remaining,
                seed=seed,
                work_dir=work_dir,
                cost_model=cost_model,
            )
            result.agent_metrics = list(strategy.metrics)
            if strategy.agent is not None and spec.agent_path:
                strategy.agent.save(spec.agent_path)
        result.phases["search_s"] = round(
            deadline.elapsed() - result.phases["extract_s"] - result.phases["warm_up_s"], 2
        )
    except StoreError:
        raise  # the tuning store went away (harl.sql_database retried): its own one line
    except Exception as e:
        log.debug("tuning failed", exc_info=True)  # the whole traceback, for whoever debugs
        raise TuningError(f"tuning failed: {first_line(e)}") from e
    finally:
        if own_builder:
            builder.close()  # no build worker outlives the run
        if own_runner and getattr(runner, "pool", None) is not None:
            runner.pool.shutdown()  # nor the runner's (LocalRunner keeps one worker)
    journal.finish()
    for _, s in new:
        if s.best_us is not None:
            s.schedule = "tuned"
    result.trials = tracker.trials - result.resumed_trials
    result.seconds = deadline.elapsed()
    return result


def _summaries(tasks, db, target, interrupted) -> tuple[list[TaskSummary], list]:
    """Every task's summary (its best latency so far from the database), and the ``(task,
    summary)`` pairs to tune: never measured, or measured by an interrupted run of this
    same command."""
    summaries, new = [], []
    for t in tasks:
        s = TaskSummary(name=t.task_name, weight=float(t.weight), flop=task_flop(t))
        prior = best_records(db, t.dispatched[0], target)
        if prior:
            s.best_us = mean_run_secs(prior[0].run_secs) * 1e6
        if prior and not (interrupted and t.task_name in interrupted["tasks"]):
            s.schedule = "database"
        else:
            new.append((t, s))
        summaries.append(s)
    return summaries, new


def _search(
    strategy: Strategy,
    searched,
    target,
    db,
    builder,
    runner,
    tracker,
    deadline,
    *,
    remaining: int,
    seed: int,
    work_dir,
    cost_model,
) -> None:
    """MetaSchedule's ``tune_tasks`` over the searched tasks with ``strategy``, held to
    ``remaining`` trials and the deadline (:class:`BudgetedStrategy`)."""
    affordable = remaining
    if not deadline.unlimited:  # the tracker keeps the run's pace in deadline.per_trial_s
        pace = deadline.per_trial_s or SECONDS_PER_TRIAL_GUESS
        affordable = min(remaining, int(deadline.remaining() / pace))
    if hasattr(strategy.task_scheduler, "use_deadline"):  # HARL's spends the time left
        strategy.task_scheduler.use_deadline(deadline)
    with tempfile.TemporaryDirectory(prefix="harl-tune-") as tmp, _named_handlers_only():
        logs_dir = str(work_dir or tmp)
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t for t, _ in searched],
            logs_dir,
            strategy=BudgetedStrategy(strategy.search, Allowance(remaining, deadline)),
            seed=seed,
            num_threads=int(target.get("num-cores", 1)),
        )
        ms.tune_tasks(
            tasks=ctxs,
            task_weights=weights,
            work_dir=logs_dir,
            max_trials_global=remaining,
            num_trials_per_iter=trials_per_round(max(1, affordable), len(searched)),
            builder=builder,
            runner=runner,
            database=db,
            measure_callbacks=[
                *ms.measure_callback.MeasureCallback.create("default"),
                tracker.callback([s for _, s in searched]),
            ],
            task_scheduler=strategy.task_scheduler,
            cost_model=cost_model,
        )


@contextlib.contextmanager
def _named_handlers_only() -> Iterator[None]:
    """Detach unnamed handlers from MetaSchedule's logger while it configures its loggers.

    ``create_loggers`` re-lists the logger's handlers by ``get_name()`` and formats each name,
    so one unnamed handler (pytest's log capture attaches two) aborts tuning with
    "'NoneType' object has no attribute 'format'". They are put back afterwards.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    unnamed = [h for h in logger.handlers if h.get_name() is None]
    for h in unnamed:
        logger.removeHandler(h)
    try:
        yield
    finally:
        for h in unnamed:
            logger.addHandler(h)

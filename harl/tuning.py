"""Operator tuning on TVM MetaSchedule: extract tasks, tune new workloads under a global trial
budget, give every untuned kernel a sensible fallback schedule, and compile.

This module is a library: plain inputs (a Relax IRModule, a target dict, a database directory,
a budget, a seed), plain outputs (:class:`TuneResult`), progress through a callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harl._fast_import import import_tensor_intrinsics
from harl.sampling import fallback_trace, sample_schedules
from harl.target import use_target_threads
from harlflow.errors import BadInputError, TuningError
from harlflow.locks import file_lock

log = logging.getLogger("harl.tuning")

FAILED_RUN_SECS = 1e9  # MetaSchedule records failed builds/runs with run_secs 1e10
STRATEGIES = ("evolutionary", "harl")


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


# --------------------------------------------------------------------------- preparation
def prepare(mod):
    """Inference decompositions, convolutions in NHWC, canonical bindings: the module that is
    compiled in the end.

    NHWC puts the output channels innermost, so a convolution's micro-kernel vectorises over
    channels (16 fp32 lanes, multiples of 16 in most layers) and broadcasts inputs; NCHW would
    vectorise over the image width (7, 14, 28, 56 in ResNet-18). The weights' transposes are
    constants and fold away; the model keeps its NCHW inputs and outputs.
    """
    from tvm import relax

    mod = relax.transform.DecomposeOpsForInference()(mod)
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
    return relax.transform.CanonicalizeBindings()(mod)


def extract_tasks(mod, target: dict[str, Any], *, prepack: bool = True):
    """MetaSchedule tasks of a prepared module, fused as :func:`compile_module` fuses it (weights
    marked layout-free when ``prepack``, so schedules may choose their layouts)."""
    from harl import pipeline

    try:
        return pipeline.extract_tasks(pipeline.fuse(mod, target, prepack=prepack), target)
    except Exception as e:
        raise TuningError(f"task extraction failed: {str(e).strip().splitlines()[-1]}") from None


# --------------------------------------------------------------------------- the database
def open_database(database_dir: str | Path):
    """The shared JSON tuning database (created if missing).

    A record line cut short by a killed process is dropped first (MetaSchedule would refuse to
    load the file); callers that share the directory with other processes hold :func:`locked`.
    """
    from tvm.s_tir import meta_schedule as ms

    Path(database_dir).mkdir(parents=True, exist_ok=True)
    for name in ("database_workload.json", "database_tuning_record.json"):
        _drop_partial_line(Path(database_dir) / name)
    return ms.database.JSONDatabase(work_dir=str(database_dir), module_equality="structural")


def _drop_partial_line(path: Path) -> None:
    """Truncate a JSON-lines file after its last complete line (a crash can cut one short)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    log.warning("%s: dropped a partial last record (%d bytes) left by an interrupted run",
                path, len(data) - keep)  # fmt: skip


def locked(database_dir: str | Path):
    """Exclusive use of a tuning database directory across processes, as a context manager.

    Two runs on one store take turns: one measuring at a time also keeps their timings honest
    on a shared machine.
    """
    return file_lock(Path(database_dir) / ".lock", f"the tuning database {database_dir}")


def _same_target(record, target_json: str) -> bool:
    import json

    return (
        record.target is not None
        and json.dumps(_target_key(record.target.export()), sort_keys=True) == target_json
    )


def _target_key(exported: dict[str, Any]) -> dict[str, Any]:
    """The parts of a target that decide code generation (kind, mcpu, cores, features)."""
    keep = ("kind", "mcpu", "mtriple", "mattr", "num-cores", "arch", "device")
    return {
        k: (list(v) if isinstance(v, (list, tuple)) else v)
        for k, v in exported.items()
        if k in keep
    }


def target_json(target: dict[str, Any]) -> str:
    import json

    import tvm

    return json.dumps(_target_key(tvm.target.Target(target).export()), sort_keys=True)


def records_on_target(db, mod, target: dict[str, Any]) -> list:
    """Every record of a workload on this target, fastest first (failed trials last)."""
    if not db.has_workload(mod):
        return []
    tj = target_json(target)
    return [r for r in db.get_top_k(db.commit_workload(mod), 1_000_000) if _same_target(r, tj)]


def best_records(db, mod, target: dict[str, Any], k: int = 1) -> list:
    """The ``k`` best valid records of a workload on this target (empty when none)."""
    valid = [
        r for r in records_on_target(db, mod, target)
        if r.run_secs and mean_run_secs(r.run_secs) < FAILED_RUN_SECS
    ]  # fmt: skip
    return valid[:k]


def mean_run_secs(run_secs) -> float:
    """Mean of a MetaSchedule record's or runner result's repeated run times, in seconds."""
    vals = [float(s) for s in run_secs]
    return sum(vals) / len(vals)


TINY_SHARE = 0.01  # tasks under 1% of the model's weighted FLOPs: two warm-up trials, no search
MICRO_KERNEL_SHARE = 0.75  # warm-up samples with register-blocked tiles (harl.sampling)


def importance(summaries: list[TaskSummary]) -> list[float]:
    """Each task's share of the model's FLOPs (weight × FLOP / Σ), 0 when unknown."""
    work = [s.weight * s.flop if math.isfinite(s.flop) else 0.0 for s in summaries]
    total = sum(work)
    return [w / total if total > 0 else 1.0 / max(1, len(work)) for w in work]


def unscheduled(task):
    """The task's kernel as TVM lowers it with no schedule: one thread, no launch of the thread
    pool. For kernels of a few µs (a transpose, a small reduction) the pool's launch costs more
    than the parallel work saves, so tiny tasks measure this candidate too."""
    from tvm.s_tir import Schedule

    sch = Schedule(task.dispatched[0])
    sch.get_sblock("root")  # a no-op: MetaSchedule's get_top_k skips records with empty traces
    return sch


def measure_random(jobs, db, target: dict[str, Any], seed: int, builder, runner,
                   report: Callable[[TaskSummary], None], deadline=None, chunk: int = 8,
                   tiny: set[str] | None = None) -> int:  # fmt: skip
    """Measure seeded samples of each task: the warm-up under any search. Returns trials spent.

    ``jobs`` is ``[(task, summary, count)]``, most important first; samples are interleaved
    across tasks (every task's first sample, then every task's second, ...) and measured in
    chunks of ``chunk``, so a ``deadline`` that cuts the warm-up short still leaves every big
    task measured. Most samples have register-blocked tiles (:mod:`harl.sampling`); each
    result is committed to ``db`` as it arrives (a killed run keeps every finished trial) and
    reported (``report(summary)`` per trial). Failed builds and runs are recorded as
    MetaSchedule records them (run_secs 1e10). Tasks named in ``tiny`` also measure their
    :func:`unscheduled` kernel.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from harl.budget import Deadline

    deadline = deadline or Deadline(None)
    tgt = tvm.target.Target(target)
    per_task = []
    for i, (task, summary, count) in enumerate(jobs):
        if deadline.expired():
            break
        samples = sample_schedules(task, target, count, seed + i, micro_kernel=MICRO_KERNEL_SHARE)
        if tiny is not None and summary.name in tiny:
            samples.insert(0, unscheduled(task))
        per_task.append([(task, summary, sch) for sch in samples])
    order = [row[k] for k in range(max(map(len, per_task), default=0)) for row in per_task
             if k < len(row)]  # fmt: skip
    spent = pos = 0
    while pos < len(order):
        batch = order[pos : pos + deadline.affordable(chunk)]
        if not batch:
            break
        pos += len(batch)
        args = [ms.arg_info.ArgInfo.from_entry_func(sch.mod, True) for _, _, sch in batch]
        built = builder.build([ms.builder.BuilderInput(sch.mod, tgt) for _, _, sch in batch])
        ok = [k for k, b in enumerate(built) if b.error_msg is None]
        inputs = [ms.runner.RunnerInput(built[k].artifact_path, _device_type(target), args[k])
                  for k in ok]  # fmt: skip
        futures = dict(zip(ok, runner.run(inputs), strict=True))
        for k, (task, summary, sch) in enumerate(batch):
            r = futures[k].result() if k in futures else None
            secs = (
                [float(x) for x in r.run_secs] if r and r.error_msg is None and r.run_secs else None
            )
            mod = task.dispatched[0]
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, db.commit_workload(mod), secs or [FAILED_RUN_SECS * 10], tgt, args[k]
            ))  # fmt: skip
            summary.trials += 1
            summary.failed += secs is None
            if secs is not None:
                us = mean_run_secs(secs) * 1e6
                if summary.best_us is None or us < summary.best_us:
                    summary.best_us = us
            spent += 1
            report(summary)
        for b in built:
            if b.artifact_path:
                shutil.rmtree(Path(b.artifact_path).parent, ignore_errors=True)
    return spent


def _device_type(target: dict[str, Any]) -> str:
    kind = target.get("kind", "llvm")
    return "cpu" if kind in ("llvm", "c") else kind


def compile_database(db, tasks, target: dict[str, Any], seed: int):
    """An in-memory database with the best record per task for this target, or a fallback.

    Returns ``(database, sources)`` where ``sources[task_name]`` is ``"database"`` or
    ``"fallback"`` (or ``"default"`` when even the fallback could not be produced).
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mem = ms.database.MemoryDatabase(module_equality="structural")
    tgt = tvm.target.Target(target)
    sources: dict[str, str] = {}
    for task in tasks:
        mod = task.dispatched[0]
        best = best_records(db, mod, target)
        if best:
            rec = best[0]
            sources[task.task_name] = "database"
        else:
            trace = fallback_trace(task, target, seed)
            if trace is None:
                sources[task.task_name] = "default"
                continue
            rec = ms.database.TuningRecord(
                trace, mem.commit_workload(mod), [FAILED_RUN_SECS / 10], tgt,
                ms.arg_info.ArgInfo.from_prim_func(mod["main"]),
            )  # fmt: skip
            sources[task.task_name] = "fallback"
        wl = mem.commit_workload(mod)
        mem.commit_tuning_record(
            ms.database.TuningRecord(rec.trace, wl, rec.run_secs, tgt, rec.args_info)
        )
    return mem, sources


def compile_module(mod, target: dict[str, Any], database, *, prepack: bool = True):
    """Compile a prepared (un-fused) module with the records of ``database`` applied, the chosen
    weight layouts folded into the constants when ``prepack`` (:mod:`harl.pipeline`)."""
    from harl import pipeline

    try:
        return pipeline.compile_with_database(mod, target, database, prepack=prepack)
    except Exception as e:
        raise TuningError(f"compilation failed: {str(e).strip().splitlines()[-1]}") from None


def compile_untuned(mod, target: dict[str, Any]):
    """TVM's default build with no schedules: the baseline tuning has to beat."""
    import tvm

    return tvm.compile(mod, target=tvm.target.Target(target))


# --------------------------------------------------------------------------- tuning
class _Tracker:
    """Counts trials, keeps each task's best latency and reports progress after every trial."""

    def __init__(self, summaries: list[TaskSummary], budget: int, history: list[Progress],
                 on_progress: Callable[[Progress], None] | None, deadline):  # fmt: skip
        self.summaries, self.budget, self.history = summaries, budget, history
        self.on_progress = on_progress
        self.deadline = deadline
        self.trials = 0
        self.measured_now = 0  # trials measured by this process (not resumed ones)
        self.t0 = deadline.elapsed()  # when measuring started (after task extraction)

    def measured(self, summary: TaskSummary, count: int = 1) -> None:
        self.trials += count
        self.measured_now += count
        self.deadline.per_trial_s = (self.deadline.elapsed() - self.t0) / self.measured_now
        known = [t.weight * t.best_us for t in self.summaries if t.best_us is not None]
        event = Progress(
            trials=self.trials, budget=self.budget, task=summary.name,
            best_task_us=summary.best_us, weighted_us=sum(known) if known else None,
            elapsed_s=self.deadline.elapsed(),
            remaining_s=None if self.deadline.unlimited else self.deadline.remaining(),
            tasks_measured=len(known), tasks_total=len(self.summaries),
        )  # fmt: skip
        self.history.append(event)
        if self.on_progress is not None:
            self.on_progress(event)

    def callback(self, summaries: list[TaskSummary]):
        """A MetaSchedule measure callback feeding this tracker (``summaries`` in task order)."""
        from tvm.ir.utils import derived_object
        from tvm.s_tir import meta_schedule as ms

        tracker = self

        @derived_object
        class _Progress(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                      runner_results):  # fmt: skip
                summary = summaries[task_id]
                for br, rr in zip(builder_results, runner_results, strict=True):
                    summary.trials += 1
                    if br.error_msg is None and rr.error_msg is None and rr.run_secs:
                        us = mean_run_secs(rr.run_secs) * 1e6
                        if summary.best_us is None or us < summary.best_us:
                            summary.best_us = us
                    else:
                        summary.failed += 1
                    tracker.measured(summary)

        return _Progress()


def trials_per_round(budget: int, num_tasks: int) -> int:
    """Measurements per search round: every task gets about two rounds of a small budget; large
    budgets batch up to 32, amortising each round's ~5-10 s of evolutionary search (on 2 cores)
    over more trials."""
    return max(8, min(32, budget // max(1, 2 * num_tasks)))


# MetaSchedule's evolutionary search evolves 512 schedules for 4 generations every round: ~10 s
# on 2 cores, more than building and running the round's 8-32 trials. A smaller population
# starting from the measured best (the register-blocked warm-up) costs a fifth of that;
# bench/trial_profile.py compares it with the stock settings at equal trials.
EVOLUTIONARY = {"population_size": 128, "genetic_num_iters": 3}
SECONDS_PER_TRIAL_GUESS = 0.7  # sizes search rounds under --time-budget before warm-up measured


def tune(
    mod,
    target: dict[str, Any],
    database_dir: str | Path,
    *,
    trials: int,
    strategy: str = "evolutionary",
    seed: int = 0,
    min_trials_per_task: int = 4,
    time_budget_s: float | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    builder=None,
    runner=None,
    work_dir: str | Path | None = None,
    agent_path: str | Path | None = None,
) -> TuneResult:
    """Tune the tasks of a prepared module whose workloads the database has not measured yet.

    Workloads with valid records for this target are not measured again; the budget goes to new
    ones. Each new task first gets ``min_trials_per_task`` measured samples, most of them
    register-blocked (a floor, so trials spent can exceed a small ``trials``); tasks under
    ``TINY_SHARE`` of the model's FLOPs get one sample plus their :func:`unscheduled` kernel and
    no search. What remains of ``trials`` goes to
    the search ``strategy``. ``time_budget_s`` stops tuning at the first batch boundary after
    that many seconds, whatever is left of ``trials``. ``trials=0`` measures nothing. Every
    measurement lands in the database.

    ``strategy="harl"`` uses HARL's task scheduler and search strategy; its agent starts from
    ``agent_path`` when that file exists and is saved there afterwards (warm start across runs).
    """

    if trials < 0:
        raise BadInputError(f"--trials must be >= 0, got {trials}")
    if min_trials_per_task < 0:
        raise BadInputError(f"min_trials_per_task must be >= 0, got {min_trials_per_task}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise BadInputError(f"--time-budget must be more than 0 seconds, got {time_budget_s}")
    if strategy not in STRATEGIES:
        raise BadInputError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    import_tensor_intrinsics()
    use_target_threads(target)  # before the runner's worker process starts: it inherits it
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # tables go to files
    with locked(database_dir):
        return _tune(mod, target, database_dir, trials=trials, strategy=strategy, seed=seed,
                     min_trials_per_task=min_trials_per_task, time_budget_s=time_budget_s,
                     on_progress=on_progress, builder=builder, runner=runner, work_dir=work_dir,
                     agent_path=agent_path)  # fmt: skip


def _tune(mod, target, database_dir, *, trials, strategy, seed, min_trials_per_task, time_budget_s,
          on_progress, builder, runner, work_dir, agent_path) -> TuneResult:  # fmt: skip
    """:func:`tune`'s body, run while holding the database's lock."""
    from tvm.s_tir import meta_schedule as ms

    from harl.budget import Allowance, BudgetedStrategy, Deadline
    from harl.runners import make_runner

    deadline = Deadline(time_budget_s)
    tasks = extract_tasks(mod, target)
    if not tasks:
        raise TuningError("the model produced no tuning tasks")
    db = open_database(database_dir)
    journal = RunJournal(database_dir, tasks, target, strategy=strategy, budget=trials, seed=seed,
                         min_trials_per_task=min_trials_per_task, time_budget_s=time_budget_s)  # fmt: skip
    interrupted = journal.load() if trials else None
    summaries, new = [], []
    for t in tasks:
        s = TaskSummary(name=t.task_name, weight=float(t.weight), flop=_flop(t))
        prior = best_records(db, t.dispatched[0], target)
        if prior:
            s.best_us = mean_run_secs(prior[0].run_secs) * 1e6
        if prior and not (interrupted and t.task_name in interrupted["tasks"]):
            s.schedule = "database"
        else:  # never measured, or measured by an interrupted run of this same command
            new.append((t, s))
        summaries.append(s)
    result = TuneResult(target=target, strategy=strategy, budget=trials, trials=0, seconds=0.0,
                        tasks=summaries, time_budget_s=time_budget_s)  # fmt: skip
    result.phases["extract_s"] = round(deadline.elapsed(), 2)
    log.info("%d tasks: %d in the database, %d new", len(tasks), len(tasks) - len(new), len(new))
    if trials == 0 or not new:
        journal.finish()
        result.seconds = deadline.elapsed()
        return result
    recorded = count_records(db, [t for t, _ in new], target)
    if interrupted:
        result.resumed_trials = recorded - interrupted["records"]
        log.info("resuming an interrupted run: %d of its %d trials were measured before it "
                 "stopped and are not measured again", result.resumed_trials, trials)  # fmt: skip
    else:
        journal.start([t.task_name for t, _ in new], recorded)
    share = dict(zip([s.name for s in summaries], importance(summaries), strict=True))
    new.sort(key=lambda ts: -share[ts[1].name])  # the heaviest kernels first
    searched = [(t, s) for t, s in new if share[s.name] >= TINY_SHARE]
    tracker = _Tracker(summaries, trials, result.history, on_progress, deadline)
    tracker.trials = result.resumed_trials
    own_builder, own_runner = builder is None, runner is None
    builder = builder or default_builder()
    runner = runner or make_runner(None)
    try:
        jobs = [(t, s, min_trials_per_task if share[s.name] >= TINY_SHARE else 1)
                for t, s in new if s.best_us is None]  # fmt: skip
        if min_trials_per_task and jobs:
            tiny = {s.name for _, s in new if share[s.name] < TINY_SHARE}
            measure_random(jobs, db, target, seed, builder, runner, tracker.measured, deadline,
                           tiny=tiny)  # fmt: skip
        result.phases["warm_up_s"] = round(deadline.elapsed() - result.phases["extract_s"], 2)
        remaining = trials - tracker.trials
        affordable = remaining
        if not deadline.unlimited:  # the tracker keeps the run's pace in deadline.per_trial_s
            pace = deadline.per_trial_s or SECONDS_PER_TRIAL_GUESS
            affordable = min(remaining, int(deadline.remaining() / pace))
        if searched and remaining > 0 and not deadline.expired():
            with tempfile.TemporaryDirectory(prefix="harl-tune-") as tmp, _named_handlers_only():
                logs_dir = str(work_dir or tmp)
                search, scheduler, agent = _strategy(strategy, seed, agent_path)
                ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    [t for t, _ in searched], logs_dir,
                    strategy=BudgetedStrategy(search, Allowance(remaining, deadline)),
                    seed=seed, num_threads=int(target.get("num-cores", 1)),
                )  # fmt: skip
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
                    task_scheduler=scheduler,
                )
                if agent is not None:
                    result.agent_metrics = list(search.shared.metrics)
                    if agent_path:
                        agent.save(agent_path)
        result.phases["search_s"] = round(
            deadline.elapsed() - result.phases["extract_s"] - result.phases["warm_up_s"], 2
        )
    except Exception as e:
        log.debug("tuning failed", exc_info=True)  # the whole traceback, for whoever debugs
        raise TuningError(f"tuning failed: {str(e).strip().splitlines()[-1]}") from e
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


# --------------------------------------------------------------------------- resuming
def count_records(db, tasks, target: dict[str, Any]) -> int:
    """Records (valid or failed) of these tasks' workloads on this target: one per trial."""
    return sum(len(records_on_target(db, t.dispatched[0], target)) for t in tasks)


class RunJournal:
    """Marks a tuning run in progress, so the same command after a crash (``kill -9``) resumes.

    Written once when a run starts (the tasks it tunes and the database's record count for
    them) and removed when it ends. The database itself says how many trials were measured
    since: those count against the budget and are not measured again.
    """

    def __init__(self, database_dir: str | Path, tasks, target: dict[str, Any], **settings):
        import hashlib
        import json

        def digest(text: str) -> str:
            return hashlib.sha256(text.encode()).hexdigest()

        key = json.dumps({
            "tasks": [[t.task_name, digest(t.dispatched[0].script())] for t in tasks],
            "target": target_json(target), **settings,
        }, sort_keys=True)  # fmt: skip
        self.path = (
            Path(database_dir) / "runs" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
        )

    def load(self) -> dict[str, Any] | None:
        import json

        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def start(self, task_names: list[str], records: int) -> None:
        import json
        import os

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"tasks": task_names, "records": records}))
        tmp.replace(self.path)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


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


def _strategy(name: str, seed: int, agent_path: str | Path | None):
    """(search strategy, task scheduler, agent) for a strategy name; the agent only for HARL."""
    if name == "evolutionary":
        from tvm.s_tir import meta_schedule as ms

        return ms.search_strategy.EvolutionarySearch(**EVOLUTIONARY), "gradient", None
    from harl.agent import EditAgent
    from harl.scheduler import HARLTaskScheduler
    from harl.strategy import HARLSearchStrategy

    if agent_path and Path(agent_path).is_file():
        agent = EditAgent.load(agent_path, seed=seed)
        log.info("HARL agent warm-started from %s (%d updates)", agent_path, agent.updates)
    else:
        agent = EditAgent(seed=seed)
    return HARLSearchStrategy(agent=agent, seed=seed), HARLTaskScheduler(seed=seed), agent


def default_builder(*, link: bool = True):
    """A :class:`~harl.builders.PersistentBuilder` with one worker per core, 60 s per build."""
    import os

    from harl.builders import PersistentBuilder

    return PersistentBuilder(max_workers=max(1, len(os.sched_getaffinity(0))), timeout_sec=60,
                             link=link)  # fmt: skip


def _flop(task) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:
        return math.nan

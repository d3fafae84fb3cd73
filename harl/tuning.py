"""Operator tuning on TVM MetaSchedule: extract tasks, tune new workloads under a global trial
budget, give every untuned kernel a sensible fallback schedule, and compile.

This module is a library: plain inputs (a Relax IRModule, a target dict, a database directory,
a budget, a seed), plain outputs (:class:`TuneResult`), progress through a callback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harl._fast_import import import_tensor_intrinsics
from harl.schedules import postprocess
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
            "tasks": len(self.tasks),
            "tasks_tuned": counts["tuned"],
            "tasks_from_database": counts["database"],
            "tasks_fallback": counts["fallback"],
            "weighted_latency_us": self.weighted_latency_us,
        }


# --------------------------------------------------------------------------- preparation
def prepare(mod):
    """Inference decompositions + canonical bindings: the module that is compiled in the end."""
    from tvm import relax

    mod = relax.transform.DecomposeOpsForInference()(mod)
    return relax.transform.CanonicalizeBindings()(mod)


def extract_tasks(mod, target: dict[str, Any]):
    """MetaSchedule tasks of a prepared module (legalized and fused first: the "zero" pipeline)."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    tgt = tvm.target.Target(target)
    with tgt:
        fused = relax.get_pipeline("zero")(mod)
    try:
        return list(ms.relax_integration.extract_tasks(fused, tgt))
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


def sample_schedules(task, target: dict[str, Any], count: int, seed: int) -> list:
    """``count`` random points of a task's design spaces, each post-processed into a valid schedule.

    Each round asks the space generator for its sketches again, which samples every decision
    afresh from the context's random state (seeded), so the same seed gives the same schedules
    and the sketches take turns. Samples the postprocessors reject are skipped.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    import_tensor_intrinsics()
    mod = task.dispatched[0]
    ctx = ms.TuneContext(
        mod=mod, target=tvm.target.Target(target), space_generator="post-order-apply",
        rand_state=seed + 1, num_threads=1,
    )  # fmt: skip
    out: list = []
    for _ in range(4 * count):  # each call samples every decision of every sketch afresh
        for sch in ctx.space_generator.generate_design_space(mod):
            if len(out) < count and postprocess(sch, ctx.space_generator.postprocs):
                out.append(sch)
        if len(out) == count:
            break
    return out


def fallback_trace(task, target: dict[str, Any], seed: int):
    """A measurement-free schedule for a task never measured on this target (``--trials 0``).

    MetaSchedule's CPU design space already parallelises, vectorises and tiles, so even a random
    point in it beats TVM's unscheduled default (single-threaded, scalar, untiled): ResNet-18 ran
    873 ms against 2177 ms. Measured warm-up samples (:func:`measure_random`) do far better.
    """
    samples = sample_schedules(task, target, 1, seed)
    return samples[0].trace if samples else None


def measure_random(tasks, summaries, db, target: dict[str, Any], per_task: int, seed: int,
                   builder, runner, report: Callable[[TaskSummary, int], None]) -> int:  # fmt: skip
    """Build and run ``per_task`` random schedules of every task in one batch; record them all.

    This is the floor under any budget: a task that never gets a search round still runs the best
    of several measured schedules (ResNet-18: 173 ms with 8 per task, against 2177 ms untuned).
    Failed builds and runs are recorded as MetaSchedule does (run_secs 1e10). Returns trials spent.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    tgt = tvm.target.Target(target)
    batch = []  # (task index, schedule, args_info)
    for i, task in enumerate(tasks):
        args_info = ms.arg_info.ArgInfo.from_prim_func(task.dispatched[0]["main"])
        for sch in sample_schedules(task, target, per_task, seed + i):
            batch.append((i, sch, args_info))
    if not batch:
        return 0
    built = builder.build([ms.builder.BuilderInput(sch.mod, tgt) for _, sch, _ in batch])
    run_inputs, run_index = [], []
    for k, ((_, _, args_info), b) in enumerate(zip(batch, built, strict=True)):
        if b.error_msg is None:
            run_inputs.append(
                ms.runner.RunnerInput(b.artifact_path, _device_type(target), args_info)
            )
            run_index.append(k)
    futures = dict(zip(run_index, runner.run(run_inputs), strict=True))
    for k, (i, sch, args_info) in enumerate(batch):
        # committed one by one as results arrive: a killed run keeps every finished trial
        r = futures[k].result() if k in futures else None
        secs = [float(x) for x in r.run_secs] if r and r.error_msg is None and r.run_secs else None
        mod = tasks[i].dispatched[0]
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(mod), secs or [FAILED_RUN_SECS * 10], tgt, args_info
        ))  # fmt: skip
        summary = summaries[i]
        summary.trials += 1
        summary.failed += secs is None
        if secs is not None:
            us = mean_run_secs(secs) * 1e6
            if summary.best_us is None or us < summary.best_us:
                summary.best_us = us
    for b in built:
        if b.artifact_path:
            Path(b.artifact_path).unlink(missing_ok=True)
    for i, summary in enumerate(summaries):
        report(summary, sum(1 for j, _, _ in batch if j == i))
    return len(batch)


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


def compile_module(mod, target: dict[str, Any], database):
    """Compile a prepared (un-fused) module with the records of ``database`` applied."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.relax_integration.compile_relax(
            database, mod, tvm.target.Target(target), params=None
        )
    except Exception as e:
        raise TuningError(f"compilation failed: {str(e).strip().splitlines()[-1]}") from None


def compile_untuned(mod, target: dict[str, Any]):
    """TVM's default build with no schedules: the baseline tuning has to beat."""
    import tvm

    return tvm.compile(mod, target=tvm.target.Target(target))


# --------------------------------------------------------------------------- tuning
class _Tracker:
    """Counts trials, keeps each task's best latency and reports progress after every batch."""

    def __init__(self, summaries: list[TaskSummary], budget: int, history: list[Progress],
                 on_progress: Callable[[Progress], None] | None):  # fmt: skip
        self.summaries, self.budget, self.history = summaries, budget, history
        self.on_progress = on_progress
        self.trials = 0
        self.start = time.monotonic()

    def measured(self, summary: TaskSummary, count: int) -> None:
        self.trials += count
        known = [t.weight * t.best_us for t in self.summaries if t.best_us is not None]
        event = Progress(
            trials=self.trials, budget=self.budget, task=summary.name,
            best_task_us=summary.best_us, weighted_us=sum(known) if known else None,
            elapsed_s=time.monotonic() - self.start,
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
                summary.trials += len(runner_results)
                for br, rr in zip(builder_results, runner_results, strict=True):
                    if br.error_msg is None and rr.error_msg is None and rr.run_secs:
                        us = mean_run_secs(rr.run_secs) * 1e6
                        if summary.best_us is None or us < summary.best_us:
                            summary.best_us = us
                    else:
                        summary.failed += 1
                tracker.measured(summary, len(runner_results))

        return _Progress()


def trials_per_round(budget: int, num_tasks: int) -> int:
    """Measurements per search round: small budgets still reach every task; large ones batch to
    amortise the ~8 s start-up of each build pool (MetaSchedule restarts it every round)."""
    return max(4, min(16, budget // max(1, num_tasks)))


def tune(
    mod,
    target: dict[str, Any],
    database_dir: str | Path,
    *,
    trials: int,
    strategy: str = "evolutionary",
    seed: int = 0,
    min_trials_per_task: int = 4,
    on_progress: Callable[[Progress], None] | None = None,
    builder=None,
    runner=None,
    work_dir: str | Path | None = None,
    agent_path: str | Path | None = None,
) -> TuneResult:
    """Tune the tasks of a prepared module whose workloads the database has not measured yet.

    Workloads with valid records for this target are not measured again; the budget goes to new
    ones. Each new task first gets ``min_trials_per_task`` measured random schedules (a floor,
    so trials spent can exceed a small ``trials``); what remains of ``trials`` goes to the search
    ``strategy``. ``trials=0`` measures nothing. Every measurement lands in the database.

    ``strategy="harl"`` uses HARL's task scheduler and search strategy; its agent starts from
    ``agent_path`` when that file exists and is saved there afterwards (warm start across runs).
    """

    if trials < 0:
        raise BadInputError(f"--trials must be >= 0, got {trials}")
    if min_trials_per_task < 0:
        raise BadInputError(f"min_trials_per_task must be >= 0, got {min_trials_per_task}")
    if strategy not in STRATEGIES:
        raise BadInputError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    import_tensor_intrinsics()
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # tables go to files
    with locked(database_dir):
        return _tune(mod, target, database_dir, trials=trials, strategy=strategy, seed=seed,
                     min_trials_per_task=min_trials_per_task, on_progress=on_progress,
                     builder=builder, runner=runner, work_dir=work_dir, agent_path=agent_path)  # fmt: skip


def _tune(mod, target, database_dir, *, trials, strategy, seed, min_trials_per_task, on_progress,
          builder, runner, work_dir, agent_path) -> TuneResult:  # fmt: skip
    """:func:`tune`'s body, run while holding the database's lock."""
    from tvm.s_tir import meta_schedule as ms

    start = time.monotonic()
    tasks = extract_tasks(mod, target)
    if not tasks:
        raise TuningError("the model produced no tuning tasks")
    db = open_database(database_dir)
    journal = RunJournal(database_dir, tasks, target, strategy=strategy, budget=trials, seed=seed,
                         min_trials_per_task=min_trials_per_task)  # fmt: skip
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
                        tasks=summaries)  # fmt: skip
    log.info("%d tasks: %d in the database, %d new", len(tasks), len(tasks) - len(new), len(new))
    if trials == 0 or not new:
        journal.finish()
        result.seconds = time.monotonic() - start
        return result
    recorded = count_records(db, [t for t, _ in new], target)
    if interrupted:
        result.resumed_trials = recorded - interrupted["records"]
        log.info("resuming an interrupted run: %d of its %d trials were measured before it "
                 "stopped and are not measured again", result.resumed_trials, trials)  # fmt: skip
    else:
        journal.start([t.task_name for t, _ in new], recorded)
    new_tasks, new_summaries = [t for t, _ in new], [s for _, s in new]
    tracker = _Tracker(summaries, trials, result.history, on_progress)
    tracker.trials = result.resumed_trials
    builder = builder or default_builder()
    runner = runner or ms.runner.LocalRunner()
    try:
        unmeasured = [(t, s) for t, s in new if s.best_us is None]
        if min_trials_per_task and unmeasured:
            measure_random([t for t, _ in unmeasured], [s for _, s in unmeasured], db, target,
                           min_trials_per_task, seed, builder, runner, tracker.measured)  # fmt: skip
        remaining = trials - tracker.trials
        if remaining > 0:
            with tempfile.TemporaryDirectory(prefix="harl-tune-") as tmp, _named_handlers_only():
                logs_dir = str(work_dir or tmp)
                search, scheduler, agent = _strategy(strategy, seed, agent_path)
                ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    new_tasks, logs_dir, strategy=search, seed=seed,
                    num_threads=int(target.get("num-cores", 1)),
                )  # fmt: skip
                ms.tune_tasks(
                    tasks=ctxs,
                    task_weights=weights,
                    work_dir=logs_dir,
                    max_trials_global=remaining,
                    num_trials_per_iter=trials_per_round(remaining, len(new_tasks)),
                    builder=builder,
                    runner=runner,
                    database=db,
                    measure_callbacks=[
                        *ms.measure_callback.MeasureCallback.create("default"),
                        tracker.callback(new_summaries),
                    ],
                    task_scheduler=scheduler,
                )
                if agent is not None:
                    result.agent_metrics = list(search.shared.metrics)
                    if agent_path:
                        agent.save(agent_path)
    except Exception as e:
        log.debug("tuning failed", exc_info=True)  # the whole traceback, for whoever debugs
        raise TuningError(f"tuning failed: {str(e).strip().splitlines()[-1]}") from e
    journal.finish()
    for s in new_summaries:
        if s.best_us is not None:
            s.schedule = "tuned"
    result.trials = tracker.trials - result.resumed_trials
    result.seconds = time.monotonic() - start
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
        return "evolutionary", "gradient", None
    from harl.agent import EditAgent
    from harl.scheduler import HARLTaskScheduler
    from harl.strategy import HARLSearchStrategy

    if agent_path and Path(agent_path).is_file():
        agent = EditAgent.load(agent_path, seed=seed)
        log.info("HARL agent warm-started from %s (%d updates)", agent_path, agent.updates)
    else:
        agent = EditAgent(seed=seed)
    return HARLSearchStrategy(agent=agent, seed=seed), HARLTaskScheduler(seed=seed), agent


def default_builder():
    """A LocalBuilder whose workers import TVM's intrinsics fast and get 60 s per build."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(
        max_workers=2, timeout_sec=60, initializer=import_tensor_intrinsics
    )


def _flop(task) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:
        return math.nan

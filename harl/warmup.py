"""The warm-up under any search: seeded samples of every new task, measured before the search
strategy starts, so each task has a measured starting point (and a time budget that ends early
still leaves every big task measured)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harl.budget import Deadline
from harl.database import FAILED_RUN_SECS
from harl.sampling import first_samples, unscheduled

MICRO_KERNEL_SHARE = 0.75  # warm-up samples with register-blocked tiles (harl.sampling)


def measure_random(
    jobs,
    db,
    target: dict[str, Any],
    seed: int,
    builder,
    runner,
    report: Callable[[Any, list[float] | None], None],
    deadline: Deadline | None = None,
    chunk: int = 8,
    tiny: set[str] | None = None,
    limit: int | None = None,
) -> int:
    """Measure seeded samples of each task. Returns trials spent, never more than ``limit``.

    ``jobs`` is ``[(task, summary, count)]``, most important first; samples are interleaved
    across tasks (every task's first sample, then every task's second, ...) and measured in
    chunks of ``chunk``, so a ``deadline`` that cuts the warm-up short still leaves every big
    task measured. A task's first sample is the schedule of the nearest workload the store
    measured, re-fitted (:mod:`harl.transfer`), where it has one; most others have
    register-blocked tiles (:mod:`harl.sampling`); each
    result is committed to ``db`` as it arrives (a killed run keeps every finished trial) and
    reported (``report(summary, run_secs)`` per trial, ``run_secs`` None for a failure).
    Failed builds and runs are recorded as MetaSchedule records
    them (run_secs 1e10). Tasks named in ``tiny`` also measure their :func:`unscheduled` kernel.
    A ``limit`` below the samples wanted keeps the first ``limit`` of the interleaved order:
    the heaviest tasks' first samples; the tasks left out compile with a fallback schedule.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from harl.transfer import Sources, transferred

    deadline = deadline or Deadline(None)
    tgt = tvm.target.Target(target)
    offered = Sources(db, target)  # the store's measured workloads, for schedule transfer
    per_task = []
    for task, summary, count in jobs:
        if deadline.expired():
            break
        # the run's seed for every task: the first sample is the schedule the task compiles
        # with when unmeasured (the nearest stored workload's, re-fitted: harl.transfer; else
        # harl.sampling.fallback_trace), so a measured task is never slower than it would be
        # at --trials 0
        moved = transferred(offered, task, seed) if count > 0 else []
        samples = moved + first_samples(
            task, target, count - len(moved), seed, micro_kernel=MICRO_KERNEL_SHARE
        )
        if tiny is not None and summary.name in tiny:
            samples.insert(0, unscheduled(task))
        per_task.append([(task, summary, sch) for sch in samples])
    rounds = max(map(len, per_task), default=0)
    order = [row[k] for k in range(rounds) for row in per_task if k < len(row)]
    if limit is not None:
        order = order[: max(0, limit)]
    spent = pos = 0
    while pos < len(order):
        batch = order[pos : pos + deadline.affordable(chunk)]
        if not batch:
            break
        pos += len(batch)
        args = [ms.arg_info.ArgInfo.from_entry_func(sch.mod, True) for _, _, sch in batch]
        built = builder.build([ms.builder.BuilderInput(sch.mod, tgt) for _, _, sch in batch])
        ok = [k for k, b in enumerate(built) if b.error_msg is None]
        inputs = [
            ms.runner.RunnerInput(built[k].artifact_path, _device_type(target), args[k]) for k in ok
        ]
        futures = dict(zip(ok, runner.run(inputs), strict=True))
        for k, (task, summary, sch) in enumerate(batch):
            r = futures[k].result() if k in futures else None
            ok_run = r is not None and r.error_msg is None and r.run_secs
            secs = [float(x) for x in r.run_secs] if ok_run else None
            workload = db.commit_workload(task.dispatched[0])
            run_secs = secs or [FAILED_RUN_SECS * 10]
            db.commit_tuning_record(
                ms.database.TuningRecord(sch.trace, workload, run_secs, tgt, args[k])
            )
            spent += 1
            report(summary, secs)
        for b in built:
            if b.artifact_path:
                shutil.rmtree(Path(b.artifact_path).parent, ignore_errors=True)
    return spent


def _device_type(target: dict[str, Any]) -> str:
    kind = target.get("kind", "llvm")
    return "cpu" if kind in ("llvm", "c") else kind

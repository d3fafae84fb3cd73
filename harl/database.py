"""The tuning database: MetaSchedule's JSON records, shared by every run on a home, and the
queries on it (a workload's records on one target, the best of them, how many there are).

MetaSchedule appends one line per trial; a trial whose build or run failed is recorded with
``run_secs`` 1e10, which :data:`FAILED_RUN_SECS` separates from real measurements.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from harlflow.core.locks import file_lock
from harlflow.core.targets import target_key

log = logging.getLogger("harl.database")

FAILED_RUN_SECS = 1e9  # MetaSchedule records failed builds/runs with run_secs 1e10


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
    dropped = len(data) - keep
    log.warning(
        "%s: dropped a partial last record (%d bytes) left by an interrupted run", path, dropped
    )


def locked(database_dir: str | Path):
    """Exclusive use of a tuning database directory across processes, as a context manager.

    Two runs on one store take turns: one measuring at a time also keeps their timings honest
    on a shared machine.
    """
    return file_lock(Path(database_dir) / ".lock", f"the tuning database {database_dir}")


def mean_run_secs(run_secs) -> float:
    """Mean of a MetaSchedule record's or runner result's repeated run times, in seconds."""
    vals = [float(s) for s in run_secs]
    return sum(vals) / len(vals)


def is_valid(record) -> bool:
    """A record of a trial that built and ran (not one of MetaSchedule's 1e10 failures)."""
    return bool(record.run_secs) and mean_run_secs(record.run_secs) < FAILED_RUN_SECS


def records_on_target(db, mod, target: dict[str, Any]) -> list:
    """Every record of a workload on this target, fastest first (failed trials last)."""
    if not db.has_workload(mod):
        return []
    key = target_key(target)
    return [
        r
        for r in db.get_top_k(db.commit_workload(mod), 1_000_000)
        if r.target is not None and target_key(dict(r.target.export())) == key
    ]


def best_records(db, mod, target: dict[str, Any], k: int = 1) -> list:
    """The ``k`` best valid records of a workload on this target (empty when none)."""
    return [r for r in records_on_target(db, mod, target) if is_valid(r)][:k]


def count_records(db, tasks, target: dict[str, Any]) -> int:
    """Records (valid or failed) of these tasks' workloads on this target: one per trial."""
    return sum(len(records_on_target(db, t.dispatched[0], target)) for t in tasks)

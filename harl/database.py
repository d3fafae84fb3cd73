"""The tuning database, and the queries on it (a workload's records on one target, the best of
them, how many there are).

A store is a *location*: a directory holds MetaSchedule's JSON files (the embedded default,
shared by every run on a home), a database URL (``postgresql://…``, ``sqlite:///…``) a SQL store
that a whole team shares (:mod:`harl.sql_database`). :func:`open_database` opens either as a
MetaSchedule database; nothing else here cares which.

MetaSchedule appends one line per trial; a trial whose build or run failed is recorded with
``run_secs`` 1e10, which :data:`FAILED_RUN_SECS` separates from real measurements.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harlflow.core.config import is_database_url, machine_cache_dir
from harlflow.core.errors import BadInputError
from harlflow.core.locks import file_lock
from harlflow.core.targets import target_key

log = logging.getLogger("harl.database")

FAILED_RUN_SECS = 1e9  # MetaSchedule records failed builds/runs with run_secs 1e10


def open_database(database_dir: str | Path):
    """The tuning store at this location (created if missing): a directory's JSON files, or
    the SQL store of a database URL.

    In a JSON store, a record line cut short by a killed process is dropped first
    (MetaSchedule would refuse to load the file); callers that share the directory with other
    processes hold :func:`locked`. A SQL store needs no such care: its writes are transactions.
    """
    from tvm.s_tir import meta_schedule as ms

    if is_database_url(database_dir):
        from harl.sql_database import SQLDatabase

        return SQLDatabase(str(database_dir))
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


def all_records(db) -> Iterable:
    """Every record of a store, streamed from a SQL store, else MetaSchedule's list."""
    if hasattr(db, "iter_tuning_records"):
        return db.iter_tuning_records()
    return db.get_all_tuning_records()


def has_records(database_dir: str | Path) -> bool:
    """Whether a store exists there to read: a SQL store's URL, or a JSON store's directory
    with its record file."""
    return (
        is_database_url(database_dir)
        or (Path(database_dir) / "database_tuning_record.json").is_file()
    )


def describe(database_dir: str | Path) -> str:
    """The store's location for messages (a URL's password masked)."""
    if not is_database_url(database_dir):
        return str(database_dir)
    from harl.sql_database import safe_url

    return safe_url(str(database_dir))


def local_dir(database_dir: str | Path) -> Path:
    """This machine's directory for a store: its lock and the journals of runs in progress.
    A JSON store's own directory; for a SQL store, one under the machine's cache, named by the
    store's URL (a run resumes on the machine it was interrupted on; on another machine the
    records it measured are in the store all the same)."""
    if not is_database_url(database_dir):
        return Path(database_dir)
    digest = hashlib.sha256(describe(database_dir).encode()).hexdigest()[:16]
    return machine_cache_dir() / "stores" / digest


def locked(database_dir: str | Path):
    """Exclusive use of a tuning store on this machine, as a context manager.

    Two runs on one machine take turns: one measuring at a time keeps their timings honest on a
    shared machine, and a JSON store's files are never read while another run writes them.
    Runs on other machines sharing a SQL store do not wait for each other.
    """
    d = local_dir(database_dir)
    d.mkdir(parents=True, exist_ok=True)
    return file_lock(d / ".lock", f"the tuning database {describe(database_dir)}")


def mean_run_secs(run_secs) -> float:
    """Mean of a MetaSchedule record's or runner result's repeated run times, in seconds."""
    vals = [float(s) for s in run_secs]
    return sum(vals) / len(vals)


def is_valid(record) -> bool:
    """A record of a trial that built and ran (not one of MetaSchedule's 1e10 failures)."""
    return bool(record.run_secs) and mean_run_secs(record.run_secs) < FAILED_RUN_SECS


def records_on_target(db, mod, target: dict[str, Any]) -> list:
    """Every record of a workload on this target, fastest first (failed trials last)."""
    if hasattr(db, "top_k_on_target"):  # a SQL store filters by target in its index
        return db.top_k_on_target(mod, target, 1_000_000)
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
    if hasattr(db, "top_k_on_target"):  # a SQL store: only those k rows are read
        return db.top_k_on_target(mod, target, k, below=FAILED_RUN_SECS)
    return [r for r in records_on_target(db, mod, target) if is_valid(r)][:k]


def best_per_workload(db, target: dict[str, Any]) -> list[tuple[Any, Any]]:
    """``(workload module, its best valid record on this target)`` for every workload of the
    store that has one (what schedule transfer searches, :mod:`harl.transfer`)."""
    if hasattr(db, "best_per_workload"):
        return [(r.workload.mod, r) for r in db.best_per_workload(target, FAILED_RUN_SECS)]
    from tvm_ffi import structural_hash

    key = target_key(target)
    best: dict[int, Any] = {}
    for r in db.get_all_tuning_records():
        if r.target is None or not is_valid(r) or target_key(dict(r.target.export())) != key:
            continue
        h = int(structural_hash(r.workload.mod))
        if h not in best or mean_run_secs(r.run_secs) < mean_run_secs(best[h].run_secs):
            best[h] = r
    return [(r.workload.mod, r) for r in best.values()]


def count_records(db, tasks, target: dict[str, Any]) -> int:
    """Records (valid or failed) of these tasks' workloads on this target: one per trial."""
    if hasattr(db, "count_on_target"):
        return sum(db.count_on_target(t.dispatched[0], target) for t in tasks)
    return sum(len(records_on_target(db, t.dispatched[0], target)) for t in tasks)


def with_workload(record, workload):
    """``record`` as a record of ``workload`` (the same workload, committed to another store:
    a record refers to its store's own workload entry)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.database.TuningRecord(
        record.trace, workload, record.run_secs, record.target, record.args_info
    )


def export_json(source: str | Path, dest: str | Path, log=None) -> dict[str, int]:
    """Copy every workload and record of the store at ``source`` into a new directory ``dest``
    in MetaSchedule's own JSON format (``ms.database.JSONDatabase`` reads it), written under a
    temporary name and renamed into place. Returns counts."""
    import os
    import shutil

    from tvm.s_tir import meta_schedule as ms

    from harl.sql_database import SQLDatabase

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BadInputError(f"db export: {dest} exists and is not empty; give a new directory")
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out = ms.database.JSONDatabase(work_dir=str(tmp), module_equality="structural")
    src = open_database(source)
    n_workloads = n_records = 0
    try:
        if isinstance(src, SQLDatabase):
            mapped = {}
            for wid, wl in src.iter_workloads():
                mapped[wid] = out.commit_workload(wl.mod)
                n_workloads += 1
            for wid, rec in src.iter_record_json():
                out.commit_tuning_record(ms.database.TuningRecord.from_json(rec, mapped[wid]))
                n_records += 1
                if log and n_records % 10_000 == 0:
                    log(f"{n_records} records exported")
        else:
            for r in src.get_all_tuning_records():
                out.commit_tuning_record(with_workload(r, out.commit_workload(r.workload.mod)))
                n_records += 1
            n_workloads = (tmp / "database_workload.json").read_bytes().count(b"\n")
        del out
        if dest.exists():
            dest.rmdir()
        tmp.replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"workloads": n_workloads, "records": n_records}


def import_json(source: str | Path, dest: str | Path, batch: int = 1000) -> dict[str, int]:
    """Add every record of MetaSchedule JSON files (a directory) to the store at ``dest``.
    Idempotent into a SQL store (a record already there keeps the better measurement); a JSON
    store appends, under its lock. Returns counts."""
    if not (Path(source) / "database_tuning_record.json").is_file():
        raise BadInputError(
            f"db import: {source} is not a MetaSchedule JSON database "
            "(no database_tuning_record.json)"
        )
    with locked(dest):
        src = open_database(source)
        out = open_database(dest)
        before = len(out)
        records = src.get_all_tuning_records()  # MetaSchedule's JSON store holds them all
        many = getattr(out, "commit_tuning_records", None)
        for i in range(0, len(records), batch):
            chunk = [
                with_workload(r, out.commit_workload(r.workload.mod))
                for r in records[i : i + batch]
            ]
            if many is not None:
                many(chunk)
            else:
                for r in chunk:
                    out.commit_tuning_record(r)
        return {"records": len(records), "new": len(out) - before}

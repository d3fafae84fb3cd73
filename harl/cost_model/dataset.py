"""A dataset of measured tensor programs, collected from MetaSchedule tuning databases.

One row per distinct scheduled program of a workload on a target, as a parquet file:

==============  ===================  ====================================================
column          type                 what
==============  ===================  ====================================================
``workload``    string               sha256 (first 16 hex) of the workload's TVMScript
``target``      string               :func:`~harlflow.core.targets.target_key` of the target
``program``     string               structural hash of the scheduled program (dedup key)
``n_stores``    int32                statements (buffer stores) in the program
``features``    list<float32>        ``n_stores × 164`` ``PerStoreFeature`` vectors, row-major:
                                     the per-statement sequence, not a pooled vector
``run_us``      float64              mean measured latency (µs); NaN when it failed
``failed``      bool                 the build or run failed (MetaSchedule's 1e10 records)
``flop``        float64              the workload's floating-point operations (NaN: unknown)
==============  ===================  ====================================================

Rows are unique by (``workload``, ``target``, ``program``): the first measurement seen is kept
(a valid one before a failed one). Collecting into an existing file merges with its rows.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from harl.database import (
    FAILED_RUN_SECS,
    all_records,
    has_records,
    mean_run_secs,
    open_database,
)
from harlflow.core.errors import BadInputError, StoreError, first_line
from harlflow.core.targets import target_key

log = logging.getLogger("harl.cost_model.dataset")

FEATURES = 164  # PerStoreFeature's vector length per statement
KEY = ("workload", "target", "program")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("workload", pa.string()), ("target", pa.string()), ("program", pa.string()),
        ("n_stores", pa.int32()), ("features", pa.list_(pa.float32())),
        ("run_us", pa.float64()), ("failed", pa.bool_()), ("flop", pa.float64()),
    ])  # fmt: skip


def _workload_id(mod) -> str:
    return hashlib.sha256(mod.script().encode()).hexdigest()[:16]


def task_workload_id(task) -> str:
    """The ``workload`` column of a MetaSchedule task's rows (its tuning database workload)."""
    return _workload_id(task.dispatched[0])


def database_rows(database_dir: str | Path, workloads: set[str] | None = None) -> Iterable[dict]:
    """Every record of a tuning database as a dataset row (replayed and featurised); only
    those of ``workloads`` (dataset workload ids) when given, the others not replayed."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops
    from tvm_ffi import structural_hash

    if not has_records(database_dir):
        raise BadInputError(
            f"{database_dir} is not a tuning database (no database_tuning_record.json)"
        )
    db = open_database(database_dir)
    extractor = ms.feature_extractor.PerStoreFeature()
    seen: dict[int, tuple[str, float]] = {}
    for rec in all_records(db):
        mod = rec.workload.mod
        wid = int(structural_hash(mod))  # not id(): each access makes a new, short-lived wrapper
        if wid not in seen:
            try:
                flop = float(estimate_tir_flops(mod))
            except Exception:
                flop = math.nan
            seen[wid] = (_workload_id(mod), flop)
        workload, flop = seen[wid]
        if rec.target is None or (workloads is not None and workload not in workloads):
            continue
        exported = dict(rec.target.export())
        sch = Schedule(mod)
        try:
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
            ctx = ms.TuneContext(mod=mod, target=tvm.target.Target(exported), num_threads=1)
            cand = ms.MeasureCandidate(sch, rec.args_info)
            feats = extractor.extract_from(ctx, [cand])[0].numpy().astype(np.float32)
        except Exception as e:  # a trace this TVM cannot replay: not a usable row
            log.debug("skipping a record of %s: %s", workload, first_line(e))
            continue
        secs = mean_run_secs(rec.run_secs) if rec.run_secs else math.inf
        failed = not secs < FAILED_RUN_SECS
        yield {
            "workload": workload,
            "target": target_key(exported),
            "program": f"{int(structural_hash(sch.mod)) & (2**64 - 1):016x}",
            "n_stores": int(feats.shape[0]),
            "features": feats.reshape(-1).tolist(),
            "run_us": math.nan if failed else secs * 1e6,
            "failed": failed,
            "flop": flop,
        }


def collect(
    database_dirs: Iterable[str | Path],
    out: str | Path,
    *,
    workloads: set[str] | None = None,
    on_progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Collect the records of every database (only ``workloads``' when given) into the parquet
    file ``out``, merged with the rows it already holds and deduplicated; returns counts.
    Written atomically. The rows already there are merged as columns, not as Python objects,
    so collecting one unit into a file of 30,000 programs takes seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    old, index = None, {}
    if out.is_file():
        try:
            old = pq.read_table(out)
            columns = [old.column(k).to_pylist() for k in (*KEY, "failed")]
            index = {tuple(r[:-1]): (i, r[-1]) for i, r in enumerate(zip(*columns, strict=True))}
        except Exception as e:
            raise StoreError(f"{out} is not a harlflow dataset: {first_line(e)}") from None
    new: dict[tuple, dict] = {}
    replaced: set[int] = set()  # rows of ``old`` a valid measurement supersedes
    seen = 0
    for d in database_dirs:
        n = 0
        for r in database_rows(d, workloads):
            seen += 1
            n += 1
            key = tuple(r[k] for k in KEY)
            if key in index:
                i, failed = index[key]
                if failed and not r["failed"]:
                    replaced.add(i)
                    index[key] = (i, False)
                    new[key] = r
            elif key not in new or (new[key]["failed"] and not r["failed"]):
                new[key] = r
        if on_progress is not None:
            on_progress(str(d), n)
    table = pa.Table.from_pylist(list(new.values()), schema=_schema())
    if old is not None:
        keep = pa.array([i not in replaced for i in range(old.num_rows)])
        table = pa.concat_tables([old.select(_schema().names).cast(_schema()).filter(keep), table])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(out)
    before = 0 if old is None else old.num_rows
    return {"records": seen, "rows": table.num_rows, "new_rows": table.num_rows - before}


def programs_per_workload(path: str | Path) -> dict[tuple[str, str], int]:
    """``(workload, target)`` → rows in a dataset file (none when it does not exist), read
    from two columns: what a generation resumes from when its work directory is gone."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        return {}
    try:
        t = pq.read_table(path, columns=["workload", "target"])
    except Exception as e:
        raise StoreError(f"{path} is not a harlflow dataset: {first_line(e)}") from None
    return dict(Counter(zip(t.column("workload").to_pylist(), t.column("target").to_pylist(),
                            strict=True)))  # fmt: skip


def schema(path: str | Path):
    """The file's parquet schema, read without its rows (a quick check before a long job);
    ``ValueError`` when it lacks a dataset's columns."""
    import pyarrow.parquet as pq

    found = pq.read_schema(path)
    missing = [n for n in _schema().names if n not in found.names]
    if missing:
        raise ValueError(f"it has no {', '.join(missing)} column")
    return found


def load(path: str | Path) -> list[dict]:
    """The rows of a dataset file, each with ``features`` as an ``(n_stores, 164)`` array."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["features"] = np.asarray(r["features"], np.float32).reshape(r["n_stores"], FEATURES)
    return rows

"""A tuning-record store in a SQL database (PostgreSQL for a team, sqlite for one machine),
as a MetaSchedule ``PyDatabase``: every reader and writer of :mod:`harl.database` uses it
unchanged, and every machine of a team that points ``HARLFLOW_TUNING_DB`` at one PostgreSQL
database reads and writes one store.

Two tables:

- ``ms_workloads``: one row per workload, its structural hash (indexed) and MetaSchedule's JSON
  of the module; unique by the sha256 of that JSON. Two modules with one hash are told apart by
  ``tvm_ffi.structural_equal``, as MetaSchedule's own databases do.
- ``ms_records``: one row per distinct measured program, **append-only and idempotent**. A
  record's identity is its workload, its full target (:func:`harlflow.core.targets.target_key`:
  the ``mcpu``, the core count, ...) and its trace (with the argument info); a program measured
  again, by this worker or another, is kept once with **the better of the measurements** (a
  lower mean run time replaces a higher one; nothing else about a row ever changes). Lookups
  go through the index on (workload, target, mean run time), so a workload's best records on a
  target cost the same at 10⁶ rows as at 10 (``bench/scale.py`` measures it). Each row keeps
  when it was first measured (``measured_at``, Unix seconds).

MetaSchedule's ``get_top_k`` has no target argument (its ``query_tuning_record`` then takes
the best record of *any* target: apache/tvm#15549, still so in 0.27): :func:`top_k_on_target`
is the query that filters by target in the database, and :func:`harl.database.records_on_target`
uses it.

A lost connection (the database restarted, the network gone) is retried with exponential
backoff for ``HARLFLOW_TUNING_DB_RETRY_S`` seconds (default 60), then fails with one
:class:`~harlflow.core.errors.StoreError` naming the store. Passwords never appear in messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import sqlalchemy as sa
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from harlflow.core.config import DATABASE_SCHEMES, check_sqlite_folder
from harlflow.core.errors import BadInputError, StoreError, first_line
from harlflow.core.targets import target_key

log = logging.getLogger("harl.database")
# MetaSchedule calls the store from C++: registered, a StoreError raised in a callback comes
# back to Python as itself (exit code 5, its one line), not as a RuntimeError
tvm_ffi.register_error("StoreError", StoreError)

T = TypeVar("T")

RETRY_S_DEFAULT = 60.0
"""How long a lost connection is retried before the store is declared unreachable"""
CACHE_RECORDS = 100_000
"""parsed records a store keeps per process (a long tuning run's lookups hit them)"""

_meta = sa.MetaData()
_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # sqlite autoincrements INTEGER
WORKLOADS = sa.Table(
    "ms_workloads",
    _meta,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("shash", sa.String(40), nullable=False, index=True),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("workload_json", sa.Text, nullable=False),
)
RECORDS = sa.Table(
    "ms_records",
    _meta,
    sa.Column("id", _BigId, primary_key=True, autoincrement=True),
    sa.Column("workload_id", _BigId, sa.ForeignKey("ms_workloads.id"), nullable=False),
    sa.Column("target", sa.String(64), nullable=False),  # sha256 of target_key(), hex, cut
    sa.Column("mean_secs", sa.Float, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False, unique=True),
    sa.Column("record_json", sa.Text, nullable=False),  # TuningRecord.as_json()
    sa.Column("measured_at", sa.Float, nullable=False),
    sa.Index("ms_records_lookup", "workload_id", "target", "mean_secs"),
)


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _engine_url(url: str) -> sa.engine.URL:
    """``postgresql://`` means psycopg 3 (the driver harlflow installs), not psycopg2."""
    try:
        u = sa.engine.make_url(url)
    except Exception:
        raise BadInputError(f"tuning store {safe_url(url)!r} is not a database URL") from None
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in DATABASE_SCHEMES:
        raise BadInputError(
            f"tuning store {safe_url(url)}: only postgresql:// and sqlite:/// are supported"
        )
    check_sqlite_folder(url, f"tuning store {safe_url(url)}")  # before the retry window
    return u


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _target_id(target) -> str:
    export = target if isinstance(target, dict) else dict(target.export())
    return _digest(target_key(export))[:32]


_engines: dict[str, sa.engine.Engine] = {}


def _engine(url: str) -> sa.engine.Engine:
    """One engine (connection pool) per store and process, tables created on first use."""
    if url not in _engines:
        u = _engine_url(url)
        if u.get_backend_name() == "sqlite":
            engine = sa.create_engine(u, connect_args={"timeout": 60})

            @sa.event.listens_for(engine, "connect")
            def _wal(conn, _):  # concurrent readers beside one writer; writers wait their turn
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")

        else:
            engine = sa.create_engine(u, pool_pre_ping=True, pool_size=2, max_overflow=2)
        _retry(url, lambda: _create_tables(engine))
        _engines[url] = engine
    return _engines[url]


SCHEMA_LOCK = 0x6861726C  # "harl": the advisory lock taken while creating the tables


def _create_tables(engine: sa.engine.Engine) -> None:
    """The tables, if missing. Several workers starting on an empty database at once would
    race on ``CREATE TABLE`` (PostgreSQL: a unique violation on its catalog): they take turns
    on an advisory lock; sqlite's writer lock serialises them, and a table another process
    created between the check and the create is taken as it is."""
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"))
            _meta.create_all(conn, checkfirst=True)
    except sa.exc.OperationalError as e:
        if "already exists" not in str(e):
            raise


def _retry(url: str, op: Callable[[], T]) -> T:
    """Run ``op``; while the database is unreachable, retry with backoff (0.5 s doubling to
    8 s) for ``HARLFLOW_TUNING_DB_RETRY_S`` seconds, then raise one ``StoreError``."""
    limit = float(os.environ.get("HARLFLOW_TUNING_DB_RETRY_S") or RETRY_S_DEFAULT)
    start, wait, tries = time.monotonic(), 0.5, 0
    while True:
        tries += 1
        try:
            return op()
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
            spent = time.monotonic() - start
            if spent + wait > limit:
                raise StoreError(
                    f"tuning store {safe_url(url)} is unreachable ({tries} tries over "
                    f"{spent:.0f} s): {first_line(e.orig or e, 200)}"
                ) from None
            log.warning(
                "tuning store %s: %s; retrying in %.1f s", safe_url(url), first_line(e, 120), wait
            )
            time.sleep(wait)
            wait = min(wait * 2, 8.0)


@derived_object
class SQLDatabase(ms.database.PyDatabase):
    """MetaSchedule's database interface over one SQL store (see the module's docstring)."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.engine = _engine(url)
        self._workloads: dict[str, list[tuple[Any, int]]] = {}  # shash -> (Workload, id), seen
        self._by_id: dict[int, Any] = {}  # the same workloads by row id
        self._cache: dict[int, tuple[float, Any]] = {}  # record row id -> (mean, TuningRecord)

    def __repr__(self) -> str:
        return f"SQLDatabase({safe_url(self.url)})"

    def _run(self, op: Callable[[sa.engine.Connection], T], write: bool = False) -> T:
        def once() -> T:
            with self.engine.begin() if write else self.engine.connect() as conn:
                return op(conn)

        return _retry(self.url, once)

    # -- workloads ------------------------------------------------------------------------
    def _find(self, mod) -> tuple[Any, int] | None:
        """The stored workload structurally equal to ``mod`` and its row id, or None."""
        wl = ms.database.Workload(mod)
        shash = str(wl.as_json()[0])
        for known, wid in self._workloads.get(shash, []):
            if _equal(known.mod, mod):
                return known, wid
        rows = self._run(
            lambda c: c.execute(
                sa.select(WORKLOADS.c.id, WORKLOADS.c.workload_json).where(
                    WORKLOADS.c.shash == shash
                )
            ).all()
        )
        for wid, text in rows:
            if wid in self._by_id:
                continue
            stored = self._remember(wid, ms.database.Workload.from_json(json.loads(text)), shash)
            if _equal(stored.mod, mod):
                return stored, wid
        return None

    def _remember(self, wid: int, wl, shash: str):
        """Keep a stored workload in this process's cache (by hash and by row id)."""
        self._workloads.setdefault(shash, []).append((wl, wid))
        self._by_id[wid] = wl
        return wl

    def _workload(self, mod) -> tuple[Any, int]:
        """The stored workload of ``mod`` and its row id, inserted if missing."""
        return self._find(mod) or self._insert_workload(mod)

    def _insert_workload(self, mod) -> tuple[Any, int]:
        wl = ms.database.Workload(mod)
        as_json = wl.as_json()
        text = json.dumps(as_json)
        digest = _digest(text)
        self._run(
            lambda c: c.execute(
                _insert(c, WORKLOADS)
                .values(shash=str(as_json[0]), digest=digest, workload_json=text)
                .on_conflict_do_nothing(index_elements=["digest"])
            ),
            write=True,
        )
        wid = self._run(
            lambda c: c.execute(
                sa.select(WORKLOADS.c.id).where(WORKLOADS.c.digest == digest)
            ).scalar_one()
        )
        return self._remember(wid, wl, str(as_json[0])), wid

    def has_workload(self, mod) -> bool:
        return self._find(mod) is not None

    def commit_workload(self, mod):
        return self._workload(mod)[0]

    # -- records --------------------------------------------------------------------------
    def commit_tuning_record(self, record) -> None:
        self.commit_tuning_records([record])

    def commit_tuning_records(self, records: Iterable) -> int:
        """Commit many records in one transaction (an import's or a round's); returns how many
        were given. Idempotent: see the module's docstring."""
        rows = [self._row(r) for r in records]
        if rows:
            self._run(lambda c: _upsert(c, rows), write=True)
        return len(rows)

    def _row(self, record) -> dict[str, Any]:
        rec = record_json(record)  # [trace, run_secs, target, args_info]
        wid = self._workload(record.workload.mod)[1]
        tid = _target_id(record.target) if record.target is not None else "none"
        secs = [float(s) for s in (record.run_secs or [])]
        mean = sum(secs) / len(secs) if secs else 1e10
        identity = json.dumps([rec[0], rec[3]], sort_keys=True)
        return {
            "workload_id": wid,
            "target": tid,
            "mean_secs": mean,
            "digest": _digest(str(wid), tid, identity),
            "record_json": json.dumps(rec),
            "measured_at": time.time(),
        }

    def _workload_by_id(self, wid: int):
        if wid not in self._by_id:
            text = self._run(
                lambda c: c.execute(
                    sa.select(WORKLOADS.c.workload_json).where(WORKLOADS.c.id == wid)
                ).scalar_one()
            )
            as_json = json.loads(text)
            self._remember(wid, ms.database.Workload.from_json(as_json), str(as_json[0]))
        return self._by_id[wid]

    def get_top_k(self, workload, top_k: int) -> list:
        found = self._find(workload.mod)
        if found is None or top_k <= 0:
            return []
        return self._select(found[1], None, top_k)

    def top_k_on_target(
        self, mod, target: dict[str, Any], top_k: int, below: float | None = None
    ) -> list:
        """The ``top_k`` fastest records of a workload on this target, failed ones last (or,
        with ``below``, only those whose mean run time is under it)."""
        found = self._find(mod)
        if found is None or top_k <= 0:
            return []
        return self._select(found[1], _target_id(target), top_k, below)

    def best_per_workload(self, target: dict[str, Any], below: float) -> list:
        """The fastest record on this target of every workload that has one under ``below``."""
        tid = _target_id(target)
        best = (
            sa.select(RECORDS.c.workload_id, sa.func.min(RECORDS.c.mean_secs).label("m"))
            .where(RECORDS.c.target == tid, RECORDS.c.mean_secs < below)
            .group_by(RECORDS.c.workload_id)
            .subquery()
        )
        q = (
            sa.select(RECORDS.c.id, RECORDS.c.workload_id, RECORDS.c.mean_secs)
            .join(
                best,
                sa.and_(
                    RECORDS.c.workload_id == best.c.workload_id, RECORDS.c.mean_secs == best.c.m
                ),
            )
            .where(RECORDS.c.target == tid)
            .order_by(RECORDS.c.workload_id, RECORDS.c.id)
        )
        rows, seen = [], set()
        for row in self._run(lambda c: c.execute(q).all()):
            if row[1] not in seen:  # one per workload (ties: the first measured)
                seen.add(row[1])
                rows.append(row)
        return self._parsed(rows)

    def count_on_target(self, mod, target: dict[str, Any]) -> int:
        """How many records (valid or failed) a workload has on this target."""
        found = self._find(mod)
        if found is None:
            return 0
        q = sa.select(sa.func.count()).where(
            RECORDS.c.workload_id == found[1], RECORDS.c.target == _target_id(target)
        )
        return self._run(lambda c: c.execute(q).scalar_one())

    def _select(self, wid: int, tid: str | None, top_k: int, below: float | None = None) -> list:
        cols = (RECORDS.c.id, RECORDS.c.workload_id, RECORDS.c.mean_secs)
        q = sa.select(*cols).where(RECORDS.c.workload_id == wid)
        if tid is not None:
            q = q.where(RECORDS.c.target == tid)
        if below is not None:
            q = q.where(RECORDS.c.mean_secs < below)
        q = q.order_by(RECORDS.c.mean_secs, RECORDS.c.id).limit(top_k)
        return self._parsed(self._run(lambda c: c.execute(q).all()))

    def _parsed(self, rows) -> list:
        """The records of these (id, workload id, mean) rows: parsed once per process (parsing
        a trace costs ~2 ms), fetched only for rows not parsed yet or measured better since."""
        missing = [rid for rid, _, mean in rows if self._cache.get(rid, (None,))[0] != mean]
        for start in range(0, len(missing), 500):
            chunk = missing[start : start + 500]
            q = sa.select(
                RECORDS.c.id, RECORDS.c.workload_id, RECORDS.c.mean_secs, RECORDS.c.record_json
            ).where(RECORDS.c.id.in_(chunk))
            for rid, wid, mean, text in self._run(lambda c, q=q: c.execute(q).all()):
                record = ms.database.TuningRecord.from_json(
                    json.loads(text), self._workload_by_id(wid)
                )
                self._cache[rid] = (mean, record)
        if len(self._cache) > CACHE_RECORDS:
            keep = {rid for rid, _, _ in rows}
            self._cache = {k: v for k, v in self._cache.items() if k in keep}
        return [self._cache[rid][1] for rid, _, _ in rows]

    def get_all_tuning_records(self) -> list:
        return list(self.iter_tuning_records())

    def __len__(self) -> int:
        return self._run(
            lambda c: c.execute(sa.select(sa.func.count()).select_from(RECORDS)).scalar_one()
        )

    # -- a whole store's content, for `harlflow db export`, in batches ---------------------
    def iter_workloads(self) -> Iterable[tuple[int, Any]]:
        """Every workload as (row id, Workload), oldest first."""
        rows = self._run(
            lambda c: c.execute(
                sa.select(WORKLOADS.c.id, WORKLOADS.c.workload_json).order_by(WORKLOADS.c.id)
            ).all()
        )
        for wid, text in rows:
            yield wid, ms.database.Workload.from_json(json.loads(text))

    def iter_tuning_records(self, batch: int = 5000) -> Iterable[Any]:
        """Every record as a ``TuningRecord``, oldest first, read in batches (a team's store
        need not fit in memory, as ``get_all_tuning_records`` would need)."""
        for wid, rec in self.iter_record_json(batch):
            yield ms.database.TuningRecord.from_json(rec, self._workload_by_id(wid))

    def iter_record_json(self, batch: int = 5000) -> Iterable[tuple[int, Any]]:
        """Every record as (workload row id, TuningRecord.as_json()), oldest first."""
        last = 0
        while True:
            rows = self._run(
                lambda c, last=last: c.execute(
                    sa.select(RECORDS.c.id, RECORDS.c.workload_id, RECORDS.c.record_json)
                    .where(RECORDS.c.id > last)
                    .order_by(RECORDS.c.id)
                    .limit(batch)
                ).all()
            )
            if not rows:
                return
            for _rid, wid, text in rows:
                yield wid, json.loads(text)
            last = rows[-1][0]


def record_json(record) -> list:
    """A ``TuningRecord`` as MetaSchedule's JSON: ``[trace, run_secs, target, args_info]``.

    ``TuningRecord.as_json()`` fails on traces holding an ``IndexMap`` (every layout rewrite):
    like MetaSchedule's C++ writer, such objects are stored as their ``tvm.ir.save_json`` text,
    which ``TuningRecord.from_json`` reads back."""
    from tvm.s_tir.meta_schedule import _ffi_api

    return _plain(_ffi_api.TuningRecordAsJSON(record))


def _plain(obj: Any) -> Any:
    """A TVM container as plain JSON values (other TVM objects as their saved JSON text)."""
    import tvm
    from tvm.tirx import FloatImm, IntImm
    from tvm_ffi import Array, Map

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (IntImm, FloatImm)):
        return obj.value
    if isinstance(obj, (Array, list, tuple)):
        return [_plain(i) for i in obj]
    if isinstance(obj, Map):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    return tvm.ir.save_json(obj)


def _equal(a, b) -> bool:
    from tvm_ffi import structural_equal

    return bool(structural_equal(a, b))


def _insert(conn: sa.engine.Connection, table: sa.Table):
    """The dialect's INSERT, which has ``on_conflict_do_*`` (PostgreSQL and sqlite alike)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def _upsert(conn: sa.engine.Connection, rows: list[dict[str, Any]]) -> None:
    """Insert records; one already stored keeps the better (lower) mean run time."""
    ins = _insert(conn, RECORDS)
    stmt = ins.on_conflict_do_update(
        index_elements=["digest"],
        set_={"mean_secs": ins.excluded.mean_secs, "record_json": ins.excluded.record_json},
        where=RECORDS.c.mean_secs > ins.excluded.mean_secs,
    )
    conn.execute(stmt, rows)

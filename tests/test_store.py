"""The team's tuning store in PostgreSQL (harl.sql_database), on a real server (tests/postgres.py):
idempotent records per full target, writers in several processes, export/import to MetaSchedule's
JSON files, resume after kill -9, the database restarted under a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from store_worker import matmul, records

from harl import database
from harl.sql_database import safe_url
from harlflow.cli import main
from harlflow.core.errors import BadInputError, StoreError

WORKER = [sys.executable, str(Path(__file__).with_name("store_worker.py"))]


@pytest.fixture(scope="module")
def mm():
    return matmul()


def _rows(url: str) -> int:
    with sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://")).connect() as c:
        return c.execute(sa.text("select count(*) from ms_records")).scalar_one()


def test_records_are_idempotent_keep_the_better_time_and_are_per_target(mm, pg_store, tmp_path):
    """The same program committed again keeps one row with the lower time; another ``mcpu`` or
    core count is another target; the JSON store answers the same queries alike."""
    _, target, tasks = mm
    task, mod = tasks[0], tasks[0].dispatched[0]
    other = {**target, "num-cores": target.get("num-cores", 2) + 1}
    for location in (pg_store, tmp_path / "json"):
        db = database.open_database(location)
        for secs in (2e-5, 1e-5, 3e-5):  # one program measured three times
            db.commit_tuning_record(next(records(db, task, target, [0], lambda s, t=secs: t)))
        db.commit_tuning_record(next(records(db, task, other, [1], lambda s: 4e-6)))
        best = database.best_records(db, mod, target, k=10)
        if location == pg_store:
            assert len(db) == 2 and _rows(pg_store) == 2  # kept once, plus the other target's
            assert [r.run_secs[0].value for r in best] == [pytest.approx(1e-5)]
        else:
            assert len(best) == 3  # JSON files append every measurement
            assert best[0].run_secs[0].value == pytest.approx(1e-5)
        assert [r.run_secs[0].value for r in database.best_records(db, mod, other)] == [
            pytest.approx(4e-6)
        ]
        # MetaSchedule's own query ignores the target (apache/tvm#15549): the other one's wins
        assert db.get_top_k(db.commit_workload(mod), 1)[0].run_secs[0].value == pytest.approx(4e-6)


def test_concurrent_writers_in_several_processes(mm, pg_store):
    """Three processes commit overlapping programs at once: every distinct program is stored
    exactly once, with the lowest time any writer measured for it."""
    seeds = [list(range(0, 12)), list(range(6, 18)), list(range(0, 18, 2))]
    procs = [
        subprocess.Popen(
            [*WORKER, "write", pg_store, *map(str, s)], stdout=subprocess.PIPE, text=True
        )
        for s in seeds
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    want: dict[str, float] = {}
    for out in outs:
        for line in out.splitlines():
            r = json.loads(line)
            key = json.dumps(r["trace"], sort_keys=True)
            want[key] = min(want.get(key, 1.0), r["secs"])
    _, target, tasks = mm
    db = database.open_database(pg_store)
    got = {
        json.dumps(json.loads(json.dumps(_trace(r))), sort_keys=True): r.run_secs[0].value
        for r in database.records_on_target(db, tasks[0].dispatched[0], target)
    }
    assert len(db) == len(want) == len(got) and 12 <= len(want) <= 18
    assert got == pytest.approx(want)


def _trace(record):
    from harl.sql_database import record_json

    return record_json(record)[0]


def test_export_import_round_trip_through_metaschedule_json(mm, pg_store, tmp_path, capsys):
    """db export writes files MetaSchedule's JSONDatabase loads; db import of them into another
    store gives the same records, and importing again adds nothing."""
    from tvm.s_tir import meta_schedule as ms

    _, target, tasks = mm
    mod = tasks[0].dispatched[0]
    db = database.open_database(pg_store)
    db.commit_tuning_records(records(db, tasks[0], target, range(6), lambda s: (s + 1) * 1e-5))
    assert main(["db", "export", str(tmp_path / "out"), "--from", pg_store]) == 0
    assert "exported 6 records of 1 workloads" in capsys.readouterr().out
    plain = ms.database.JSONDatabase(work_dir=str(tmp_path / "out"))
    assert len(plain) == 6
    lite = f"sqlite:///{tmp_path / 'lite.db'}"
    for new in (6, 0):
        assert main(["db", "import", str(tmp_path / "out"), "--to", lite]) == 0
        assert f"imported 6 records from {tmp_path / 'out'} into {lite} ({new} new)" in (
            capsys.readouterr().out
        )
    times = [[r.run_secs[0].value for r in database.best_records(d, mod, target, 10)] for d in (
        database.open_database(pg_store), database.open_database(lite), plain
    )]  # fmt: skip
    assert times[0] == times[1] == times[2] == pytest.approx([(s + 1) * 1e-5 for s in range(6)])
    # the cost model's dataset reads the store as it reads JSON files
    from harl.cost_model import dataset

    counts = dataset.collect([pg_store], tmp_path / "ds.parquet")
    assert counts["records"] == 6 and 1 <= counts["rows"] <= 6
    # bad input: one line, exit 2, nothing written
    assert main(["db", "export", str(tmp_path / "out"), "--from", pg_store]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["db", "import", str(tmp_path), "--to", lite]) == 2
    assert "is not a MetaSchedule JSON database" in capsys.readouterr().err


def test_kill_9_mid_tuning_then_the_same_run_resumes_from_the_shared_store(pg_store, tmp_path):
    """A tuning process killed with SIGKILL keeps every committed trial in PostgreSQL; the same
    run again resumes: those trials count against its budget and are not measured again."""
    env = {**os.environ, "HARLFLOW_MACHINE_CACHE": str(tmp_path / "machine")}
    cmd = [*WORKER, "tune", pg_store, "12"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline:
            if _rows_or_zero(pg_store) >= 3:
                break
            time.sleep(0.2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    assert p.returncode == -9
    measured = _rows(pg_store)
    assert 3 <= measured < 12
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.splitlines()[-1])
    assert s["resumed_trials"] == measured and measured + s["trials"] == 12
    # a program measured twice is stored once: the new rows are at most the new trials
    assert measured < _rows(pg_store) <= 12


def _rows_or_zero(url: str) -> int:
    try:
        return _rows(url)
    except sa.exc.ProgrammingError:  # the tables are not created yet
        return 0


def test_database_restarted_under_a_run_is_retried_then_named(mm, tmp_path, monkeypatch):
    """A store that goes away is retried with backoff: back within the window, the call just
    succeeds; gone for longer, one StoreError names the store (password masked). On a server
    of the test's own, which it stops and starts."""
    import postgres as pg

    postgres = pg.embedded(tmp_path / "pgdata")
    pg_store = postgres.create()
    _, target, tasks = mm
    db = database.open_database(pg_store)
    db.commit_workload(tasks[0].dispatched[0])
    postgres.stop()
    back = threading.Timer(2.0, postgres.start)
    back.start()
    try:
        assert len(db) == 0  # retried until the server was back
    finally:
        back.join()
    monkeypatch.setenv("HARLFLOW_TUNING_DB_RETRY_S", "2")
    postgres.stop()
    try:
        with pytest.raises(StoreError, match="is unreachable") as e:
            len(db)
    finally:
        postgres.start()
    assert str(e.value).startswith(f"tuning store {safe_url(pg_store)} is unreachable")
    assert len(db) == 0
    postgres.server.cleanup()


def test_two_tunings_of_one_workload_at_once_keep_the_store_consistent(mm, pg_store, tmp_path):
    """Two tuning processes on what would be two machines (machine caches of their own, so no
    lock makes them take turns) tune the same matmul into one store at the same time: both
    finish, and every stored record is distinct and loads."""
    cmd = [*WORKER, "tune", pg_store, "8"]
    procs = [
        subprocess.Popen(
            cmd,
            env={**os.environ, "HARLFLOW_MACHINE_CACHE": str(tmp_path / f"m{i}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    trials = [json.loads(out.splitlines()[-1])["trials"] for out, _ in outs]
    _, target, tasks = mm
    db = database.open_database(pg_store)
    stored = database.records_on_target(db, tasks[0].dispatched[0], target)
    keys = {json.dumps(_trace(r), sort_keys=True) for r in stored}
    assert len(stored) == len(keys) == _rows(pg_store) == len(db)
    assert 0 < len(stored) <= sum(trials)


def test_a_sqlite_store_in_a_missing_directory_is_one_line_at_once(monkeypatch, tmp_path, capsys):
    """Not a passing fault: refused before any work, not after the retry window."""
    url = f"sqlite:///{tmp_path}/missing/records.db"
    monkeypatch.setenv("HARLFLOW_TUNING_DB", url)
    assert main(["db", "export", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"no directory {tmp_path}/missing" in err and len(err.splitlines()) == 1
    with pytest.raises(BadInputError, match="no directory"):
        database.open_database(url)
    assert not (tmp_path / "out").exists()

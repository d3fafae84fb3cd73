"""Team scale: the tuning store's speed at up to 10⁶ records, and a retune fanned out over a
Prefect work pool with 1 and with 2 workers.

    python bench/scale.py store     # JSON files vs sqlite vs PostgreSQL: lookups, inserts, rounds
    python bench/scale.py retune    # 4 bundled models, --time-budget each, 1 then 2 workers

``store``: for each store size the stores are filled with rows (a real workload's real records,
and filler rows of other workloads and targets, written in bulk), then timed in the way tuning
uses them: opening, a workload's best record on a target (what packaging and the TVM oracle
ask, per kernel), and committing one record at a time (what a search round does per trial).
Then a real tuning run of a matmul (16 trials) into each kind of store, each in a fresh
process, alternated over rounds: the round overhead is the wall-time difference, with spread.

``retune``: a Prefect server, an MLflow server and a PostgreSQL tuning store (the team set-up,
on loopback), and process workers on one pool with a home and a machine cache each, as if on
machines of their own. On these 2 cores two workers cannot be faster than one when both tune:
the figures are the per-model overhead (wall time less the tuning budget) and the projected
wall time with N machines.

Results: ``bench/results/scale_store.json`` and ``scale_retune.json``, written as rows finish.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
RESULTS = ROOT / "bench" / "results"
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/harlflow-bench-scale"))
SIZES = [int(s) for s in os.environ.get("BENCH_SIZES", "10000,100000,1000000").split(",")]
JSON_MAX = 100_000  # the JSON store loads every record at open: timed up to here
FILLER_WORKLOADS = 1000


def _write(name: str, data) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f".{name}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(RESULTS / name)


def _postgres():
    import postgres

    return postgres.start(WORK / "pgdata")


# -- store -----------------------------------------------------------------------------------
def _real_records(n: int):
    """``n`` sampled schedules of a 64×64 matmul as records on this host's target."""
    from store_worker import matmul, records

    from harl import database

    mod, target, tasks = matmul()
    mem = database.open_database(WORK / "seed-json")
    recs = list(records(mem, tasks[0], target, range(n), lambda s: 1e-5 * (1 + s % 7)))
    return tasks[0].dispatched[0], target, recs


def _fill_sql(url: str, mod, target, recs, size: int) -> None:
    """The real workload with its records through the API, then filler rows in bulk up to
    ``size``: other workloads and other targets, the same record text (only keys matter)."""
    import sqlalchemy as sa

    from harl import database
    from harl.sql_database import RECORDS, WORKLOADS, SQLDatabase, _engine, record_json

    db = database.open_database(url)
    assert isinstance(db, SQLDatabase)
    db.commit_tuning_records(recs)
    text = json.dumps(record_json(recs[0]))
    wl_text = json.dumps(recs[0].workload.as_json())
    engine = _engine(url)
    with engine.begin() as c:
        c.execute(
            sa.insert(WORKLOADS),
            [
                {"shash": str(uuid.uuid4().int % 10**12), "digest": uuid.uuid4().hex * 2,
                 "workload_json": wl_text}
                for _ in range(FILLER_WORKLOADS)
            ],
        )  # fmt: skip
        ids = [r[0] for r in c.execute(sa.select(WORKLOADS.c.id)).all()]
    left, batch = size - len(recs), 20_000
    while left > 0:
        n = min(batch, left)
        rows = [
            {"workload_id": ids[i % len(ids)], "target": uuid.uuid4().hex, "mean_secs": 1e-5 + i,
             "digest": uuid.uuid4().hex * 2, "record_json": text, "measured_at": 0.0}
            for i in range(n)
        ]  # fmt: skip
        with engine.begin() as c:
            c.execute(sa.insert(RECORDS), rows)
        left -= n
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(sa.text("VACUUM ANALYZE ms_records"))


def _fill_json(directory: Path, recs, size: int) -> None:
    """A JSON store of ``size`` record lines: the real records, then copies of them."""
    from harl import database

    db = database.open_database(directory)
    for r in recs:
        db.commit_tuning_record(database.with_workload(r, db.commit_workload(r.workload.mod)))
    del db
    lines = (directory / "database_tuning_record.json").read_bytes().splitlines()
    with open(directory / "database_tuning_record.json", "ab") as f:
        for i in range(size - len(recs)):
            f.write(lines[i % len(lines)] + b"\n")


def _time_store(location, mod, target, recs) -> dict:
    """Open, look up, commit: median seconds of each, in this process."""
    import tvm

    from harl import database

    t = time.perf_counter()
    db = database.open_database(location)
    n = len(db)
    opened = time.perf_counter() - t
    t = time.perf_counter()
    first = database.best_records(db, mod, target)  # the first lookup: workload not cached
    cold = time.perf_counter() - t
    assert first, "the real workload's records are not found"
    lookups = []
    for _ in range(20):
        t = time.perf_counter()
        database.best_records(db, mod, target)
        lookups.append(time.perf_counter() - t)
    commits = []
    from tvm.s_tir import meta_schedule as ms

    for i in range(200):  # one record at a time, on targets not stored yet: real inserts
        r = recs[i % len(recs)]
        other = tvm.target.Target({**target, "num-cores": 1000 + i})
        rec = ms.database.TuningRecord(r.trace, r.workload, [2e-5], other, r.args_info)
        t = time.perf_counter()
        db.commit_tuning_record(rec)
        commits.append(time.perf_counter() - t)
    return {
        "records": n,
        "open_s": round(opened, 4),
        "first_lookup_ms": round(cold * 1e3, 2),
        "lookup_ms_median": round(statistics.median(lookups) * 1e3, 3),
        "lookup_ms_max": round(max(lookups) * 1e3, 3),
        "commit_ms_median": round(statistics.median(commits) * 1e3, 3),
        "commit_ms_p90": round(sorted(commits)[int(0.9 * len(commits))] * 1e3, 3),
        "inserts_per_s": round(len(commits) / sum(commits), 1),
    }


def _tune_once(location: str) -> float:
    """Wall time of a 16-trial tuning of a fresh matmul into ``location``, in a fresh process."""
    code = (
        "import sys, time, json; sys.path[:0] = sys.argv[2:4];"
        "from store_worker import matmul; from harl import tuning;"
        "mod, target, _ = matmul(48); t = time.perf_counter();"
        "tuning.tune(mod, target, sys.argv[1], trials=16, min_trials_per_task=4, seed=0);"
        "print(json.dumps(time.perf_counter() - t))"
    )
    env = {**os.environ, "HARLFLOW_MACHINE_CACHE": str(WORK / "machine")}
    r = subprocess.run(
        [sys.executable, "-c", code, location, str(ROOT), str(ROOT / "tests")],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.splitlines()[-1])


def bench_store(rounds: int) -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    pg = _postgres()
    mod, target, recs = _real_records(64)
    out = {"sizes": {}, "tuning_rounds": [], "machine": os.uname().nodename}
    print(f"{'store':10s} {'records':>9s} {'open s':>8s} {'1st lookup ms':>13s} "
          f"{'lookup ms':>10s} {'commit ms':>10s} {'inserts/s':>10s}")  # fmt: skip
    for size in SIZES:
        row = {}
        stores = {"postgresql": pg.create(), "sqlite": f"sqlite:///{WORK / f'lite-{size}.db'}"}
        if size <= JSON_MAX:
            stores["json"] = str(WORK / f"json-{size}")
        for kind, location in stores.items():
            t = time.perf_counter()
            if kind == "json":
                _fill_json(Path(location), recs, size)
            else:
                _fill_sql(location, mod, target, recs, size)
            fill = time.perf_counter() - t
            r = _time_store(location, mod, target, recs) | {"fill_s": round(fill, 1)}
            row[kind] = r
            print(f"{kind:10s} {r['records']:9d} {r['open_s']:8.3f} {r['first_lookup_ms']:13.2f} "
                  f"{r['lookup_ms_median']:10.3f} {r['commit_ms_median']:10.3f} "
                  f"{r['inserts_per_s']:10.1f}", flush=True)  # fmt: skip
            out["sizes"][str(size)] = row
            _write("scale_store.json", out)
        pg.drop(stores["postgresql"])
        for p in WORK.glob(f"lite-{size}.db*"):
            p.unlink()
    # tuning into each kind of empty store, fresh processes, alternated
    print("\ntuning a 48x48 matmul, 16 trials, into an empty store (fresh process each):")
    for i in range(rounds):
        times = {}
        for kind in ("json", "sqlite", "postgresql"):
            location = {
                "json": str(WORK / f"tune-json-{i}"),
                "sqlite": f"sqlite:///{WORK / f'tune-{i}.db'}",
                "postgresql": pg.create(),
            }[kind]
            times[kind] = round(_tune_once(location), 2)
        out["tuning_rounds"].append(times)
        print(f"  round {i + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()),
              flush=True)  # fmt: skip
        _write("scale_store.json", out)
    ratios = {k: [r[k] / r["json"] for r in out["tuning_rounds"]] for k in ("sqlite", "postgresql")}
    out["tuning_ratio_to_json"] = {
        k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
            "max": round(max(v), 3)}
        for k, v in ratios.items()
    }  # fmt: skip
    _write("scale_store.json", out)
    for k, v in out["tuning_ratio_to_json"].items():
        print(f"  {k} / json: median {v['median']:.3f} (range {v['min']:.3f}-{v['max']:.3f})")
    if pg.server is not None:
        pg.server.cleanup()


# -- retune ----------------------------------------------------------------------------------
MODELS = ["tiny_mlp", "small_cnn", "squeezenet_small", "inception_small"]


def bench_retune(budget: str, workers_list: list[int]) -> None:
    from services import (
        BIN,
        Service,
        embedded_env,
        harlflow,
        start_mlflow_server,
        start_prefect_server,
    )

    from harlflow.core.durations import parse_duration

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    pg = _postgres()
    out = {"models": MODELS, "time_budget": budget, "runs": []}
    budget_s = parse_duration(budget, "--time-budget")
    models = WORK / "models"
    models.mkdir()
    base = embedded_env(WORK / "export")
    for m in MODELS:
        r = harlflow(base, "export-example", m, "--out", str(models / f"{m}.onnx"))
        assert r.returncode == 0, r.stderr
    prefect, api = start_prefect_server(WORK)
    try:
        for n in workers_list:
            store = pg.create()
            (WORK / f"mlflow-{n}").mkdir()
            mlflow, mlflow_url = start_mlflow_server(WORK / f"mlflow-{n}")
            team = {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_url,
                    "HARLFLOW_TUNING_DB": store, "PREFECT_WORKER_QUERY_SECONDS": "2"}  # fmt: skip
            me = {**embedded_env(WORK / f"coord-{n}"), **team}
            pool = f"bench-{n}"
            r = harlflow(me, "deploy", "--pool", pool)
            assert r.returncode == 0, r.stderr
            workers = []
            for i in range(n):
                home = WORK / f"w{n}-{i}"
                env = {**embedded_env(home), **team, "HARLFLOW_MACHINE_CACHE": str(home / "mc")}
                cmd = ["worker", "start", "--pool", pool, "--work-queue", "optimize",
                       "--limit", "1"]  # fmt: skip
                workers.append(Service(f"worker-{n}-{i}", [str(BIN / "prefect"), *cmd], WORK, env))
            time.sleep(5)  # the workers register
            t = time.perf_counter()
            r = harlflow(me, "retune", str(models), "--pool", pool, "--time-budget", budget,
                         "--no-measure", timeout=3600)  # fmt: skip
            wall = time.perf_counter() - t
            for w in workers:
                w.stop()
            ok = r.returncode == 0
            per_model = _per_model(mlflow_url, api) if ok else {}
            mlflow.stop()
            flow_s = sum(m["flow_run_s"] for m in per_model.values())
            row = {
                "workers": n,
                "wall_s": round(wall, 1),
                "ok": ok,
                "time_budget_s": budget_s,
                "records": _records(store),
                "trials": sum(m["trials"] for m in per_model.values()),
                "models": per_model,
                # worker time outside the flow runs, per model: the worker's polling, the flow
                # run's process start and imports, the retune listing and submitting
                "overhead_per_model_s": round((wall * n - flow_s) / len(MODELS), 1),
                # the retune's time outside its flow runs (listing, submitting, waiting)
                "coordinator_s": round(wall - flow_s / n, 1),
                "output": r.stdout.strip().splitlines()[-len(MODELS) :],
            }
            if not ok:
                row["error"] = r.stderr[-1500:]
            out["runs"].append(row)
            print(f"{n} worker(s): {wall:.0f} s for {len(MODELS)} models ({budget} each), "
                  f"{row['trials']} trials, {row['records']} records in the store; overhead "
                  f"{row['overhead_per_model_s']} s per model; ok={ok}", flush=True)  # fmt: skip
            for name, m in per_model.items():
                print(f"    {name:18s} flow run {m['flow_run_s']:6.1f} s, optimize "
                      f"{m['optimize_s']:6.1f} s, {m['trials']} trials")  # fmt: skip
            _write("scale_retune.json", out)
    finally:
        prefect.stop()
    one = next((r for r in out["runs"] if r["workers"] == 1 and r["ok"]), None)
    if one is not None:
        # N machines, one worker each: the uncontended flow runs of the 1-worker run packed
        # longest first onto the least loaded machine, plus the retune's own time
        times = sorted((m["flow_run_s"] for m in one["models"].values()), reverse=True)
        out["projection"] = {}
        for n in (1, 2, 4):
            load = [0.0] * n
            for t in times:
                load[load.index(min(load))] += t
            out["projection"][str(n)] = round(max(load) + one["coordinator_s"], 1)
        print("projected wall time with N machines (one worker each): "
              + ", ".join(f"{n}: {s:.0f} s" for n, s in out["projection"].items()))  # fmt: skip
        _write("scale_retune.json", out)
    if pg.server is not None:
        pg.server.cleanup()


def _per_model(mlflow_url: str, api: str) -> dict:
    """Each model of the last retune: its flow run's wall time (Prefect), its optimize flow's
    own time and trials (its MLflow summary)."""
    os.environ["PREFECT_API_URL"] = api  # before Prefect reads its settings
    os.environ.setdefault("PREFECT_HOME", str(WORK / "prefect-client"))
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    c = MlflowClient(tracking_uri=mlflow_url)
    exp = c.get_experiment_by_name("harlflow")
    run = c.search_runs([exp.experiment_id], "tags.`harlflow.flow` = 'retune'",
                        order_by=["attributes.start_time DESC"], max_results=1)[0]  # fmt: skip
    tmp = WORK / f"dl-{run.info.run_id}"
    decisions = json.loads(Path(c.download_artifacts(run.info.run_id, "retune.json", str(tmp)))
                           .read_text())  # fmt: skip
    out = {}
    with get_client(sync_client=True) as client:
        for name, d in decisions.items():
            s = json.loads(Path(c.download_artifacts(d["mlflow_run_id"], "summary.json",
                                                     str(tmp / name))).read_text())  # fmt: skip
            fr = client.read_flow_run(d["flow_run_id"])
            out[name] = {
                "flow_run_s": round((fr.end_time - fr.start_time).total_seconds(), 1),
                "optimize_s": round(s["total_seconds"], 1),
                "trials": s["trials"],
            }
    return out


def _records(url: str) -> int:
    import sqlalchemy as sa

    with sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://")).connect() as c:
        return c.execute(sa.text("select count(*) from ms_records")).scalar_one()


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("store")
    s.add_argument("--rounds", type=int, default=5)
    r = sub.add_parser("retune")
    r.add_argument("--time-budget", default="60s")
    r.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    if a.what == "store":
        bench_store(a.rounds)
    else:
        bench_retune(a.time_budget, a.workers)


if __name__ == "__main__":
    main()

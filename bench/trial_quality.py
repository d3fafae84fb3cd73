"""How good the schedules a search chose to measure were: each searched trial's latency over its
task's best, per tuning run (the sqlite stores ``bench/time_to_quality.py`` tunes into).

    python bench/trial_quality.py --run base=/tmp/ttq-x/inception-evolutionary+xgb-s0.db@5,20 \
        --run harl=/tmp/ttq-y/inception-harl+transfer-s0.db@5 [--warm-up 4] [--out FILE.json]

A search that measures schedules near the best spends its trials where the gain is; one whose
median measured schedule is twice the best spends half of them on schedules that could not win.
For every run, minute (``@M[,M]``, from the store's first record) and task, the task's trials
up to that minute in the order they were measured, the first ``--warm-up`` of each task left
out (the tuner's seeded samples, the same for every strategy); each trial's latency is divided
by the task's best within those minutes. Reported per run and minute: trials, median and
quartiles of that ratio, the same over each task's first and second half of its searched
trials, and the share of trials within 10 % of the best. Failed trials count as infinitely
slow. No TVM needed: the stores are read as sqlite files.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import store_minutes  # noqa: E402

from harl.database import FAILED_RUN_SECS  # noqa: E402 (no TVM behind it)


def ratios(store: Path, minute: float, warm_up: int) -> dict[str, list[float]]:
    """Each searched trial's latency / its task's best within ``minute`` minutes, split into
    the first and second half of every task's searched trials (``all`` = both)."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as c:
        rows = c.execute(
            "SELECT workload_id, mean_secs, measured_at FROM ms_records ORDER BY measured_at, id"
        ).fetchall()
    if not rows:
        return {"all": [], "first": [], "second": []}
    cutoff = rows[0][2] + minute * 60
    per_task: dict[int, list[float]] = defaultdict(list)
    for w, secs, at in rows:
        if at <= cutoff:
            per_task[w].append(secs)
    out: dict[str, list[float]] = {"all": [], "first": [], "second": []}
    for secs in per_task.values():
        searched = secs[warm_up:]
        ok = [s for s in secs if s < FAILED_RUN_SECS]
        if not searched or not ok:
            continue
        best = min(ok)
        r = [s / best if s < FAILED_RUN_SECS else math.inf for s in searched]
        half = len(r) // 2
        out["all"] += r
        out["first"] += r[:half]
        out["second"] += r[half:]
    return out


def summary(r: list[float]) -> dict:
    if not r:
        return {"trials": 0}
    q = np.quantile(np.array(r), [0.25, 0.5, 0.75])  # inf sorts last: quartiles stay finite
    return {
        "trials": len(r),
        "p25": float(q[0]),
        "median": float(q[1]),
        "p75": float(q[2]),
        "within_10pct": sum(x <= 1.1 for x in r) / len(r),
        "failed": sum(math.isinf(x) for x in r),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, help="NAME=STORE.db@MIN[,MIN]")
    p.add_argument("--warm-up", type=int, default=4, help="trials of each task left out")
    p.add_argument("--out", type=Path, help="write the rows as JSON here too")
    a = p.parse_args()
    rows = []
    for spec in a.run:
        name, _, rest = spec.partition("=")
        store = store_minutes(rest)
        if not name or store is None:
            p.error(f"--run {spec!r}: want NAME=STORE.db@MIN[,MIN] with an existing store")
        path, minutes = store
        for minute in minutes:
            r = ratios(path, minute, a.warm_up)
            rows.append({"run": name if len(minutes) == 1 else f"{name}@{minute:g}",
                         "store": str(path), "minute": minute,
                         **{k: summary(v) for k, v in r.items()}})  # fmt: skip
    print(f"{'run':28s} {'trials':>6s} {'median':>7s} {'p25-p75':>12s} {'≤1.1×':>6s} "
          f"{'1st half':>8s} {'2nd half':>8s}")  # fmt: skip
    for r in rows:
        s = r["all"]
        if not s["trials"]:
            print(f"{r['run']:28s} no searched trials")
            continue
        print(f"{r['run']:28s} {s['trials']:6d} {s['median']:7.2f} "
              f"{s['p25']:5.2f}-{s['p75']:<6.2f} {s['within_10pct']:6.2f} "
              f"{r['first'].get('median', math.nan):8.2f} "
              f"{r['second'].get('median', math.nan):8.2f}")  # fmt: skip
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"warm_up": a.warm_up, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

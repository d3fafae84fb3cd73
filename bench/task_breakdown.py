"""Where a tuning run's minutes went, task by task: the trials each task had measured and its
best latency × calls per inference, at chosen minutes of one or more runs' sqlite stores.

    python bench/task_breakdown.py --network inception \
        --run base=/tmp/ttq-x/inception-evolutionary+xgb-s0.db@5,20 \
        --run harl=/tmp/ttq-x/inception-harl+transfer-s0.db@5 [--out bench/results/breakdown.json]

The stores are those ``bench/time_to_quality.py`` tunes into (kept in its work directory,
``/tmp/ttq-*``): every record carries the time it was measured, so the store at minute M is the
records measured within M minutes of the run's first. (A run that started from a copy of a
``--warm-store`` counts its minutes from that store's first record instead: use it on runs from
an empty store.) A task's "best" is what packaging would
compile it with; the summed column is the model's kernel time as the tuner sees it (what the
artifact's latency follows, minus the VM's own work). The table says which kernels a shorter
or a different run lost on, and whether the trials went there.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import store_minutes  # noqa: E402
from time_to_quality import copy_until  # noqa: E402

from harl import compilation  # noqa: E402
from harl.database import best_records, count_records, mean_run_secs, open_database  # noqa: E402
from harlflow.core.targets import resolve_target  # noqa: E402
from tasks.importing import import_model, to_relax  # noqa: E402


def store_at(src: Path, minute: float, dest: Path):
    """``src`` as it was ``minute`` minutes after its first record: a copy without the later
    records, opened as a tuning store."""
    with sqlite3.connect(src) as a:
        t0 = a.execute("SELECT min(measured_at) FROM ms_records").fetchone()[0]
    copy_until(src, dest, t0 + minute * 60)
    return open_database(f"sqlite:///{dest}")


def weighted_best_us(db, task, target: dict) -> float:
    """``task``'s best measured latency in ``db`` × its calls per inference (NaN: unmeasured)."""
    best = best_records(db, task.dispatched[0], target)
    return mean_run_secs(best[0].run_secs) * 1e6 * float(task.weight) if best else math.nan


def breakdown(tasks, columns: list[tuple[str, object]], target: dict) -> list[dict]:
    """One row per task: its weight and, per column, trials measured and weighted best µs."""
    rows = []
    for t in tasks:
        row = {"task": t.task_name, "weight": float(t.weight), "columns": {}}
        for name, db in columns:
            n = count_records(db, [t], target)
            row["columns"][name] = {"trials": n, "weighted_us": weighted_best_us(db, t, target)}
        rows.append(row)
    last = columns[-1][0]

    def heaviest(r: dict) -> float:  # an unmeasured task (NaN) last
        us = r["columns"][last]["weighted_us"]
        return -us if not math.isnan(us) else math.inf

    rows.sort(key=heaviest)
    return rows


def table(rows: list[dict], names: list[str]) -> str:
    head = "| task | calls | " + " | ".join(f"{n}: µs × calls (trials)" for n in names) + " |"
    lines = [head, "|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [
            f"{r['columns'][n]['weighted_us']:.1f} ({r['columns'][n]['trials']})" for n in names
        ]
        lines.append(f"| {r['task']} | {r['weight']:g} | " + " | ".join(cells) + " |")
    totals = []
    for n in names:
        us = sum(r["columns"][n]["weighted_us"] for r in rows)
        trials = sum(r["columns"][n]["trials"] for r in rows)
        totals.append(f"**{us:.1f}** ({trials})")
    lines.append("| total | | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", required=True, help="a network of bench/families.py")
    p.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=STORE.db@MIN[,MIN]",
        help="a run's sqlite store and the minutes to look at",
    )
    p.add_argument("--out", type=Path, help="write the rows as JSON here too")
    a = p.parse_args()
    from families import export

    runs = []  # checked before the network is exported and compiled
    for spec in a.run:
        name, _, rest = spec.partition("=")
        store = store_minutes(rest)
        if not name or store is None:
            p.error(f"--run {spec!r}: want NAME=STORE.db@MIN[,MIN] with an existing store")
        runs.append((name, *store))
    target = resolve_target("cpu")
    work = Path(tempfile.mkdtemp(prefix="breakdown-"))
    m = import_model(str(export(a.network, work)), cache_dir=work / "cache")
    tasks = compilation.extract_tasks(compilation.prepare(to_relax(m.onnx_path, m.inputs)), target)
    columns = []
    for name, path, mins in runs:
        for minute in mins:
            col = f"{name}@{minute:g}m"
            columns.append((col, store_at(path, minute, work / f"{len(columns)}.db")))
    rows = breakdown(tasks, columns, target)
    print(table(rows, [c for c, _ in columns]))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"network": a.network, "target": target, "runs": a.run, "rows": rows}
        a.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()

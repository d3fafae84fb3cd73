"""What searching the FLOP-tiny tasks buys: a tuning run's store at chosen minutes, against the
same store with those tasks tuned again under ``harl.tuning``'s rule (a warm-up, then a search
of the ones measured at ``TINY_SHARE`` of the model's time or more: ``still_tiny``) for
``--trials`` more trials; both artifacts timed side by side with onnxruntime.

    python bench/tiny_tasks.py --network inception \
        --store /tmp/ttq-x/inception-evolutionary+xgb-s0.db@5,20 [--trials 240] [--seed 0] \
        [--out bench/results/tiny_tasks.json]

The store is one ``bench/time_to_quality.py`` tuned into (its work directory, ``/tmp/ttq-*``),
from a run made before the rule, when those tasks got their two warm-up trials and no search.
The comparison isolates the kernels the rule adds to the search: the other tasks' records are
the same on both sides. It does not say what the trials cost under a time budget (the search
of the heavy kernels gets fewer): ``bench/time_to_quality.py`` on the new code says that.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import store_minutes  # noqa: E402
from task_breakdown import store_at, weighted_best_us  # noqa: E402

from harl import compilation, tuning  # noqa: E402
from harl.database import open_database  # noqa: E402
from harlflow.core.targets import resolve_target  # noqa: E402
from harlflow.measure import Runtime, side_by_side  # noqa: E402
from tasks.importing import import_model, to_relax  # noqa: E402
from tasks.packaging import measure_threads, package  # noqa: E402


def flop_tiny(tasks) -> list:
    """The tasks under ``TINY_SHARE`` of the model's FLOPs (what the warm-up judges by)."""
    sums = [
        tuning.TaskSummary(t.task_name, float(t.weight), compilation.task_flop(t)) for t in tasks
    ]
    tiny = tuning.tiny_by_flops(sums)
    return [t for t in tasks if t.task_name in tiny]


def forget(path: Path, tasks) -> None:
    """Delete the records of ``tasks``' workloads from the sqlite store at ``path``."""
    from tvm_ffi import structural_equal

    db = open_database(f"sqlite:///{path}")
    ids = [
        wid
        for wid, wl in db.iter_workloads()
        if any(structural_equal(wl.mod, t.dispatched[0]) for t in tasks)
    ]
    with sqlite3.connect(path) as c:
        c.executemany("DELETE FROM ms_records WHERE workload_id = ?", [(i,) for i in ids])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", required=True, help="a network of bench/families.py")
    p.add_argument("--store", required=True, metavar="STORE.db@MIN[,MIN]")
    p.add_argument("--trials", type=int, default=240, help="for the FLOP-tiny tasks, warm-up too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=20.0, help="per side-by-side measurement")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/tiny_tasks.json")
    a = p.parse_args()
    store = store_minutes(a.store)
    if store is None:
        p.error(f"--store {a.store!r}: want STORE.db@MIN[,MIN] with an existing store")
    path, mins = store
    from families import export

    target = resolve_target("cpu")
    work = Path(tempfile.mkdtemp(prefix="tiny-tasks-"))
    m = import_model(str(export(a.network, work)), cache_dir=work / "cache")
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
    tiny = flop_tiny(compilation.extract_tasks(mod, target))
    ort = Runtime("onnxruntime", "ort", str(m.onnx_path))
    result = {"network": a.network, "target": target, "store": a.store, "trials": a.trials,
              "seed": a.seed, "rows": []}  # fmt: skip
    for minute in mins:
        before = store_at(path, minute, work / f"at{minute:g}.db")
        after_path = work / f"at{minute:g}+tiny.db"
        store_at(path, minute, after_path)
        forget(after_path, tiny)
        res = tuning.tune(mod, target, f"sqlite:///{after_path}", strategy="evolutionary",
                          cost_model="xgb", seed=a.seed, trials=a.trials)  # fmt: skip
        after = open_database(f"sqlite:///{after_path}")
        trials = {s.name: s.trials for s in res.tasks}
        tasks = [
            {"task": t.task_name, "trials": trials.get(t.task_name, 0),
             "before_us": weighted_best_us(before, t, target),
             "after_us": weighted_best_us(after, t, target)}
            for t in tiny
        ]  # fmt: skip
        runtimes = [ort]
        for name, db in (
            (f"{minute:g}m", work / f"at{minute:g}.db"),
            (f"{minute:g}m+tiny", after_path),
        ):
            art = package(m, target, database_dir=f"sqlite:///{db}", home=work / f"art-{name}",
                          tune_summary={}, measure=False, log=lambda *_: None)  # fmt: skip
            runtimes.append(Runtime(name, "tvm", str(art.directory)))
        s = side_by_side(runtimes, m.reference_path, threads=measure_threads(target),
                         max_seconds=a.seconds)  # fmt: skip
        ratios = {}
        for x, y in ((runtimes[2].label, runtimes[1].label), (runtimes[1].label, "onnxruntime"),
                     (runtimes[2].label, "onnxruntime")):  # fmt: skip
            r = s.ratio(x, y)
            ratios[f"{x} / {y}"] = {"value": r.value, "ci": list(r.ci)}
        result["rows"].append({"minute": minute, "tasks": tasks, "ratios": ratios})
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
        print(f"\n{a.network}, the store at {minute:g} min; FLOP-tiny tasks, µs × calls:")
        print("| task | trials | before | after |\n|---|---|---|---|")
        for t in tasks:
            print(f"| {t['task']} | {t['trials']} | {t['before_us']:.1f} | {t['after_us']:.1f} |")
        print("\n| latency ratio | value | 95 % interval |\n|---|---|---|")
        for k, v in ratios.items():
            print(f"| {k} | {v['value']:.3f} | [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] |")


if __name__ == "__main__":
    main()

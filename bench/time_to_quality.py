"""Time to quality: the latency each search strategy × cost model reaches on held-out networks
after 1, 2, 5, 10 and 20 minutes of tuning, against onnxruntime and against the 20-minute
``evolutionary`` + ``xgb`` baseline.

    python bench/time_to_quality.py [--networks inception,gpt_decoder,mobilenet]
        [--combos evolutionary:xgb:20,harl:transfer:10,harl/gradient:transfer:5] [--seeds 0,1]
        [--checkpoints 1,2,5,10,20] [--warm-store sqlite:///other-models.db]
        [--out bench/results/time_to_quality.json] [--fresh] [--tag TAG]
    python bench/time_to_quality.py --make-warm-store other-models.db [--warm-trials 160]

One tuning run per (network, combination, seed) yields every checkpoint: it tunes into a
sqlite store of its own (``harl.sql_database`` keeps when each trial was measured), and each
checkpoint is the artifact compiled from the records measured up to that minute. Only the
combination that is the baseline needs the full 20 minutes (``NAME:COSTMODEL:MINUTES``; a
name ``SEARCH/SCHEDULER`` pairs a search with the other task scheduler, ``--task-scheduler``).
With ``--warm-store``, each run starts from a copy of that store (say, the other bundled
models' records): those records count at every checkpoint. ``--make-warm-store`` makes one:
the bundled example models (``harlflow.examples``; none is a benchmark network), each tuned
with the default strategy for ``--warm-trials`` trials into one sqlite store.

Every latency is measured side by side with onnxruntime (``harlflow.measure``: fresh
processes, alternated, 95 % intervals). The networks come from ``bench/families.py``: none is
in the dataset suite (``tasks.datasets.SUITE_NETWORKS``) any learned part was trained on. The
JSON is rewritten after every row; a plot per network is written beside it. Rows already in
``--out`` (measured on the same target) are kept, and the runs they came from are not run again:
a grid is built up over several invocations, and one that was stopped goes on where it was
(``--fresh`` starts the file over). Rows of another target (another host) are refused, not
replaced: each host's rows go to a file of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from harl import compilation, tuning  # noqa: E402
from harl.budget import UNLIMITED_TRIALS  # noqa: E402
from harlflow.core.targets import resolve_target  # noqa: E402
from harlflow.measure import Runtime, side_by_side  # noqa: E402
from tasks.importing import import_model, to_relax  # noqa: E402
from tasks.packaging import measure_threads, package  # noqa: E402

BASELINE = ("evolutionary", "xgb")


def copy_until(src: Path, dest: Path, cutoff: float) -> None:
    """A copy of the sqlite store ``src`` without the records measured after ``cutoff`` (Unix
    seconds): the store as it was at that moment of the run."""
    dest.unlink(missing_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dest) as b:
        a.backup(b)  # consistent, WAL included
        b.execute("DELETE FROM ms_records WHERE measured_at > ?", (cutoff,))
        b.commit()


def _named(cost_model: str, tag: str) -> str:
    """The cost model's name in the rows: ``COSTMODEL@TAG`` when a ``--tag`` is given."""
    return f"{cost_model}@{tag}" if tag else cost_model


def run_one(network, m, combo, seed, checkpoints, target, seconds, work, warm, emit,
            tag: str = "") -> None:  # fmt: skip
    """Tune ``m`` with ``combo`` for its minutes, then compile and time each checkpoint."""
    strategy, cost_model, minutes = combo
    named = _named(cost_model, tag)
    label = f"{strategy}+{named}"
    db = work / f"{network}-{label.replace('/', '-')}-s{seed}.db"  # harl/gradient
    db.unlink(missing_ok=True)
    if warm is not None:
        copy_until(warm, db, math.inf)  # the sqlite backup API: its WAL included
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
    t0 = time.time()
    search, _, scheduler = strategy.partition("/")  # harl/gradient: HARL's search, MS's tasks
    res = tuning.tune(
        mod,
        target,
        f"sqlite:///{db}",
        strategy=search,
        task_scheduler=scheduler or None,
        cost_model=cost_model,
        seed=seed,
        trials=UNLIMITED_TRIALS,
        time_budget_s=minutes * 60,
    )
    tuned_s = time.time() - t0
    ort = Runtime("onnxruntime", "ort", str(m.onnx_path))
    for minute in [c for c in checkpoints if c <= minutes]:
        snap = work / f"{db.stem}-at{minute:g}m.db"
        copy_until(db, snap, t0 + minute * 60)
        art = package(
            m, target, database_dir=f"sqlite:///{snap}", home=work / f"art-{db.stem}-{minute:g}",
            tune_summary=res.summary(), measure=False, log=lambda *_: None,
        )  # fmt: skip
        tvm = Runtime(f"tvm {label} {minute:g}m", "tvm", art.directory)
        s = side_by_side(
            [tvm, ort], m.reference_path, threads=measure_threads(target), max_seconds=seconds
        )
        r = s.ratio(tvm.label, "onnxruntime")
        emit(
            {
                "network": network,
                "strategy": strategy,
                "cost_model": named,
                "store": "warm" if warm is not None else "empty",
                "seed": seed,
                "minute": minute,
                "run_minutes": minutes,
                "trials_total": res.trials,
                "tuned_s": round(tuned_s, 1),
                "tvm_ms": s.estimate(tvm.label).median_ms,
                "onnxruntime_ms": s.estimate("onnxruntime").median_ms,
                "ratio_to_onnxruntime": r.value,
                "ratio_ci": list(r.ci),
            }
        )
        snap.unlink()


def _run_key(row: dict) -> tuple:
    """The run a row came from: every checkpoint of one run shares it."""
    return (row["network"], row["strategy"], row["cost_model"], row["store"], row["seed"])


def _earlier_rows(out: Path, target: dict) -> list[dict]:
    """The rows of an earlier invocation in ``out``; a run whose checkpoints are not all there
    (stopped mid-way) is dropped, to be run again. Rows measured on another target are never
    mixed with this host's, nor overwritten: that is an error (another ``--out``, or
    ``--fresh``)."""
    if not out.is_file():
        return []
    old = json.loads(out.read_text())
    if old.get("target") != target:
        sys.exit(
            f"error: {out} holds rows measured on {old.get('target')}, this host is {target}: "
            "give another --out (or --fresh to discard them)"
        )
    rows = old.get("rows", [])
    complete = set()
    for key in {_run_key(r) for r in rows}:
        mine = [r for r in rows if _run_key(r) == key]
        if max(r["minute"] for r in mine) >= min(r["run_minutes"] for r in mine):
            complete.add(key)
    return [r for r in rows if _run_key(r) in complete]


def summarise(rows: list[dict]) -> dict:
    """Per network and combination: the ratio at each minute (median and range over seeds),
    the first minute at or under onnxruntime, and the first minute at or under the baseline's
    latency at its last checkpoint (both as ratios to onnxruntime, measured beside it)."""
    out: dict = {}
    for net in sorted({r["network"] for r in rows}):
        mine = [r for r in rows if r["network"] == net]
        base = [r for r in mine if (r["strategy"], r["cost_model"]) == BASELINE]
        goal = None
        if base:
            last = max(r["minute"] for r in base)
            goal = sorted(r["ratio_to_onnxruntime"] for r in base if r["minute"] == last)
            goal = goal[len(goal) // 2]
        out[net] = {"baseline_ratio": goal, "combos": {}}
        for key in sorted({(r["strategy"], r["cost_model"], r["store"]) for r in mine}):
            rs = [r for r in mine if (r["strategy"], r["cost_model"], r["store"]) == key]
            by_min: dict = {}
            for r in rs:
                by_min.setdefault(r["minute"], []).append(r["ratio_to_onnxruntime"])
            curve = {
                str(k): {"median": sorted(v)[len(v) // 2], "min": min(v), "max": max(v)}
                for k, v in sorted(by_min.items())
            }
            seeds = {
                seed: {str(r["minute"]): {"median": r["ratio_to_onnxruntime"]}
                       for r in sorted(rs, key=lambda r: r["minute"]) if r["seed"] == seed}
                for seed in sorted({r["seed"] for r in rs})
            }  # fmt: skip
            out[net]["combos"]["+".join(key)] = {
                "curve": curve,
                "minutes_to_onnxruntime": _first_minute(curve, 1.0),
                "minutes_to_baseline": _first_minute(curve, goal) if goal is not None else None,
                "by_seed": {
                    str(seed): {
                        "minutes_to_onnxruntime": _first_minute(c, 1.0),
                        "minutes_to_baseline": _first_minute(c, goal) if goal is not None else None,
                    }
                    for seed, c in seeds.items()
                },
            }
    return out


def _first_minute(curve: dict, bar: float) -> float | None:
    """The first checkpoint whose median ratio is at or under ``bar`` (None: never)."""
    return next((float(k) for k, v in curve.items() if v["median"] <= bar), None)


def _reach(c: dict, what: str) -> str:
    """A table cell: the median curve's first minute to reach, then each seed's own."""

    def cell(x):
        return f"{x:g}" if x is not None else "-"

    median = c[what]
    head = f"{median:g} min" if median is not None else "not reached"
    if len(c["by_seed"]) < 2:
        return head
    per = ", ".join(f"s{s}: {cell(v[what])}" for s, v in c["by_seed"].items())
    return f"{head} ({per})"


def table(rows: list[dict]) -> str:
    """A markdown table per network: latency / onnxruntime at each checkpoint (median over
    seeds, the range when there are several), one line per combination and store; the minutes
    to reach onnxruntime and the baseline, of the median curve and of each seed ("-": not
    within the run)."""
    lines = []
    minutes = sorted({r["minute"] for r in rows})
    for net, s in summarise(rows).items():
        goal = "none" if s["baseline_ratio"] is None else f"{s['baseline_ratio']:.3f}"
        lines += [f"**{net}** (latency / onnxruntime; the baseline, evolutionary+xgb at its "
                  f"last checkpoint: {goal})", "",
                  "| combination | store | " + " | ".join(f"{m:g} min" for m in minutes)
                  + " | to onnxruntime | to baseline |",
                  "|---|---|" + "---|" * (len(minutes) + 2)]  # fmt: skip
        for key, c in s["combos"].items():
            name, store = key.rsplit("+", 1)
            cells = []
            for m in minutes:
                v = c["curve"].get(str(m))
                if v is None:
                    cells.append("")
                elif v["min"] == v["max"]:
                    cells.append(f"{v['median']:.2f}")
                else:
                    cells.append(f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})")
            reach = [_reach(c, "minutes_to_onnxruntime"), _reach(c, "minutes_to_baseline")]
            lines.append(f"| {name} | {store} | " + " | ".join(cells + reach) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for net in sorted({r["network"] for r in rows}):
        fig, ax = plt.subplots(figsize=(6, 4))
        mine = [r for r in rows if r["network"] == net]
        for key in sorted({(r["strategy"], r["cost_model"], r["store"], r["seed"]) for r in mine}):
            rs = sorted(
                (r for r in mine if (r["strategy"], r["cost_model"], r["store"], r["seed"]) == key),
                key=lambda r: r["minute"],
            )
            ax.plot([r["minute"] for r in rs], [r["ratio_to_onnxruntime"] for r in rs],
                    marker="o", label=f"{key[0]}+{key[1]} ({key[2]}, seed {key[3]})")  # fmt: skip
        ax.axhline(1.0, color="grey", linestyle="--", label="onnxruntime")
        ax.set(xscale="log", yscale="log", xlabel="minutes of tuning",
               ylabel="latency / onnxruntime", title=net)  # fmt: skip
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path.with_name(f"{path.stem}_{net}.png"), dpi=100)
        plt.close(fig)


def make_warm_store(path: Path, trials: int, target: dict) -> None:
    """Tune every bundled example model into the sqlite store ``path`` (a team's records)."""
    from harlflow.examples import EXAMPLES

    work = Path(tempfile.mkdtemp(prefix="ttq-warm-"))
    for name in EXAMPLES:
        m = import_model(f"harlflow.examples:{name}", cache_dir=work / "cache")
        mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
        t0 = time.time()
        res = tuning.tune(mod, target, f"sqlite:///{path}", trials=trials, seed=0)
        print(f"{name}: {res.trials} trials in {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", default="inception,gpt_decoder,mobilenet")
    p.add_argument("--combos", default="evolutionary:xgb:20,harl:transfer:10")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--checkpoints", default="1,2,5,10,20")
    p.add_argument("--warm-store", type=Path, help="a sqlite store every run starts from")
    p.add_argument("--seconds", type=float, default=10.0, help="per side-by-side measurement")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/time_to_quality.json")
    p.add_argument("--fresh", action="store_true", help="discard the rows already in --out")
    p.add_argument(
        "--make-warm-store",
        type=Path,
        metavar="DB",
        help="tune the bundled example models into this sqlite file, then stop",
    )
    p.add_argument("--warm-trials", type=int, default=160, help="per model, --make-warm-store")
    p.add_argument("--table", action="store_true", help="print --out's tables and stop")
    p.add_argument(
        "--tag",
        default="",
        help="appended to the cost model's name in the rows (COSTMODEL@TAG): a rerun after the "
        "shipped model or agent changed is a run of its own, beside the earlier rows",
    )
    a = p.parse_args()
    if a.table:
        print(table(json.loads(a.out.read_text())["rows"]))
        return
    if a.make_warm_store:
        make_warm_store(a.make_warm_store.resolve(), a.warm_trials, resolve_target("cpu"))
        return
    from families import export

    target = resolve_target("cpu")
    combos = [
        (c.split(":")[0], c.split(":")[1], float(c.split(":")[2])) for c in a.combos.split(",")
    ]
    checkpoints = [float(c) for c in a.checkpoints.split(",")]
    rows: list[dict] = _earlier_rows(a.out, target) if not a.fresh else []
    work = Path(tempfile.mkdtemp(prefix="ttq-"))
    result = {"target": target, "host": platform.node(), "rows": rows}
    done = {_run_key(r) for r in rows}

    def emit(row: dict) -> None:
        rows.append(row)
        result["summary"] = summarise(rows)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
        print(f"{row['network']:14s} {row['strategy']}+{row['cost_model']:9s} {row['store']:5s} "
              f"seed {row['seed']} {row['minute']:4g} min: {row['tvm_ms']:.3f} ms = "
              f"{row['ratio_to_onnxruntime']:.2f}x onnxruntime "
              f"[{row['ratio_ci'][0]:.2f}, {row['ratio_ci'][1]:.2f}]", flush=True)  # fmt: skip

    for network in a.networks.split(","):
        onnx_path = export(network, work)
        m = import_model(str(onnx_path), cache_dir=work / "cache")
        for seed in [int(s) for s in a.seeds.split(",")]:
            for combo in combos:
                store = "warm" if a.warm_store is not None else "empty"
                named = _named(combo[1], a.tag)
                if (network, combo[0], named, store, seed) in done:
                    print(f"{network} {combo[0]}+{named} {store} seed {seed}: in {a.out}")
                    continue
                run_one(network, m, combo, seed, checkpoints, target, a.seconds, work,
                        a.warm_store, emit, a.tag)  # fmt: skip
    if rows:
        plot(rows, a.out)
        print(table(rows))


if __name__ == "__main__":
    main()

"""Which oracle should judge rewrites: the compiled artifact's latency after equal-budget tuning.

    python bench/rewrite_oracles.py [--models bert_encoder,vit_small,squeezenet_small]
                                    [--budget 32] [--strategy evolutionary] [--seeds 0,1,2]

For each model, three graphs: the input (``none``), greedy rewriting judged on onnxruntime and
greedy rewriting judged on TVM (:class:`tasks.rewrite_oracle.TvmOracle`, empty database: the
calibrated roofline, as a first run sees it). Each graph is tuned from an empty database with the
same budget and strategy, once per seed (32-trial runs of one graph vary by up to 30%), compiled,
and all builds are timed side by side (``harlflow.measure``: fresh processes, alternating rounds,
intervals over blocks of processes). A rewrite that
leaves the graph unchanged reuses the input's builds. Reported: each oracle's estimates, the
substitutions, and the median compiled latency over seeds as a ratio to ``none``.
Writes ``bench/results/rewrite_oracles.json`` (and ``.partial.json`` as models finish).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harlflow.core.targets import resolve_target  # noqa: E402
from tasks.importing import import_model, to_relax  # noqa: E402
from tasks.rewrite_oracle import TvmOracle  # noqa: E402
from xrlflow import ir, search  # noqa: E402
from xrlflow.cost import OrtOracle  # noqa: E402
from xrlflow.verify import max_mismatch  # noqa: E402


def tune_and_build(path, inputs, target, db_dir, budget, strategy, seed):
    from harl import compilation, database, tuning

    mod = compilation.prepare(to_relax(path, inputs))
    res = tuning.tune(
        mod, target, db_dir, trials=budget, strategy=strategy, seed=seed, min_trials_per_task=0
    )
    tasks = compilation.extract_tasks(mod, target)
    memdb, _ = compilation.compile_database(database.open_database(db_dir), tasks, target, seed)
    return compilation.compile_module(mod, target, memdb), res.trials, len(tasks)


def _built(libs: dict):
    """(variant, graph hash) of each variant built so far."""
    return {(k, h) for k, _, h in libs}


def timed(libs: dict, imported, target: dict, work: Path, seconds: float = 30.0) -> dict:
    """Every build exported as an artifact directory and timed side by side: median ms each."""
    from common import as_artifact

    from harlflow.measure import Runtime, side_by_side
    from tasks.packaging import measure_threads

    runtimes = [
        (key, Runtime(str(i), "tvm", str(as_artifact(lib, work / f"build-{i}", imported, target))))
        for i, (key, lib) in enumerate(libs.items())
    ]
    m = side_by_side(
        [rt for _, rt in runtimes], imported.reference_path, threads=measure_threads(target),
        max_seconds=seconds, stop=None,
    )  # fmt: skip
    return {key: m.estimate(rt.label).median_ms for key, rt in runtimes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert_encoder,vit_small,squeezenet_small")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--strategy", default="evolutionary")
    p.add_argument(
        "--seeds", default="0", help="tuning seeds: each graph is tuned once per seed (median kept)"
    )
    p.add_argument("--out", default="bench/results/rewrite_oracles.json")
    a = p.parse_args()
    target = resolve_target(None)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rewrite-oracles-") as tmp:
        tmp = Path(tmp)
        for name in a.models.split(","):
            m = import_model(f"harlflow.examples:{name}", cache_dir=tmp / "imports")
            g = ir.normalize(ir.check(ir.load(m.onnx_path)))
            tvm_oracle, ort_oracle = TvmOracle(target), OrtOracle()
            row = {"model": name, "budget": a.budget, "strategy": a.strategy}
            graphs = {"none": g}
            for oname, oracle in (("onnxruntime", ort_oracle), ("tvm", tvm_oracle)):
                r = search.best_of(g, search.greedy(g, oracle))
                bad = max_mismatch(g, r.graph)
                if bad:
                    raise SystemExit(f"{name}/{oname}: rewritten graph differs: {bad}")
                graphs[oname] = r.graph
                row[f"{oname}_rules"] = r.summary()["rules_applied"]
                row[f"{oname}_search_s"] = r.seconds
            for k, gr in graphs.items():
                row[f"{k}_tvm_estimate_ms"] = tvm_oracle.estimate(gr) * 1e3
                row[f"{k}_ort_estimate_ms"] = ort_oracle.estimate(gr) * 1e3
            seeds = [int(x) for x in a.seeds.split(",")]
            libs, same = {}, {}
            for k, gr in graphs.items():
                twin = next((j for j, h in _built(libs) if h == gr.structural_hash()), None)
                if twin is not None:
                    same[k] = twin
                    continue
                path = tmp / f"{name}-{k}.onnx"
                ir.save(gr, path)
                for seed in seeds:
                    libs[(k, seed, gr.structural_hash())], trials, tasks = tune_and_build(
                        path, m.inputs, target, tmp / f"db-{name}-{k}-{seed}", a.budget,
                        a.strategy, seed,
                    )  # fmt: skip
                    row[f"{k}_tasks"] = tasks
                    print(
                        f"{name} {k} seed {seed}: tuned {trials} trials, {tasks} tasks", flush=True
                    )
            ms = timed(libs, m, target, tmp / f"builds-{name}")
            for k in graphs:
                src = same.get(k, k)
                runs = [ms[key] for key in libs if key[0] == src]
                row[f"{k}_ms_per_seed"] = runs
                row[f"{k}_ms"] = float(np.median(runs))
                row[f"{k}_same_as"] = same.get(k)
            for k in ("onnxruntime", "tvm"):
                row[f"{k}_ratio"] = row[f"{k}_ms"] / row["none_ms"]
            print(
                f"{name}: none {row['none_ms']:.3f} ms | greedy/onnxruntime "
                f"{row['onnxruntime_ms']:.3f} ({row['onnxruntime_ratio']:.3f}x) "
                f"{row['onnxruntime_rules']} | greedy/tvm "
                f"{row['tvm_ms']:.3f} ({row['tvm_ratio']:.3f}x) {row['tvm_rules']}",
                flush=True,
            )
            rows.append(row)
            out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=2, default=str))
    print()
    print(f"{'model':>16s} {'none ms':>9s} {'ort-greedy':>11s} {'tvm-greedy':>11s}")
    for r in rows:
        print(
            f"{r['model']:>16s} {r['none_ms']:9.3f} {r['onnxruntime_ratio']:11.3f} "
            f"{r['tvm_ratio']:11.3f}"
        )
    out.write_text(json.dumps(rows, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

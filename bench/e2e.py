"""End-to-end latency: PyTorch eager, onnxruntime, untuned TVM and TVM tuned at several budgets.

    python bench/e2e.py [--models resnet18,bert_encoder] [--budgets 64,256,1024]
                        [--strategies evolutionary,harl] [--out bench/results/e2e.json]

One run, one table. Every latency comes from a fresh process (median of repeats); each budget tunes
from an empty database so budgets are independent; ratios are against onnxruntime in this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harl import tuning  # noqa: E402
from harl.target import resolve_target  # noqa: E402
from tasks.importing import import_model, to_relax  # noqa: E402
from tasks.packaging import package, run_worker  # noqa: E402


def bench_model(example: str, budgets: list[int], strategies: list[str], target: dict,
                min_trials: int, seconds: float, work: Path) -> list[dict]:  # fmt: skip
    m = import_model(f"harlflow.examples:{example}", cache_dir=work / "cache")
    ref = str(m.reference_path)
    limit = ["--max-seconds", str(seconds)]
    rows = []

    def row(runtime: str, lat: dict, budget=None, trials=None, tune_s=None, weighted_us=None):
        rows.append({"model": example, "runtime": runtime, "budget": budget, "trials": trials,
                     "tuning_seconds": tune_s, "weighted_task_us": weighted_us, **lat})  # fmt: skip
        print(f"  {example:13s} {runtime:22s} {lat['median_ms']:10.3f} ms", flush=True)

    row("pytorch", run_worker(["torch", "--path", m.source, "--reference", ref, *limit]))
    row("onnxruntime", run_worker(["ort", "--path", str(m.onnx_path), "--reference", ref, *limit]))
    mod = tuning.prepare(to_relax(m.onnx_path, m.inputs))
    for budget in budgets:
        for strategy in strategies if budget else strategies[:1]:  # interleaved per budget
            db_dir = work / f"db-{example}-{budget}-{strategy}"
            t0 = time.monotonic()
            res = tuning.tune(mod, target, db_dir, trials=budget, strategy=strategy, seed=0,
                              min_trials_per_task=min_trials)  # fmt: skip
            tune_s = time.monotonic() - t0
            art = package(m, target, database_dir=db_dir, home=work / "art",
                          tune_summary=res.summary(), measure=False, log=lambda *_: None)  # fmt: skip
            lat = run_worker(["tvm", "--path", art.directory, "--reference", ref, *limit])
            label = f"tvm {strategy if budget else 'fallback'} ({budget})"
            row(label, lat, budget, res.trials, round(tune_s, 1), res.weighted_latency_us)
    untuned = work / f"untuned-{example}"
    untuned.mkdir()
    tuning.compile_untuned(mod, target).export_library(str(untuned / "model.so"))
    (untuned / "manifest.json").write_text(Path(art.directory, "manifest.json").read_text())
    row("tvm untuned", run_worker(["tvm", "--path", str(untuned), "--reference", ref,
                                   "--repeats", "5", *limit]))  # fmt: skip
    ort = next(r["median_ms"] for r in rows if r["runtime"] == "onnxruntime")
    for r in rows:
        r["ratio_to_onnxruntime"] = r["median_ms"] / ort
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,bert_encoder")
    p.add_argument("--budgets", default="64,256,1024")
    p.add_argument("--strategies", default="evolutionary", help="comma list: evolutionary,harl")
    p.add_argument("--min-trials-per-task", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=10.0, help="per latency measurement")
    p.add_argument("--out", default="bench/results/e2e.json")
    a = p.parse_args()
    target = resolve_target(None)
    budgets = [int(b) for b in a.budgets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="harlflow-bench-") as tmp:
        for example in a.models.split(","):
            rows += bench_model(example, budgets, a.strategies.split(","), target,
                                a.min_trials_per_task, a.max_seconds, Path(tmp))  # fmt: skip
    print()
    print(
        f"{'model':13s} {'runtime':22s} {'median ms':>10s} {'p90 ms':>9s} {'x ORT':>7s} {'trials':>7s} {'tune s':>7s}"
    )
    for r in rows:
        print(f"{r['model']:13s} {r['runtime']:22s} {r['median_ms']:10.3f} {r['p90_ms']:9.3f} "
              f"{r['ratio_to_onnxruntime']:7.2f} {r['trials'] or '':>7} {r['tuning_seconds'] or '':>7}")  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"target": target, "machine": platform.processor() or platform.machine(),
                               "min_trials_per_task": a.min_trials_per_task, "rows": rows}, indent=2))  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

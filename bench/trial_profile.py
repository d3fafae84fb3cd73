"""Where a tuning trial's wall time goes, before and after harlflow's measurement machinery.

    python bench/trial_profile.py [--ops conv56,gemm512,...] [--trials 64] [--seeds 0]
                                  [--out bench/results/trial_profile.json]

For every operator of ``bench/harl_vs_ms.py``'s suite (NHWC convolutions, prepacked weights, the
same tasks for both), two tuning runs from an empty database at equal trials, interleaved:

- ``stock``: MetaSchedule as harlflow drove it before: ``LocalBuilder`` (a new process pool every
  round, ``.tar`` exports linked by the runner), the default evaluator (number=3, repeat=1,
  min_repeat_ms=100), ``EvolutionarySearch()`` defaults, 16 trials per round;
- ``harlflow``: ``harl.tuning.tune`` with ``min_trials_per_task=0`` (no warm-up, so only the
  machinery differs): persistent builders exporting linked ``.so`` files, the evaluator of
  ``harl.runners.EVALUATOR``, the evolutionary settings of ``harl.strategies.EVOLUTIONARY``.

Reported per run: wall seconds per trial, MetaSchedule's profiler split (search, cost-model
update, build, run) and the best latency found; then the geometric means. ``--noise`` first
measures the evaluators themselves: 8 register-blocked conv56 schedules, each timed 5 times under
either evaluator, reporting the mean coefficient of variation and the seconds per measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harl_vs_ms import OPERATORS, operator_module  # noqa: E402

from harl import compilation, database, tuning  # noqa: E402
from harl._fast_import import import_tensor_intrinsics  # noqa: E402
from harlflow.core.targets import resolve_target, use_target_threads  # noqa: E402

PHASES = {  # MetaSchedule profiler entries → phase
    "EvoSearch/Evolve/Mutation": "search",
    "EvoSearch/SampleInitPopulation": "search",
    "EvoSearch/Evolve/Misc": "search",
    "EvoSearch/Evolve/PredictNormalizedScore": "search",
    "EvoSearch/PickBestFromDatabase": "search",
    "EvoSearch/PickWithEpsGreedy": "search",
    "MeasureCallback/UpdateCostModel": "cost_model",
    "SendToBuilder": "build",
    "SendToRunner": "run",
    "JoinRunnerFutures": "run",
}


def _split(profiler) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, secs in profiler.get().items():
        phase = PHASES.get(name)
        if phase:
            out[phase] = out.get(phase, 0.0) + float(secs)
    return {k: round(v, 2) for k, v in out.items()}


def run_stock(mod, target, trials: int, seed: int, db_dir: Path) -> dict:
    """MetaSchedule's stock machinery on the same tasks, from an empty database."""
    from tvm.s_tir import meta_schedule as ms

    tasks = compilation.extract_tasks(mod, target)
    db = database.open_database(db_dir)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as logs, ms.Profiler() as prof:
        ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks,
            logs,
            strategy=ms.search_strategy.EvolutionarySearch(),
            seed=seed,
            num_threads=int(target["num-cores"]),
        )
        ms.tune_tasks(
            tasks=ctxs,
            task_weights=weights,
            work_dir=logs,
            max_trials_global=trials,
            num_trials_per_iter=16,
            database=db,
            task_scheduler="gradient",
            builder=ms.builder.LocalBuilder(
                max_workers=2, timeout_sec=60, initializer=import_tensor_intrinsics
            ),
            runner=ms.runner.LocalRunner(),
        )
    wall = time.monotonic() - t0
    n = database.count_records(db, tasks, target)
    return {
        "wall_s": round(wall, 1),
        "trials": n,
        "s_per_trial": round(wall / max(1, n), 3),
        "split_s": _split(prof),
        "best_us": _best_us(db, tasks, target),
    }


def run_harlflow(mod, target, trials: int, seed: int, db_dir: Path) -> dict:
    from tvm.s_tir import meta_schedule as ms

    t0 = time.monotonic()
    with ms.Profiler() as prof:
        res = tuning.tune(mod, target, db_dir, trials=trials, seed=seed, min_trials_per_task=0)
    wall = time.monotonic() - t0
    db = database.open_database(db_dir)
    tasks = compilation.extract_tasks(mod, target)
    return {
        "wall_s": round(wall, 1),
        "trials": res.trials,
        "s_per_trial": round(wall / max(1, res.trials), 3),
        "split_s": _split(prof),
        "best_us": _best_us(db, tasks, target),
    }


def _best_us(db, tasks, target) -> float:
    """Best measured latency of the operator's own kernel (the task with the most FLOPs; the
    layout transposes around an NHWC convolution are tiny tasks harlflow does not search)."""
    main = max(tasks, key=compilation.task_flop)
    best = database.best_records(db, main.dispatched[0], target)
    return round(database.mean_run_secs(best[0].run_secs) * 1e6, 2) if best else math.inf


def noise(target, work: Path, repeats: int = 5) -> dict:
    """Spread and cost of one measurement under the stock evaluator and harlflow's."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from harl.builders import persistent_builder
    from harl.runners import EVALUATOR
    from harl.sampling import sample_schedules

    mod = operator_module("conv56", work)
    task = max(compilation.extract_tasks(mod, target), key=compilation.task_flop)
    samples = sample_schedules(task, target, 8, seed=0, micro_kernel=1.0)
    tgt = tvm.target.Target(target)
    with persistent_builder(max_workers=2) as b:
        built = b.build([ms.builder.BuilderInput(s.mod, tgt) for s in samples])
    inputs = [
        ms.runner.RunnerInput(
            r.artifact_path, "cpu", ms.arg_info.ArgInfo.from_entry_func(s.mod, True)
        )
        for r, s in zip(built, samples, strict=True)
        if r.error_msg is None
    ]
    out = {}
    for name, cfg in (("harlflow", EVALUATOR), ("stock", {}), ("harlflow-again", EVALUATOR)):
        runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(**cfg))
        times = np.zeros((len(inputs), repeats))
        t0 = time.monotonic()
        for k in range(repeats):
            for i, res in enumerate(runner.run(inputs)):
                times[i, k] = database.mean_run_secs(res.result().run_secs)
        wall = time.monotonic() - t0
        runner.pool.shutdown()
        cv = float(np.mean(times.std(axis=1) / times.mean(axis=1)))
        out[name] = {
            "evaluator": cfg or "default",
            "mean_cv": round(cv, 4),
            "s_per_measurement": round(wall / times.size, 3),
        }
        print(f"noise {name:9s} cv {cv:.4f}  {wall / times.size:.3f} s/measurement", flush=True)
    return out


def ort_us(op: str, work: Path) -> float:
    """onnxruntime's latency on the operator (2 threads, all graph optimisations), in µs."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    proto = OPERATORS[op]()
    proto.ir_version = 8
    path = work / f"{op}-ort.onnx"
    onnx.save(proto, str(path))
    inits = {i.name for i in proto.graph.initializer}
    feeds = {
        i.name: np.random.default_rng(0)
        .standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
        .astype("float32")
        for i in proto.graph.input
        if i.name not in inits
    }
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 0.2:
            sess.run(None, feeds)
            n += 1
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="conv56,conv14,gemm512,bert_dense,depthwise,softmax")
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--seeds", default="0")
    p.add_argument("--noise", action="store_true", help="also compare the evaluators' spread")
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=650.0,
        help="fp32 FMA peak of the machine (docs/ENVIRONMENT.md: ~620-690 on 2 cores)",
    )
    p.add_argument("--out", default="bench/results/trial_profile.json")
    a = p.parse_args()
    target = resolve_target(None)
    use_target_threads(target)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    print(
        f"{'op':11s} {'machinery':11s} {'trials':>6s} {'s/trial':>8s} {'best us':>10s} "
        f"{'GFLOP/s':>8s} {'% peak':>6s}  split (s)"
    )
    spread = None
    with tempfile.TemporaryDirectory(prefix="harlflow-profile-") as tmp:
        work = Path(tmp)
        if a.noise:
            spread = noise(target, work)
        for seed in [int(s) for s in a.seeds.split(",")]:
            for op in a.ops.split(","):
                mod = operator_module(op, work)
                flop = max(compilation.task_flop(t) for t in compilation.extract_tasks(mod, target))
                ort = ort_us(op, work)
                rows.append({"op": op, "machinery": "onnxruntime", "seed": seed, "best_us": ort})
                for name, fn in (("stock", run_stock), ("harlflow", run_harlflow)):
                    r = fn(mod, target, a.trials, seed, work / f"db-{op}-{name}-{seed}")
                    rows.append({"op": op, "machinery": name, "seed": seed, **r})
                for r in rows[-3:]:
                    r["gflops"] = round(flop / r["best_us"] / 1e3, 1)
                    r["peak_fraction"] = round(r["gflops"] / a.peak_gflops, 3)
                    r["ratio_to_onnxruntime"] = round(r["best_us"] / ort, 3)
                    print(
                        f"{op:11s} {r['machinery']:11s} {r.get('trials', ''):>6} "
                        f"{r.get('s_per_trial', ''):>8} {r['best_us']:10.1f} {r['gflops']:8.1f} "
                        f"{100 * r['peak_fraction']:6.1f}  {r.get('split_s', '')}",
                        flush=True,
                    )
                out.write_text(json.dumps({"target": target, "rows": rows}, indent=2))

    def gmean(xs):
        return math.exp(sum(math.log(x) for x in xs) / len(xs))

    summary = {}
    for name in ("stock", "harlflow"):
        mine = [r for r in rows if r["machinery"] == name]
        summary[name] = {
            "mean_s_per_trial": round(sum(r["s_per_trial"] for r in mine) / len(mine), 3)
        }
    pairs = [
        (s, h)
        for s in rows
        for h in rows
        if s["machinery"] == "stock"
        and h["machinery"] == "harlflow"
        and s["op"] == h["op"]
        and s["seed"] == h["seed"]
    ]
    summary["best_latency_ratio_harlflow_over_stock_gmean"] = round(
        gmean([h["best_us"] / s["best_us"] for s, h in pairs]), 3
    )
    summary["noise"] = spread
    print(json.dumps(summary, indent=2))
    out.write_text(json.dumps({"target": target, "rows": rows, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

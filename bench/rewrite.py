"""Graph rewriting side by side: input graph, onnxruntime's own optimiser, greedy, TASO-style
backtracking, X-RLflow and RLFlow, both agents trained leave-one-out.

    python bench/rewrite.py [--models bert_encoder,vit_small,...] [--iterations 6]
                            [--tvm-models bert_encoder,squeezenet_small --tvm-budget 32]

For each model (all latencies measured in this one run, onnxruntime CPU, 1 thread, medians):

- ``input``: the imported graph with onnxruntime's graph optimisations off;
- ``ort_all``: the same graph with ORT_ENABLE_ALL (what users reach for today);
- ``greedy`` / ``backtracking`` / ``xrlflow``: our rewrites, run with optimisations off (so the
  rewrite is what is measured) and also with ORT_ENABLE_ALL on top (``+ort``);
- X-RLflow's agent and RLFlow's world model + controller are trained on the *other* models only
  (leave-one-out), then run greedily plus ``--rollouts`` sampled episodes on the scored model;
- sample efficiency: the real environment steps each agent took in training, and how many
  RLFlow needed before its real (grounding) return reached X-RLflow's final training return
  (the mean of its last three iterations), as a fraction of X-RLflow's real steps.

With ``--tvm-models``, those models are also tuned with HARL's pipeline tuner at equal budgets
with and without the X-RLflow rewrite, and the compiled modules measured end to end.
Writes ``bench/results/rewrite.json``; prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harlflow import rl  # noqa: E402
from tasks.importing import import_model  # noqa: E402
from xrlflow import agent as A  # noqa: E402
from xrlflow import ir, search  # noqa: E402
from xrlflow import rlflow as RF  # noqa: E402
from xrlflow.cost import OrtOracle  # noqa: E402
from xrlflow.env import RewriteEnv  # noqa: E402
from xrlflow.verify import max_mismatch, random_inputs  # noqa: E402

MODELS = ["bert_encoder", "vit_small", "resnet18", "inception_small", "squeezenet_small"]


def latencies(configs: dict[str, tuple], work: Path, seconds: float = 10.0) -> dict[str, float]:
    """Median ms of each (graph, ORT optimisation level) config under onnxruntime on one thread
    (the oracle's setting), side by side (``harlflow.measure``: fresh processes, alternating
    rounds), on the same seeded inputs."""
    import numpy as np

    from harlflow.measure import Runtime, side_by_side

    work.mkdir(parents=True, exist_ok=True)
    runtimes = []
    for i, (k, (g, level)) in enumerate(configs.items()):
        ir.save(g, work / f"{i}.onnx")
        runtimes.append(Runtime(k, "ort", str(work / f"{i}.onnx"), ort_level=level))
    first = next(iter(configs.values()))[0]
    np.savez(work / "inputs.npz", **{f"input/{k}": v for k, v in random_inputs(first).items()})
    m = side_by_side(runtimes, work / "inputs.npz", threads=1, max_seconds=seconds, stop=None)
    return {k: m.estimate(k).median_ms for k in configs}


def load(name: str, cache: Path):
    m = import_model(f"harlflow.examples:{name}", cache_dir=cache)
    return m, ir.normalize(ir.check(ir.load(m.onnx_path)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument(
        "--iterations", type=int, default=6, help="PPO iterations per leave-one-out agent"
    )
    p.add_argument("--episodes", type=int, default=2, help="episodes per PPO iteration")
    p.add_argument("--train-steps", type=int, default=10, help="substitutions per training episode")
    p.add_argument("--rollouts", type=int, default=2, help="sampled rollouts at inference")
    p.add_argument("--max-steps", type=int, default=25, help="substitutions per inference episode")
    p.add_argument("--bt-budget", type=int, default=20, help="graphs backtracking expands")
    p.add_argument("--rl-iterations", type=int, default=30, help="RLFlow PPO iterations")
    p.add_argument(
        "--rl-random-episodes", type=int, default=12, help="random real episodes RLFlow starts on"
    )
    p.add_argument(
        "--rl-ground-every", type=int, default=5, help="RLFlow re-grounds every N iterations"
    )
    p.add_argument("--tvm-models", default="", help="also tune these with and without rewriting")
    p.add_argument("--tvm-budget", type=int, default=32)
    p.add_argument("--out", default="bench/results/rewrite.json")
    a = p.parse_args()
    names = a.models.split(",")
    oracle = OrtOracle()
    cands: dict = {}  # candidate sets are a pure function of the graph: shared by every env
    rows, tvm_rows, rewritten = [], [], {}
    with tempfile.TemporaryDirectory(prefix="rewrite-bench-") as tmp:
        cache = Path(tmp)
        graphs = {n: load(n, cache)[1] for n in names}
        for name in names:
            g = graphs[name]
            row = {"model": name, "nodes": len(g.nodes)}
            print(f"{name}: {len(g.nodes)} nodes", flush=True)
            results = {
                "greedy": search.greedy(g, oracle),
                "backtracking": search.backtracking(g, oracle, alpha=1.05, budget=a.bt_budget),
            }
            others = {k: v for k, v in graphs.items() if k != name}
            t0 = time.monotonic()
            rl.setup(0)
            agent = A.XRLflowAgent(seed=0)
            curve: list[dict] = []
            if others:
                env = RewriteEnv(others, oracle, max_steps=a.train_steps, candidate_cache=cands)
                curve = A.train(env, agent, iterations=a.iterations, episodes_per_iter=a.episodes)
            train_s = time.monotonic() - t0
            results["xrlflow"] = search.policy(
                g, agent, oracle, rollouts=a.rollouts, max_steps=a.max_steps
            )
            xrl_steps = np.cumsum([m["charts/mean_steps"] * a.episodes for m in curve])
            t0 = time.monotonic()
            rl.setup(0)
            rlflow_agent = RF.RLFlowAgent(seed=0)
            rl_curve: list[dict] = []
            if others:
                env = RewriteEnv(others, oracle, max_steps=a.train_steps, candidate_cache=cands)
                rl_curve = RF.train(
                    env,
                    rlflow_agent,
                    iterations=a.rl_iterations,
                    random_episodes=a.rl_random_episodes,
                    ground_every=a.rl_ground_every,
                    ground_episodes=a.episodes,
                    seed=0,
                )
            rl_train_s = time.monotonic() - t0
            results["rlflow"] = search.policy(
                g, rlflow_agent, oracle, rollouts=a.rollouts, max_steps=a.max_steps
            )
            row |= efficiency(curve, xrl_steps, rl_curve)
            row["rlflow_train_s"] = rl_train_s
            row["rlflow_curve"] = rl_curve
            configs = {"input": (g, "disable"), "ort_all": (g, "all")}
            for method, r in results.items():
                r = search.best_of(g, r)
                if method == "xrlflow":
                    rewritten[name] = r.graph
                bad = max_mismatch(g, r.graph)
                if bad:
                    raise SystemExit(f"{name}/{method}: rewritten graph differs: {bad}")
                configs[method], configs[f"{method}+ort"] = (r.graph, "disable"), (r.graph, "all")
                row[f"{method}_s"] = r.seconds
                row[f"{method}_rules"] = r.summary()["rules_applied"]
                row[f"{method}_nodes"] = len(r.graph.nodes)
            timed = latencies(configs, cache / f"ort-{name}")
            row |= {f"{k}_ms": v for k, v in timed.items()}
            for method in results:
                print(
                    f"  {method:12s} {row[f'{method}_ms']:8.3f} ms "
                    f"({row['input_ms'] / row[f'{method}_ms']:.3f}x)"
                    f"  +ORT_ALL {row[f'{method}+ort_ms']:8.3f} ms  "
                    f"search {row[f'{method}_s']:6.1f} s  "
                    f"{row[f'{method}_rules']}",
                    flush=True,
                )
            row["xrlflow_train_s"] = train_s
            row["xrlflow_curve"] = curve
            rows.append(row)
            partial = Path(a.out).with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"models": rows}, indent=2, default=str))
        for name in [m for m in a.tvm_models.split(",") if m]:
            tvm_rows.append(tvm_compare(name, cache, a.tvm_budget, rewritten[name], log=print))
    print()
    head = [
        "model",
        "input",
        "ORT_ALL",
        "greedy",
        "backtrack",
        "X-RLflow",
        "X-RL/input",
        "X-RL/greedy",
        "X-RL+ORT",
        "RLFlow",
        "RLF/X-RL",
        "X-RL steps",
        "RLF steps",
        "RLF→X-RL",
    ]
    print(" ".join(f"{h:>11s}" for h in head))
    for r in rows:
        print(
            f"{r['model']:>11.11s} {r['input_ms']:11.3f} {r['ort_all_ms']:11.3f} "
            f"{r['greedy_ms']:11.3f} {r['backtracking_ms']:11.3f} {r['xrlflow_ms']:11.3f} "
            f"{r['input_ms'] / r['xrlflow_ms']:11.3f} {r['greedy_ms'] / r['xrlflow_ms']:11.3f} "
            f"{r['xrlflow+ort_ms']:11.3f} {r['rlflow_ms']:11.3f} "
            f"{r['rlflow_ms'] / r['xrlflow_ms']:11.3f} {r['xrlflow_real_steps']:11.0f} "
            f"{r['rlflow_real_steps']:11.0f} "
            + (
                f"{r['rlflow_fraction']:11.2f}"
                if r["rlflow_fraction"] is not None
                else "      never"
            )
        )
    for t in tvm_rows:
        print(
            f"TVM {t['model']}: budget {t['budget']}, no rewrite {t['plain_ms']:.3f} ms, "
            f"X-RLflow rewrite {t['rewritten_ms']:.3f} ms "
            f"({t['plain_ms'] / t['rewritten_ms']:.3f}x)"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"models": rows, "tvm": tvm_rows}, indent=2, default=str))
    print(f"wrote {out}")


def efficiency(xrl_curve: list[dict], xrl_steps, rl_curve: list[dict]) -> dict:
    """Real steps each agent trained on; RLFlow's steps to reach X-RLflow's final return."""
    if not xrl_curve or not rl_curve:
        return {"xrlflow_real_steps": 0, "rlflow_real_steps": 0, "rlflow_fraction": None}
    target = float(np.mean([m["charts/mean_return"] for m in xrl_curve[-3:]]))
    reached = next(
        (
            m["charts/real_steps"]
            for m in rl_curve
            if "charts/real_return" in m and m["charts/real_return"] >= target
        ),
        None,
    )
    total = float(xrl_steps[-1])
    return {
        "xrlflow_final_return": target,
        "xrlflow_real_steps": total,
        "rlflow_real_steps": rl_curve[-1]["charts/real_steps"],
        "rlflow_final_real_return": rl_curve[-1].get("charts/real_return"),
        "rlflow_steps_to_xrlflow_return": reached,
        "rlflow_fraction": reached / total if reached is not None and total else None,
    }


def tvm_compare(name: str, cache: Path, budget: int, rewritten, log) -> dict:
    """Tune the model with and without X-RLflow's rewrite at equal budgets; measure both side
    by side (``harlflow.measure``)."""
    from common import as_artifact

    from harl import compilation, database, tuning
    from harlflow.core.targets import resolve_target
    from harlflow.measure import Runtime, side_by_side
    from tasks.importing import to_relax
    from tasks.packaging import measure_threads

    imported, _ = load(name, cache)
    target = resolve_target(None)
    rw_path = cache / f"{name}-xrlflow.onnx"
    ir.save(rewritten, rw_path)
    out = {"model": name, "budget": budget}
    for key, path in (("plain", imported.onnx_path), ("rewritten", rw_path)):
        mod = compilation.prepare(to_relax(path, imported.inputs))
        db = cache / f"db-{name}-{key}"
        res = tuning.tune(
            mod, target, db, trials=budget, strategy="harl", seed=0, min_trials_per_task=0
        )
        memdb, _ = compilation.compile_database(
            database.open_database(db), compilation.extract_tasks(mod, target), target, 0
        )
        lib = compilation.compile_module(mod, target, memdb)
        as_artifact(lib, cache / f"build-{name}-{key}", imported, target)
        out[f"{key}_trials"] = res.trials
    m = side_by_side(
        [Runtime(k, "tvm", str(cache / f"build-{name}-{k}")) for k in ("plain", "rewritten")],
        imported.reference_path, threads=measure_threads(target), max_seconds=20,
    )  # fmt: skip
    for key in ("plain", "rewritten"):
        out[f"{key}_ms"] = m.estimate(key).median_ms
        log(f"TVM {name} {key}: {out[f'{key}_ms']:.3f} ms after {out[f'{key}_trials']} trials")
    r = m.ratio("rewritten", "plain")
    out["rewritten_ratio"], out["rewritten_ratio_ci"] = r.value, list(r.ci)
    return out


if __name__ == "__main__":
    main()

"""HARL against MetaSchedule's evolutionary search at equal trial budgets, side by side.

    python bench/harl_vs_ms.py [--ops gemm512,conv56,...] [--budgets 32,64,128] [--seeds 0,1,2]
                               [--cost-model xgb|transfer|PATH] [--agent pretrained,fresh,PATH]
    python bench/harl_vs_ms.py --summarise bench/results/harl_vs_ms.json   # its table again

The network-level comparison (BERT encoder, ResNet-18 at equal global budgets: weighted task
latency and the compiled model's end-to-end latency) is ``bench/e2e.py --strategies
evolutionary,harl``.

For every (seed, operator, budget) the strategies run back to back (interleaved, never one
strategy's whole suite first), each from an empty database, with no random warm-up
(min_trials_per_task=0) so that only the search strategy differs: all rank candidates with the
same ``--cost-model``. HARL's agent starts from each ``--agent`` in turn: the one the package
ships (pre-trained offline by ``harlflow harl-train``), a fresh one, or a file; every run starts
from a copy, so no run learns from another. Reported per operator and HARL variant: best
latency ratio HARL/MS (geometric mean over seeds), trials HARL needs to reach MS's final best
(search speed = budget / those trials), wall seconds per trial, GFLOP/s and the fraction of
``--peak-gflops``. Latencies are MetaSchedule runner measurements (what the searches see).
Writes JSON (runs so far in ``*.partial.json`` while it runs) and a convergence plot.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harl import compilation, tuning  # noqa: E402
from harlflow.core.signature import TensorSpec  # noqa: E402
from harlflow.core.targets import resolve_target  # noqa: E402
from tasks.importing import to_relax  # noqa: E402

F32 = TensorProto.FLOAT


def _w(name: str, shape) -> onnx.TensorProto:
    return numpy_helper.from_array(
        np.random.default_rng(0).standard_normal(shape).astype("float32") * 0.1, name
    )


def _model(nodes, inputs, output_shape, inits) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "op",
        [helper.make_tensor_value_info(n, F32, s) for n, s in inputs],
        [helper.make_tensor_value_info("y", F32, output_shape)],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _conv(c: int, hw: int, groups: int = 1):
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=groups)]
    return _model(nodes, [("x", [1, c, hw, hw])], [1, c, hw, hw], [_w("w", (c, c // groups, 3, 3))])


def _gemm(n: int):
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [n, n])], [n, n], [_w("w", (n, n))]
    )


OPERATORS = {
    "gemm512": lambda: _gemm(512),
    "gemm1024": lambda: _gemm(1024),
    "bert_bmm": lambda: _model(
        [helper.make_node("MatMul", ["q", "k"], ["y"])],
        [("q", [4, 128, 64]), ("k", [4, 64, 128])],
        [4, 128, 128],
        [],
    ),
    "bert_dense": lambda: _model(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        [("x", [128, 256])],
        [128, 1024],
        [_w("w", (256, 1024)), _w("b", (1024,))],
    ),
    "conv56": lambda: _conv(64, 56),
    "conv28": lambda: _conv(128, 28),
    "conv14": lambda: _conv(256, 14),
    "conv7": lambda: _conv(512, 7),
    "depthwise": lambda: _conv(64, 56, groups=64),
    "softmax": lambda: _model(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        [("x", [4, 128, 128])],
        [4, 128, 128],
        [],
    ),
    "layernorm": lambda: _model(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)],
        [("x", [128, 256])],
        [128, 256],
        [_w("g", (256,)), _w("b", (256,))],
    ),
}


def operator_module(name: str, work: Path):
    proto = OPERATORS[name]()
    path = work / f"{name}.onnx"
    onnx.save(proto, str(path))
    inits = {i.name for i in proto.graph.initializer}
    specs = [
        TensorSpec(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim), "float32")
        for i in proto.graph.input
        if i.name not in inits
    ]
    return compilation.prepare(to_relax(path, specs))


def agent_copy(agent: str, seed: int, work: Path) -> Path:
    """A copy of the agent a HARL run starts from (the run saves its agent back there)."""
    from harl.agent import PRETRAINED, EditAgent

    path = work / f"agent-{time.monotonic_ns()}.pt"
    if agent == "fresh":
        EditAgent(seed=seed).save(path)
    else:
        shutil.copy(PRETRAINED if agent == "pretrained" else agent, path)
    return path


def run_one(
    mod,
    target,
    strategy: str,
    budget: int,
    seed: int,
    work: Path,
    cost_model: str = "xgb",
    agent: str = "pretrained",
) -> dict:
    """One tuning run from an empty database; the best-so-far curve of the heaviest task."""
    curve: list[tuple[int, float]] = []
    agent_path = agent_copy(agent, seed, work) if strategy == "harl" else None
    t0 = time.monotonic()
    res = tuning.tune(
        mod,
        target,
        work / f"db-{strategy}-{seed}-{budget}-{time.monotonic_ns()}",
        trials=budget,
        strategy=strategy,
        seed=seed,
        min_trials_per_task=0,
        on_progress=lambda p: curve.append((p.trials, p.weighted_us)),
        cost_model=cost_model,
        agent_path=agent_path,
    )
    wall = time.monotonic() - t0
    main = max(res.tasks, key=lambda t: (t.flop if math.isfinite(t.flop) else 0, t.weight))
    return {
        "strategy": strategy,
        "seed": seed,
        "budget": budget,
        "trials": res.trials,
        "wall_s": wall,
        "wall_per_trial_s": wall / max(1, res.trials),
        "best_us": res.weighted_latency_us,
        "flop": main.flop,
        "curve": [(t, u) for t, u in curve if u is not None],
    }


def trials_to_reach(curve, target_us: float) -> int | None:
    return next((t for t, u in curve if u <= target_us * 1.0001), None)


def variant(run: dict) -> str:
    """A run's label: ``evolutionary`` or ``harl:<agent it started from>``."""
    return run.get("variant") or run["strategy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPERATORS))
    p.add_argument("--budgets", default="32,64,128")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--peak-gflops",
        type=float,
        default=520.0,
        help="machine peak for the fraction column (docs/ENVIRONMENT.md: ~520 on 2 Zen 5 cores)",
    )
    p.add_argument(
        "--cost-model", default="xgb", help="both strategies' cost model: xgb, transfer or a file"
    )
    p.add_argument(
        "--agent",
        default="pretrained",
        help="HARL's starting agent: pretrained (shipped), fresh, or an agent file; several, "
        "comma-separated, run side by side against the same MetaSchedule runs",
    )
    p.add_argument("--out", default="bench/results/harl_vs_ms.json")
    p.add_argument(
        "--summarise",
        nargs="+",
        metavar="JSON",
        help="print the table of results files (.partial.json too; several, with the same settings "
        "and different seeds: their runs pooled) and measure nothing",
    )
    a = p.parse_args()
    if a.summarise:
        runs = []
        for f in a.summarise:
            doc = json.loads(Path(f).read_text())
            agent = doc.get("settings", {}).get("agent")  # files from before --agent took a list
            runs += [
                r | {"variant": f"harl:{agent}"} if r["strategy"] == "harl" and agent else r
                for r in doc["runs"]
            ]
        ops = list(dict.fromkeys(r["op"] for r in runs))
        budgets = sorted({r["budget"] for r in runs})
        report(summarise(runs, ops, budgets, a.peak_gflops), budgets, a.peak_gflops)
        return
    target = resolve_target(None)
    ops, budgets = a.ops.split(","), [int(b) for b in a.budgets.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    agents = a.agent.split(",")
    labels = {
        ag: f"harl:{Path(ag).stem if ag not in ('pretrained', 'fresh') else ag}" for ag in agents
    }
    runs = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # the runs so far, in case the bench is stopped
    with tempfile.TemporaryDirectory(prefix="harl-bench-") as tmp:
        work = Path(tmp)
        mods = {op: operator_module(op, work) for op in ops}
        for seed in seeds:
            for op in ops:
                for budget in budgets:
                    plan = [("evolutionary", None)] + [("harl", ag) for ag in agents]
                    for strategy, ag in plan:  # interleaved
                        r = run_one(
                            mods[op], target, strategy, budget, seed, work, a.cost_model, ag
                        ) | {"op": op, "variant": labels[ag] if ag else strategy}
                        runs.append(r)
                        partial.write_text(json.dumps({"target": target, "runs": runs}))
                        print(
                            f"seed {seed} {op:10s} {budget:4d} {r['variant']:16s} "
                            f"best {r['best_us']:10.2f} us"
                            f"  {r['trials']} trials  {r['wall_s']:.0f} s",
                            flush=True,
                        )
    rows = summarise(runs, ops, budgets, a.peak_gflops)
    report(rows, budgets, a.peak_gflops)
    settings = {"cost_model": a.cost_model, "agents": agents}
    out.write_text(
        json.dumps(
            {"target": target, "settings": settings, "runs": runs, "summary": rows}, indent=2
        )
    )
    partial.unlink(missing_ok=True)
    plot(runs, ops, budgets, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def report(rows: list[dict], budgets: list[int], peak: float) -> None:
    """The table (one row per operator, budget and HARL variant) and the geometric means."""
    print()
    print(
        f"{'op':10s} {'budget':>6s} {'HARL variant':16s} {'MS us':>9s} {'HARL us':>9s} "
        f"{'HARL/MS':>8s} {'speed':>6s} {'s/trial MS':>10s} {'s/trial HARL':>12s} "
        f"{'GFLOP/s MS':>10s} {'GFLOP/s HARL':>12s} {'%peak HARL':>10s}"
    )
    for r in rows:
        speed = f"{r['search_speed']:.2f}" if r["search_speed"] else "never"
        print(
            f"{r['op']:10s} {r['budget']:6d} {r['variant']:16s} {r['ms_us']:9.2f} "
            f"{r['harl_us']:9.2f} {r['ratio']:8.3f} {speed:>6s} "
            f"{r['ms_s_per_trial']:10.2f} {r['harl_s_per_trial']:12.2f} {r['ms_gflops']:10.1f} "
            f"{r['harl_gflops']:12.1f} {100 * r['harl_gflops'] / peak:9.1f}%"
        )
    for name in dict.fromkeys(r["variant"] for r in rows):
        for budget in budgets:
            ratios = [r["ratio"] for r in rows if r["budget"] == budget and r["variant"] == name]
            print(
                f"budget {budget}: geometric-mean latency {name}/MS = "
                f"{math.exp(np.mean(np.log(ratios))):.3f}"
            )


def summarise(runs, ops, budgets, peak) -> list[dict]:
    """Per operator, budget and HARL variant: latencies (geometric means over seeds), the
    HARL/MS ratio, search speed, seconds per trial and GFLOP/s."""
    gm = lambda rs: math.exp(np.mean([math.log(r["best_us"]) for r in rs]))  # noqa: E731
    names = [v for v in dict.fromkeys(variant(r) for r in runs) if v != "evolutionary"]
    rows = []
    for op in ops:
        for budget in budgets:
            here = [r for r in runs if r["op"] == op and r["budget"] == budget]
            for name in names:
                harl = sorted((r for r in here if variant(r) == name), key=lambda r: r["seed"])
                seeds = {r["seed"] for r in harl}  # compared on the seeds both ran
                ms_runs = sorted(
                    (r for r in here if variant(r) == "evolutionary" and r["seed"] in seeds),
                    key=lambda r: r["seed"],
                )
                harl = [r for r in harl if r["seed"] in {m["seed"] for m in ms_runs}]
                if not ms_runs or not harl:
                    continue  # a partial file: this pair was not run
                reach = []
                for m, h in zip(ms_runs, harl, strict=True):  # same seed
                    t = trials_to_reach(h["curve"], m["best_us"])
                    reach.append(m["trials"] / t if t else 0.0)
                flop = ms_runs[0]["flop"]
                rows.append(
                    {
                        "op": op,
                        "budget": budget,
                        "variant": name,
                        "ms_us": gm(ms_runs),
                        "harl_us": gm(harl),
                        "ratio": gm(harl) / gm(ms_runs),
                        "search_speed": float(np.mean(reach)) if all(reach) else None,
                        "ms_s_per_trial": float(np.mean([r["wall_per_trial_s"] for r in ms_runs])),
                        "harl_s_per_trial": float(np.mean([r["wall_per_trial_s"] for r in harl])),
                        "ms_gflops": flop / gm(ms_runs) / 1e3,
                        "harl_gflops": flop / gm(harl) / 1e3,
                        "peak_gflops": peak,
                    }
                )
    return rows


def plot(runs, ops, budgets, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = max(budgets)
    names = list(dict.fromkeys(variant(r) for r in runs))
    colors = dict(zip(names, ["tab:blue", "tab:red", "tab:green", "tab:orange"], strict=False))
    cols = min(4, len(ops))
    fig, axes = plt.subplots(
        math.ceil(len(ops) / cols),
        cols,
        figsize=(4 * cols, 3 * math.ceil(len(ops) / cols)),
        squeeze=False,
    )
    for ax, op in zip(axes.flat, ops, strict=False):
        for name in names:
            for r in (
                r for r in runs if r["op"] == op and r["budget"] == budget and variant(r) == name
            ):
                if r["curve"]:
                    ax.step(
                        *zip(*r["curve"], strict=True),
                        where="post",
                        color=colors.get(name, "gray"),
                        alpha=0.6,
                        label=name if r["seed"] == runs[0]["seed"] else None,
                    )
        ax.set_title(op)
        ax.set_xlabel("trials")
        ax.set_ylabel("best latency (us)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()

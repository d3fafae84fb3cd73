"""End-to-end latency: PyTorch eager, onnxruntime, untuned TVM and TVM tuned per budget.

    python bench/e2e.py [--models small_cnn,resnet18,bert_encoder,mobile_cnn] [--minutes 5,20]
                        [--budgets 64,256] [--strategies evolutionary,harl]
                        [--out bench/results/e2e.json]

One run, one table. Budgets are wall-clock minutes of tuning (``--minutes``, what a user gives
``--time-budget``) and/or trial counts (``--budgets``). Every runtime is measured side by side
with onnxruntime by harlflow's protocol (``harlflow.measure``: fresh processes, alternating
rounds, 95 % intervals over blocks of processes); each budget tunes from an empty database, so
budgets are independent. The JSON is rewritten after every row (a long run
that is cut short keeps what it measured) and a plot of latency against tuning minutes, with
onnxruntime as a line, is written next to it.
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

from harl import compilation, tuning  # noqa: E402
from harl.budget import UNLIMITED_TRIALS  # noqa: E402
from harlflow.core.targets import resolve_target  # noqa: E402
from harlflow.measure import Runtime, side_by_side  # noqa: E402
from tasks.importing import import_model, to_relax  # noqa: E402
from tasks.packaging import export_library, measure_threads, package  # noqa: E402


def bench_model(
    example: str,
    budgets: list[tuple[str, float]],
    strategies: list[str],
    target: dict,
    min_trials: int,
    seconds: float,
    work: Path,
    emit,
) -> None:
    """Measure one bundled example; ``emit(row)`` is called as each row is measured."""
    m = import_model(f"harlflow.examples:{example}", cache_dir=work / "cache")
    ort = Runtime("onnxruntime", "ort", str(m.onnx_path))

    def row(runtime: Runtime, **extra) -> None:
        """``runtime`` side by side with onnxruntime: its latency and ratio, with intervals."""
        s = side_by_side(
            [runtime, ort], m.reference_path, threads=measure_threads(target), max_seconds=seconds
        )
        e, r = s.estimate(runtime.label), s.ratio(runtime.label, "onnxruntime")
        emit(
            {
                "model": example,
                "runtime": runtime.label,
                **extra,
                **e.to_dict(),
                "onnxruntime_ms": s.estimate("onnxruntime").median_ms,
                "ratio_to_onnxruntime": r.value,
                "ratio_ci": list(r.ci),
                "measurement": s.session(),
            }
        )

    row(Runtime("pytorch", "torch", m.source))
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
    art = None
    for kind, amount in budgets:
        for strategy in strategies:  # interleaved per budget
            db_dir = work / f"db-{example}-{kind}{amount}-{strategy}"
            t0 = time.monotonic()
            res = tuning.tune(
                mod,
                target,
                db_dir,
                strategy=strategy,
                seed=0,
                min_trials_per_task=min_trials,
                trials=int(amount) if kind == "trials" else UNLIMITED_TRIALS,
                time_budget_s=amount * 60 if kind == "minutes" else None,
            )
            tune_s = time.monotonic() - t0
            art = package(
                m,
                target,
                database_dir=db_dir,
                home=work / "art",
                tune_summary=res.summary(),
                measure=False,
                log=lambda *_: None,
            )
            label = f"tvm {strategy} ({amount:g} {'min' if kind == 'minutes' else 'trials'})"
            row(
                Runtime(label, "tvm", art.directory),
                strategy=strategy,
                budget_kind=kind,
                budget=amount,
                trials=res.trials,
                tuning_seconds=round(tune_s, 1),
                seconds_per_trial=round(res.seconds / max(1, res.trials), 3),
                weighted_task_us=res.weighted_latency_us,
                phases=res.phases,
            )
    if art is not None:
        untuned = work / f"untuned-{example}"
        untuned.mkdir()
        export_library(compilation.compile_untuned(mod, target), untuned / "model.so")
        (untuned / "manifest.json").write_text(Path(art.directory, "manifest.json").read_text())
        row(Runtime("tvm untuned", "tvm", str(untuned)))


def plot(rows: list[dict], path: Path) -> None:
    """Latency against tuning minutes per model, onnxruntime as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for strategy in sorted({r.get("strategy") for r in mine if r.get("strategy")}):
            pts = sorted(
                (r["tuning_seconds"] / 60, r["median_ms"])
                for r in mine
                if r.get("strategy") == strategy
            )
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"tvm {strategy}")
        for r in mine:
            if r["runtime"] == "pytorch":  # each row carries onnxruntime's latency beside it
                ax.axhline(r["onnxruntime_ms"], ls="--", color="k", label="onnxruntime")
                ax.axhline(r["median_ms"], ls=":", color="gray", label="pytorch")
        ax.set_title(model)
        ax.set_xlabel("tuning minutes")
        ax.set_ylabel("latency (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,mobile_cnn,resnet18,bert_encoder")
    p.add_argument("--minutes", default="5,20", help="comma list of tuning budgets in minutes")
    p.add_argument("--budgets", default="", help="comma list of trial budgets")
    p.add_argument("--strategies", default="evolutionary", help="comma list: evolutionary,harl")
    p.add_argument("--min-trials-per-task", type=int, default=4)
    p.add_argument("--max-seconds", type=float, default=10.0, help="per side-by-side measurement")
    p.add_argument("--out", default="bench/results/e2e.json")
    a = p.parse_args()
    target = resolve_target(None)
    budgets = [("minutes", float(x)) for x in a.minutes.split(",") if x]
    budgets += [("trials", float(x)) for x in a.budgets.split(",") if x]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    header = {
        "target": target,
        "machine": platform.processor() or platform.machine(),
        "min_trials_per_task": a.min_trials_per_task,
        "budgets": budgets,
    }
    cols = (
        f"{'model':12s} {'runtime':30s} {'median ms':>10s} {'x ORT':>7s} {'95% interval':>13s} "
        f"{'trials':>7s} {'s/trial':>8s}"
    )
    print(cols, flush=True)

    def emit(r: dict) -> None:
        rows.append(r)
        print(
            f"{r['model']:12s} {r['runtime']:30s} {r['median_ms']:10.3f} "
            f"{r['ratio_to_onnxruntime']:7.2f} {r['ratio_ci'][0]:6.2f}-{r['ratio_ci'][1]:<6.2f} "
            f"{r.get('trials') or '':>7} "
            f"{r.get('seconds_per_trial') or '':>8}",
            flush=True,
        )
        out.write_text(json.dumps({**header, "rows": rows}, indent=2))

    with tempfile.TemporaryDirectory(prefix="harlflow-bench-") as tmp:
        for example in a.models.split(","):
            bench_model(
                example,
                budgets,
                a.strategies.split(","),
                target,
                a.min_trials_per_task,
                a.max_seconds,
                Path(tmp),
                emit,
            )
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()

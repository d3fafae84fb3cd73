"""End-to-end latency: PyTorch eager, onnxruntime, untuned TVM and TVM tuned per budget.

    python bench/e2e.py [--models small_cnn,resnet18,bert_encoder,mobile_cnn] [--minutes 5,20]
                        [--budgets 0,64,256] [--strategies evolutionary,harl]
                        [--out bench/results/e2e.json]
    python bench/e2e.py --families gpt_decoder,vit,resnet50ish,... --budgets 0 --minutes 2,10

``--families`` takes held-out architectures (``bench/families.py``, exported to ONNX here, old
opsets included) instead of bundled examples. ``--budgets 0`` is ``--trials 0``: the
measurement-free fallback schedules. Every TVM row carries the artifact's kernel table split
into GEMM/convolution kernels, other kernels and the VM's own builtins, and the time outside
any kernel.

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

GEMM_KERNELS = ("conv2d", "matmul", "dense", "batch_matmul")


def kernel_split(artifact: str, reference: str) -> dict:
    """The artifact's kernel table (``python -m harlflow.measure profile``) summed per kind, ms
    per inference: ``gemm`` (convolutions and matrix products with their fused epilogues),
    ``other`` kernels, ``vm`` builtins, and ``outside`` (the run less every instrumented call),
    with the five costliest kernels."""
    from tasks.packaging import run_worker

    p = run_worker(["profile", "--path", artifact, "--reference", reference])
    split = {"gemm": 0.0, "other": 0.0, "vm": 0.0}
    for k in p["kernels"]:
        kind = (
            "vm"
            if k["kernel"].startswith("vm.")
            else "gemm"
            if any(g in k["kernel"] for g in GEMM_KERNELS)
            else "other"
        )
        split[kind] += k["total_us"] / 1e3
    return {
        **{f"{k}_ms": round(v, 4) for k, v in split.items()},
        "outside_ms": p["overhead_ms"],
        "run_ms": round(p["run_ms"], 4),
        "top": [(k["kernel"], k["total_us"], k["calls"]) for k in p["kernels"][:5]],
    }


def _split_text(k: dict | None) -> str:
    if not k:
        return ""
    return (
        "  gemm {gemm_ms:.3f} other {other_ms:.3f} vm {vm_ms:.3f} outside {outside_ms:.3f}".format(
            **k
        )
    )


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
    """Measure one bundled example or a held-out family (``family:NAME``); ``emit(row)`` is
    called as each row is measured."""
    held_out = example.startswith("family:")
    if held_out:
        import os

        from families import export

        example = example.removeprefix("family:")
        onnx_path = export(example, work)
        m = import_model(str(onnx_path), cache_dir=work / "cache")
        os.environ["HARLFLOW_TRUST_PT2"] = "1"  # the program exported just above
        torch_rt = Runtime("pytorch", "torch", str(onnx_path.with_suffix(".pt2")), "pt2")
    else:
        m = import_model(f"harlflow.examples:{example}", cache_dir=work / "cache")
        torch_rt = Runtime("pytorch", "torch", m.source)
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

    row(torch_rt)
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
                seconds_per_trial=round(res.seconds / res.trials, 3) if res.trials else None,
                weighted_task_us=res.weighted_latency_us,
                phases=res.phases,
                kernels=kernel_split(art.directory, str(m.reference_path)),
            )
    if art is not None and not held_out:  # TVM's untuned build: minutes to compile, 10-100x
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
    p.add_argument("--families", help="held-out families of bench/families.py, instead")
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
        f"{'trials':>7s} {'s/trial':>8s}  kernel table split, ms"
    )
    print(cols, flush=True)

    def emit(r: dict) -> None:
        rows.append(r)
        print(
            f"{r['model']:12s} {r['runtime']:30s} {r['median_ms']:10.3f} "
            f"{r['ratio_to_onnxruntime']:7.2f} {r['ratio_ci'][0]:6.2f}-{r['ratio_ci'][1]:<6.2f} "
            f"{r.get('trials') if r.get('trials') is not None else '':>7} "
            f"{r.get('seconds_per_trial') or '':>8}" + _split_text(r.get("kernels")),
            flush=True,
        )
        out.write_text(json.dumps({**header, "rows": rows}, indent=2))

    with tempfile.TemporaryDirectory(prefix="harlflow-bench-") as tmp:
        models = a.models.split(",")
        if a.families:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            models = [f"family:{f}" for f in a.families.split(",")]
        for example in models:
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

"""How far harlflow's latency figures can be trusted: the regression gate's A/A refusal rate,
before and after the side-by-side protocol, and what an interval costs in seconds.

    python bench/measurement.py [--repeats 20] [--trials 32] [--session-seconds 60]
                                [--out bench/results/measurement.json]

Two models, each tuned briefly (``--trials``, evolutionary, an empty database) and packaged: the
bundled small CNN and a GPT-style decoder (``bench/index_checks.py``'s, never tuned elsewhere).
Then, for each:

1. **A/A, ``--repeats`` times**: the artifact against a byte-identical copy of itself.
   *Today's gate* (before this protocol): production's latency came from one fresh process
   (warm-up, then 50 calls, their median), the new version's from another, later one; refused
   when new > production × 1.05. Emulated here by two such processes one after the other (the
   real gate had hours between them, which can only make it worse). *The new gate*:
   ``harlflow.measure.side_by_side`` + ``gate`` at 5 %, exactly as ``--promote`` runs it
   (``--measure-seconds`` 10: up to 30 s while undecided). Reported: how often each refuses,
   and how often the new ratio's 95 % interval holds 1.0.
2. **Interval width against measurement time**: one long session of the artifact beside
   onnxruntime (``--session-seconds``, no early stop); the tuned/onnxruntime ratio's interval
   after each block of fresh processes, against the seconds spent until then.
3. **Overhead per optimize run**: the package stage's measurement at the default 10 s (tuned and
   onnxruntime side by side, stopping once separated), against today's three sequential
   processes (tuned, untuned, onnxruntime) as the wall time of two of them plus the untuned one.
4. **Spinning**: the artifact beside onnxruntime with the thread pools' spinning off
   (``spin=False``), with TVM's default spin count and a 20 ms pause, and with the protocol's
   10 000 and no pause or the default 20 ms one; ``--spin-repeats`` alternating sessions of 10 s.

The JSON is rewritten after every measurement (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harlflow.core.targets import resolve_target  # noqa: E402
from harlflow.measure import Runtime, gate, side_by_side, undecided  # noqa: E402
from tasks.packaging import measure_threads  # noqa: E402

# Today's protocol, as harlflow.measure's worker ran it before (one process, one measurement):
# warm up once, then up to 50 calls within 10 s, their median.
OLD = """
import sys, time, numpy as np
from harlflow.runtime import load
from harlflow.core.outputs import load_reference
model = load(sys.argv[1]); ins, _ = load_reference(sys.argv[2])
t = model._arguments((), ins); model.run_tvm(t); times = []; start = time.perf_counter()
while len(times) < 50 and (len(times) < 3 or time.perf_counter() - start < 10):
    s = time.perf_counter(); model.run_tvm(t); times.append((time.perf_counter() - s) * 1e3)
print(float(np.median(times)))
"""


def old_measure(artifact: Path) -> tuple[float, float]:
    """(median ms, wall seconds of the process) by today's one-process protocol."""
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", OLD, str(artifact), str(artifact / "reference.npz")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def build(name: str, work: Path, trials: int, target: dict):
    """Import, tune ``trials`` and package one model: (imported model, artifact directory)."""
    from harl.spec import TuningSpec
    from tasks.importing import import_model
    from tasks.packaging import package
    from tasks.tuning import tune_model

    if name == "gpt_decoder":
        from index_checks import decoder

        source = str(decoder(work / "decoder.onnx"))
    else:
        source = f"harlflow.examples:{name}"
    m = import_model(source, cache_dir=work / "cache")
    db = work / f"db-{name}"
    tuned = tune_model(
        m, target, database_dir=db, spec=TuningSpec(trials, min_trials_per_task=1),
        log=lambda *_: None,
    )  # fmt: skip
    art = package(
        m, target, database_dir=db, home=work / "home", tune_summary=tuned.summary(),
        measure=False, log=lambda *_: None,
    )  # fmt: skip
    return m, Path(art.directory)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="small_cnn,gpt_decoder")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--session-seconds", type=float, default=60.0)
    p.add_argument("--max-regression", type=float, default=0.05)
    p.add_argument("--spin-repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/measurement.json")
    a = p.parse_args()
    target = resolve_target("cpu")
    threads = measure_threads(target)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "machine": platform.processor() or platform.machine(),
        "target": target,
        "max_regression": a.max_regression,
        "models": {},
    }

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    work = Path(tempfile.mkdtemp(prefix="bench-measurement-"))
    for name in a.models.split(","):
        m, art = build(name, work, a.trials, target)
        copy = Path(shutil.copytree(art, work / f"{name}-copy"))
        r: dict = {"trials": a.trials, "aa": [], "widths": [], "overhead": {}}
        result["models"][name] = r
        print(f"\n{name}: A/A, {a.repeats} times (today's gate | the side-by-side gate)")
        for i in range(a.repeats):
            prod_ms, _ = old_measure(art)
            new_ms, _ = old_measure(copy)
            today_refuses = new_ms > prod_ms * (1 + a.max_regression)
            s = side_by_side(
                [Runtime("new", "tvm", str(copy)), Runtime("production", "tvm", str(art))],
                art / "reference.npz", threads=threads, max_seconds=30,
                stop=undecided(1 + a.max_regression),
            )  # fmt: skip
            d = gate(s, a.max_regression)
            row = {
                "today": {"production_ms": prod_ms, "new_ms": new_ms, "ratio": new_ms / prod_ms,
                          "refused": today_refuses},
                "side_by_side": {**d.to_dict(), "seconds": s.seconds,
                                 "holds_1": d.ratio.ci[0] <= 1.0 <= d.ratio.ci[1]},
            }  # fmt: skip
            r["aa"].append(row)
            save()
            print(
                f"  {i + 1:2d}: today {new_ms / prod_ms:6.3f} "
                f"{'REFUSE' if today_refuses else 'ok':6s}"
                f" | side by side {d.ratio.value:6.3f} [{d.ratio.ci[0]:.3f}, {d.ratio.ci[1]:.3f}]"
                f" {'ok' if d.promote else 'REFUSE':6s} ({d.basis}, {s.seconds:.1f} s)",
                flush=True,
            )
        aa = r["aa"]
        r["aa_summary"] = {
            "today_refused": sum(x["today"]["refused"] for x in aa),
            "side_by_side_refused": sum(x["side_by_side"]["decision"] == "refuse" for x in aa),
            "interval_holds_1": sum(x["side_by_side"]["holds_1"] for x in aa),
            "today_ratio_range": [min(x["today"]["ratio"] for x in aa),
                                  max(x["today"]["ratio"] for x in aa)],
            "side_by_side_ratio_range": [min(x["side_by_side"]["ratio"] for x in aa),
                                         max(x["side_by_side"]["ratio"] for x in aa)],
            "side_by_side_seconds_median": float(np.median([x["side_by_side"]["seconds"]
                                                            for x in aa])),
            "runs": len(aa),
        }  # fmt: skip
        save()

        print(f"{name}: tuned beside onnxruntime for {a.session_seconds:g} s, by block")
        rts = [
            Runtime("tvm_tuned", "tvm", str(art)),
            Runtime("onnxruntime", "ort", str(m.onnx_path)),
        ]
        long = side_by_side(
            rts, art / "reference.npz", threads=threads, max_seconds=a.session_seconds, stop=None
        )
        for k in range(2, long.blocks + 1):
            q = long.first_blocks(k).ratio("tvm_tuned", "onnxruntime")
            r["widths"].append({"blocks": k, "seconds": round(long.block_ends[k - 1], 2),
                                "ratio": q.value, "ci": list(q.ci),
                                "relative_width": (q.ci[1] - q.ci[0]) / q.value})  # fmt: skip
            width = r["widths"][-1]["relative_width"]
            print(f"  {k:2d} blocks, {long.block_ends[k - 1]:5.1f} s: ratio {q.value:.3f} "
                  f"[{q.ci[0]:.3f}, {q.ci[1]:.3f}] width {width:.1%}")  # fmt: skip
        save()

        pkg = side_by_side(rts, art / "reference.npz", threads=threads, max_seconds=10)
        _, old_tuned_s = old_measure(art)
        # today's untuned build: compile it, then one more process like the tuned one
        from harl import compilation
        from tasks.importing import to_relax
        from tasks.packaging import export_library

        t = time.perf_counter()
        untuned = work / f"{name}-untuned"
        shutil.copytree(art, untuned)
        mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
        export_library(compilation.compile_untuned(mod, target), untuned / "model.so")
        compile_s = time.perf_counter() - t
        _, old_untuned_s = old_measure(untuned)
        r["overhead"] = {
            "side_by_side_seconds": pkg.seconds,
            "side_by_side_blocks": pkg.blocks,
            "side_by_side_stopped": pkg.stopped,
            "today_seconds_estimate": 2 * old_tuned_s + compile_s + old_untuned_s,
            "today_parts": {"one_process_s": old_tuned_s, "untuned_compile_s": compile_s,
                            "untuned_process_s": old_untuned_s},
        }  # fmt: skip
        save()
        print(f"  package-stage measurement: side by side {pkg.seconds:.1f} s ({pkg.stopped}), "
              f"today's ~{r['overhead']['today_seconds_estimate']:.1f} s")  # fmt: skip

        import harlflow.measure.protocol as protocol

        defaults = protocol.SPIN_COUNT, protocol.SETTLE_S
        configs = {  # (spin, TVM's spin count, pause between runtimes' parts)
            "spin off": (False, None, 0.0),
            "TVM spins 300k, 20ms": (True, None, 0.02),
            "TVM spins 10k, 0ms": (True, 10_000, 0.0),
            "TVM spins 10k, 20ms": (True, 10_000, 0.02),
        }
        r["spin"] = {k: [] for k in configs}
        for _ in range(a.spin_repeats):
            for cfg, (spin, count, settle) in configs.items():
                protocol.SPIN_COUNT, protocol.SETTLE_S = count, settle
                q = side_by_side(
                    rts, art / "reference.npz", threads=threads, max_seconds=10, stop=None,
                    spin=spin,
                )  # fmt: skip
                ratio = q.ratio("tvm_tuned", "onnxruntime")
                r["spin"][cfg].append({"tvm": q.estimate("tvm_tuned").median_ms,
                                       "ort": q.estimate("onnxruntime").median_ms,
                                       "ratio": ratio.value, "ci": list(ratio.ci)})  # fmt: skip
                print(
                    f"  {cfg:22s} tvm {r['spin'][cfg][-1]['tvm']:.4f} ms, onnxruntime "
                    f"{r['spin'][cfg][-1]['ort']:.4f} ms, ratio {ratio.value:.3f}",
                    flush=True,
                )
                save()
        protocol.SPIN_COUNT, protocol.SETTLE_S = defaults

    print("\nspinning: tvm ms, onnxruntime ms, ratio (medians over sessions)")
    for name, r in result["models"].items():
        for cfg, rows in r["spin"].items():
            med = {k: float(np.median([x[k] for x in rows])) for k in ("tvm", "ort", "ratio")}
            print(f"  {name:12s} {cfg:22s} {med['tvm']:8.4f} {med['ort']:8.4f} {med['ratio']:7.3f}")
    print(f"\n{'model':12s} {'A/A refused: today':>19s} {'side by side':>13s} {'holds 1.0':>10s}")
    for name, r in result["models"].items():
        s = r["aa_summary"]
        print(f"{name:12s} {s['today_refused']:>12d}/{s['runs']:<6d} "
              f"{s['side_by_side_refused']:>6d}/{s['runs']:<6d} "
              f"{s['interval_holds_1']:>3d}/{s['runs']}")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The target's measured profile and what it changes in the rewrite stage's decisions.

    python bench/target_profile.py [--model family:gpt_decoder] [--trials 0,64]
                                   [--max-seconds 20] [--out bench/results/target_profile.json]

1. Measures this host's profile (``harl.calibration``: GEMM FLOP/s on a grid of shapes, copy
   bandwidth by size, the VM's cost per kernel call) into a fresh store and prints it.
2. Runs the greedy rewrite of ``--model`` judged by the TVM oracle twice: with the flat profile
   (one FLOP rate, one bandwidth: the oracle before the profile) and with the measured one; prints
   the substitutions each took and their estimates.
3. Applies ``--force`` (default: the Q/K/V merge) wherever it matches and prices that graph with
   both profiles: what each predicts the substitution is worth.
4. For each ``--trials`` budget: the original model, the graph the measured profile chose and the
   forced graph are each tuned from an empty database with that many trials and packaged, then
   timed side by side with onnxruntime by harlflow's protocol (fresh processes, alternating
   rounds, 95 % intervals over blocks): whether the substitutions pay on this machine, and
   whether the oracle's decision on the forced one was right.

One process compiles; every timing runs in the protocol's worker processes. The JSON is rewritten
after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def profile_table(p) -> list[str]:
    rows = [f"launch (VM call of a tiny kernel): {p.launch_s * 1e6:.2f} us"]
    rows.append(f"{'m':>5s} {'n':>5s} {'k':>5s} {'us':>10s} {'GFLOP/s':>8s}")
    for m, n, k, s in p.gemm:
        rows.append(f"{m:5d} {n:5d} {k:5d} {s * 1e6:10.1f} {2 * m * n * k / s / 1e9:8.1f}")
    rows += [f"copy {b / 1024:8.0f} KiB moved: {b / s / 1e9:6.1f} GB/s" for b, s in p.copy]
    return rows


def _forced(g, rule: str):
    """``g`` with ``rule`` applied wherever it matches (first candidate first, until none)."""
    from xrlflow import rules as R

    chosen = [r for r in R.RULES if r.name == rule]
    if not chosen:
        raise SystemExit(f"no rewrite rule {rule!r}")
    taken = 0
    while cands := R.candidates(g, chosen):
        g, taken = cands[0].graph, taken + 1
    return g, taken


def main() -> None:
    from common import tuned_artifact
    from families import source

    from harl import calibration
    from harlflow.core.targets import resolve_target
    from harlflow.measure import Runtime, side_by_side
    from tasks.importing import import_model
    from tasks.packaging import measure_threads
    from tasks.rewrite_oracle import TvmOracle
    from tasks.rewriting import rewrite_model
    from xrlflow import ir, search

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="family:gpt_decoder")
    p.add_argument("--trials", default="0,64", help="comma list of trial budgets")
    p.add_argument(
        "--force",
        default="merge_qkv_projections",
        help="a rule applied wherever it matches, priced and timed as a third graph",
    )
    p.add_argument("--max-seconds", type=float, default=20.0, help="per side-by-side timing")
    p.add_argument("--out", default="bench/results/target_profile.json")
    a = p.parse_args()
    target, out = resolve_target(None), Path(a.out)
    result: dict = {"target": target, "model": a.model}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory(prefix="harlflow-bench-") as tmp:
        work = Path(tmp)
        store = work / "store"
        t = time.perf_counter()
        profile = calibration.load_or_measure(store, target)
        result["profile_seconds"] = round(time.perf_counter() - t, 1)
        result["profile"] = json.loads(profile.to_json())
        print("\n".join(profile_table(profile)))
        print(f"measured in {result['profile_seconds']} s\n", flush=True)
        save()

        m = import_model(source(a.model, work), cache_dir=work / "cache")
        g = ir.normalize(ir.check(ir.load(m.onnx_path)))
        result["greedy"] = {}
        for name, oracle in (("flat", TvmOracle(target)), ("measured", TvmOracle(target, store))):
            t = time.perf_counter()
            r = search.greedy(g, oracle)
            result["greedy"][name] = {
                **r.summary(),
                "wall_seconds": round(time.perf_counter() - t, 1),
            }
            print(
                f"greedy, {name:8s} profile: {r.latency_before * 1e3:.3f} -> "
                f"{r.latency_after * 1e3:.3f} ms estimated; "
                f"{r.summary()['rules_applied'] or 'nothing taken'}",
                flush=True,
            )
        save()

        rewritten = rewrite_model(
            m, "greedy", work_dir=work / "rw", target=target, database_dir=store,
            log=lambda *_: None,
        ).model  # fmt: skip
        forced, taken = _forced(g, a.force)
        result["forced"] = {"rule": a.force, "applied": taken}
        for name, oracle in (("flat", TvmOracle(target)), ("measured", TvmOracle(target, store))):
            before, after = oracle.estimate(g), oracle.estimate(forced)
            result["forced"][f"{name}_estimate_ratio"] = after / before
            print(f"{a.force} x{taken}, {name:8s} profile: {before * 1e3:.3f} -> "
                  f"{after * 1e3:.3f} ms estimated ({after / before:.3f})", flush=True)  # fmt: skip
        forced_path = work / "forced.onnx"
        forced_path.write_bytes(ir.to_onnx(forced).SerializeToString())
        merged = import_model(str(forced_path), cache_dir=work / "cache")
        ort = Runtime("onnxruntime", "ort", str(m.onnx_path))
        result["rows"] = []
        for trials in [int(x) for x in a.trials.split(",") if x]:
            arts = {}
            for label, model in (("original", m), ("rewritten", rewritten), ("forced", merged)):
                directory, _ = tuned_artifact(model, target, work, f"{label}-{trials}", trials)
                arts[label] = Runtime(f"{label} ({trials} trials)", "tvm", directory)
            s = side_by_side(
                [arts["rewritten"], arts["forced"], arts["original"], ort],
                m.reference_path,
                threads=measure_threads(target),
                max_seconds=a.max_seconds,
            )
            row = {"trials": trials, "measurement": s.session()}
            for label in ("rewritten", "forced", "original"):
                rt = arts[label].label
                r = s.ratio(rt, "onnxruntime")
                row[label] = {
                    "median_ms": s.estimate(rt).median_ms,
                    "ratio_to_onnxruntime": r.value,
                    "ratio_ci": list(r.ci),
                }
            f = s.ratio(arts["forced"].label, arts["original"].label)
            row["forced_over_original"] = {"value": f.value, "ci": list(f.ci)}
            r = s.ratio(arts["rewritten"].label, arts["original"].label)
            row["rewritten_over_original"] = {"value": r.value, "ci": list(r.ci)}
            result["rows"].append(row)
            print(
                f"{trials:4d} trials: rewritten {row['rewritten']['median_ms']:.3f} ms, original "
                f"{row['original']['median_ms']:.3f} ms, onnxruntime "
                f"{s.estimate('onnxruntime').median_ms:.3f} ms; rewritten / original "
                f"{r.value:.3f} ({r.ci[0]:.3f}-{r.ci[1]:.3f}); {a.force} / original "
                f"{f.value:.3f} ({f.ci[0]:.3f}-{f.ci[1]:.3f})",
                flush=True,
            )
            save()
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""ONNX's operator conformance cases through harlflow's import → prepare → compile path.

    python bench/conformance.py [--ops Gather,Relu] [--workers 2] [--timeout 300]
                                [--out bench/results/conformance.json]

Every float32 / integer inference node case of the installed ``onnx`` package
(``tasks.conformance.in_scope``) is imported, prepared and compiled with fallback schedules
(no tuning, no MLflow) in isolated worker processes, run on the case's inputs and compared with
its expected outputs. Prints, per operator: passed, refused (a ModelImportError naming the
operator, before compiling), compile errors (a clear error, but late), wrong results, crashes
(tracebacks, dead or hung workers) and the pass rate; writes JSON with every case's outcome and
message (and ``.partial.json`` as cases finish).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import conformance  # noqa: E402

OUTCOMES = ["passed", "refused", "compile_error", "wrong", "crash"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", help="comma-separated operators (default: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    p.add_argument("--out", default="bench/results/conformance.json")
    a = p.parse_args()

    found = conformance.cases()
    wanted = set(a.ops.split(",")) if a.ops else None
    names = [n for n, c in found.items() if wanted is None or conformance.operator_of(c) in wanted]
    out = Path(a.out)
    partial = out.with_suffix(".partial.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    start = time.time()

    def progress(r: dict) -> None:
        results.append(r)
        if r["outcome"] != "passed":
            print(f"  {r['outcome']:13s} {r['case']}: {r.get('message', '')[:150]}", flush=True)
        if len(results) % 50 == 0 or len(results) == len(names):
            print(f"{len(results)}/{len(names)} cases, {time.time() - start:.0f} s", flush=True)
            partial.write_text(json.dumps({"cases": results}, indent=1))

    print(f"{len(names)} in-scope cases of {len(found)} ({len(set(names))} distinct)")
    conformance.run_cases(names, workers=a.workers, timeout=a.timeout, on_result=progress)
    table = conformance.summarize(results)
    totals = {k: sum(row.get(k, 0) for row in table.values()) for k in OUTCOMES}

    print(f"\n{'operator':28s}" + "".join(f"{k:>14s}" for k in OUTCOMES) + f"{'pass rate':>11s}")
    for op, row in table.items():
        cells = "".join(f"{row.get(k, 0):14d}" for k in OUTCOMES)
        print(f"{op:28s}{cells}{row['pass_rate']:11.2f}")
    cells = "".join(f"{totals[k]:14d}" for k in OUTCOMES)
    print(f"{'all':28s}{cells}{totals['passed'] / max(1, len(results)):11.2f}")

    import onnx
    import tvm

    report = {
        "onnx": onnx.__version__,
        "tvm": tvm.__version__,
        "seconds": round(time.time() - start, 1),
        "totals": totals,
        "operators": table,
        "cases": sorted(results, key=lambda r: r["case"]),
    }
    out.write_text(json.dumps(report, indent=1))
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

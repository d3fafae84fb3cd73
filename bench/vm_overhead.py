"""Time outside the kernels: what an artifact costs besides its compiled kernels (the VM's
instructions, its allocations, the kernel calls, the call from Python), against onnxruntime's
whole latency, and against a baseline harlflow.

    python bench/vm_overhead.py [--models small_cnn,family:gpt_decoder] [--seconds 40]
                                [--rounds 5] [--baseline-tree DIR]
                                [--out bench/results/vm_overhead.json]

For each model, built with its ``--trials 0`` schedules:

1. **Side by side** (``harlflow.measure``'s protocol: fresh processes, alternating rounds,
   intervals over blocks): the artifact as harlflow builds it (Relax's bytecode VM), the same
   kernels under Relax's ``exec_mode="compiled"`` (the VM's instructions compiled to C), and
   onnxruntime.
2. **Hollow artifacts**: the model built the same way, then every kernel's body emptied, so a
   call costs what the VM does around the kernels and nothing of theirs: timed from Python
   through ``harlflow.runtime`` (as a deployment calls it) and in TVM's C++ loop, with the VM's
   instructions counted. ``--rounds`` fresh processes, alternating with the same measure made by
   the code of ``--baseline-tree`` (a checkout of an older commit, e.g. ``git worktree add
   /tmp/base COMMIT``) when given. The aim (issue 22): outside the kernels ≤ 10 % of
   onnxruntime's latency on the README demo (``small_cnn``).

Prints a table and writes JSON (rewritten after each model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(model: str, work: Path) -> dict:
    """Import ``model`` (``NAME`` of a bundled example or ``family:NAME``) and build it both ways
    with fallback schedules; the artifact directories and the imported model's ONNX file."""
    from common import as_artifact
    from tvm.s_tir import meta_schedule as ms

    from harl import compilation
    from harlflow.core.targets import resolve_target
    from tasks.importing import import_model, to_relax

    m = import_model(_source(model, work), cache_dir=work / "cache")
    target = resolve_target("host")
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
    tasks = compilation.extract_tasks(mod, target)
    db, _ = compilation.compile_database(ms.database.MemoryDatabase(), tasks, target, seed=0)
    dirs = {}
    for mode in ("bytecode", "compiled"):
        lib = compilation._build(mod, target, db, prepack=True, exec_mode=mode)
        dirs[mode] = str(as_artifact(lib, work / model.replace(":", "_") / mode, m, target))
    return {"artifacts": dirs, "onnx": str(m.onnx_path), "reference": str(m.reference_path)}


def hollow(model: str, work: Path, calls: int = 20000) -> dict:
    """One fresh process: ``model`` built with its ``--trials 0`` schedules by the harlflow
    whose code this process imports, every kernel's body then emptied, so that what a call
    costs is the VM's own work (its instructions, allocations and the kernel calls themselves)
    and nothing of the kernels'. µs per call: from Python as a deployment calls it
    (``harlflow.runtime``'s way of calling ``main``) and in TVM's C++ timing loop."""
    import numpy as np
    import tvm
    from tvm import relax, tirx
    from tvm.s_tir import meta_schedule as ms

    from harl import compilation
    from harlflow.core.targets import resolve_target
    from tasks.importing import import_model, to_relax

    m = import_model(_source(model, work), cache_dir=work / "cache")
    target = resolve_target("host")
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
    tasks = compilation.extract_tasks(mod, target)
    db, _ = compilation.compile_database(ms.database.MemoryDatabase(), tasks, target, seed=0)
    scheduled = compilation.apply_database(mod, target, db)
    for gv, func in list(scheduled.functions.items()):
        if isinstance(func, tirx.PrimFunc):
            scheduled[gv] = func.with_body(tirx.Evaluate(tirx.const(0, "int32")))

    @tvm.transform.module_pass(opt_level=3)
    def lower(mod, _ctx):
        return tvm.transform.Sequential(compilation._lowering_passes())(mod)

    tgt = tvm.target.Target(target)
    with tgt, tvm.transform.PassContext(opt_level=3):
        lib = relax.build(scheduled, target=tgt, relax_pipeline=lower)
    from common import as_artifact

    from harlflow.core.outputs import load_reference
    from harlflow.runtime import load

    directory = as_artifact(lib, work / "hollow", m, target)
    model = load(directory)  # this tree's runtime, called as a deployment calls it
    ins, _ = load_reference(str(directory / "reference.npz"))
    tensors = model._arguments((), ins)
    counts: dict[str, int] = {}

    def count(func, name, before_run, ret_value, *a):
        if before_run:
            kind = name if name.startswith("vm.") else "kernel calls"
            counts[kind] = counts.get(kind, 0) + 1
        return 0

    model._vm.set_instrument(count)
    model.run_tvm(tensors)
    model._vm.set_instrument(None)
    for _ in range(1000):
        model.run_tvm(tensors)
    t = time.perf_counter()
    for _ in range(calls):
        model.run_tvm(tensors)
    python_us = (time.perf_counter() - t) / calls * 1e6
    cpp = model._vm.time_evaluator("main", tvm.cpu(), number=calls, repeat=5)(*tensors)
    return {
        "python_us": round(python_us, 3),
        "cpp_us": round(float(np.median(cpp.results)) * 1e6, 3),
        "instructions": counts,
    }


def _source(model: str, work: Path) -> str:
    if model.startswith("family:"):
        from families import export

        return str(export(model.removeprefix("family:"), work))
    return f"harlflow.examples:{model}"


def _spread(values: list[float]) -> dict:
    import numpy as np

    return {"median": round(float(np.median(values)), 2), "min": min(values), "max": max(values)}


def run(models: list[str], seconds: float, rounds: int, baseline: str | None, out: Path):
    from harlflow.core.targets import resolve_target
    from harlflow.measure import Runtime, side_by_side
    from tasks.packaging import measure_threads

    trees = {"this": str(ROOT), **({"baseline": baseline} if baseline else {})}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vm-overhead-") as tmp:
        for model in models:
            b = build(model, Path(tmp))
            art = b["artifacts"]
            s = side_by_side(
                [
                    Runtime("bytecode VM", "tvm", art["bytecode"]),
                    Runtime("compiled VM", "tvm", art["compiled"]),
                    Runtime("onnxruntime", "ort", b["onnx"]),
                ],
                b["reference"],
                threads=measure_threads(resolve_target("host")),
                max_seconds=seconds,
            )
            hollow_runs: dict[str, list[dict]] = {k: [] for k in trees}
            for i in range(rounds):  # A B A B ..., one fresh process at a time
                for label, tree in trees.items():
                    work = Path(tmp) / f"{label}-{i}"
                    p = subprocess.run(
                        [sys.executable, __file__, "--hollow", model, "--work", str(work)],
                        capture_output=True,
                        text=True,
                        env={**os.environ, "HARLFLOW_BENCH_TREE": tree},
                    )
                    if p.returncode != 0:
                        raise SystemExit(f"hollow build in {tree} failed: {p.stderr[-2000:]}")
                    hollow_runs[label].append(json.loads(p.stdout.strip().splitlines()[-1]))
            ort_us = s.estimate("onnxruntime").median_ms * 1e3
            hollow = {
                label: {
                    "python_us": _spread([r["python_us"] for r in runs]),
                    "cpp_us": _spread([r["cpp_us"] for r in runs]),
                    "instructions": runs[0]["instructions"],
                    "share_of_onnxruntime": round(
                        _spread([r["python_us"] for r in runs])["median"] / ort_us, 4
                    ),
                }
                for label, runs in hollow_runs.items()
            }
            row = {
                "model": model,
                "side_by_side": s.to_dict(),
                "ratio_bytecode_to_ort": s.ratio("bytecode VM", "onnxruntime").to_dict(),
                "ratio_compiled_to_bytecode": s.ratio("compiled VM", "bytecode VM").to_dict(),
                "onnxruntime_us": round(ort_us, 2),
                "hollow": hollow,
                "trees": trees,
            }
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1))
            _print(row)
    return rows


def _print(r: dict) -> None:
    b, c = r["ratio_bytecode_to_ort"], r["ratio_compiled_to_bytecode"]
    print(
        f"{r['model']}: onnxruntime {r['onnxruntime_us']:.1f} µs; harlflow / onnxruntime "
        f"{b['ratio']:.2f} ({b['ci'][0]:.2f}-{b['ci'][1]:.2f}); compiled VM / bytecode VM "
        f"{c['ratio']:.2f} ({c['ci'][0]:.2f}-{c['ci'][1]:.2f})"
    )
    print(f"  {'outside the kernels':22s} {'from Python µs':>22s} {'C++ loop µs':>22s} "
          f"{'/ onnxruntime':>14s}  instructions")  # fmt: skip
    for label, h in r["hollow"].items():
        py, cpp = h["python_us"], h["cpp_us"]
        n = sum(v for k, v in h["instructions"].items() if k.startswith("vm."))
        print(
            f"  {label:22s} {py['median']:8.2f} ({py['min']:.2f}-{py['max']:.2f}) "
            f"{cpp['median']:8.2f} ({cpp['min']:.2f}-{cpp['max']:.2f}) "
            f"{h['share_of_onnxruntime']:13.1%}  {n} builtins, "
            f"{h['instructions'].get('kernel calls', 0)} kernel calls"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small_cnn,family:gpt_decoder")
    ap.add_argument("--seconds", type=float, default=40.0, help="side-by-side session length")
    ap.add_argument("--rounds", type=int, default=5, help="fresh processes per hollow measure")
    ap.add_argument("--baseline-tree", help="a checkout of the harlflow to compare with")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vm_overhead.json"))
    ap.add_argument("--hollow", help=argparse.SUPPRESS)  # one worker process's measure
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.hollow:
        print(json.dumps(hollow(a.hollow, Path(a.work))))
        return
    run(a.models.split(","), a.seconds, a.rounds, a.baseline_tree, Path(a.out))


# the harlflow whose code is measured: this checkout, or a baseline's in a worker process
_TREE = Path(os.environ.get("HARLFLOW_BENCH_TREE", ROOT))
sys.path[:0] = [str(_TREE), str(_TREE / "bench"), str(ROOT / "bench")]

if __name__ == "__main__":
    main()

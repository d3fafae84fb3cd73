"""Fresh-process measurement: ``python -m harlflow.measure KIND ...`` prints one JSON line.

Timings taken in the tuning process right after tuning were off by up to 3× (ENVIRONMENT.md),
so every latency harlflow reports comes from a new process: warm up once, then repeat until
``--repeats`` runs or ``--max-seconds`` are used (at least 3 runs), and report median and p90.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np

from harlflow.core.errors import HarlflowError
from harlflow.core.outputs import compare, load_reference


def _time(fn: Callable[[], object], repeats: int, max_seconds: float) -> dict:
    fn()  # warm-up: first-run allocation, lazy initialisation, page faults
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < max_seconds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "repeats": len(times),
    }


def tvm_runner(lib_dir: str, reference: str):
    """A closure running an artifact directory on the reference inputs (TVM tensors prepared)."""
    from harlflow.runtime import load

    model = load(lib_dir)
    ins, _ = load_reference(reference)
    tensors = model._arguments((), ins)
    return lambda: model.run_tvm(tensors)


def ort_runner(onnx_path: str, reference: str):
    import onnxruntime as ort

    ins, _ = load_reference(reference)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, ins)


def torch_runner(source: str, kind: str, checkpoint: str | None, reference: str):
    import torch

    from tasks.importing import load_factory

    ins, _ = load_reference(reference)
    if kind == "pt2":
        from tasks.importing import check_pt2_trusted

        check_pt2_trusted(source)
        net = torch.export.load(source).module()
    else:
        net = load_factory(source, checkpoint)
    args = [torch.from_numpy(v) for v in ins.values()]

    def run():
        with torch.inference_mode():
            net(*args)

    return run


def profile(lib_dir: str, reference: str, runs: int = 20) -> dict:
    """Per-kernel time table of an artifact: every function the VM calls (tuned kernels and the
    VM's own builtins), with calls per inference, total µs per inference and share.

    Timed through the VM's instrument hook, which adds a Python call around every kernel (a few
    µs): shares are honest for kernels of tens of µs and up, and ``overhead_ms`` (an uninstrumented
    run minus the kernels' sum, floored at 0) bounds what dispatch costs besides the kernels.
    """
    from harlflow.runtime import load

    model = load(lib_dir)
    ins, _ = load_reference(reference)
    tensors = model._arguments((), ins)
    plain = _time(lambda: model.run_tvm(tensors), repeats=runs, max_seconds=5.0)["median_ms"]
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    started: list[float] = []

    def instrument(func, name, before_run, ret_value, *args):
        if before_run:
            started.append(time.perf_counter())
        else:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - started.pop()
            calls[name] = calls.get(name, 0) + 1
        return 0  # VMInstrumentReturnKind.NO_OP

    model._vm.set_instrument(instrument)
    model.run_tvm(tensors)  # warm-up
    totals.clear()
    calls.clear()
    for _ in range(runs):
        model.run_tvm(tensors)
    kernel_ms = sum(totals.values()) * 1e3 / runs
    rows = sorted(
        (
            {
                "kernel": k,
                "calls": calls[k] // runs,
                "total_us": round(v * 1e6 / runs, 2),
                "share": round(v / max(1e-12, sum(totals.values())), 4),
            }
            for k, v in totals.items()
        ),
        key=lambda r: -r["total_us"],
    )
    return {
        "run_ms": plain,
        "kernels_ms": round(kernel_ms, 4),
        "overhead_ms": round(max(0.0, plain - kernel_ms), 4),
        "kernels": rows,
    }


def verify(lib_dir: str, reference: str) -> dict:
    """Run the artifact on the reference inputs; per-output max abs/rel error (onnxruntime's)."""
    from harlflow.runtime import load

    model = load(lib_dir)
    ins, expected = load_reference(reference)
    got = model(**ins)
    got = [got] if isinstance(got, np.ndarray) else got
    return compare(model.outputs, got, expected)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harlflow.measure")
    p.add_argument("kind", choices=["tvm", "ort", "torch", "verify", "profile"])
    p.add_argument(
        "--path", required=True, help="artifact dir (tvm/verify), .onnx (ort), source (torch)"
    )
    p.add_argument("--reference", required=True, help="reference.npz with the inputs")
    p.add_argument("--source-kind", default="factory")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--max-seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    try:
        return _run(a)
    except HarlflowError as e:  # a bad artifact or reference: one line, as the CLI says it
        print(f"harlflow.measure: error: {e}", file=sys.stderr)
        return e.exit_code


def _run(a: argparse.Namespace) -> int:
    if a.kind == "verify":
        print(json.dumps(verify(a.path, a.reference)))
        return 0
    if a.kind == "profile":
        print(json.dumps(profile(a.path, a.reference)))
        return 0
    if a.kind == "tvm":
        fn = tvm_runner(a.path, a.reference)
    elif a.kind == "ort":
        fn = ort_runner(a.path, a.reference)
    else:
        fn = torch_runner(a.path, a.source_kind, a.checkpoint, a.reference)
    print(json.dumps(_time(fn, a.repeats, a.max_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

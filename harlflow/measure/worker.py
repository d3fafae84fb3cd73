"""The measuring worker: ``python -m harlflow.measure KIND ...`` in a fresh process.

``tvm``, ``ort`` and ``torch`` load one runtime, pinned to the cores the coordinator chose, and
serve timed rounds on stdin (:mod:`harlflow.measure.protocol` drives them, alternating several
such workers); ``verify`` and ``profile`` print one JSON line. Timings taken in the tuning
process right after tuning were off by up to 3×, so no latency is ever taken in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np

from harlflow.core.errors import HarlflowError, first_line
from harlflow.core.ort import LEVELS
from harlflow.core.outputs import compare, load_reference


def tvm_runner(lib_dir: str, reference: str):
    """A closure running an artifact directory on the reference inputs (TVM tensors prepared)."""
    from harlflow.runtime import load

    model = load(lib_dir)
    ins, _ = load_reference(reference)
    tensors = model._arguments((), ins)
    return lambda: model.run_tvm(tensors)


def ort_runner(onnx_path: str, reference: str, threads: int, level: str = "all"):
    """onnxruntime on ``threads`` intra-op threads; its threads spin between calls as they do by
    default unless ``HARLFLOW_MEASURE_SPIN=0`` (the protocol's ``spin=False``)."""
    import os

    import onnxruntime as ort

    from harlflow.core.ort import session_options

    ins, _ = load_reference(reference)
    opts = session_options(level, threads)
    spin = "0" if os.environ.get("HARLFLOW_MEASURE_SPIN") == "0" else "1"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, ins)


def torch_runner(source: str, kind: str, checkpoint: str | None, reference: str, threads: int):
    import torch

    torch.set_num_threads(threads)

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
    model.run_tvm(tensors)  # warm-up
    plain = float(np.median([_ms(lambda: model.run_tvm(tensors)) for _ in range(runs)]))
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


def _pin() -> int:
    """Pin this process to the cores the coordinator chose (``HARLFLOW_MEASURE_CPUS``) before
    any runtime starts its threads; returns how many."""
    import os

    cpus = os.environ.get("HARLFLOW_MEASURE_CPUS")
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        return len(cpus.split(","))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def serve(fn: Callable[[], object], out) -> int:
    """The protocol's worker loop (:mod:`harlflow.measure.protocol`): warm up, say how long a
    call takes, then answer each request ``{"calls": n}`` on stdin with one untimed call and
    ``n`` timed ones, ``{"ms": [...]}``, until stdin closes."""
    first = _ms(fn)  # first-run allocation, lazy initialisation, page faults
    warm = float(np.median([_ms(fn) for _ in range(3)]))
    out.write(json.dumps({"first_ms": first, "warm_ms": warm}) + "\n")
    out.flush()
    while line := sys.stdin.readline():
        if not line.strip():
            continue
        n = int(json.loads(line)["calls"])
        fn()  # the round's warm-up: caches and thread pool after the other runtimes' rounds
        out.write(json.dumps({"ms": [_ms(fn) for _ in range(n)]}) + "\n")
        out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harlflow.measure")
    p.add_argument(
        "kind",
        choices=["tvm", "ort", "torch", "verify", "profile"],
        help="tvm / ort / torch: serve timed rounds to harlflow.measure.side_by_side on stdin; "
        "verify: compare with the reference outputs; profile: per-kernel time table",
    )
    p.add_argument(
        "--path", required=True, help="artifact dir (tvm/verify/profile), .onnx (ort), source"
    )
    p.add_argument("--reference", required=True, help=".npz with the inputs (input/NAME)")
    p.add_argument("--source-kind", default="factory")
    p.add_argument("--checkpoint", default=None)
    p.add_argument(
        "--ort-level", choices=LEVELS, default="all",
        help="onnxruntime's graph optimisation level (ort; default all)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: pinned)")
    a = p.parse_args(argv)
    if a.kind != "torch":
        # tvm_ffi imports PyTorch when it can, for DLPack (about 1 s of every worker's start-up);
        # a worker that runs no PyTorch makes that import fail, which tvm_ffi allows for
        sys.modules.setdefault("torch", None)
    try:
        return _run(a)
    except HarlflowError as e:  # a bad artifact or reference: one line, as the CLI says it
        print(f"harlflow.measure: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a runtime that cannot load the model (onnxruntime's own errors)
        print(f"harlflow.measure: error: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return 3


def _run(a: argparse.Namespace) -> int:
    import os

    # the protocol's answers go to a private copy of stdout; whatever a library prints goes to
    # stderr and cannot corrupt them
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if a.kind == "verify":
        out.write(json.dumps(verify(a.path, a.reference)) + "\n")
        return 0
    if a.kind == "profile":
        out.write(json.dumps(profile(a.path, a.reference)) + "\n")
        return 0
    pinned = _pin()
    threads = a.threads or pinned
    if a.kind == "tvm":
        fn = tvm_runner(a.path, a.reference)
    elif a.kind == "ort":
        fn = ort_runner(a.path, a.reference, threads, a.ort_level)
    else:
        fn = torch_runner(a.path, a.source_kind, a.checkpoint, a.reference, threads)
    return serve(fn, out)


if __name__ == "__main__":
    sys.exit(main())

"""ONNX's own operator conformance cases through harlflow's path: import, prepare, compile with
no tuning (fallback schedules, as ``--trials 0`` builds), run, compare.

The ``onnx`` package carries the node cases every ONNX backend is checked against
(``onnx.backend.test.case.node.collect_testcases()``: a one-operator model and its input/output
data each). :func:`run_case` pushes one through the same functions ``harlflow optimize`` uses and
sorts the outcome:

- ``passed``: outputs within the case's tolerance (NaN equal to NaN);
- ``refused``: a :class:`ModelImportError` before compiling, naming the operator;
- ``compile_error``: a clear :class:`TuningError` later (a refusal, but not up front);
- ``wrong``: it ran and the outputs differ (shape, dtype or values);
- ``crash``: any other exception (a traceback a user would see), or, from
  :func:`run_cases`, a worker process that died (segfault, abort) or hung.

:func:`run_cases` runs cases in worker processes of their own (one per core) and restarts a
worker that dies, so one crashing case cannot take the others with it.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

# element types a float32/integer inference case may use (bool included)
_PLAIN = {
    *("float32", "bool"),
    *("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
}
_RESULT = "@@conformance "


def _dtype(vi) -> str | None:
    """numpy dtype name of a tensor value_info, None for sequences, optionals and the like."""
    from onnx import helper

    if not vi.type.HasField("tensor_type"):
        return None
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)))
    except Exception:
        return None


def in_scope(case) -> bool:
    """A float32 / integer inference case: plain tensors in and out, the default domain, no
    training operators."""
    g = case.model.graph
    if any(o.domain not in ("", "ai.onnx") for o in case.model.opset_import):
        return False
    if any(n.domain not in ("", "ai.onnx") for n in g.node):
        return False
    types = [_dtype(v) for v in [*g.input, *g.output]]
    return bool(case.data_sets) and all(t in _PLAIN for t in types)


def cases(names: Iterable[str] | None = None) -> dict[str, Any]:
    """The in-scope node cases by name (all, or those named)."""
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cases' own numpy overflow warnings
        found = {c.name: c for c in collect_testcases(None) if in_scope(c)}
    if names is None:
        return found
    return {n: found[n] for n in names}


def operator_of(case) -> str:
    """The case's operator (its first node's; the node cases have one, or a few of one kind)."""
    return case.model.graph.node[0].op_type


def run_case(case, target: dict[str, Any]) -> dict[str, Any]:
    """One case through import → prepare → compile (fallback schedules) → run; the outcome."""
    import onnx
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from harl import compilation
    from harlflow.core.errors import HarlflowError, ModelImportError, first_line
    from harlflow.runtime import c_contiguous
    from tasks.importing import _signature, canonicalize, check_tvm_support, to_relax

    out: dict[str, Any] = {"case": case.name, "operator": operator_of(case)}
    inputs, expected = case.data_sets[0]
    try:
        with tempfile.TemporaryDirectory(prefix="harlflow-conformance-") as tmp:
            proto = canonicalize(case.model, case.name, {})
            check_tvm_support(proto, case.name)
            ins, outs = _signature(proto)
            path = Path(tmp) / "model.onnx"
            onnx.save(proto, str(path))
            mod = compilation.prepare(to_relax(path, ins, case.name))
            tasks = compilation.extract_tasks(mod, target)
            db, _ = compilation.compile_database(ms.database.MemoryDatabase(), tasks, target, 0)
            vm = relax.VirtualMachine(compilation.compile_module(mod, target, db), tvm.cpu())
            fed = [tvm.runtime.tensor(c_contiguous(np.asarray(a))) for a in inputs]
            result = vm["main"](*fed)
            got = [result] if hasattr(result, "numpy") else list(result)
            got = [g.numpy() if hasattr(g, "numpy") else np.asarray(g) for g in got]
    except ModelImportError as e:
        return {**out, "outcome": "refused", "message": first_line(e)}
    except HarlflowError as e:
        return {**out, "outcome": "compile_error", "message": first_line(e)}
    except Exception as e:
        return {**out, "outcome": "crash", "message": f"{type(e).__name__}: {first_line(e)}"}
    if len(got) != len(expected):
        return {**out, "outcome": "wrong", "message": f"{len(got)} outputs, not {len(expected)}"}
    for spec, g, e in zip(outs, got, expected, strict=True):
        e = np.asarray(e)
        if g.shape != e.shape or g.dtype != e.dtype:
            return {
                **out,
                "outcome": "wrong",
                "message": f"{spec.name}: {g.dtype}{list(g.shape)}, expected {e.dtype}"
                f"{list(e.shape)}",
            }
        try:
            np.testing.assert_allclose(g, e, rtol=case.rtol, atol=case.atol, equal_nan=True)
        except AssertionError:
            diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
            worst = float(np.nanmax(diff)) if diff.size else 0.0
            return {**out, "outcome": "wrong", "message": f"{spec.name}: max abs error {worst:.3g}"}
    return {**out, "outcome": "passed"}


# --------------------------------------------------------------------------- isolated workers
def _worker() -> int:
    """``python -m tasks.conformance``: read case names on stdin, print one result line each."""
    from harlflow.core.targets import resolve_target

    target = resolve_target(os.environ.get("HARLFLOW_CONFORMANCE_TARGET", "cpu"))
    found = cases()
    print(_RESULT + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        result = run_case(found[name], target)
        print(_RESULT + json.dumps(result), flush=True)
    return 0


class _Worker:
    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.conformance"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=str(Path(__file__).resolve().parents[1]),
            text=True,
        )
        self.read(timeout=300)  # ready

    def read(self, timeout: float) -> dict | None:
        """The next result line, or None when the worker died or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            line = self.proc.stdout.readline()
            if not line:
                return None
            if line.startswith(_RESULT):
                return json.loads(line[len(_RESULT) :])

    def stop(self) -> int | None:
        self.proc.kill()
        return self.proc.wait()


def run_cases(
    names: list[str],
    *,
    target: str = "cpu",
    workers: int = 2,
    timeout: float = 300.0,
    on_result: Callable[[dict], None] = lambda r: None,
) -> list[dict]:
    """Run the named cases in ``workers`` processes; a worker that dies or takes longer than
    ``timeout`` seconds on a case reports it as a crash (with the signal) and is replaced."""
    ops = {n: operator_of(c) for n, c in cases(names).items()}
    todo: queue.Queue[str] = queue.Queue()
    for n in names:
        todo.put(n)
    results: list[dict] = []
    lock = threading.Lock()
    env = {**os.environ, "HARLFLOW_CONFORMANCE_TARGET": target}

    def loop() -> None:
        w = _Worker(env)
        while True:
            try:
                name = todo.get_nowait()
            except queue.Empty:
                break
            w.proc.stdin.write(name + "\n")
            w.proc.stdin.flush()
            r = w.read(timeout)
            if r is None:
                died = w.proc.poll()
                w.stop()
                how = f"hung for {timeout:.0f} s" if died is None else f"died ({died})"
                r = {"case": name, "operator": ops[name], "outcome": "crash", "message": how}
                w = _Worker(env)
            with lock:
                results.append(r)
                on_result(r)
        w.proc.stdin.close()
        w.stop()

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(results: list[dict]) -> dict[str, dict[str, int]]:
    """Per operator: how many cases ended in each outcome, and its pass rate."""
    table: dict[str, dict[str, Any]] = {}
    for r in results:
        row = table.setdefault(r["operator"], {})
        row[r["outcome"]] = row.get(r["outcome"], 0) + 1
    for row in table.values():
        row["pass_rate"] = round(row.get("passed", 0) / sum(row.values()), 3)
    return dict(sorted(table.items()))


if __name__ == "__main__":
    sys.exit(_worker())

"""Verify and package stage: compile with the tuning database, export, verify against the
reference in a fresh process, measure every runtime in fresh processes, and write the artifact
directory atomically under ``$HARLFLOW_HOME/<name>/<version>/``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harl import compilation, database
from harl.index_guard import index_checks
from harlflow.core import tvmlog
from harlflow.core.config import validate_name
from harlflow.core.errors import StoreError, TuningError, VerificationError, first_line
from harlflow.core.hashing import sha256_tree
from harlflow.core.outputs import mismatches
from tasks.importing import ImportedModel, to_relax

MANIFEST_VERSION = 1


@dataclass
class Artifact:
    """A packaged, verified artifact on local disk."""

    name: str
    version: str
    directory: str
    manifest: dict[str, Any]


def versions() -> dict[str, str]:
    """Versions of the libraries an artifact depends on (recorded in manifest and MLflow)."""
    import onnx
    import onnxruntime
    import tvm

    import harlflow

    return {
        "harlflow": harlflow.__version__,
        "tvm": tvm.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def run_worker(args: list[str], timeout: float = 900) -> dict:
    """``python -m harlflow.measure ...`` in a fresh process; its one JSON line, parsed."""
    proc = subprocess.run(
        [sys.executable, "-m", "harlflow.measure", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TuningError(f"measurement worker failed ({' '.join(args[:1])}): {tail[0]}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise TuningError(f"measurement worker ({' '.join(args[:1])}) printed nothing")
    return json.loads(lines[-1])


def _export_tuning_db(db, tasks, target: dict[str, Any], dest: Path) -> int:
    """Copy every valid record of the model's workloads on this target into ``dest``."""
    from tvm.s_tir import meta_schedule as ms

    dest.mkdir(parents=True, exist_ok=True)
    out = ms.database.JSONDatabase(work_dir=str(dest), module_equality="structural")
    n = 0
    for t in tasks:
        mod = t.dispatched[0]
        records = database.best_records(db, mod, target, k=10_000)
        if not records:
            continue
        wl = out.commit_workload(mod)
        for r in records:
            out.commit_tuning_record(database.with_workload(r, wl))
            n += 1
    return n


def _remove_stale_tmp(parent: Path) -> None:
    """Remove ``.tmp-<pid>-*`` directories of packaging processes that died (e.g. killed)."""
    import psutil

    for d in parent.glob(".tmp-*-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _next_version_dir(parent: Path, tmp: Path) -> Path:
    """Rename ``tmp`` to the next free integer version under ``parent`` (race-safe)."""
    while True:
        taken = [int(p.name) for p in parent.iterdir() if p.name.isdigit()]
        final = parent / str(max(taken, default=0) + 1)
        try:
            os.rename(tmp, final)  # atomic; fails if a concurrent run took that version
            return final
        except OSError:
            if final.exists():
                continue
            raise


@tvmlog.collecting  # TVM's warnings once per kind
def package(
    imported: ImportedModel,
    target: dict[str, Any],
    *,
    database_dir: str | Path,
    home: str | Path,
    tune_summary: dict[str, Any],
    seed: int = 0,
    measure: bool = True,
    max_seconds: float = 10.0,
    measure_untuned: bool = False,
    log=print,
) -> Artifact:
    """Compile, export, verify and measure; the artifact appears only if it verified."""
    name = validate_name(imported.name)
    mod = compilation.prepare(to_relax(imported.onnx_path, imported.inputs))
    tasks = compilation.extract_tasks(mod, target)
    with database.locked(database_dir):  # never read a record line another run is writing
        db = database.open_database(database_dir)
    compile_db, sources = compilation.compile_database(db, tasks, target, seed)
    parent = Path(home) / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=parent))
    except OSError as e:
        raise StoreError(f"cannot write the artifact under {parent}: {e.strerror or e}") from None
    scratch = Path(tempfile.mkdtemp(prefix="harlflow-untuned-"))
    try:
        log(
            f"compiling {name} with {sum(v == 'database' for v in sources.values())} tuned, "
            f"{sum(v == 'transferred' for v in sources.values())} transferred and "
            f"{sum(v in ('fallback', 'default') for v in sources.values())} fallback kernels"
        )
        export_library(compilation.compile_module(mod, target, compile_db), tmp / "model.so")
        shutil.copy(imported.reference_path, tmp / "reference.npz")
        n_records = _export_tuning_db(db, tasks, target, tmp / "tuning_db")
        manifest: dict[str, Any] = {
            "manifest_version": MANIFEST_VERSION,
            "name": name,
            "source": imported.source,
            "source_kind": imported.source_kind,
            "source_sha256": imported.source_sha256,
            "inputs": [s.to_dict() for s in imported.inputs],
            "outputs": [s.to_dict() for s in imported.outputs],
            "target": target,
            # what the bounds checks compiled into model.so guard (harl.index_guard)
            "index_checks": index_checks(mod),
            "versions": versions(),
            "seed": seed,
            "tuning": {
                **tune_summary,
                "records_in_artifact": n_records,
                "kernels": sources,
            },
        }
        _write_json(tmp / "manifest.json", manifest)  # the runtime loader needs it to verify

        log("verifying against onnxruntime's reference outputs in a fresh process")
        report = run_worker(
            ["verify", "--path", str(tmp), "--reference", str(tmp / "reference.npz")]
        )
        bad = mismatches(report)
        if bad:
            raise VerificationError(
                f"{name}: compiled outputs differ from the reference, not packaged: "
                f"{'; '.join(bad)}"
            )
        manifest["verification"] = report

        if measure:
            untuned = scratch / "untuned" if measure_untuned else None
            if untuned:
                log("compiling the untuned TVM build (--measure-untuned)")
                untuned.mkdir()
                export_library(compilation.compile_untuned(mod, target), untuned / "model.so")
                shutil.copy(tmp / "manifest.json", untuned / "manifest.json")
            m = _measure(imported, target, tmp, untuned, max_seconds, log)
            manifest.update(latency_fields(m))
            log("timing each kernel of the tuned artifact")
            manifest["kernel_profile"] = run_worker(
                ["profile", "--path", str(tmp), "--reference", str(tmp / "reference.npz")]
            )
        manifest["files"] = {k: v for k, v in sha256_tree(tmp).items() if k != "manifest.json"}
        _write_json(tmp / "manifest.json", manifest)
        final = _next_version_dir(parent, tmp)  # the directory name is the version
        return Artifact(name=name, version=final.name, directory=str(final), manifest=manifest)
    except Exception as e:
        if _disk_failure(e):
            raise StoreError(
                f"writing the artifact under {parent} failed ({_disk_line(e)}): nothing was written"
            ) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


NATIVE_EXIT = 70  # export_library's child left through the C library's exit() (LLVM does)


def export_library(executable, path: Path, timeout: float = 900) -> None:
    """``executable.export_library(path)`` in a forked child process.

    LLVM does not raise when it cannot write its object file (a full disk or temp directory):
    it prints "LLVM ERROR: IO failure on output stream: ..." and exits the whole process. In a
    child that costs only the child; here its exit becomes an exception carrying what it
    printed, which :func:`_disk_failure` recognises. The child shares the compiled module with
    this process by ``fork`` (nothing is serialised) and leaves with ``os._exit``, so no exit
    handler of this process runs twice."""
    import ctypes
    import select
    import signal
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report on the pipe, which is also its stderr
        code = 0
        try:
            os.close(err_r)
            os.dup2(err_w, 2)
            # LLVM leaves through exit(), whose handlers include the static destructors of the
            # libraries loaded here; onnxruntime's waits for threads that were not forked and
            # never returns. Registered last, this handler runs first and skips them all.
            at_exit = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: os._exit(NATIVE_EXIT))
            ctypes.CDLL(None).__cxa_atexit(at_exit, None, None)
            executable.export_library(str(path))
        except BaseException as e:
            os.write(err_w, f"{type(e).__name__}: {e}".encode(errors="replace")[-8000:])
            code = 1
        finally:
            os._exit(code)
    os.close(err_w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([err_r], [], [], 1.0)
            if ready:
                chunk = os.read(err_r, 65536)
                if not chunk:
                    break  # the child has exited (or closed its stderr)
                chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
            chunks.append(f"no result after {timeout:.0f} s".encode())
    finally:
        os.close(err_r)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    printed = b"".join(chunks).decode(errors="replace").strip()
    if code != 0:
        how = "the compiler ended the process" if code == NATIVE_EXIT else f"exit {code}"
        raise RuntimeError(f"exporting {path.name} failed ({how}):\n{printed or 'no message'}")
    if printed:
        sys.stderr.write(printed + "\n")  # the compiler's warnings, if any


_DISK_FULL = (
    "No space left on device",
    "File too large",
    "File size limit exceeded",
    "Disk quota exceeded",
    "Read-only file",
)


def _disk_failure(e: BaseException) -> bool:
    """A write that failed for lack of space or permission (also when gcc/TVM report it)."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)
    return any(m in str(e) for m in _DISK_FULL)


def _disk_line(e: BaseException) -> str:
    """The line of ``e``'s message that says the disk is full, else its :func:`first_line`."""
    lines = [ln.strip() for ln in str(e).splitlines() if any(m in ln for m in _DISK_FULL)]
    return lines[0][:300] if lines else first_line(e)


def _measure(imported, target, artifact: Path, untuned: Path | None, max_seconds, log):
    """The tuned artifact, onnxruntime on the original model, PyTorch eager for PyTorch sources
    and, when asked, the untuned TVM build, side by side (:mod:`harlflow.measure`)."""
    from harlflow.measure import Runtime, side_by_side

    rts = [
        Runtime("tvm_tuned", "tvm", str(artifact)),
        Runtime("onnxruntime", "ort", str(imported.original_onnx_path)),
    ]
    if imported.source_kind in ("pt2", "factory"):
        rts.append(
            Runtime("pytorch", "torch", imported.source, imported.source_kind, imported.checkpoint)
        )
    if untuned is not None:
        rts.append(Runtime("tvm_untuned", "tvm", str(untuned)))
    log(f"measuring {', '.join(r.label for r in rts)} side by side (up to {max_seconds:g} s)")
    return side_by_side(
        rts, artifact / "reference.npz", threads=measure_threads(target), max_seconds=max_seconds,
        log=log,
    )  # fmt: skip


def measure_threads(target: dict[str, Any]) -> int:
    """Threads (and cores) a measurement of an artifact for ``target`` uses: its cores."""
    return int(target.get("num-cores") or os.cpu_count() or 1)


def latency_fields(m) -> dict[str, Any]:
    """The manifest's latency fields from a side-by-side measurement of ``tvm_tuned`` and the
    others: every latency with its interval, the speedup over each other runtime (its latency
    over the tuned one's, per round) with its interval, the tuned artifact's ratio to
    onnxruntime with ``ratio_ci``, and how it was measured."""
    others = [k for k in m.labels if k != "tvm_tuned"]
    speedups = {f"vs_{k}": m.ratio(k, "tvm_tuned") for k in others}
    ort = m.ratio("tvm_tuned", "onnxruntime")
    return {
        "latency_ms": {k: m.estimate(k).to_dict() for k in m.labels},
        "speedup": {k: round(r.value, 4) for k, r in speedups.items()},
        "speedup_ci": {k: [round(x, 4) for x in r.ci] for k, r in speedups.items()},
        "ratio_to_onnxruntime": round(ort.value, 4),
        "ratio_ci": [round(x, 4) for x in ort.ci],
        "measurement": m.session(),
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def log_package(c, run_id: str, artifact: Artifact) -> None:
    """Package stage → MLflow: verification errors, latencies, speedups, manifest, tuning DB."""
    from tasks import tracking

    m = artifact.manifest
    metrics: dict[str, float] = {}
    for out, r in m.get("verification", {}).items():
        metrics[f"verify/{out}/max_abs"] = r.get("max_abs")
        metrics[f"verify/{out}/max_rel"] = r.get("max_rel")
    for k, v in m.get("latency_ms", {}).items():
        metrics[f"latency/{k}_median_ms"] = v["median_ms"]
        metrics[f"latency/{k}_p90_ms"] = v["p90_ms"]
        metrics[f"latency/{k}_ci_low_ms"], metrics[f"latency/{k}_ci_high_ms"] = v["ci_ms"]
    metrics.update({f"speedup/{k}": v for k, v in m.get("speedup", {}).items()})
    for k, (lo, hi) in m.get("speedup_ci", {}).items():
        metrics[f"speedup/{k}_ci_low"], metrics[f"speedup/{k}_ci_high"] = lo, hi
    if "ratio_to_onnxruntime" in m:
        metrics["ratio_to_onnxruntime"] = m["ratio_to_onnxruntime"]
        metrics["ratio_to_onnxruntime_ci_low"], metrics["ratio_to_onnxruntime_ci_high"] = m[
            "ratio_ci"
        ]
    if "measurement" in m:
        metrics["latency/measure_wall_s"] = m["measurement"]["seconds"]
        metrics["latency/measure_blocks"] = m["measurement"]["blocks"]
    tracking.log_metrics(c, run_id, metrics)
    tracking.log_params(
        c, run_id, {"artifact_dir": artifact.directory, "version": artifact.version}
    )
    c.log_artifact(run_id, str(Path(artifact.directory) / "manifest.json"))
    prof = m.get("kernel_profile")
    if prof:  # what dominates the artifact's time: a table users can sort in the MLflow UI
        c.log_table(
            run_id,
            {k: [r[k] for r in prof["kernels"]] for k in ("kernel", "calls", "total_us", "share")},
            "kernel_profile.json",
        )
        tracking.log_metrics(
            c,
            run_id,
            {
                "latency/vm_overhead_ms": prof["overhead_ms"],
                "latency/kernels_ms": prof["kernels_ms"],
            },
        )
    c.log_artifacts(run_id, str(Path(artifact.directory) / "tuning_db"), "tuning_db")

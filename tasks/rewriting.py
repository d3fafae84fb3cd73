"""Rewrite stage: graph rewriting between import and tuning, by greedy search, X-RLflow or RLFlow.

Rewrites are judged by a cost oracle: ``tvm`` (default: the artifact is compiled by TVM, so a
rewrite that helps onnxruntime but adds kernels to the compiled model is not taken; see
:mod:`tasks.rewrite_oracle`) or ``onnxruntime`` (per-operator timings on this CPU). The stage
reports both oracles' estimates of the input and of the rewritten graph, and onnxruntime's
measured latency of each; the compiled artifact's latency is measured by the package stage.

The rewritten graph is checked against the imported model's reference outputs before it moves
on (a wrong rewrite stops here with a VerificationError), and the package stage verifies the
compiled artifact against the same *original* reference. A rewrite measured slower than the
input graph is dropped (the input goes on unchanged).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harlflow import rl
from harlflow.core import tvmlog
from harlflow.core.errors import BadInputError, VerificationError
from harlflow.core.outputs import compare, mismatches
from tasks.importing import ImportedModel
from tasks.rewrite_methods import METHODS, ORACLES, RewriteJob, lookup, make_oracle


@dataclass
class RewriteOutcome:
    """What the rewrite stage hands on: the model to tune, and what it did."""

    model: ImportedModel
    method: str
    summary: dict[str, Any] = field(default_factory=dict)
    learning_curve: list[dict[str, float]] = field(default_factory=list)
    rewritten_onnx: str | None = None


def rewrite_model(
    imported: ImportedModel,
    method: str,
    *,
    work_dir: str | Path,
    agent_path: str | Path | None = None,
    rlflow_agent_path: str | Path | None = None,
    oracle: str = "tvm",
    target: dict | None = None,
    database_dir: str | Path | None = None,
    train_iterations: int = 10,
    rollouts: int = 2,
    max_steps: int = 30,
    seed: int = 0,
    time_budget_s: float | None = None,
    log=print,
) -> RewriteOutcome:
    """Rewrite ``imported`` with ``method``, judged by ``oracle``; returns the model the next
    stages should use. With ``time_budget_s`` the search stops pricing candidates after that
    many seconds and hands on the best graph reached (training an agent that is not saved yet
    is not cut short)."""
    lookup(METHODS, method, "rewrite method")
    lookup(ORACLES, oracle, "rewrite oracle")
    if method == "none":
        return RewriteOutcome(imported, "none", {"method": "none"})
    with tvmlog.collected(log) as warned:  # TVM warns once per priced candidate otherwise
        out = _rewrite(
            imported, method, work_dir, agent_path, rlflow_agent_path, oracle, target,
            database_dir, train_iterations, rollouts, max_steps, seed, time_budget_s, log,
        )  # fmt: skip
    out.summary["tvm_warnings"] = dict(warned)
    return out


def _rewrite(
    imported, method, work_dir, agent_path, rlflow_agent_path, oracle, target, database_dir,
    train_iterations, rollouts, max_steps, seed, time_budget_s, log,
) -> RewriteOutcome:  # fmt: skip
    from xrlflow import ir, search

    rl.setup(seed)  # the agent's initial weights; one torch thread for small graphs
    t0 = time.monotonic()
    deadline = None if time_budget_s is None else t0 + time_budget_s
    original = ir.check(ir.load(imported.onnx_path))
    g = ir.normalize(original)
    judge = make_oracle(oracle, target, database_dir)
    t = time.monotonic()
    if judge.estimate(g) == float("inf"):
        raise BadInputError(
            f"{imported.name}: the TVM oracle cannot compile this model; "
            "use --rewrite-oracle onnxruntime"
        )
    pricing_s = time.monotonic() - t
    job = RewriteJob(
        g, judge, log, seed, deadline, pricing_s, max_steps, rollouts, train_iterations,
        agent_path, rlflow_agent_path,
    )  # fmt: skip
    result = METHODS[method].run(job)
    if result.notes.get("stopped"):
        log(
            f"rewrite: stopped at its share of the time budget ({time_budget_s:.0f} s) with "
            f"the best graph so far, {result.explored} candidates priced"
        )
    result = search.best_of(original, result)
    summary = result.summary() | {
        "oracle": judge.name,
        "estimates": _both_oracles(g, result.graph, judge, target),
        "stage_seconds": time.monotonic() - t0,
    }
    log(
        f"rewrite: {len(result.steps)} substitutions, {summary['latency_before_ms']:.3f} ms -> "
        f"{summary['latency_after_ms']:.3f} ms on {judge.name} ({result.speedup:.3f}x); "
        + "; ".join(
            f"{k} {v['before_ms']:.3f} -> {v['after_ms']:.3f} ms"
            for k, v in summary["estimates"].items()
        )
    )
    if not result.steps:
        return RewriteOutcome(imported, method, summary, job.curve)
    model, path = _write(imported, result.graph, work_dir, summary)
    return RewriteOutcome(model, method, summary, job.curve, path)


def _both_oracles(before, after, judge, target) -> dict[str, dict[str, float]]:
    """Each oracle's view of the input and the output graph, in ms: the TVM estimate, the sum
    of onnxruntime's per-operator timings and onnxruntime's end-to-end measurement."""
    from xrlflow.cost import OrtOracle

    ort = judge if judge.name == "onnxruntime" else OrtOracle()
    tvm = judge if judge.name == "tvm" else make_oracle("tvm", target)
    rows = {
        "tvm_estimate": tvm.estimate,
        "onnxruntime_estimate": ort.estimate,
        "onnxruntime_measured": ort.measure,
    }
    return {k: {"before_ms": f(before) * 1e3, "after_ms": f(after) * 1e3} for k, f in rows.items()}


def _write(
    imported: ImportedModel, g, work_dir: str | Path, summary: dict
) -> tuple[ImportedModel, str]:
    """Verify the rewritten graph against the original reference, then write it atomically."""
    from xrlflow import ir
    from xrlflow.verify import session

    inputs, expected = imported.reference()
    bad = mismatches(compare(imported.outputs, session(g).run(None, inputs), expected))
    if bad:
        raise VerificationError(
            f"{imported.name}: the rewritten graph differs from the original "
            f"model's reference, the rewrite is refused: {'; '.join(bad)}"
        )
    proto = ir.to_onnx(g).SerializeToString()
    key = hashlib.sha256(proto).hexdigest()[:16]
    dest = Path(work_dir) / key
    if not (dest / "model.onnx").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
        (tmp / "model.onnx").write_bytes(proto)
        shutil.copy(imported.reference_path, tmp / "reference.npz")  # the ORIGINAL's reference
        (tmp / "rewrite.json").write_text(json.dumps(summary, indent=2, default=str))
        try:
            tmp.rename(dest)
        except OSError:  # a concurrent run wrote the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    model = replace(
        imported,
        directory=str(dest),
        num_nodes=len(g.nodes),
        op_counts=g.op_counts(),
        original_directory=imported.original_directory or imported.directory,
    )
    return model, str(dest / "model.onnx")


def log_rewrite(c, run_id: str, out: RewriteOutcome) -> None:
    """Rewrite stage → MLflow: method, rules applied, latencies before/after, curve, the ONNX."""
    from tasks import tracking

    s = out.summary
    tracking.log_params(c, run_id, {"rewrite": out.method, "oracle": s.get("oracle")})
    if out.method == "none":
        return
    both = {
        f"rewrite/{k}_{when}_ms": v[f"{when}_ms"]
        for k, v in s.get("estimates", {}).items()
        for when in ("before", "after")
    }
    tracking.log_metrics(
        c,
        run_id,
        {
            "rewrite/latency_before_ms": s["latency_before_ms"],
            "rewrite/latency_after_ms": s["latency_after_ms"],
            "rewrite/speedup": s["speedup"],
            "rewrite/substitutions": len(s["steps"]),
            "rewrite/seconds": s["stage_seconds"],
            "rewrite/tvm_warnings": sum(s.get("tvm_warnings", {}).values()),
            **both,
        },
    )
    c.log_dict(run_id, s, "rewrite.json")
    for i, m in enumerate(out.learning_curve):
        tracking.log_metrics(c, run_id, m, step=i)
    if out.rewritten_onnx:
        c.log_artifact(run_id, out.rewritten_onnx, "rewritten")

"""Publish stage: the artifact directory into MLflow (run artifacts + a registered model version)
and, when asked, into S3 with each file's sha256 in its object metadata."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harlflow.core.errors import RegressionError, StoreError
from harlflow.core.hashing import sha256_file
from harlflow.core.targets import target_key
from tasks import tracking
from tasks.packaging import Artifact
from tasks.s3 import parse_s3_uri, s3_attempts, s3_client

ARTIFACT_PATH = "artifact"  # where the artifact directory lives inside its MLflow run


def register(c, run_id: str, artifact: Artifact) -> str:
    """Log the artifact directory to ``run_id`` and register it as a new model version."""
    try:
        c.log_artifacts(run_id, artifact.directory, ARTIFACT_PATH)
        m = artifact.manifest
        tags = {
            "target": target_tag(m["target"]),
            "source_sha256": m["source_sha256"],
            "harlflow_version": m["versions"]["harlflow"],
            "local_path": artifact.directory,
            **{f"speedup_{k}": f"{v:.3f}" for k, v in m.get("speedup", {}).items()},
        }
        tuned = m.get("latency_ms", {}).get("tvm_tuned")
        if tuned:  # as measured in this run, beside onnxruntime; the gate measures again
            tags["latency_ms"] = f"{tuned['median_ms']:.6g}"
            tags["latency_ci_ms"] = "-".join(f"{x:.6g}" for x in tuned["ci_ms"])
        if m.get("ratio_ci"):
            tags["ratio_to_onnxruntime"] = f"{m['ratio_to_onnxruntime']:.4f}"
            tags["ratio_ci"] = "-".join(f"{x:.4f}" for x in m["ratio_ci"])
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"registering {artifact.name} in MLflow failed: {e}") from None
    return tracking.register_version(
        c,
        artifact.name,
        run_id,
        ARTIFACT_PATH,
        description="Compiled, verified harlflow artifacts of this model.",
        tags=tags,
    )


def target_tag(target: dict[str, Any]) -> str:
    """The ``target`` tag of a registered version: :func:`~harlflow.core.targets.target_key`,
    the same notion of "same target" the tuning database uses."""
    return target_key(target)


def _with_backoff(what: str, fn, attempts: int, log=print, base_delay: float = 1.0):
    """``fn()`` with up to ``attempts`` tries, waiting 1, 2, 4, ... s between them."""
    import time

    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if i == attempts - 1:
                raise StoreError(
                    f"{what} failed after {attempts} attempts: {type(e).__name__}: {e}"
                ) from None
            delay = base_delay * 2**i
            log(f"{what} failed ({type(e).__name__}); attempt {i + 2}/{attempts} in {delay:.0f} s")
            time.sleep(delay)


def upload_s3(artifact: Artifact, s3_uri: str, log=print) -> str:
    """Upload the artifact to ``s3_uri/<name>/<version>/``; returns that URI.

    Each object carries its sha256 in metadata (``x-amz-meta-sha256``); ``manifest.json`` goes
    last, so a reader that finds the manifest finds every file it lists. Each file is retried
    with backoff; when S3 stays unreachable the error says so and the local artifact is intact.
    """
    bucket, prefix = parse_s3_uri(s3_uri)
    key_root = "/".join(p for p in (prefix, artifact.name, artifact.version) if p)
    root = Path(artifact.directory)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "manifest.json")
    s3, attempts = s3_client(), s3_attempts()
    try:
        for path in files:
            key = f"{key_root}/{path.relative_to(root).as_posix()}"
            meta = {"Metadata": {"sha256": sha256_file(path)}}
            _with_backoff(
                f"uploading s3://{bucket}/{key}",
                lambda p=path, k=key, m=meta: s3.upload_file(str(p), bucket, k, ExtraArgs=m),
                attempts,
                log,
            )
    except StoreError as e:
        raise StoreError(f"{e}; the local artifact at {artifact.directory} is intact") from None
    return f"s3://{bucket}/{key_root}"


PRODUCTION = "production"


def promote_version(
    c,
    name: str,
    version: str,
    max_regression: float,
    *,
    artifact_dir: str | Path,
    measure_seconds: float = 10.0,
    log=print,
) -> tuple[str, dict[str, Any]]:
    """The regression gate: move the ``production`` alias to ``version`` unless it is slower
    than the current production version by more than ``max_regression`` (a fraction).

    Production's artifact is pulled from the registry (every file's sha256 checked) and timed
    *with* the new one (``artifact_dir``) by the side-by-side protocol, on this machine, now
    (:func:`harlflow.measure.gate`): refused when the ratio's interval lies above
    ``1 + max_regression``, promoted when it lies below, measured up to ``3 × measure_seconds``
    while it straddles, then decided on the median. A production version for another target or
    with other inputs is not compared (said so); one whose files cannot be pulled stops the gate
    (StoreError) and the alias stays. Returns (the production version, the gate's record); the
    record also goes to the new version's tags."""
    from harlflow.measure import MeasurementError, Runtime, gate, side_by_side, undecided
    from tasks.packaging import measure_threads
    from tasks.pulling import pull_mlflow

    new = c.get_model_version(name, version)
    try:
        cur = c.get_model_version_by_alias(name, PRODUCTION)
    except Exception:  # no production version yet
        cur = None
    record: dict[str, Any] = {"compared": False}
    if cur is None or str(cur.version) == str(version):
        record["reason"] = "no production version yet" if cur is None else "already production"
        return _promote(c, name, version, record, log), record
    record["production_version"] = str(cur.version)
    if cur.tags.get("target") != new.tags.get("target"):
        record["reason"] = f"production v{cur.version} is for another target: not compared"
        log(f"{record['reason']}; promoting v{version}")
        return _promote(c, name, version, record, log), record
    artifact_dir = Path(artifact_dir)
    mine = json.loads((artifact_dir / "manifest.json").read_text())
    with tempfile.TemporaryDirectory(prefix="harlflow-gate-") as scratch:
        try:
            prod_dir = pull_mlflow(f"{name}:{cur.version}", Path(scratch) / "production")
        except StoreError as e:
            msg = (
                f"the regression gate cannot compare: production v{cur.version}'s artifact "
                f"cannot be pulled ({e}); '{PRODUCTION}' stays on v{cur.version}"
            )
            c.set_model_version_tag(name, version, "promotion", f"not compared: {msg}")
            raise StoreError(msg) from None
        theirs = json.loads((prod_dir / "manifest.json").read_text())
        if theirs.get("inputs") != mine.get("inputs"):
            record["reason"] = f"production v{cur.version} takes other inputs: not compared"
            log(f"{record['reason']}; promoting v{version}")
            return _promote(c, name, version, record, log), record
        limit = 1 + max_regression
        log(
            f"regression gate: v{version} against production v{cur.version}, side by side "
            f"(refused if more than {max_regression:.0%} slower)"
        )
        try:
            m = side_by_side(
                [
                    Runtime("new", "tvm", str(artifact_dir)),
                    Runtime("production", "tvm", str(prod_dir)),
                ],
                artifact_dir / "reference.npz",
                threads=measure_threads(mine["target"]),
                max_seconds=3 * measure_seconds,
                stop=undecided(limit),
                log=log,
            )
        except MeasurementError as e:  # e.g. production built by a TVM this one cannot load
            msg = f"the regression gate cannot compare: {e}; '{PRODUCTION}' stays on v{cur.version}"
            c.set_model_version_tag(name, version, "promotion", f"not compared: {msg}")
            raise MeasurementError(msg) from None
    decision = gate(m, max_regression)
    record.update(compared=True, **decision.to_dict(), session=m.session())
    lo, hi = decision.ratio.ci
    for key, value in {
        "gate_production_version": str(cur.version),
        "gate_ratio": f"{decision.ratio.value:.6f}",
        "gate_ratio_ci": f"{lo:.6f}-{hi:.6f}",
        "gate_new_ms": f"{decision.new_ms.median_ms:.6g}",
        "gate_production_ms": f"{decision.production_ms.median_ms:.6g}",
        "gate_basis": decision.basis,
    }.items():
        c.set_model_version_tag(name, version, key, value)
    said = f"{name} v{version}: {decision.describe()}"
    if not decision.promote:
        msg = (
            f"{said}: more than {max_regression:.0%} slower than production v{cur.version}; "
            f"'{PRODUCTION}' stays on v{cur.version}"
        )
        c.set_model_version_tag(name, version, "promotion", f"refused: {msg}")
        raise RegressionError(msg, details=record)
    log(said)
    return _promote(c, name, version, record, log), record


def _promote(c, name: str, version: str, record: dict[str, Any], log) -> str:
    c.set_registered_model_alias(name, PRODUCTION, version)
    how = "promoted" if record.get("compared") else f"promoted ({record['reason']})"
    c.set_model_version_tag(name, version, "promotion", how)
    log(f"'{PRODUCTION}' alias -> {name} v{version}")
    return version


@dataclass
class Publication:
    """Where a published artifact went: its registered version and every location."""

    version: str
    """the MLflow registry's version number"""
    locations: dict[str, str]
    """local, s3 (when asked), mlflow (models:/NAME/VERSION), production (when promoted)"""
    gate: dict[str, Any] | None = None
    """the regression gate's record (``--promote``): decision, both latencies, the ratio and
    its interval, or why production was not compared"""


def publish(
    run_id: str,
    artifact: Artifact,
    s3_uri: str | None,
    *,
    promote: bool = False,
    max_regression: float = 0.05,
    measure_seconds: float = 10.0,
    log=print,
) -> Publication:
    """Upload to S3 when asked, register in MLflow and, with ``promote``, move the production
    alias to the new version unless it regresses (:func:`promote_version`).

    S3 goes first, so a registered version is always complete: when the upload fails, nothing
    is registered and the verified artifact stays in the local store for the next attempt.
    """
    c = tracking.client()
    where = {"local": artifact.directory}
    if s3_uri:
        where["s3"] = upload_s3(artifact, s3_uri, log=log)
        log(f"uploaded to {where['s3']}")
    version = register(c, run_id, artifact)
    where["mlflow"] = f"models:/{artifact.name}/{version}"
    log(f"registered {where['mlflow']}")
    tracking.log_params(c, run_id, {f"published_{k}": v for k, v in where.items()})
    c.set_tag(run_id, "registered_version", version)
    gate = None
    if promote:  # the regression gate: a refusal is an answer (RegressionError), not retried
        promoted, gate = promote_version(
            c,
            artifact.name,
            version,
            max_regression,
            artifact_dir=artifact.directory,
            measure_seconds=measure_seconds,
            log=log,
        )
        where["production"] = f"models:/{artifact.name}@{PRODUCTION} -> v{promoted}"
    return Publication(version, where, gate)

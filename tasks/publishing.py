"""Publish stage: the artifact directory into MLflow (run artifacts + a registered model version)
and, when asked, into S3 with each file's sha256 in its object metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harlflow.core.errors import BadInputError, RegressionError, StoreError
from harlflow.core.hashing import sha256_file
from harlflow.core.targets import target_key
from tasks import tracking
from tasks.packaging import Artifact

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
        if tuned:
            tags["latency_ms"] = f"{tuned['median_ms']:.6g}"
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


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at either end)."""
    u = urlparse(uri)
    if u.scheme != "s3" or not u.netloc:
        raise BadInputError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
    prefix = u.path.strip("/")
    if any(part in ("..", ".") for part in prefix.split("/")):
        raise BadInputError(f"S3 prefix must not contain '.' or '..' segments: {uri!r}")
    return u.netloc, prefix


def s3_client():
    """boto3 S3 client; endpoint and credentials come from the standard AWS variables only.

    botocore retries throttling and 5xx answers itself (standard mode, ``AWS_MAX_ATTEMPTS``);
    :func:`upload_s3` adds its own visible retries for an endpoint that does not answer at all.
    """
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        config=Config(retries={"mode": "standard"}, connect_timeout=5, read_timeout=60),
    )


def s3_attempts() -> int:
    """Attempts per S3 file before giving up (``HARLFLOW_S3_ATTEMPTS``, default 5)."""
    raw = os.environ.get("HARLFLOW_S3_ATTEMPTS", "5")
    if not raw.isdigit() or int(raw) < 1:
        raise BadInputError(f"HARLFLOW_S3_ATTEMPTS must be a positive integer, got {raw!r}")
    return int(raw)


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


def promote_version(c, name: str, version: str, max_regression: float, log=print) -> str:
    """Move the ``production`` alias to ``version`` unless it is slower than the current
    production version on the same target by more than ``max_regression`` (a fraction)."""
    new = c.get_model_version(name, version)
    try:
        cur = c.get_model_version_by_alias(name, PRODUCTION)
    except Exception:  # no production version yet
        cur = None
    if cur is not None and str(cur.version) != str(version):
        if cur.tags.get("target") != new.tags.get("target"):
            log(f"production v{cur.version} is for another target; promoting v{version}")
        else:
            if "latency_ms" not in new.tags:
                raise BadInputError(
                    "promotion needs the new artifact's measured latency: "
                    "do not combine --promote with --no-measure"
                )
            old_ms = float(cur.tags.get("latency_ms", "inf"))
            new_ms = float(new.tags["latency_ms"])
            if new_ms > old_ms * (1 + max_regression):
                msg = (
                    f"{name} v{version} takes {new_ms:.4g} ms, production v{cur.version} "
                    f"{old_ms:.4g} ms on the same target (more than {max_regression:.0%} slower): "
                    f"'{PRODUCTION}' stays on v{cur.version}"
                )
                c.set_model_version_tag(name, version, "promotion", f"refused: {msg}")
                raise RegressionError(msg)
    c.set_registered_model_alias(name, PRODUCTION, version)
    c.set_model_version_tag(name, version, "promotion", "promoted")
    log(f"'{PRODUCTION}' alias -> {name} v{version}")
    return version


@dataclass
class Publication:
    """Where a published artifact went: its registered version and every location."""

    version: str
    """the MLflow registry's version number"""
    locations: dict[str, str]
    """local, s3 (when asked), mlflow (models:/NAME/VERSION), production (when promoted)"""


def publish(
    run_id: str,
    artifact: Artifact,
    s3_uri: str | None,
    *,
    promote: bool = False,
    max_regression: float = 0.05,
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
    if promote:  # the regression gate: a refusal is an answer (RegressionError), not retried
        promoted = promote_version(c, artifact.name, version, max_regression, log=log)
        where["production"] = f"models:/{artifact.name}@{PRODUCTION} -> v{promoted}"
    return Publication(version, where)

"""Pull a packaged artifact from the MLflow registry or from S3, checking every file's sha256.

The download lands in a temporary directory beside ``dest`` and is renamed into place only when
every file matches the manifest: a failed or tampered pull leaves nothing at ``dest``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harlflow.core.errors import BadInputError, IntegrityError, StoreError, first_line
from harlflow.core.hashing import sha256_file

_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*?)(?:@(?P<alias>[\w-]+)|:(?P<version>\d+))?$"
)


def verify_directory(root: Path) -> dict:
    """Check every file listed in ``manifest.json`` against its sha256; no unlisted files."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise IntegrityError(f"{root}: no manifest.json, not a harlflow artifact")
    manifest = json.loads(manifest_path.read_text())
    listed = manifest.get("files") or {}
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    present.discard("manifest.json")
    missing = sorted(set(listed) - present)
    if missing:
        raise IntegrityError(f"artifact is missing files listed in its manifest: {missing}")
    extra = sorted(present - set(listed))
    if extra:
        raise IntegrityError(f"artifact has files its manifest does not list: {extra}")
    for rel, want in listed.items():
        got = sha256_file(root / rel)
        if got != want:
            raise IntegrityError(
                f"sha256 mismatch for {rel}: manifest {want[:12]}…, file {got[:12]}…"
            )
    return manifest


def _place(tmp: Path, dest: Path) -> Path:
    if dest.exists():
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()
        else:
            raise StoreError(f"--dest {dest} already exists and is not empty")
    os.rename(tmp, dest)
    return dest


@contextlib.contextmanager
def _staging(dest: Path, source: str) -> Iterator[Path]:
    """A temporary directory beside ``dest``, removed afterwards whatever happens; unexpected
    errors become one ``StoreError`` naming ``source``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
    try:
        yield tmp
    except (StoreError, BadInputError):
        raise
    except Exception as e:
        raise StoreError(
            f"downloading {source} failed: {type(e).__name__}: {first_line(e)}"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pull_mlflow(ref: str, dest: str | Path) -> Path:
    """``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS`` from the registry into ``dest``."""
    import mlflow

    from tasks.tracking import client

    m = _REF.match(ref)
    if not m:
        raise BadInputError(
            f"bad model reference {ref!r}: expected NAME, NAME:VERSION or NAME@ALIAS"
        )
    c = client()
    name = m["name"]
    try:
        if m["alias"]:
            mv = c.get_model_version_by_alias(name, m["alias"])
        elif m["version"]:
            mv = c.get_model_version(name, m["version"])
        else:
            found = c.search_model_versions(f"name = '{name}'")
            if not found:
                raise StoreError(f"no registered model named {name!r}")
            mv = max(found, key=lambda v: int(v.version))
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(
            f"cannot resolve {ref!r} in the MLflow registry: {type(e).__name__}: {first_line(e)}"
        ) from None
    dest = Path(dest).resolve()
    with _staging(dest, repr(ref)) as tmp:
        mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp))
        root = tmp / Path(mv.source.rstrip("/")).name
        if not root.is_dir():
            root = tmp
        verify_directory(root)
        return _place(root, dest)


def pull_s3(uri: str, dest: str | Path) -> Path:
    """Every object under ``s3://bucket/prefix/`` into ``dest``, checked against the manifest
    and against each object's ``sha256`` metadata."""
    from tasks.s3 import parse_s3_uri, s3_client

    bucket, prefix = parse_s3_uri(uri)
    s3 = s3_client()
    dest = Path(dest).resolve()
    with _staging(dest, uri) as tmp:
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        ):
            keys += [o["Key"] for o in page.get("Contents", [])]
        if not keys:
            raise StoreError(f"nothing found under {uri}")
        for key in keys:
            rel = key[len(prefix) + 1 :]
            target = (tmp / rel).resolve()
            if tmp.resolve() not in target.parents:
                raise IntegrityError(f"object key {key!r} escapes the destination")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, key, str(target))
            meta = s3.head_object(Bucket=bucket, Key=key).get("Metadata", {})
            if "sha256" in meta and meta["sha256"] != sha256_file(target):
                raise IntegrityError(f"sha256 mismatch for s3://{bucket}/{key} (object metadata)")
        verify_directory(tmp)
        return _place(tmp, dest)

"""Model sources for scheduled retuning: a directory or an S3 prefix of ``.onnx`` / ``.pt2`` files,
each with its content hash, and what MLflow says was last optimised for a name and target.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harlflow.core.config import validate_name
from harlflow.core.errors import BadInputError, StoreError
from harlflow.core.hashing import sha256_file

MODEL_SUFFIXES = (".onnx", ".pt2")


@dataclass
class SourceModel:
    """One model file found in a source: its artifact name, local path and content hash."""

    name: str
    path: str
    sha256: str
    origin: str  # where it was found (the file path or s3://bucket/key)


def check_source(source: str) -> None:
    """A source is an existing directory or a well-formed ``s3://bucket/prefix``."""
    if source.startswith("s3://"):
        from tasks.s3 import parse_s3_uri

        parse_s3_uri(source)
    elif not Path(source).is_dir():
        raise BadInputError(f"model source {source!r} is not a directory or an s3:// prefix")


def list_models(source: str, cache_dir: Path) -> list[SourceModel]:
    """Every model file directly in ``source`` (a directory, or ``s3://bucket/prefix``), sorted.

    S3 objects are downloaded under ``cache_dir`` (content-addressed) so that the import stage
    reads a local file; a name that cannot be an artifact name is a :class:`BadInputError`.
    """
    check_source(source)
    if source.startswith("s3://"):
        return _list_s3(source, cache_dir)
    root = Path(source)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES)
    return [
        SourceModel(
            validate_name(p.stem, f"model file name in {source}"),
            str(p.resolve()),
            sha256_file(p),
            str(p),
        )
        for p in files
    ]


def _list_s3(source: str, cache_dir: Path) -> list[SourceModel]:
    from tasks.s3 import parse_s3_uri, s3_client

    bucket, prefix = parse_s3_uri(source)
    s3 = s3_client()
    keys: list[str] = []
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", Delimiter="/"
        )
        for page in pages:
            keys += [
                o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(MODEL_SUFFIXES)
            ]
    except Exception as e:
        raise StoreError(f"listing {source} failed: {type(e).__name__}: {e}") from None
    out = []
    cache_dir.mkdir(parents=True, exist_ok=True)
    for key in sorted(keys):
        stem, suffix = Path(key).stem, Path(key).suffix
        validate_name(stem, f"model object name in {source}")
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=suffix, delete=False) as f:
            tmp = Path(f.name)
        try:
            s3.download_file(bucket, key, str(tmp))
            sha = sha256_file(tmp)
            final = cache_dir / sha[:16] / f"{stem}{suffix}"  # keeps the stem: the default name
            final.parent.mkdir(exist_ok=True)
            tmp.replace(final)
        except Exception as e:
            raise StoreError(f"downloading s3://{bucket}/{key} failed: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        out.append(SourceModel(stem, str(final), sha, f"s3://{bucket}/{key}"))
    return out


def last_optimised(c, name: str, target: dict[str, Any]) -> dict[str, str] | None:
    """The newest registered version of ``name`` for ``target``: its version and source hash.

    Published versions carry ``source_sha256`` and ``target`` tags (see ``tasks.publishing``);
    this is the record retuning compares a model's current content against.
    """
    from tasks.publishing import target_tag

    try:
        versions = c.search_model_versions(f"name = '{name}'")
    except Exception as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e):
            return None
        raise StoreError(f"reading registered model {name} from MLflow failed: {e}") from None
    want = target_tag(target)
    mine = [v for v in versions if v.tags.get("target") == want and "source_sha256" in v.tags]
    if not mine:
        return None
    newest = max(mine, key=lambda v: int(v.version))
    return {"version": str(newest.version), "source_sha256": newest.tags["source_sha256"]}

"""S3 access shared by the stages that read and write it (publishing, pulling, sources): the
URI format and a boto3 client configured from the standard AWS variables."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from harlflow.core.errors import BadInputError


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

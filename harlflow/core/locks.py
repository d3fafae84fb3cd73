"""Cross-process file locks (``flock``) for stores that several harlflow runs share."""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("harlflow")


@contextlib.contextmanager
def file_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing); says so when it has to wait.

    The lock dies with its process, so a run killed with ``kill -9`` never blocks the next one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another run to release %s", what)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield

"""Errors meant for users: each message names the file, operator or value at fault.

The CLI turns any :class:`HarlflowError` into one line on stderr and a non-zero exit code
(``exit_code`` below), never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class HarlflowError(Exception):
    """Base of every error harlflow reports to a user."""

    exit_code = 1


class ModelImportError(HarlflowError):
    """The model could not be read, checked or converted."""

    exit_code = 2


class BadInputError(HarlflowError, ValueError):
    """A command-line value or argument is malformed (a target, an input spec, a name)."""

    exit_code = 2


class IndexRangeError(BadInputError):
    """An index the caller sent (a token id, a position) lies outside what the model indexes:
    the compiled model refused it instead of reading outside a buffer."""


INDEX_CHECK_PREFIX = "harlflow index check"
"""How the index checks compiled into an artifact start their error (``harl.index_guard``)."""


class TuningError(HarlflowError):
    """Task extraction, tuning or compilation failed."""

    exit_code = 3


class MeasurementError(TuningError):
    """A measuring worker could not load or run its runtime (exit 3, as tuning's failures)."""


class VerificationError(HarlflowError):
    """The compiled artifact's outputs do not match the reference: it is not packaged."""

    exit_code = 4


class StoreError(HarlflowError):
    """Writing, publishing or pulling an artifact failed (local disk, MLflow, S3)."""

    exit_code = 5


class RegressionError(HarlflowError):
    """The new artifact is slower than the current production version: it is not promoted."""

    exit_code = 6

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details
        """the regression gate's record (both latencies, the ratio and its interval)"""

    def __reduce__(self):  # keep the record when Prefect hands the exception across processes
        return (type(self), (str(self), self.details))


class IntegrityError(StoreError):
    """A file's sha256 does not match its manifest entry."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The line of an exception's message that says what went wrong; never empty, never raises.

    Most messages lead with it. A message that carries a traceback (``Traceback ...`` first, as
    some of TVM's do) ends with it. An empty message gives the exception's type name.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line[:limit]


@contextlib.contextmanager
def loading(path: str | Path, kind: str) -> Iterator[None]:
    """Any failure while loading ``path``, a saved ``kind`` (e.g. "HARL agent"), becomes one
    :class:`BadInputError` naming the file: "<kind> file not found: PATH", or "PATH is not a
    <kind>: <what went wrong>" for a corrupt or mismatched one."""
    try:
        yield
    except FileNotFoundError:
        raise BadInputError(f"{kind} file not found: {path}") from None
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(f"{path} is not a {kind}: {first_line(e)}") from None

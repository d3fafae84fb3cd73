"""TVM's C++ warnings counted and reported once per kind, not once per compile.

TVM writes its warnings (``[09:12:01] /project/include/tvm/topi/transform.h:1261: Warning: Fast
mode segfaults when ...``) straight to the process's stderr, one per compile: pricing rewrite
candidates printed the same one about 20 times and buried harlflow's own progress lines.
:func:`collected` points file descriptor 2 at a temporary file for the duration of a stage and
forwards every other line as it arrives (harlflow's progress, Prefect's log, tracebacks), so
nothing else is lost or held back; each kind of TVM warning is shown the first time, counted,
and reported at the end with its count. harlflow's own repeated warnings (a logging message of
``harl.compilation``, e.g. ConvertLayout's, once per priced candidate) are counted the same
way.

Build and measure workers started inside the block inherit the descriptor: their TVM warnings
are counted too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator

# "[hh:mm:ss] /path/file.h:123: Warning: message"
TVM_LINE = re.compile(rb"^\[\d\d:\d\d:\d\d\] (\S+): (Warning|Info): (.*)$")


class _Repeats(logging.Filter):
    """Lets each message of a logger through once; counts it every time."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = record.getMessage()
        self.counts[key] += 1
        return self.counts[key] == 1


@contextlib.contextmanager
def collected(
    log: Callable[[str], None] = print, loggers: tuple[str, ...] = ("harl.compilation",)
) -> Iterator[Counter]:
    """Count TVM's warnings (and repeated warnings of ``loggers``) inside the block; yields the
    counter (message → count) and logs one line per kind that came more than once at the end."""
    counts: Counter = Counter()
    repeats = _Repeats(counts)
    for name in loggers:
        logging.getLogger(name).addFilter(repeats)
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to tidy
        saved = None
    if saved is None:
        try:
            yield counts
        finally:
            for name in loggers:
                logging.getLogger(name).removeFilter(repeats)
        return
    # writers append through descriptor 2; the reader has a descriptor (and offset) of its own
    fd, path = tempfile.mkstemp(prefix="harlflow-stderr-")
    os.close(fd)
    writer = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.dup2(writer, 2)
    os.close(writer)
    done = threading.Event()
    seen: set[bytes] = set()

    def forward(chunk: bytes, partial: bytes) -> bytes:
        lines = (partial + chunk).split(b"\n")
        for line in lines[:-1]:
            m = TVM_LINE.match(line)
            if m is None:
                os.write(saved, line + b"\n")
                continue
            kind = m.group(3).strip()
            counts[kind.decode(errors="replace")] += 1
            if kind not in seen:  # the first of each kind as it comes
                seen.add(kind)
                os.write(saved, line + b"\n")
        return lines[-1]

    def tail() -> None:
        partial = b""
        with open(path, "rb") as reader:
            while True:
                finished = done.wait(0.2)
                chunk = reader.read()
                if chunk:
                    partial = forward(chunk, partial)
                if finished:
                    if partial:
                        forward(b"\n", partial)
                    return

    thread = threading.Thread(target=tail, name="harlflow-tvmlog", daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        done.set()
        thread.join(timeout=5)
        os.close(saved)
        os.unlink(path)
        for name in loggers:
            logging.getLogger(name).removeFilter(repeats)
        for kind, n in counts.items():
            if n > 1:
                log(f"warned {n} times (shown once): {kind}")


def collecting(fn):
    """``fn`` (a stage function taking ``log=``) with :func:`collected` around it."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, log: Callable[[str], None] = print, **kwargs):
        with collected(log):
            return fn(*args, log=log, **kwargs)

    return wrapper

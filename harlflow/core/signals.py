"""Stopping on request: SIGINT (Ctrl-C) and SIGTERM (a Prefect cancellation, a CI timeout,
``docker stop``) end a harlflow command within seconds, whatever it is doing.

:func:`install` makes both signals raise :class:`Interrupted` in the main thread (a
``KeyboardInterrupt``, so no ``except Exception`` swallows it), which unwinds through the
stages: MLflow runs are ended KILLED (``tasks.tracking.run``), every measured trial is already in
the tuning database (it commits per trial). The CLI then ends every child process (build and
measure workers, Prefect's temporary server) and exits 128 + the signal's number: 130 or 143.

A signal that arrives inside a long TVM call is delivered when the call returns to Python, and
TVM may hand it back as an ordinary error, which a handler that skips failed candidates would
take for one: such handlers call :func:`check` first. If the process has still not exited
:data:`GRACE_S` seconds after the signal (a C++ call that does not return), a watchdog ends the
children and the process itself with the same exit code; a second signal does so at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

GRACE_S = 10.0
_requested: int | None = None
_arrivals = 0  # stop signals seen on the wake-up pipe
_handled = 0  # of those, the ones that reached our handler
_installed = False


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; exits with ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def requested() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _requested


def check() -> None:
    """Raise :class:`Interrupted` if a stop was requested (for handlers that swallow errors)."""
    if _requested is not None:
        raise Interrupted(_requested)


def end_children(timeout: float = 3.0) -> int:
    """Terminate every descendant process, then kill what is left after ``timeout`` seconds;
    returns how many there were."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for p in children:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return len(children)


def _hard_exit(signum: int) -> None:
    end_children(timeout=1.0)
    sys.stderr.write(
        f"harlflow: stopped by {signal.Signals(signum).name} without unwinding (a second "
        f"signal, or still running {GRACE_S:.0f} s after the first); the MLflow runs are "
        "closed KILLED by the next run\n"
    )
    sys.stderr.flush()
    os._exit(128 + signum)


def _arrived(signum: int) -> None:
    """A stop signal arrived (read from the wake-up pipe, whichever Python handler ran): the
    first starts the watchdog."""
    global _requested, _arrivals
    _arrivals += 1
    if _requested is None:
        _requested = signum
    if _arrivals == 1:
        watchdog = threading.Timer(GRACE_S, _hard_exit, args=(signum,))
        watchdog.daemon = True
        watchdog.start()


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        for signum in data:
            if signum in (signal.SIGINT, signal.SIGTERM):
                _arrived(signum)


def _handler(signum: int, _frame) -> None:
    """Raise :class:`Interrupted`; the second time (a user insisting), exit at once. Prefect's
    SIGTERM bridge re-sends the signal once it has handled it: that reaches here once."""
    global _requested, _handled
    _handled += 1
    if _requested is None:
        _requested = signum
    if _handled > 1:
        _hard_exit(signum)
    raise Interrupted(signum)


def install() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only; a no-op elsewhere).

    Their arrival is also counted from the interpreter's wake-up pipe by a thread of its own, so
    the watchdog starts even when another handler (Prefect replaces SIGTERM's during a flow run)
    turned the signal into an exception that TVM then handed back as an ordinary error."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    _installed = True
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _handler)
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(r,), name="harlflow-signals", daemon=True).start()

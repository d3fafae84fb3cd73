"""Where trials are measured: on this machine (``LocalRunner``) or on TVM RPC servers registered
with a tracker (``RPCRunner``), given as ``HOST:PORT:KEY``.

Starting the tracker and servers is TVM's job (see the README, "Running in production")::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
    python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key KEY   # on each device

A trial whose server dies fails (recorded as a failed measurement, as MetaSchedule does) and the
next trials go to the servers that remain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harlflow.core.errors import BadInputError, TuningError, first_line

_SPEC = re.compile(
    r"^(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5}):(?P<key>[\w.\-]+)$"
)


@dataclass(frozen=True)
class RPCSpec:
    """A tracker address and the key its servers registered under."""

    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.key}"


def parse_rpc(spec: str) -> RPCSpec:
    """``HOST:PORT:KEY`` → :class:`RPCSpec`; a malformed value is a :class:`BadInputError`."""
    m = _SPEC.match(spec or "")
    if not m or not 0 < int(m["port"]) < 65536:
        raise BadInputError(
            f"invalid --rpc {spec!r}: expected HOST:PORT:KEY, e.g. 127.0.0.1:9190:cpu-local"
        )
    return RPCSpec(m["host"].strip("[]"), int(m["port"]), m["key"])


def _config(spec: RPCSpec, session_timeout_sec: int):
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.RPCConfig(
        tracker_host=spec.host,
        tracker_port=spec.port,
        tracker_key=spec.key,
        session_timeout_sec=session_timeout_sec,
    )


def count_servers(spec: RPCSpec, timeout_sec: int = 10) -> int:
    """Servers registered with the tracker under ``spec.key``; unreachable tracker → TuningError."""
    import socket

    try:  # TVM's own connect retries for a minute and prints a thread's traceback: probe first
        socket.create_connection((spec.host, spec.port), timeout=timeout_sec).close()
    except OSError as e:
        raise TuningError(
            f"RPC tracker {spec.host}:{spec.port} is unreachable: {e.strerror or e}"
        ) from None
    try:
        return _config(spec, timeout_sec).count_num_servers(allow_missing=True)
    except Exception as e:
        raise TuningError(
            f"RPC tracker {spec.host}:{spec.port} is unreachable: {first_line(e)}"
        ) from None


def rpc_runner(spec: RPCSpec | str, *, session_timeout_sec: int = 60):
    """An ``RPCRunner`` with one connection per registered server (checked now, not mid-run)."""
    from tvm.s_tir import meta_schedule as ms

    from harl._fast_import import import_tensor_intrinsics

    spec = parse_rpc(spec) if isinstance(spec, str) else spec
    servers = count_servers(spec)
    if servers == 0:
        raise TuningError(
            f"no RPC server is registered with the tracker {spec.host}:{spec.port} under key "
            f"{spec.key!r} (start one: python -m tvm.exec.rpc_server --tracker "
            f"{spec.host}:{spec.port} --key {spec.key})"
        )
    return ms.runner.RPCRunner(
        rpc_config=_config(spec, session_timeout_sec),
        evaluator_config=evaluator_config(),
        max_workers=servers,
        initializer=import_tensor_intrinsics,
    )


# One trial's timing: MetaSchedule's default is number=3, repeat=1, min_repeat_ms=100, i.e. one
# mean over >= 100 ms. Two repeats of >= 40 ms cost 0.11-0.12 s per measurement against 0.20 s
# (bench/trial_profile.py --noise), but their spread across re-measurements of the same kernels
# was less even: a coefficient of variation of 0.03, 0.16 and 0.23 in three runs against 0.022 for
# the default. The end-to-end results in the README were tuned with these settings; whether the
# default's steadier ranking buys more than its extra 0.08 s per trial is still to be measured.
EVALUATOR = {"number": 3, "repeat": 2, "min_repeat_ms": 40, "enable_cpu_cache_flush": False}


def evaluator_config():
    """MetaSchedule's ``EvaluatorConfig`` for :data:`EVALUATOR`."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(**EVALUATOR)


def make_runner(rpc: str | None, target: dict | None = None):
    """The runner for ``--rpc`` (None: this machine's ``LocalRunner``, one persistent worker).

    Give the ``target`` when the runner is made before :func:`harl.tuning.tune` runs: its worker
    process starts now and must inherit the target's thread count (``use_target_threads``).
    """
    if target is not None:
        from harlflow.core.targets import use_target_threads

        use_target_threads(target)
    if rpc:
        return rpc_runner(rpc)
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.LocalRunner(evaluator_config=evaluator_config())

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
        f_alloc_argument=RPC_ALLOC,
        max_workers=servers,
        initializer=_rpc_worker_init,
    )


def _rpc_worker_init() -> None:
    """An RPC runner worker (on this machine, driving a remote server): the tensor intrinsics,
    and the argument fills of :func:`alloc_arguments` (the remote allocates, this side fills)."""
    from harl._fast_import import import_tensor_intrinsics

    import_tensor_intrinsics()
    register_fills()


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


LOCAL_ALLOC = "harl.runners.alloc_arguments"
RPC_ALLOC = "harl.runners.alloc_arguments_rpc"
FILL_SEED = 0
"""Every candidate of a task is measured on the same argument values."""


def alloc_arguments(device, args_info, alloc_repeat: int, *, empty=None, fill_float=None) -> list:
    """MetaSchedule's argument allocation for a measurement, with values a model could hold.

    MetaSchedule fills every tensor with ``random_fill_for_measure``: floats uniform in [1, 10],
    but every ``bool`` True and every int32/int64 a float's bit pattern (4.6e18 as a token id).
    An all-True attention mask measured the causal-mask kernel of ``bench/families.py``'s GPT
    decoder (``matmul / sqrt(d)``, then ``where(mask, -inf, ...)``) at 3.3 µs for a schedule that
    takes 51-56 µs on random bits (on one thread: 104 µs, on random bits as on the model's causal
    mask). The search kept such schedules, and the decoder's artifact got slower the longer it
    was tuned (0.65× onnxruntime after 1 minute, 0.92× after 20; 0.60× after 20 with these
    fills). Here bools are random bits and integers are drawn from [1, 8] (small, non-zero: an
    index stays near the front of its table, a divisor is never 0); floats are filled as
    MetaSchedule fills them. Seeded (:data:`FILL_SEED`), so that every candidate of a task runs
    on the same values.

    ``args_info``: MetaSchedule's JSON form, ``["TENSOR", dtype, shape]`` per argument.
    ``empty(shape, dtype)`` and ``fill_float(tensor)`` allocate and fill on the measuring device
    (default: this process's ``device``).
    """
    import numpy as np
    import tvm

    if empty is None:
        empty = lambda shape, dtype: tvm.runtime.empty(shape, dtype, device)  # noqa: E731
    if fill_float is None:
        fill_float = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")
    rng = np.random.default_rng(FILL_SEED)
    repeated = []
    for _ in range(alloc_repeat):
        args = []
        for info in args_info:
            kind, dtype, shape = info[0], str(info[1]), [int(d) for d in info[2]]
            if kind != "TENSOR":
                raise NotImplementedError(f"cannot allocate a {kind} argument for measurement")
            t = empty(shape, dtype)
            if dtype == "bool":
                t.copyfrom(rng.random(shape) < 0.5)
            elif dtype.startswith(("int", "uint")):
                t.copyfrom(rng.integers(1, 9, size=shape).astype(dtype))
            else:
                fill_float(t)
            args.append(t)
        repeated.append(args)
    return repeated


def _alloc_rpc(session, device, args_info, alloc_repeat: int) -> list:
    """:func:`alloc_arguments` on an RPC server's device: allocated there, bools and integers
    copied from here, floats filled by the server's ``random_fill_for_measure``."""
    import tvm

    return alloc_arguments(
        device,
        args_info,
        alloc_repeat,
        empty=lambda shape, dtype: tvm.runtime.empty(shape, dtype, device),
        fill_float=session.get_function("tvm.contrib.random.random_fill_for_measure"),
    )


def register_fills() -> None:
    """Register the allocation functions under :data:`LOCAL_ALLOC` and :data:`RPC_ALLOC`: the
    runner's worker processes look them up by name (idempotent)."""
    import tvm

    tvm.register_global_func(LOCAL_ALLOC, alloc_arguments, override=True)
    tvm.register_global_func(RPC_ALLOC, _alloc_rpc, override=True)


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

    return ms.runner.LocalRunner(
        evaluator_config=evaluator_config(),
        f_alloc_argument=LOCAL_ALLOC,
        initializer=register_fills,
    )

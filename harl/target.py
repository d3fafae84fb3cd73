"""Targets are TVM target dicts; ``"cpu"``/``"host"`` resolve to this host's real llvm target."""

from __future__ import annotations

import json
import os
from typing import Any

from harlflow.errors import BadInputError

HOST_SHORTHANDS = ("cpu", "host", "llvm")


def host_target() -> dict[str, Any]:
    """The host's llvm target with its real ``mcpu`` and the cores this process may use.

    Without ``mcpu`` LLVM emits generic x86-64 code (no AVX-512), so the shorthand always
    carries it.
    """
    from tvm.target import codegen

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "kind": "llvm",
        "mcpu": str(codegen.llvm_get_system_cpu()),
        "num-cores": int(cores or 1),
    }


def resolve_target(spec: str | dict[str, Any] | None) -> dict[str, Any]:
    """Turn ``None``, a shorthand, a JSON string or a dict into a validated TVM target dict."""
    import tvm

    if spec is None or (isinstance(spec, str) and spec.strip().lower() in HOST_SHORTHANDS):
        target = host_target()
    elif isinstance(spec, dict):
        target = dict(spec)
    elif isinstance(spec, str) and spec.strip().startswith("{"):
        try:
            target = json.loads(spec)
        except json.JSONDecodeError as e:
            raise BadInputError(f"--target is not valid JSON ({e.msg}): {spec!r}") from None
        if not isinstance(target, dict):
            raise BadInputError(f"--target must be a JSON object, got {spec!r}")
    else:
        raise BadInputError(
            f"unknown target {spec!r}: give a TVM target dict as JSON, e.g. "
            '\'{"kind": "llvm", "mcpu": "znver5", "num-cores": 2}\', or one of '
            f"{', '.join(HOST_SHORTHANDS)}"
        )
    if target.get("kind") == "llvm" and "num-cores" not in target:
        target["num-cores"] = host_target()["num-cores"]
    try:
        tvm.target.Target(target)
    except Exception as e:  # TVM raises its own error types for unknown kinds/attributes
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise BadInputError(f"invalid TVM target {json.dumps(target)}: {first}") from None
    return target


def use_target_threads(target: dict[str, Any]) -> None:
    """Size TVM's runtime thread pool to the target's cores, unless ``TVM_NUM_THREADS`` is set.

    TVM reads ``TVM_NUM_THREADS`` when its pool first starts (and processes it spawns, such as
    MetaSchedule's runner worker, inherit it). Left alone on our 2-vCPU machines the pool ran
    kernels on one thread: a tuned 3×3 convolution took 2.3 ms against 1.16 ms with
    ``TVM_NUM_THREADS=2`` (``bench/trial_profile.py``). Tuning, verification and deployment
    must all run the target's core count, or the schedules are chosen for the wrong machine.
    """
    if target.get("kind", "llvm") == "llvm" and "num-cores" in target:
        os.environ.setdefault("TVM_NUM_THREADS", str(int(target["num-cores"])))

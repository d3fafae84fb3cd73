"""Targets are TVM target dicts; ``"cpu"``/``"host"`` resolve to this host's real llvm target."""

from __future__ import annotations

import json
import os
from typing import Any

from harlflow.errors import BadInputError

HOST_SHORTHANDS = ("cpu", "host", "llvm")


def host_target() -> dict[str, Any]:
    """The host's llvm target with its real ``mcpu`` and the cores this process may use.

    Without ``mcpu`` LLVM emits generic x86-64 code (ENVIRONMENT.md: 105 vs ~475 GFLOP/s on a
    tuned 512³ matmul), so the shorthand always carries it.
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

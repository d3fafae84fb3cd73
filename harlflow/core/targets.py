"""Targets are TVM target dicts; ``"cpu"``/``"host"`` resolve to this host's real llvm target.

Also the one notion of "the same target" (:func:`target_key`) that the tuning database and the
model registry both use, and the one rule for TVM's thread count (:func:`use_target_threads`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from harlflow.core.errors import BadInputError, first_line

HOST_SHORTHANDS = ("cpu", "host", "llvm")
SUPPORTED_KINDS = ("llvm",)  # what harlflow tunes, measures and packages (CPU artifacts)
# the parts of a target that decide code generation; the rest (keys, tags, defaults) does not
_KEY_FIELDS = ("kind", "mcpu", "mtriple", "mattr", "num-cores", "arch", "device")


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
    """Turn ``None``, a shorthand, a JSON string or a dict into a validated TVM target dict.

    A kind harlflow does not package for, or one this TVM build cannot compile for (the PyPI
    wheel has no CUDA), is a :class:`BadInputError` here, before any work or store is touched.
    """
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
    kind = target.get("kind")
    if kind is None:
        raise BadInputError(f'--target {json.dumps(target)} has no "kind" (e.g. "llvm")')
    if kind not in SUPPORTED_KINDS:  # checked before TVM parses it (cuda's parser warns on stderr)
        if kind not in tvm.target.Target.list_kinds():
            raise BadInputError(f"invalid TVM target {json.dumps(target)}: no target kind {kind!r}")
        if not _can_compile(kind):
            why = f"this TVM build cannot compile for {kind!r} (it has no {kind} code generator)"
        else:
            why = "harlflow tunes, measures and packages CPU (llvm) targets only"
        raise BadInputError(f"unsupported --target kind {kind!r}: {why}")
    try:
        tvm.target.Target(target)
    except Exception as e:  # TVM raises its own error types for unknown kinds/attributes
        raise BadInputError(f"invalid TVM target {json.dumps(target)}: {first_line(e)}") from None
    return target


def _can_compile(kind: str) -> bool:
    """Whether this TVM build has a code generator for targets of ``kind``."""
    import tvm

    return tvm.get_global_func(f"target.build.{kind}", allow_missing=True) is not None


def target_key(target: dict[str, Any]) -> str:
    """The canonical form of a target for "is this the same target?": the fields that decide
    code generation, as sorted JSON. Accepts a target dict or a TVM ``Target.export()``."""
    keep = {}
    for k in _KEY_FIELDS:
        v = target.get(k)
        if v is None or (isinstance(v, (list, tuple, str)) and len(v) == 0):
            continue  # absent and empty are the same: export() fills in empty defaults
        keep[k] = list(v) if isinstance(v, (list, tuple)) else v
    return json.dumps(keep, sort_keys=True)


def use_target_threads(target: dict[str, Any]) -> None:
    """Size TVM's runtime thread pool to the target's cores, unless ``TVM_NUM_THREADS`` is set.

    TVM reads ``TVM_NUM_THREADS`` when its pool first starts (and processes it spawns, such as
    MetaSchedule's runner worker, inherit it). Left alone on our 2-vCPU machines the pool ran
    kernels on one thread: a tuned 3×3 convolution took 2.3 ms against 1.16 ms with
    ``TVM_NUM_THREADS=2`` (``bench/trial_profile.py``). Tuning, verification and deployment
    must all run the target's core count, or the schedules are chosen for the wrong machine.
    Set it yourself before loading an artifact to run with another count.
    """
    if target.get("kind", "llvm") == "llvm" and target.get("num-cores"):
        os.environ.setdefault("TVM_NUM_THREADS", str(int(target["num-cores"])))

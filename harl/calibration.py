"""What a target charges for a kernel, measured once per target and kept in the tuning store.

The rewrite stage prices graphs before anything is tuned (``tasks.rewrite_oracle``). A flat
roofline, one FLOP rate for every matrix product and one bandwidth for every copy, cannot see
what decides a rewrite such as merging three Q/K/V projections into one GEMM: a GEMM three
times wider runs at a higher FLOP rate than three narrow ones (the micro-kernel's tiles fill
up, the two cores split more rows), and every kernel call costs the VM a launch. A
:class:`TargetProfile` measures those three things on this target:

- ``gemm``: seconds of a matrix product ``[M, K] @ [K, N]`` (the weight constant, prepacked as
  the artifact prepacks it) on a grid of shapes, each compiled with the schedule a kernel gets
  before it is measured (``harl.sampling.fallback_trace``: parallel, vectorised, register
  blocked), so that a FLOP rate for any shape can be read off by interpolation;
- ``copy``: seconds of an element-wise kernel over tensors of a few sizes (the achieved
  bandwidth falls as a tensor leaves the caches);
- ``launch_s``: the VM's cost per kernel call, from a chain of tiny matrix products (two
  matrix products never fuse, so each is a kernel of its own).

Each is compiled as the pipeline compiles a model and timed in this process through the Relax
VM (``time_evaluator``: the fastest of seven repeats of 20 ms or more; other work on a shared
machine only slows a repeat down), so every time includes the VM's call;
there is one runtime in the process, so its thread pool has the cores to itself. The grid takes
about 10 s on a 2-core host. :func:`load_or_measure` keeps the profile beside the tuning records
(``target-profile-<hash>.json``), and a copy in the machine's cache
(``harlflow.core.config.machine_cache_dir``) so that another home on the same machine and target
does not measure it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harlflow.core.files import replacing
from harlflow.core.locks import file_lock
from harlflow.core.targets import target_key

log = logging.getLogger("harl.calibration")

VERSION = 2
"""bumped when what a profile measures changes: an older profile is measured again"""
GEMM_GRID = {"m": (1, 32, 512), "n": (32, 128, 512, 2048), "k": (64, 512)}
"""the matrix products measured (every combination): rows, output columns, reduction length"""
COPY_BYTES = (16 << 10, 256 << 10, 4 << 20, 32 << 20)
"""sizes of the element-wise kernel's input (its output is as large)"""
CHAIN = 32
"""tiny kernels in the chain that prices a launch"""


@dataclass(frozen=True)
class TargetProfile:
    """Measured costs of one target (module docstring); :meth:`flat` before any measurement."""

    target: str
    launch_s: float
    gemm: tuple[tuple[int, int, int, float], ...]  # (m, n, k, seconds)
    copy: tuple[tuple[int, float], ...]  # (bytes read and written, seconds)
    version: int = VERSION
    measured: bool = True

    @classmethod
    def flat(cls, target: dict[str, Any], peak: float, bandwidth: float, launch_s: float):
        """One FLOP rate and one bandwidth for every kernel: the oracle's estimate when no
        measurement is wanted (a graph priced without a store)."""
        gemm = tuple(
            (m, n, k, 2.0 * m * n * k / peak)
            for m in GEMM_GRID["m"]
            for n in GEMM_GRID["n"]
            for k in GEMM_GRID["k"]
        )
        copy = tuple((b, b / bandwidth) for b in COPY_BYTES)
        return cls(target_key(target), launch_s, gemm, copy, measured=False)

    def gemm_rate(self, m: float, n: float, k: float) -> float:
        """FLOP/s of an ``[m, k] @ [k, n]`` product: the grid's rates interpolated linearly in
        log space along each axis (clamped at the grid's edges)."""
        axes = [sorted({g[i] for g in self.gemm}) for i in range(3)]
        rate = {(g[0], g[1], g[2]): 2.0 * g[0] * g[1] * g[2] / g[3] for g in self.gemm}
        corners = [_bracket(ax, x) for ax, x in zip(axes, (m, n, k), strict=True)]
        log_rate = sum(
            wm * wn * wk * math.log(rate[(mm, nn, kk)])
            for mm, wm in corners[0]
            for nn, wn in corners[1]
            for kk, wk in corners[2]
        )
        return math.exp(log_rate)

    @property
    def peak(self) -> float:
        """The highest FLOP/s any measured GEMM reached."""
        return max(2.0 * m * n * k / s for m, n, k, s in self.gemm)

    def bandwidth(self, moved: float) -> float:
        """Bytes/s of a memory-bound kernel that reads and writes ``moved`` bytes in all."""
        sizes = [b for b, _ in self.copy]
        rate = {b: b / s for b, s in self.copy}
        return math.exp(sum(w * math.log(rate[b]) for b, w in _bracket(sizes, moved)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TargetProfile:
        d = json.loads(text)
        return cls(
            d["target"],
            float(d["launch_s"]),
            tuple((int(m), int(n), int(k), float(s)) for m, n, k, s in d["gemm"]),
            tuple((int(b), float(s)) for b, s in d["copy"]),
            int(d["version"]),
            bool(d.get("measured", True)),
        )


def _bracket(axis: list, x: float) -> list[tuple[Any, float]]:
    """The grid points around ``x`` on ``axis`` with their linear weights in log space."""
    x = min(max(x, axis[0]), axis[-1])
    for lo, hi in zip(axis, axis[1:], strict=False):
        if x <= hi:
            t = (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return [(lo, 1.0 - t), (hi, t)]
    return [(axis[-1], 1.0)]


def profile_path(store: str | Path, target: dict[str, Any]) -> Path:
    from harl.database import local_dir  # a SQL store's profiles live on each machine

    digest = hashlib.sha256(target_key(target).encode()).hexdigest()[:12]
    return local_dir(store) / f"target-profile-{digest}.json"


def load_or_measure(store: str | Path, target: dict[str, Any],
                    machine_cache: str | Path | None = None) -> TargetProfile:  # fmt: skip
    """The store's profile of ``target``; else the machine cache's (copied into the store);
    else measured now and saved in both. A profile for another target or an older version is
    not used; an unreadable one is measured again, with a warning."""
    path = profile_path(store, target)
    cached = profile_path(machine_cache, target) if machine_cache is not None else None
    key = target_key(target)
    with file_lock(path.with_suffix(".lock"), f"the target profile {path}"):
        profile = _read(path, key)
        if profile is None and cached is not None:
            with file_lock(cached.with_suffix(".lock"), f"the target profile {cached}"):
                profile = _read(cached, key) or measure(target)
                _write(cached, profile)
        profile = profile or measure(target)
        _write(path, profile)
        return profile


def _read(path: Path, key: str) -> TargetProfile | None:
    if not path.is_file():
        return None
    try:
        profile = TargetProfile.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s): measuring the target again", path, e)
        return None
    return profile if profile.version == VERSION and profile.target == key else None


def _write(path: Path, profile: TargetProfile) -> None:
    if _read(path, profile.target) != profile:
        with replacing(path) as tmp:
            tmp.write_text(profile.to_json())


def measure(target: dict[str, Any]) -> TargetProfile:
    """Measure ``target`` on this machine (module docstring): the shapes of :data:`GEMM_GRID`,
    the sizes of :data:`COPY_BYTES`."""
    import numpy as np

    grid, copy_bytes = GEMM_GRID, COPY_BYTES
    started = time.perf_counter()
    shapes = [(m, n, k) for m in grid["m"] for n in grid["n"] for k in grid["k"]]
    log.info(
        "measuring what this target charges per kernel (once per store): %d GEMM shapes, "
        "%d copies, the VM's launch",
        len(shapes),
        len(copy_bytes),
    )
    rng = np.random.default_rng(0)
    gemm = []
    for m, n, k in shapes:
        w = rng.standard_normal((k, n)).astype("float32")
        gemm.append((m, n, k, _time(target, "matmul", (m, k), w)))
    copy = []
    for b in copy_bytes:
        copy.append((2 * b, _time(target, "add", (b // 4,))))
    one = _time(target, "chain", (1, 16), links=1)
    many = _time(target, "chain", (1, 16), links=CHAIN)
    launch = max((many - one) / (CHAIN - 1), 1e-8)
    log.info("target measured in %.1f s", time.perf_counter() - started)
    return TargetProfile(target_key(target), launch, tuple(gemm), tuple(copy))


def _module(kind: str, shape: tuple[int, ...], weight=None, links: int = 1):
    """A one-function Relax module: ``matmul`` (input @ constant ``weight``), ``add`` (input +
    1) or ``chain`` (``links`` products with a constant 16 x 16 matrix in a row)."""
    import numpy as np
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind == "matmul":
                y = bb.emit(relax.op.matmul(x, relax.const(weight)))
            elif kind == "add":
                y = bb.emit(relax.op.add(x, relax.const(np.float32(1.0))))
            else:
                y = x
                for i in range(links):
                    w = np.eye(shape[-1], dtype="float32") * np.float32(1.0 - i * 1e-3)
                    y = bb.emit(relax.op.matmul(y, relax.const(w)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _time(target: dict[str, Any], kind: str, shape: tuple[int, ...], weight=None,
          links: int = 1) -> float:  # fmt: skip
    """Seconds per call of :func:`_module`'s ``main`` on ``shape`` (the fastest repeat),
    compiled as the pipeline compiles it with every kernel given its fallback schedule."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from harl import compilation

    prepared = compilation.prepare(_module(kind, shape, weight, links))
    tasks = compilation.extract_tasks(prepared, target)
    none = ms.database.MemoryDatabase(module_equality="structural")  # every kernel: fallback
    mem, _ = compilation.compile_database(none, tasks, target, seed=0)
    ex = compilation.compile_module(prepared, target, mem)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(np.ones(shape, dtype="float32"))]
    timer = vm.time_evaluator("main", dev, number=1, repeat=7, min_repeat_ms=20)
    return float(np.min(timer(*args).results))  # the machine's noise only ever slows a repeat

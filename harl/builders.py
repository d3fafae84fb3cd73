"""Where candidates are compiled: one pool of build workers that lives for a whole tuning run.

MetaSchedule's ``LocalBuilder`` starts a new ``PopenPoolExecutor`` on every ``build()`` call, i.e.
every search round, and each new worker re-imports TVM (~3 s on our 2-core machines, measured in
``bench/trial_profile.py``). Its default export writes a ``.tar`` of object files that the single
runner worker then links with ``cc``, serially. :class:`PersistentBuilder` keeps its workers
across rounds and exports a ready-linked shared object in the parallel workers, so the runner
only ``dlopen``\\ s it. A worker that dies (a compiler crash, the OOM killer) is restarted and
the candidate it was building gets one more try; a second death fails only that candidate.

Use it through :func:`persistent_builder` (or call :meth:`close`): the workers end with the run,
also when the run fails or is interrupted; if the parent is killed, each worker exits when its
pipe closes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from harl._fast_import import import_tensor_intrinsics

BUILD_TIMEOUT_S = 60.0  # the most one candidate's build may take
BUILD_BUDGET_SHARE = 0.05  # under a --time-budget: this share of it, ...
MIN_BUILD_TIMEOUT_S = 10.0  # ... but never less (a normal build takes 0.3-3 s)


def build_shared_object(mod, target) -> str:
    """Compile one candidate (MetaSchedule's default build) and export a linked ``.so``.

    Runs in a build worker. The directory it creates is removed by MetaSchedule's
    ``RemoveBuildArtifact`` callback (or by :func:`harl.warmup.measure_random`) after the run.
    """
    rt_mod = default_build(mod, target, None)
    path = os.path.join(tempfile.mkdtemp(prefix="harl-build-"), "candidate.so")
    rt_mod.export_library(path)
    return path


def build_tar(mod, target) -> str:
    """MetaSchedule's default build and ``.tar`` export (for RPC devices that link themselves)."""
    return default_export(default_build(mod, target, None))


@derived_object
class PersistentBuilder(ms.builder.PyBuilder):
    """A MetaSchedule builder whose worker pool lives until :meth:`close`."""

    def __init__(
        self, *, max_workers: int = 2, timeout_sec: float = BUILD_TIMEOUT_S, link: bool = True
    ):
        super().__init__()
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers, self.timeout_sec = max_workers, timeout_sec
        self.export = build_shared_object if link else build_tar
        self.pool = None

    def _pool(self):
        if self.pool is None:
            self.pool = PopenPoolExecutor(
                max_workers=self.max_workers,
                timeout=self.timeout_sec,
                initializer=import_tensor_intrinsics,
            )
        return self.pool

    def _reap(self) -> None:
        """Reset workers that died while idle, so they restart on their next build instead
        of failing it (``PopenWorker`` only restarts after a failed send)."""
        if self.pool is None:
            return
        for worker in list(self.pool._worker_map.values()):
            if worker._proc is not None and not worker.is_alive():
                worker.kill()

    def build(self, build_inputs):
        self._reap()
        export = self.export
        jobs = [(b.mod, b.target) for b in build_inputs]
        done = list(self._pool().map_with_error_catching(lambda x: export(*x), jobs))
        # a worker that died under a candidate (killed, out of memory) is restarted; the
        # candidate gets one more try before it counts as a failed build
        again = [
            k
            for k, r in enumerate(done)
            if r.status == StatusKind.EXCEPTION and isinstance(r.value, ChildProcessError)
        ]
        if again:
            self._reap()
            retried = self._pool().map_with_error_catching(
                lambda x: export(*x), [jobs[k] for k in again]
            )
            for k, r in zip(again, retried, strict=True):
                done[k] = r
        results = []
        for r in done:
            if r.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(r.value, None))
            elif r.status == StatusKind.TIMEOUT:
                results.append(
                    ms.builder.BuilderResult(
                        None, f"PersistentBuilder: timeout, killed after {self.timeout_sec} s"
                    )
                )
            else:
                results.append(ms.builder.BuilderResult(None, f"PersistentBuilder: {r.value}"))
        return results

    def worker_pids(self) -> list[int]:
        """PIDs of the live build workers (for tests and diagnostics)."""
        if self.pool is None:
            return []
        return [w._proc.pid for w in self.pool._worker_map.values() if w._proc is not None]

    def close(self) -> None:
        """End every worker process now (idempotent)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


@contextlib.contextmanager
def persistent_builder(**kwargs) -> Iterator:
    """A :class:`PersistentBuilder` whose workers end when the ``with`` block does."""
    builder = PersistentBuilder(**kwargs)
    try:
        yield builder
    finally:
        builder.close()


def build_timeout_s(time_budget_s: float | None = None) -> float:
    """How long one candidate's build may take: :data:`BUILD_TIMEOUT_S`, and under a time
    budget at most :data:`BUILD_BUDGET_SHARE` of it (never under :data:`MIN_BUILD_TIMEOUT_S`).

    Some candidates never finish compiling in useful time (a softmax with its ``exp`` inlined
    under a 512-step unroll took LLVM over 150 s); each one holds a build worker until the
    timeout, so under a 5-minute budget a round of them at 60 s each spent 200 s of it."""
    if time_budget_s is None:
        return BUILD_TIMEOUT_S
    return min(BUILD_TIMEOUT_S, max(MIN_BUILD_TIMEOUT_S, BUILD_BUDGET_SHARE * time_budget_s))


def default_builder(*, link: bool = True, time_budget_s: float | None = None):
    """A :class:`PersistentBuilder` with one worker per core and :func:`build_timeout_s`."""
    return PersistentBuilder(
        max_workers=max(1, len(os.sched_getaffinity(0))),
        timeout_sec=build_timeout_s(time_budget_s),
        link=link,
    )

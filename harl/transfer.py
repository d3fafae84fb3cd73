"""Schedules transferred across workloads: a task the store has never measured starts from the
best measured schedules of the most similar workloads it holds.

Two workloads are *compatible* when a design space (sketch) of the new task has the same
sampling instructions, in the same order, as a stored record's trace: the same anchor
operator, layout and fusion, so the same ``SSRSRS`` tiling (MetaSchedule's
``module_equality="anchor-block"`` finds the exact structural matches; this finds the same
structure at other shapes). Among those, the *nearest* is the one whose tiled loop extents are
closest (the sum of ``|log2(extent ratio)|`` over the tiled loops).

The record's decisions are then re-fitted to the new extents and replayed on the new task's
sketch: each tiling keeps its innermost factor (the register block) where it divides the new
extent (else the nearest divisor), and the outer levels are re-split from the inside out with
the divisors nearest the old factors, the outermost taking what is left; categorical decisions
(unroll depth) are kept, compute locations too where the replay accepts them. The result goes
through MetaSchedule's postprocessors like any sample, so what comes out is a valid schedule.

These schedules are a task's first warm-up samples and its fallback when it is compiled
unmeasured (``--trials 0``); ``tests/test_transfer.py`` checks them on convolutions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from harl.sampling import CATEGORICAL, TILE, _context, _divisors
from harl.schedules import replay

log = logging.getLogger("harl.transfer")

LOCATION = "SampleComputeLocation"
SAMPLING = (TILE, CATEGORICAL, LOCATION)


def _sampling(trace) -> list:
    """The trace's sampling instructions that carry a decision, before its postprocessing."""
    out = []
    for inst in trace.insts:
        if inst.kind.name == "EnterPostproc":
            break
        if inst.kind.name in SAMPLING and inst in trace.decisions:
            out.append(inst)
    return out


def _shape(inst) -> tuple:
    """What must match for a decision to carry over: the kind and its arity."""
    kind = inst.kind.name
    if kind == TILE:
        return (kind, int(inst.attrs[0]))
    if kind == CATEGORICAL:
        return (kind, len(inst.attrs[0]))
    return (kind,)


@dataclass(frozen=True)
class Signature:
    """A trace's sampling structure and its tiled loops' extents."""

    shape: tuple
    extents: tuple

    @classmethod
    def of(cls, trace) -> Signature:
        insts = _sampling(trace)
        extents = tuple(
            math.prod(int(x) for x in trace.decisions[i]) for i in insts if i.kind.name == TILE
        )
        return cls(tuple(_shape(i) for i in insts), extents)

    def distance(self, other: Signature) -> float:
        """``inf`` when incompatible, else the summed |log2| ratio of the tiled extents."""
        if self.shape != other.shape:
            return math.inf
        return sum(abs(math.log2(a / b)) for a, b in zip(self.extents, other.extents, strict=True))


def _nearest_divisor(n: int, want: int) -> int:
    """The divisor of ``n`` nearest ``want`` in ratio (the smaller on a tie)."""
    return min(_divisors(n), key=lambda d: (abs(math.log2(d / max(want, 1))), d))


def refit_tile(factors: list[int], extent: int) -> list[int]:
    """Tile factors (outermost first) re-fitted to ``extent``: the innermost kept where it
    divides it, each outer level the divisor of what is left nearest its old factor, the
    outermost the rest. The product is ``extent``."""
    inner = factors[-1] if extent % factors[-1] == 0 else _nearest_divisor(extent, factors[-1])
    out, left = [inner], extent // inner
    for f in reversed(factors[1:-1]):
        d = _nearest_divisor(left, f)
        out.append(d)
        left //= d
    out.append(left)
    return list(reversed(out))


def refit(source_trace, sketch_trace, keep_locations: bool = True):
    """``sketch_trace`` with the decisions of ``source_trace`` (same sampling structure)
    re-fitted to the sketch's extents; None when the structures differ."""
    src, dst = _sampling(source_trace), _sampling(sketch_trace)
    if [_shape(i) for i in src] != [_shape(i) for i in dst]:
        return None
    trace = sketch_trace
    for s, d in zip(src, dst, strict=True):
        kind, old = s.kind.name, source_trace.decisions[s]
        if kind == TILE:
            extent = math.prod(int(x) for x in sketch_trace.decisions[d])
            value: Any = refit_tile([int(x) for x in old], extent)
        elif kind == CATEGORICAL:
            value = int(old)
        elif keep_locations:
            value = int(old)
        else:
            continue
        trace = trace.with_decision(d, value, remove_postproc=True)
    return trace


def transfer(record_trace, task, target: dict[str, Any], seed: int = 0):
    """``record_trace`` (measured on another workload) as a valid schedule of ``task``, or
    None when no sketch of ``task`` has its structure or the replay fails."""
    ctx = _context(task, target, seed)
    mod = task.dispatched[0]
    for sketch in ctx.space_generator.generate_design_space(mod):
        for keep in (True, False):  # a compute location may not exist at the new shape
            trace = refit(record_trace, sketch.trace, keep_locations=keep)
            if trace is None:
                break
            sch = replay(mod, trace, ctx.space_generator.postprocs, seed)
            if sch is not None:
                return sch
    return None


class Sources:
    """What a store offers to transfer on one target: every workload's best valid record with
    its signature, read once (a network's tasks all search the same list)."""

    def __init__(self, db, target: dict[str, Any]):
        from harl.database import best_per_workload

        self.target = target
        self.entries = [(m, r, Signature.of(r.trace)) for m, r in best_per_workload(db, target)]

    def nearest(self, task, k: int = 3) -> list[tuple[float, Any]]:
        """The best records of the ``k`` stored workloads nearest ``task`` (compatible with
        one of its sketches) as ``(distance, record)``, nearest first; the task's own workload
        left out (its records need no transfer)."""
        from tvm_ffi import structural_equal

        if not self.entries:
            return []
        ctx = _context(task, self.target, 0)
        mod = task.dispatched[0]
        sketches = [Signature.of(s.trace) for s in ctx.space_generator.generate_design_space(mod)]
        found = []
        for wl_mod, record, sig in self.entries:
            d = min((sig.distance(s) for s in sketches), default=math.inf)
            if d < math.inf and not structural_equal(wl_mod, mod):
                found.append((d, record))
        found.sort(key=lambda x: x[0])
        return found[:k]


def transferred(sources: Sources, task, seed: int = 0, k: int = 1) -> list:
    """Up to ``k`` schedules of ``task`` transferred from its nearest stored workloads."""
    out = []
    for distance, record in sources.nearest(task, k=3 * k):
        sch = transfer(record.trace, task, sources.target, seed)
        if sch is not None:
            log.debug("%s: schedule transferred (distance %.2f)", task.task_name, distance)
            out.append(sch)
            if len(out) >= k:
                break
    return out

"""The rewrite environment's cost oracle for the target that ships: TVM.

The artifact harlflow ships is compiled by TVM, whose fusion decides what a rewrite is worth: a
merged projection followed by a Split may be one kernel fewer on onnxruntime and two copy kernels
more on TVM. :class:`TvmOracle` prices a graph the way the compiled artifact runs it:

1. the graph goes through the same import, preparation and fusion as tuning
   (``harl.compilation.extract_tasks``), giving MetaSchedule's tasks (one per distinct kernel)
   and how many times each runs (its weight);
2. each kernel's latency is the best *measured* record of that workload on this target in the
   tuning database, where there is one;
3. otherwise a roofline estimate, ``max(launch, flops / rate, bytes / bandwidth)``, read off
   the target's measured profile (``harl.calibration``: kept in the store, measured once per
   target): ``rate`` is what a GEMM of the kernel's shape (rows, output columns, reduction
   length of its largest reduction) reaches on this target, ``bandwidth`` what a copy of the
   kernel's size moves, ``launch`` what the VM charges per kernel call. Both are scaled by how
   much faster than the profile the database's tuned kernels of this target ran (the median
   ratio over compute-bound and over memory-bound kernels; none until there are three of
   each). So merging three narrow projections into one wide GEMM is priced at the wide GEMM's
   rate, one launch instead of three, and the split's copies;
4. the graph's cost is the weighted sum.

Without a store (``database_dir`` None) the profile is flat: one FLOP rate and one bandwidth
for every shape (:data:`DEFAULT_PEAK`, :data:`DEFAULT_BANDWIDTH`), nothing measured.

Pricing a whole graph imports, prepares and fuses all of it (a 175-node ResNet-style CNN: 18-24 s
here), and a search prices every candidate of every step. :meth:`TvmOracle.estimate_change`
prices a candidate against the graph it was derived from instead: only the nodes the rewrite
changed and their unchanged neighbours (so that fusion across the change's edge is the same on
both sides) are imported, in the base graph and in the candidate, and the candidate's cost is
the base's less the old region's plus the new region's. The search prices the graph it steps
to in full, so errors do not accumulate from step to step.

Everything is a pure function of the graph and of the database as it was when the oracle was
made (a snapshot), so the same model and seed give the same decisions in every run: no single
noisy timing decides a substitution. ``measure`` is therefore the estimate itself; the artifact's
real latency is measured after tuning by the package stage.

The learned cost model is not used to price unseen kernels: it is trained with a pairwise loss to
rank programs *within* one workload, so its scores do not compare kernels of different workloads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from harl.calibration import TargetProfile, load_or_measure
from harlflow.core import signals
from harlflow.core.config import machine_cache_dir
from harlflow.core.errors import HarlflowError, first_line
from xrlflow.cost import FlopsOracle
from xrlflow.ir import Graph, Node, Value, attr_key

log = logging.getLogger("tasks.rewrite_oracle")

DEFAULT_PEAK = 20e9
"""FLOP/s of every GEMM in the flat profile (a 2-core AVX-512 host reaches 15-40 GFLOP/s on the
suite's matmuls and convolutions after a few dozen trials)"""
DEFAULT_BANDWIDTH = 8e9
"""bytes/s of every memory-bound kernel in the flat profile"""
KERNEL_OVERHEAD = 2e-6
"""seconds per kernel call in the flat profile (call, argument checks, the pool's wake-up)"""
CACHE_SIZE = 4096
"""graphs, regions and changes an oracle remembers (each cache starts over past it)"""
COMPUTE_BOUND = 4.0
"""FLOPs per byte above which a kernel's calibration sample counts as compute-bound"""


class TvmOracle:
    """Prices graphs by their TVM kernels (see the module docstring). Deterministic."""

    name = "tvm"
    decision_margin = 0.005
    """relative gain a search needs to accept a step. The estimate is deterministic, but a step
    changes the kernels tuning sees, and a 32-trial tuning run varies by a few percent: a step
    worth 0.06% (BERT's scale_into_matmul) compiled 3.8% slower after equal tuning. Steps under
    0.5% are not worth a new task set."""

    def __init__(self, target: dict[str, Any], database_dir: str | Path | None = None,
                 profile: TargetProfile | None = None):  # fmt: skip
        """``profile``: the target's costs (``harl.calibration``); by default the store's
        (measured into it the first time), flat without a store."""
        from harl.database import open_database
        from harlflow.core.config import is_database_url

        self.target = target
        self.db = (
            open_database(database_dir)
            if database_dir is not None
            and (is_database_url(database_dir) or Path(database_dir).is_dir())
            else None
        )
        if profile is None and database_dir is not None:
            try:
                profile = load_or_measure(database_dir, target, machine_cache_dir())
            except HarlflowError:
                raise  # an unwritable store, a bad input: the run's own error
            except Exception as e:  # noqa: BLE001 - TVM could not build a calibration kernel
                signals.check()
                log.warning("the target could not be profiled (%s): flat pricing", first_line(e))
        self.profile = profile or TargetProfile.flat(
            target, DEFAULT_PEAK, DEFAULT_BANDWIDTH, KERNEL_OVERHEAD
        )
        self.compute_scale, self.memory_scale = self._calibrate()
        self.peak = self.profile.peak * self.compute_scale
        self.bandwidth = self.profile.bandwidth(1 << 20) * self.memory_scale
        self._ops = FlopsOracle(self.peak, self.bandwidth, self.profile.launch_s)
        self._graphs: dict[str, tuple[float, list[dict]]] = {}
        self._kernels: dict[int, tuple[float, str]] = {}
        self._regions: dict[str, float] = {}  # a region's structural hash -> its cost
        self._changes: dict[tuple[str, str], float] = {}
        self.failures = 0

    # ------------------------------------------------------------------ the CostOracle protocol
    def op_cost(self, g: Graph, node: Node) -> float:
        """One operator's analytical cost with the calibrated peak (the agents' node feature)."""
        return self._ops.op_cost(g, node)

    def estimate(self, g: Graph) -> float:
        """The graph's compiled latency in seconds; ``inf`` when TVM cannot compile it."""
        return self._priced(g)[0]

    def measure(self, g: Graph) -> float:
        return self.estimate(g)

    def estimate_change(self, base: Graph, g: Graph) -> float:
        """``g``'s estimate from ``base``'s (priced in full) and the part of the graph that
        differs: ``estimate(base) - region(base) + region(g)`` (module docstring). Falls back to
        pricing ``g`` in full when the change is large, a region's shapes are unknown or TVM
        cannot price a region on its own."""
        full = self.estimate(base)
        key = (base.structural_hash(), g.structural_hash())
        if key in self._changes:
            return self._changes[key]
        if len(self._changes) > CACHE_SIZE:
            self._changes.clear()
        regions = _regions(base, g)
        if regions is None or not math.isfinite(full):
            return self.estimate(g)
        old, new = regions
        try:
            cost = full - self._region_cost(base, old, g) + self._region_cost(g, new, base)
        except _Unpriceable as e:
            log.debug("pricing the candidate in full: %s", e)
            return self.estimate(g)
        self._changes[key] = cost
        return cost

    # ------------------------------------------------------------------ reports
    def kernels(self, g: Graph) -> list[dict]:
        """Each kernel of ``g``: task name, weight, seconds per call and where that came from
        (``database`` or ``roofline``)."""
        return list(self._priced(g)[1])

    def sources(self, g: Graph) -> dict[str, int]:
        return dict(Counter(k["source"] for k in self.kernels(g)))

    # ------------------------------------------------------------------ internals
    def _priced(self, g: Graph) -> tuple[float, list[dict]]:
        signals.check()  # every candidate: a stop request is never priced away
        key = g.structural_hash()
        if key not in self._graphs:
            if len(self._graphs) > CACHE_SIZE:
                self._graphs.clear()
            try:
                tasks = _tasks(g, self.target)
            except Exception as e:  # noqa: BLE001 - a candidate TVM cannot compile is never chosen
                signals.check()  # unless the error is a stop request TVM handed back
                self.failures += 1
                log.debug("TVM cannot compile a candidate graph: %s", first_line(e))
                self._graphs[key] = (math.inf, [])
                return self._graphs[key]
            rows = []
            for t in tasks:
                seconds, source = self._kernel(t)
                rows.append(
                    {
                        "task": t.task_name,
                        "weight": int(t.weight),
                        "seconds": seconds,
                        "source": source,
                    }  # fmt: skip
                )
            self._graphs[key] = (sum(r["weight"] * r["seconds"] for r in rows), rows)
        return self._graphs[key]

    def _kernel(self, task) -> tuple[float, str]:
        from tvm_ffi import structural_hash

        from harl.database import best_records, mean_run_secs

        mod = task.dispatched[0]
        key = int(structural_hash(mod))
        if key not in self._kernels:
            best = best_records(self.db, mod, self.target) if self.db is not None else []
            if best:
                self._kernels[key] = (mean_run_secs(best[0].run_secs), "database")
            else:
                self._kernels[key] = (self._roofline(mod), "roofline")
        return self._kernels[key]

    def _region_cost(self, g: Graph, nodes: list[Node], other: Graph) -> float:
        """The kernels' cost of ``nodes`` of ``g`` imported alone (the region's inputs as graph
        inputs, shapes from either graph's inferred values)."""
        sub = _subgraph(g, nodes, other)
        key = sub.structural_hash()
        if key not in self._regions:
            if len(self._regions) > CACHE_SIZE:
                self._regions.clear()
            signals.check()
            try:
                tasks = _tasks(sub, self.target)
            except Exception as e:  # noqa: BLE001 - e.g. an op that needs its input constant
                signals.check()
                raise _Unpriceable(f"TVM cannot compile the region alone: {first_line(e)}") from e
            self._regions[key] = sum(t.weight * self._kernel(t)[0] for t in tasks)
        return self._regions[key]

    def _roofline(self, mod) -> float:
        """The kernel's seconds from the target's profile, scaled to this store's tuning."""
        flops, moved = _work(mod)
        compute, memory = self._profile_rates(mod, flops, moved)
        return max(
            self.profile.launch_s,
            flops / (compute * self.compute_scale),
            moved / (memory * self.memory_scale),
        )

    def _profile_rates(self, mod, flops: float, moved: float) -> tuple[float, float]:
        """FLOP/s and bytes/s the profile gives a kernel: the GEMM rate of its largest
        reduction's shape (the profile's peak when it has none), the copy bandwidth of its size."""
        shape = _gemm_shape(mod)
        compute = self.profile.gemm_rate(*shape) if shape else self.profile.peak
        return compute, self.profile.bandwidth(max(moved, 1.0))

    def _calibrate(self) -> tuple[float, float]:
        """How much faster than the profile this target's tuned kernels in the database ran:
        the median ratio of achieved to profiled rate over compute-bound and over memory-bound
        kernels (1 until there are three of each)."""
        if self.db is None:
            return 1.0, 1.0
        from tvm_ffi import structural_hash

        from harl.database import best_records, mean_run_secs

        compute, memory = [], []
        workloads = {
            structural_hash(r.workload.mod): r.workload.mod
            for r in self.db.get_all_tuning_records()
        }
        for wl in workloads.values():
            best = best_records(self.db, wl, self.target)
            if not best:
                continue
            secs = max(mean_run_secs(best[0].run_secs), 1e-9)
            flops, moved = _work(wl)
            if moved <= 0:
                continue
            rate, bandwidth = self._profile_rates(wl, flops, moved)
            if flops / moved >= COMPUTE_BOUND:
                compute.append(flops / secs / rate)
            else:
                memory.append(moved / secs / bandwidth)
        return (
            statistics.median(compute) if len(compute) >= 3 else 1.0,
            statistics.median(memory) if len(memory) >= 3 else 1.0,
        )


class _Unpriceable(Exception):
    """A region that cannot be priced on its own (the whole candidate is priced instead)."""


MAX_CHANGED_SHARE = 0.3
"""a rewrite that changes more than this share of the graph's nodes is priced in full"""


def _node_key(n: Node) -> tuple:
    return (n.domain, n.op, repr(sorted((k, attr_key(v)) for k, v in n.attrs.items())),
            n.inputs, n.outputs)  # fmt: skip


def _regions(base: Graph, g: Graph) -> tuple[list[Node], list[Node]] | None:
    """The nodes of ``base`` and of ``g`` that a rewrite changed, each with the unchanged
    neighbours (producers of their inputs, consumers of their outputs) common to both; None
    when nothing or too much changed."""
    base_keys = {_node_key(n) for n in base.nodes}
    g_keys = {_node_key(n) for n in g.nodes}
    old = [n for n in base.nodes if _node_key(n) not in g_keys]
    new = [n for n in g.nodes if _node_key(n) not in base_keys]
    if not old and not new:
        return None
    if len(old) + len(new) > MAX_CHANGED_SHARE * (len(base.nodes) + len(g.nodes)):
        return None
    touched = {t for n in old + new for t in (*n.inputs, *n.outputs) if t}
    common = base_keys & g_keys
    neighbours = [
        n
        for n in base.nodes
        if _node_key(n) in common and touched & {t for t in (*n.inputs, *n.outputs) if t}
    ]
    keep = {_node_key(n) for n in neighbours}

    def region(graph: Graph, changed: list[Node]) -> list[Node]:
        ids = {id(n) for n in changed}
        return [n for n in graph.nodes if id(n) in ids or _node_key(n) in keep]

    return region(base, old), region(g, new)


def _subgraph(g: Graph, nodes: list[Node], other: Graph) -> Graph:
    """``nodes`` (in ``g``'s order) as a graph of their own: what they read from outside is an
    input (or the same initializer), what the rest of ``g`` or its outputs read is an output."""
    produced = {o for n in nodes for o in n.outputs if o}
    inside = {id(n) for n in nodes}
    read_outside = {i for n in g.nodes if id(n) not in inside for i in n.inputs if i}
    known = {**other.values, **g.values, **{v.name: v for v in g.inputs}}
    inputs, inits, seen = [], {}, set()
    for n in nodes:
        for i in n.inputs:
            if not i or i in produced or i in seen:
                continue
            seen.add(i)
            if g.is_const(i):
                inits[i] = g.initializers[i]
            elif i in known and known[i].shape is not None:
                inputs.append(Value(i, known[i].elem_type, known[i].shape))
            else:
                raise _Unpriceable(f"no shape for the region's input {i!r}")
    outputs = []
    for t in sorted(produced & (read_outside | set(g.output_names))):
        if t not in known:
            raise _Unpriceable(f"no type for the region's output {t!r}")
        outputs.append(known[t])
    if not outputs:
        raise _Unpriceable("the region has no output")
    values = {k: v for k, v in known.items() if k in produced}
    return Graph(list(nodes), inputs, outputs, inits, values, "region", dict(g.opsets))


def _tasks(g: Graph, target: dict[str, Any]) -> list:
    """MetaSchedule's tasks of ``g``, prepared and fused as tuning and compilation do."""
    from tvm.relax.frontend.onnx import from_onnx

    from harl.compilation import extract_tasks, prepare
    from xrlflow.ir import to_onnx

    # the importer prints the operator it failed on before raising: the caller reports failures
    with contextlib.redirect_stdout(io.StringIO()):
        mod = from_onnx(
            to_onnx(g),
            shape_dict={v.name: list(v.shape) for v in g.inputs},
            dtype_dict={v.name: str(v.dtype) for v in g.inputs},
        )
    return extract_tasks(prepare(mod), target)


def _work(mod) -> tuple[float, float]:
    """A kernel's floating-point operations and the bytes of its buffers (inputs and outputs)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        flops = float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - data-dependent loops: price it by its memory traffic
        flops = 0.0
    moved = 0.0
    for arg in ms.arg_info.ArgInfo.from_prim_func(mod["main"]):
        shape = list(getattr(arg, "shape", None) or [])
        if all(_static(d) for d in shape):
            moved += math.prod(int(d) for d in shape) * _bytes(str(arg.dtype))
    return flops, moved


def _gemm_shape(mod) -> tuple[int, int, int] | None:
    """``(rows, columns, reduction length)`` of the kernel's largest reduction block, as a
    GEMM: the innermost spatial axis is the columns (the contiguous output axis), the other
    spatial axes the rows; None when the kernel reduces nothing or its extents are dynamic."""
    from tvm import s_tir

    from harl.schedules import REDUCE, root_blocks

    try:
        sch = s_tir.Schedule(mod)
        blocks = [sch.get(b) for b in root_blocks(sch)]
    except Exception:  # noqa: BLE001 - no root block: priced without a shape
        return None
    best, size = None, 0
    for blk in blocks:
        spatial, reduce = [], []
        for iv in blk.iter_vars:
            if not _static(iv.dom.extent):
                return None
            (reduce if int(iv.iter_type) == REDUCE else spatial).append(int(iv.dom.extent))
        k = math.prod(reduce)
        if not reduce or not spatial or k < 2:
            continue
        m, n = math.prod(spatial[:-1]), spatial[-1]
        if m * n * k > size:
            best, size = (m, n, k), m * n * k
    return best


def _static(d) -> bool:
    try:
        int(d)
    except (TypeError, ValueError):
        return False
    return True


def _bytes(dtype: str) -> int:
    digits = "".join(c for c in dtype if c.isdigit())
    return max(int(digits) // 8, 1) if digits else 4

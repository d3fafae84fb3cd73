"""Cost oracles: what a graph costs on the target.

An oracle answers two questions: ``estimate(g)`` — the sum of per-operator costs, each measured
once and cached by the operator's signature (op, attributes, input shapes and dtypes, and the
values of small integer constants such as Reshape shapes) — and ``measure(g)`` — one end-to-end
measurement of the whole graph (cached by the graph's structural hash). Both are in seconds.

- :class:`OrtOracle` (default) measures with onnxruntime on this machine's CPU;
- :class:`FlopsOracle` is analytical and deterministic (FLOPs, bytes moved and a per-operator
  overhead): for tests and for cheap pre-training, never for reported speedups.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from typing import Protocol

import numpy as np
from onnx import helper, numpy_helper

from harlflow.core import signals
from xrlflow.ir import Graph, Node, attr_key
from xrlflow.verify import random_inputs, session


class CostOracle(Protocol):
    name: str
    decision_margin: float
    """relative estimated gain below which a search does not take a step"""

    def op_cost(self, g: Graph, node: Node) -> float: ...

    def estimate(self, g: Graph) -> float: ...

    def measure(self, g: Graph) -> float: ...


class _Base:
    name = "base"
    decision_margin = 1e-4

    def estimate(self, g: Graph) -> float:
        return sum(self.op_cost(g, n) for n in g.nodes)

    def op_cost(self, g: Graph, node: Node) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


def _signature(g: Graph, n: Node) -> tuple:
    ins = []
    for i in n.inputs:
        if not i:
            ins.append(None)
            continue
        c = g.const(i)
        shape, et = g.static_shape(i), g.elem_type(i)
        small_int = c is not None and c.dtype.kind in "iub" and c.size <= 16
        ins.append((shape, et, c is not None, tuple(c.reshape(-1).tolist()) if small_int else None))
    return (
        n.domain,
        n.op,
        tuple(sorted((k, attr_key(v)) for k, v in n.attrs.items())),
        tuple(ins),
    )


class OrtOracle(_Base):
    """onnxruntime on the CPU; ``level`` is its graph-optimisation level for ``measure``."""

    name = "onnxruntime"

    def __init__(
        self,
        level: str = "disable",
        threads: int = 1,
        op_seconds: float = 0.02,
        e2e_seconds: float = 0.3,
    ):
        self.level, self.threads = level, threads
        self.op_seconds, self.e2e_seconds = op_seconds, e2e_seconds
        self.op_cache: dict[tuple, float] = {}
        self.e2e_cache: dict[str, float] = {}
        self.op_measurements = 0
        self.e2e_measurements = 0

    def op_cost(self, g: Graph, node: Node) -> float:
        key = _signature(g, node)
        if key not in self.op_cache:
            self.op_cache[key] = self._measure_op(g, node)
            self.op_measurements += 1
        return self.op_cache[key]

    def _measure_op(self, g: Graph, n: Node) -> float:
        if n.op in ("Constant", "Identity") or not [o for o in n.outputs if o]:
            return 0.0
        rng = np.random.default_rng(0)
        inputs, inits, feeds = [], [], {}
        for i in dict.fromkeys(x for x in n.inputs if x):
            c = g.const(i)
            if c is not None:
                small = c.dtype.kind in "iub" or c.size <= 16
                arr = c if small else rng.standard_normal(c.shape).astype(c.dtype)
                inits.append(numpy_helper.from_array(arr, i))
                continue
            shape, et = g.static_shape(i), g.elem_type(i)
            if shape is None or et is None:
                return 0.0  # unknown shape: no basis for a measurement
            inputs.append(helper.make_tensor_value_info(i, et, shape))
            dtype = helper.tensor_dtype_to_np_dtype(et)
            feeds[i] = (
                rng.standard_normal(shape)
                if np.issubdtype(dtype, np.floating)
                else rng.integers(0, 2, shape)
            ).astype(dtype)
        outs = [
            helper.make_tensor_value_info(o, g.elem_type(o) or 0, g.static_shape(o))
            for o in n.outputs
            if o
        ]
        node = helper.make_node(
            n.op, list(n.inputs), list(n.outputs), domain=n.domain or None, **n.attrs
        )
        model = helper.make_model(
            helper.make_graph([node], "op", inputs, outs, inits),
            opset_imports=[helper.make_opsetid(d, v) for d, v in g.opsets.items()],
        )
        model.ir_version = g.ir_version
        try:
            sess = session(model, "disable", self.threads)
        except Exception:  # noqa: BLE001 - an op ORT cannot run alone costs what we cannot know
            signals.check()
            return 0.0
        try:
            return _time(lambda: sess.run(None, feeds), self.op_seconds)
        except Exception:  # noqa: BLE001 - e.g. a Reshape fed a random (not the real) shape tensor
            signals.check()
            return 0.0

    def significant(
        self, before: Graph, after: Graph, rounds: int = 7, effect: float = 0.03
    ) -> bool:
        """Whether ``after`` is cheaper than ``before`` beyond the timing noise: the operators in
        which they differ are timed again in ``rounds`` rounds, alternating which side goes
        first, and ``after``'s must cost at least ``effect`` (a fraction) less in every round.
        Operators that cost the same (``Div`` for ``Mul``) then fail in some round instead of
        winning on one lucky timing.

        A single noisy timing decided greedy rewriting before: the same model gave 12, 23 and 16
        substitutions in three runs (BERT encoder), which changed the tuning task set.
        """
        ops_before = {_signature(before, n): n for n in before.nodes}
        ops_after = {_signature(after, n): n for n in after.nodes}
        counts_before = Counter(_signature(before, n) for n in before.nodes)
        counts_after = Counter(_signature(after, n) for n in after.nodes)
        removed, added = counts_before - counts_after, counts_after - counts_before

        def cost(g: Graph, ops: dict, counts: Counter) -> float:
            self.op_measurements += len(counts)
            return sum(k * self._measure_op(g, ops[sig]) for sig, k in counts.items())

        for r in range(rounds):
            if r % 2:
                cost_added = cost(after, ops_after, added)
                cost_removed = cost(before, ops_before, removed)
            else:
                cost_removed = cost(before, ops_before, removed)
                cost_added = cost(after, ops_after, added)
            if not cost_added < cost_removed * (1 - effect):
                return False
        return True

    def measure(self, g: Graph) -> float:
        key = g.structural_hash()
        if key not in self.e2e_cache:
            sess = session(g, self.level, self.threads)
            feeds = random_inputs(g)
            self.e2e_cache[key] = _time(lambda: sess.run(None, feeds), self.e2e_seconds)
            self.e2e_measurements += 1
        return self.e2e_cache[key]


def _time(fn, budget: float, warmup: int = 3, min_runs: int = 5, max_runs: int = 200) -> float:
    """Median wall time of ``fn`` over as many runs as fit in ``budget`` seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    end = time.perf_counter() + budget
    while len(times) < min_runs or (time.perf_counter() < end and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class FlopsOracle(_Base):
    """Analytical: ``overhead + flops / peak + bytes / bandwidth`` per operator (deterministic)."""

    name = "flops"

    def __init__(self, peak_flops: float = 50e9, bandwidth: float = 20e9, overhead: float = 2e-6):
        self.peak, self.bw, self.overhead = peak_flops, bandwidth, overhead

    def op_cost(self, g: Graph, n: Node) -> float:
        if n.op in ("Constant", "Identity"):
            return 0.0
        if n.op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
            return self.overhead / 4  # metadata-only in most runtimes
        out = [g.static_shape(o) for o in n.outputs if o]
        ins = [g.static_shape(i) for i in n.inputs if i]
        elems = lambda s: math.prod(s) if s else 1  # noqa: E731
        moved = 4 * (
            sum(elems(s) for s in ins if s is not None)
            + sum(elems(s) for s in out if s is not None)
        )
        flops = sum(elems(s) for s in out if s is not None)
        if n.op in ("MatMul", "Gemm") and ins[0] is not None and out[0] is not None:
            k = ins[0][-1] if not n.attrs.get("transA", 0) else ins[0][-2]
            flops = 2 * elems(out[0]) * k
        elif n.op == "Conv" and ins[1] is not None and out[0] is not None:
            flops = 2 * elems(out[0]) * math.prod(ins[1][1:])
        return self.overhead + flops / self.peak + moved / self.bw

    def measure(self, g: Graph) -> float:
        return self.estimate(g)

"""The known rewrite problem the agents' tests share: a SqueezeNet-style fire module under the
deterministic FLOP oracle. Its best graph needs a *slower* first step (enlarging the 1×1 kernel so
the two expand convolutions can merge), which greedy search never takes; its best reachable cost
is found by exhaustive search."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from xrlflow import ir
from xrlflow import rules as R
from xrlflow.cost import FlopsOracle

ORACLE = FlopsOracle(overhead=5e-6)


def fire_module() -> ir.Graph:
    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32))  # noqa: E731
    inits = [w(4, 4, 1, 1), w(4), w(4, 4, 3, 3), w(4)]
    for t, name in zip(inits, ["w1", "b1", "w3", "b3"], strict=True):
        t.name = name
    nodes = [
        helper.make_node("Relu", ["x"], ["s"], name="squeeze_relu"),
        helper.make_node("Conv", ["s", "w1", "b1"], ["e1"], name="expand1x1"),
        helper.make_node("Conv", ["s", "w3", "b3"], ["e3"], name="expand3x3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["e1"], ["r1"], name="relu1"),
        helper.make_node("Relu", ["e3"], ["r3"], name="relu3"),
        helper.make_node("Concat", ["r1", "r3"], ["y"], name="concat", axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "fire",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx 1.23 writes 14; onnxruntime 1.31 reads up to 13
    return ir.check(ir.from_onnx(model))


def exhaustive_best(g: ir.Graph, depth: int = 6) -> float:
    best, frontier, seen = ORACLE.estimate(g), [g], {g.structural_hash()}
    for _ in range(depth):
        nxt = []
        for cur in frontier:
            for c in R.candidates(cur, R.RULES):
                h = c.graph.structural_hash()
                if h not in seen:
                    seen.add(h)
                    nxt.append(c.graph)
                    best = min(best, ORACLE.estimate(c.graph))
        frontier = nxt
    return best

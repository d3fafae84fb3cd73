"""Example models: for every rule, a random instance of its pattern as an ONNX model.

The tests rewrite each example with its rule and compare the outputs with onnxruntime's on the
original (``tests/test_xrlflow_rules.py``). A small DSL builds them: :func:`model` from nodes,
input shapes and initializers; :func:`rand`, :func:`pos` and :func:`i64` for constants.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def model(
    rng: np.random.Generator,
    nodes: list,
    inputs: dict[str, list[int]],
    outputs: list[str],
    inits: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A float32 ONNX model; ``nodes`` are ``(op, inputs, outputs, attrs)`` tuples."""
    g = helper.make_graph(
        [
            helper.make_node(op, list(i), list(o), name=f"n{k}", **(a or {}))
            for k, (op, i, o, a) in enumerate(nodes)
        ],
        "example",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def rand(rng, *shape, scale=0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def pos(rng, *shape) -> np.ndarray:
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)


def i64(*v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def conv_then(op: str, const_shape):
    def ex(rng):
        nodes = [
            ("Conv", ["x", "w", "b"], ["c"], {"pads": [1, 1, 1, 1]}),
            (op, ["c", "k"], ["y"], None),
        ]
        return model(
            rng,
            nodes,
            {"x": [1, 4, 6, 6]},
            ["y"],
            {"w": rand(rng, 5, 4, 3, 3), "b": rand(rng, 5), "k": pos(rng, *const_shape)},
        )

    return ex


def conv_bn(rng):
    nodes = [
        ("Conv", ["x", "w", "b"], ["c"], {"pads": [1, 1, 1, 1]}),
        ("BatchNormalization", ["c", "s", "t", "mu", "var"], ["y"], {"epsilon": 1e-3}),
    ]
    return model(
        rng,
        nodes,
        {"x": [1, 4, 6, 6]},
        ["y"],
        {
            "w": rand(rng, 5, 4, 3, 3),
            "b": rand(rng, 5),
            "s": pos(rng, 5),
            "t": rand(rng, 5),
            "mu": rand(rng, 5),
            "var": pos(rng, 5),
        },
    )


def matmul_then(op: str, const_shape, rank3: bool = False):
    def ex(rng):
        nodes = [("MatMul", ["x", "w"], ["c"], None), (op, ["c", "k"], ["y"], None)]
        x = [2, 3, 8] if rank3 else [3, 8]
        return model(
            rng, nodes, {"x": x}, ["y"], {"w": rand(rng, 8, 6), "k": pos(rng, *const_shape)}
        )

    return ex


def gemm(trans_b: int = 0, alpha: float = 1.0):
    def ex(rng):
        w = rand(rng, 6, 8) if trans_b else rand(rng, 8, 6)
        nodes = [("Gemm", ["x", "w", "c"], ["y"], {"transB": trans_b, "alpha": alpha})]
        return model(rng, nodes, {"x": [3, 8]}, ["y"], {"w": w, "c": rand(rng, 6)})

    return ex


def gemm_then(op: str):
    def ex(rng):
        nodes = [
            ("Gemm", ["x", "w", "c"], ["g"], {"transB": 1, "beta": 0.5}),
            (op, ["g", "k"], ["y"], None),
        ]
        return model(
            rng,
            nodes,
            {"x": [3, 8]},
            ["y"],
            {"w": rand(rng, 6, 8), "c": rand(rng, 6), "k": pos(rng, 6)},
        )

    return ex


def bn(rng):
    nodes = [
        ("Relu", ["x"], ["r"], None),
        ("BatchNormalization", ["r", "s", "t", "mu", "var"], ["y"], None),
    ]
    return model(
        rng,
        nodes,
        {"x": [2, 3, 4, 4]},
        ["y"],
        {"s": pos(rng, 3), "t": rand(rng, 3), "mu": rand(rng, 3), "var": pos(rng, 3)},
    )


def chain(op: str, op2: str | None = None):
    def ex(rng):
        nodes = [
            ("Relu", ["x"], ["r"], None),
            (op, ["r", "k1"], ["a"], None),
            (op2 or op, ["a", "k2"], ["y"], None),
        ]
        return model(rng, nodes, {"x": [2, 5]}, ["y"], {"k1": pos(rng, 5), "k2": pos(rng, 1)})

    return ex


def binary(op: str, value=None):
    def ex(rng):
        k = pos(rng, 5) if value is None else np.full((5,), value, np.float32)
        nodes = [("Relu", ["x"], ["r"], None), (op, ["r", "k"], ["y"], None)]
        return model(rng, nodes, {"x": [2, 5]}, ["y"], {"k": k})

    return ex


def fold(rng):
    nodes = [("Transpose", ["w"], ["wt"], {"perm": [1, 0]}), ("MatMul", ["x", "wt"], ["y"], None)]
    return model(rng, nodes, {"x": [3, 6]}, ["y"], {"w": rand(rng, 4, 6)})


def shape(rng):
    nodes = [
        ("Relu", ["x"], ["r"], None),
        ("Shape", ["r"], ["s"], {"start": 1}),
        ("Reshape", ["x", "s"], ["a"], None),
        ("Sigmoid", ["a"], ["y"], None),
    ]
    return model(rng, nodes, {"x": [1, 3, 4]}, ["y"])


def constant(rng):
    k = numpy_helper.from_array(pos(rng, 5))
    nodes = [("Constant", [], ["k"], {"value": k}), ("Mul", ["x", "k"], ["y"], None)]
    return model(rng, nodes, {"x": [2, 5]}, ["y"])


def unary(op: str, **attrs):
    def ex(rng):
        nodes = [
            ("Relu", ["x"], ["r"], None),
            (op, ["r"], ["a"], attrs or None),
            ("Sigmoid", ["a"], ["y"], None),
        ]
        return model(rng, nodes, {"x": [2, 5]}, ["y"])

    return ex


def neutral(rng):
    nodes = [
        ("Relu", ["x"], ["r"], None),
        ("Mul", ["r", "one"], ["a"], None),
        ("Add", ["a", "zero"], ["b"], None),
        ("Sub", ["b", "zero"], ["c"], None),
        ("Div", ["c", "one"], ["y"], None),
    ]
    return model(
        rng,
        nodes,
        {"x": [2, 5]},
        ["y"],
        {"one": np.ones(5, np.float32), "zero": np.zeros((1, 5), np.float32)},
    )


def cse(rng):
    nodes = [
        ("MatMul", ["x", "w"], ["a"], None),
        ("MatMul", ["x", "w"], ["b"], None),
        ("Add", ["a", "b"], ["y"], None),
    ]
    return model(rng, nodes, {"x": [3, 4]}, ["y"], {"w": rand(rng, 4, 4)})


def split_concat(rng):
    nodes = [
        ("Relu", ["x"], ["r"], None),
        ("Split", ["r", "s"], ["a", "b"], {"axis": 1}),
        ("Concat", ["a", "b"], ["c"], {"axis": 1}),
        ("Sigmoid", ["c"], ["y"], None),
    ]
    return model(rng, nodes, {"x": [2, 6]}, ["y"], {"s": i64(2, 4)})


def concat_split(rng):
    nodes = [
        ("Concat", ["x", "z"], ["c"], {"axis": 1}),
        ("Split", ["c", "s"], ["a", "b"], {"axis": 1}),
        ("Mul", ["a", "a"], ["y1"], None),
        ("Relu", ["b"], ["y2"], None),
    ]
    return model(rng, nodes, {"x": [2, 2], "z": [2, 4]}, ["y1", "y2"], {"s": i64(2, 4)})


def concat_unary(rng):
    nodes = [
        ("Relu", ["x"], ["a"], None),
        ("Relu", ["z"], ["b"], None),
        ("Concat", ["a", "b"], ["c"], {"axis": 1}),
        ("Sigmoid", ["c"], ["y"], None),
    ]
    return model(rng, nodes, {"x": [2, 3], "z": [2, 4]}, ["y"])


def transposes(rng):
    nodes = [
        ("Transpose", ["x"], ["a"], {"perm": [0, 2, 1]}),
        ("Transpose", ["a"], ["b"], {"perm": [2, 1, 0]}),
        ("Transpose", ["b"], ["c"], {"perm": [0, 1, 2]}),
        ("Sigmoid", ["c"], ["y"], None),
    ]
    return model(rng, nodes, {"x": [2, 3, 4]}, ["y"])


def transpose_back(rng):
    nodes = [
        ("Transpose", ["x"], ["a"], {"perm": [1, 0]}),
        ("Relu", ["a"], ["r"], None),
        ("Transpose", ["r"], ["y"], {"perm": [1, 0]}),
    ]
    return model(rng, nodes, {"x": [3, 4]}, ["y"])


def reshapes(rng):
    nodes = [
        ("Relu", ["x"], ["r"], None),
        ("Reshape", ["r", "s1"], ["a"], None),
        ("Unsqueeze", ["a", "ax"], ["b"], None),
        ("Reshape", ["b", "s2"], ["c"], None),
        ("Sigmoid", ["c"], ["y"], None),
    ]
    return model(
        rng, nodes, {"x": [2, 3, 4]}, ["y"], {"s1": i64(6, 4), "ax": i64(0), "s2": i64(2, 3, 4)}
    )


def reshape_same(rng):
    nodes = [
        ("Relu", ["x"], ["r"], None),
        ("Reshape", ["r", "s"], ["a"], None),
        ("Sigmoid", ["a"], ["y"], None),
    ]
    return model(rng, nodes, {"x": [2, 3, 4]}, ["y"], {"s": i64(2, -1, 4)})


def matmul_transpose(rng):
    nodes = [
        ("Relu", ["w"], ["r"], None),
        ("Transpose", ["r"], ["t"], {"perm": [1, 0]}),
        ("MatMul", ["x", "t"], ["y"], None),
    ]
    return model(rng, nodes, {"x": [3, 5], "w": [4, 5]}, ["y"])


def pad_conv(rng):
    nodes = [
        ("Pad", ["x", "p"], ["xp"], None),
        ("Conv", ["xp", "w", "b"], ["y"], {"pads": [0, 1, 0, 1]}),
    ]
    return model(
        rng,
        nodes,
        {"x": [1, 3, 6, 6]},
        ["y"],
        {"p": i64(0, 0, 1, 1, 0, 0, 1, 0), "w": rand(rng, 4, 3, 3, 3), "b": rand(rng, 4)},
    )


def parallel_conv(k2: int):
    def ex(rng):
        nodes = [
            ("Conv", ["x", "w1", "b1"], ["a"], {"pads": [1, 1, 1, 1]}),
            ("Conv", ["x", "w2", "b2"], ["b"], {"pads": [k2 // 2] * 4}),
            ("Relu", ["a"], ["y1"], None),
            ("Relu", ["b"], ["y2"], None),
        ]
        return model(
            rng,
            nodes,
            {"x": [1, 3, 6, 6]},
            ["y1", "y2"],
            {
                "w1": rand(rng, 4, 3, 3, 3),
                "b1": rand(rng, 4),
                "w2": rand(rng, 2, 3, k2, k2),
                "b2": rand(rng, 2),
            },
        )

    return ex


def parallel_matmul(n: int, bias: bool):
    def ex(rng):
        nodes, inits, outs = [], {}, []
        for i in range(n):
            nodes.append(("MatMul", ["x", f"w{i}"], [f"m{i}"], None))
            inits[f"w{i}"] = rand(rng, 8, 4 + i)
            out = f"m{i}"
            if bias:
                nodes.append(("Add", [f"m{i}", f"b{i}"], [f"a{i}"], None))
                inits[f"b{i}"] = rand(rng, 4 + i)
                out = f"a{i}"
            nodes.append(("Relu", [out], [f"y{i}"], None))
            outs.append(f"y{i}")
        return model(rng, nodes, {"x": [2, 3, 8]}, outs, inits)

    return ex


def matmul_split(rng):
    nodes = [
        ("MatMul", ["x", "w"], ["m"], None),
        ("Add", ["m", "b"], ["a"], None),
        ("Split", ["a", "s"], ["q", "k", "v"], {"axis": -1}),
        ("Relu", ["q"], ["y1"], None),
        ("Sigmoid", ["k"], ["y2"], None),
        ("Tanh", ["v"], ["y3"], None),
    ]
    inits = {"w": rand(rng, 8, 12), "b": rand(rng, 12), "s": i64(4, 4, 4)}
    return model(rng, nodes, {"x": [2, 3, 8]}, ["y1", "y2", "y3"], inits)


def parallel_gemm(rng):
    nodes = [
        ("Gemm", ["x", "w1", "c1"], ["a"], {"transB": 1, "alpha": 0.5}),
        ("Gemm", ["x", "w2", "c2"], ["b"], {"beta": 2.0}),
        ("Relu", ["a"], ["y1"], None),
        ("Relu", ["b"], ["y2"], None),
    ]
    return model(
        rng,
        nodes,
        {"x": [3, 8]},
        ["y1", "y2"],
        {"w1": rand(rng, 5, 8), "c1": rand(rng, 5), "w2": rand(rng, 8, 6), "c2": rand(rng, 6)},
    )


def two_matmuls(shared: str):
    def ex(rng):
        if shared == "x":
            nodes = [("MatMul", ["x", "w1"], ["a"], None), ("MatMul", ["x", "w2"], ["b"], None)]
            ins = {"x": [3, 6]}
        else:
            nodes = [("MatMul", ["x", "w1"], ["a"], None), ("MatMul", ["z", "w1"], ["b"], None)]
            ins = {"x": [3, 6], "z": [3, 6]}
        nodes.append(("Add", ["a", "b"], ["y"], None))
        return model(rng, nodes, ins, ["y"], {"w1": rand(rng, 6, 5), "w2": rand(rng, 6, 5)})

    return ex


def assoc(rng):
    nodes = [("MatMul", ["x", "w1"], ["a"], None), ("MatMul", ["a", "w2"], ["y"], None)]
    return model(
        rng, nodes, {"x": [2, 3, 6]}, ["y"], {"w1": rand(rng, 6, 8), "w2": rand(rng, 8, 4)}
    )


def scale_matmul(rng):
    nodes = [("Mul", ["x", "s"], ["a"], None), ("MatMul", ["a", "w"], ["y"], None)]
    return model(
        rng, nodes, {"x": [3, 6]}, ["y"], {"s": np.array(0.125, np.float32), "w": rand(rng, 6, 4)}
    )

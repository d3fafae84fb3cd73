"""Constant folding: operators of constants, static shapes, Constant nodes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xrlflow.ir import Node
from xrlflow.rules import common as C
from xrlflow.rules import examples as ex
from xrlflow.rules.engine import Match, Rewrite, Rule

_FOLD_LIMIT = 1 << 22  # elements: never materialise huge constants


def constant_fold(m: Match, n: Node):
    if n.domain or n.op in C.NONDETERMINISTIC or n.op == "Constant":
        return
    ins = [i for i in n.inputs if i]
    if not ins or any(m.c(i) is None for i in ins):
        return
    from onnx.reference import ReferenceEvaluator

    sub = helper.make_graph(
        [helper.make_node(n.op, list(n.inputs), list(n.outputs), **n.attrs)],
        "fold",
        [],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in n.outputs if o],
        [numpy_helper.from_array(m.c(i), i) for i in dict.fromkeys(ins)],
    )
    model = helper.make_model(
        sub, opset_imports=[helper.make_opsetid(d, v) for d, v in m.g.opsets.items()]
    )
    results = ReferenceEvaluator(model).run(None, {})
    if sum(np.asarray(r).size for r in results) > _FOLD_LIMIT:
        return
    inits, rename = {}, {}
    for o, r in zip([o for o in n.outputs if o], results, strict=True):
        name, i = m.init(np.asarray(r), "folded")
        inits |= i
        rename[o] = name
    yield Rewrite([], rename, inits, remove=[n])


def shape_fold(m: Match, n: Node):
    """Shape(x) of a statically shaped x → a constant (then ``constant_fold`` cascades)."""
    shape = m.shape(n.inputs[0])
    if shape is None:
        return
    start, end = n.attrs.get("start", 0), n.attrs.get("end", None)
    name, inits = m.init(np.array(shape[start:end], dtype=np.int64), "shape")
    yield Rewrite([], {n.outputs[0]: name}, inits, remove=[n])


def constant_to_initializer(m: Match, n: Node):
    value = n.attrs.get("value")
    if value is None:
        return
    arr = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
    name, inits = m.init(arr, "const")
    yield Rewrite([], {n.outputs[0]: name}, inits, remove=[n])


RULES: list[Rule] = [
    Rule("constant_fold", "const", "*", constant_fold, ex.fold,
         "An operator whose inputs are all constants → its output as a constant."),
    Rule("shape_fold", "const", "Shape", shape_fold, ex.shape,
         "Shape of a tensor with a static shape → a constant."),
    Rule("constant_to_initializer", "const", "Constant", constant_to_initializer, ex.constant,
         "A Constant node → an initializer."),
]  # fmt: skip

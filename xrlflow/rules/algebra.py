"""Algebra on matmuls: distributivity, factoring, associativity, scalars into weights."""

from __future__ import annotations

from xrlflow.ir import Node
from xrlflow.rules import common as C
from xrlflow.rules import examples as ex
from xrlflow.rules.engine import Match, Rewrite, Rule


def distribute_matmul(m: Match, add: Node):
    """x·W1 + x·W2 → x·(W1 + W2)  (distributivity; constant weights)."""
    a, b = (m.src(i, "MatMul") for i in add.inputs[:2])
    if (
        a is None
        or b is None
        or a is b
        or a.inputs[0] != b.inputs[0]
        or not (m.private(a) and m.private(b))
    ):
        return
    wa, wb = m.c(a.inputs[1]), m.c(b.inputs[1])
    if not (C.is_float(wa) and C.is_float(wb)) or wa.shape != wb.shape:
        return
    wn, inits = m.init(wa + wb, "sum_w")
    node = m.new("MatMul", (a.inputs[0], wn))
    yield Rewrite([node], {add.outputs[0]: node.outputs[0]}, inits)


def factor_matmul(m: Match, add: Node):
    """x1·W + x2·W → (x1 + x2)·W  (shared right operand, equal input shapes)."""
    a, b = (m.src(i, "MatMul") for i in add.inputs[:2])
    if (
        a is None
        or b is None
        or a is b
        or a.inputs[1] != b.inputs[1]
        or not (m.private(a) and m.private(b))
    ):
        return
    if m.shape(a.inputs[0]) is None or m.shape(a.inputs[0]) != m.shape(b.inputs[0]):
        return
    s = m.new("Add", (a.inputs[0], b.inputs[0]))
    node = m.new("MatMul", (s.outputs[0], a.inputs[1]))
    yield Rewrite([s, node], {add.outputs[0]: node.outputs[0]})


def matmul_assoc(m: Match, mm: Node):
    """(x·W1)·W2 → x·(W1·W2)  (associativity; folds the constant product)."""
    inner = m.src(mm.inputs[0], "MatMul")
    if inner is None or not m.private(inner):
        return
    w1, w2 = m.c(inner.inputs[1]), m.c(mm.inputs[1])
    if not (C.is_float(w1) and C.is_float(w2)) or w1.ndim != 2 or w2.ndim != 2:
        return
    wn, inits = m.init(w1 @ w2, "assoc_w")
    node = m.new("MatMul", (inner.inputs[0], wn))
    yield Rewrite([node], {mm.outputs[0]: node.outputs[0]}, inits)


def scale_into_matmul(m: Match, mm: Node):
    """(x·s)·W → x·(s·W) for a scalar constant s."""
    mul = m.src(mm.inputs[0], "Mul")
    w = m.c(mm.inputs[1])
    if mul is None or not m.private(mul) or not C.is_float(w):
        return
    bc = C.binary_const(m, mul)
    if bc is None or bc[1].size != 1 or not C.same_out_shape(m, mul, bc[0]):
        return
    wn, inits = m.init(w * bc[1].reshape(()), "scaled_w")
    node = m.new("MatMul", (bc[0], wn))
    yield Rewrite([node], {mm.outputs[0]: node.outputs[0]}, inits)


RULES: list[Rule] = [
    Rule("distribute_matmul", "algebra", "Add", distribute_matmul, ex.two_matmuls("x"),
         "x·W1 + x·W2 → x·(W1 + W2) for constant weights (distributivity)."),
    Rule("factor_matmul", "algebra", "Add", factor_matmul, ex.two_matmuls("w"),
         "x1·W + x2·W → (x1 + x2)·W for a shared right operand (factoring)."),
    Rule("matmul_assoc", "algebra", "MatMul", matmul_assoc, ex.assoc,
         "(x·W1)·W2 → x·(W1·W2) for constant 2-D weights (associativity)."),
    Rule("scale_into_matmul", "fold", "MatMul", scale_into_matmul, ex.scale_matmul,
         "(x · s)·W → x·(s·W) for a scalar constant s."),
]  # fmt: skip

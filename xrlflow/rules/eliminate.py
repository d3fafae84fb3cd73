"""Eliminations: identities, dropout, neutral elements, common subexpressions, split/concat
pairs."""

from __future__ import annotations

import numpy as np

from xrlflow.ir import Node
from xrlflow.rules import common as C
from xrlflow.rules import examples as ex
from xrlflow.rules.engine import Match, Rewrite, Rule


def identity_elim(m: Match, n: Node):
    yield from C.passthrough(m, n, n.inputs[0])


def dropout_elim(m: Match, n: Node):
    if len(n.inputs) > 2 and n.inputs[2]:
        mode = m.c(n.inputs[2])
        if mode is None or bool(mode):
            return
    if len(n.outputs) > 1 and n.outputs[1] and (m.cons.get(n.outputs[1]) or n.outputs[1] in m.outs):
        return
    yield from C.passthrough(m, n, n.inputs[0])


def neutral_elim(m: Match, n: Node):
    """x * 1, x + 0, x - 0, x / 1 (shape-preserving) → x."""
    c = m.c(n.inputs[1])
    if c is None or m.c(n.inputs[0]) is not None:
        return
    neutral = 1.0 if n.op in ("Mul", "Div") else 0.0
    if c.size and np.all(c == neutral):
        yield from C.passthrough(m, n, n.inputs[0])


def cse(m: Match, n: Node):
    """Common subexpression: an earlier node with the same op, attributes and inputs."""
    if n.op in C.NONDETERMINISTIC or not n.inputs:
        return
    key = _node_key(n)
    for other in m.cons.get(n.inputs[0], []):
        if other is n:
            return  # only rewrite the later duplicate, using the earlier one
        if _node_key(other) == key and len(other.outputs) == len(n.outputs):
            yield Rewrite([], dict(zip(n.outputs, other.outputs, strict=True)), remove=[n])
            return


def _node_key(n: Node):
    from xrlflow.ir import attr_key

    return (n.domain, n.op, n.inputs, sorted((k, attr_key(v)) for k, v in n.attrs.items()))


def split_concat_elim(m: Match, cat: Node):
    split = m.src(cat.inputs[0], "Split")
    if split is None or tuple(cat.inputs) != tuple(split.outputs):
        return
    rank = len(m.shape(split.inputs[0]) or ())
    if rank == 0 or split.attrs.get("axis", 0) % rank != cat.attrs["axis"] % rank:
        return
    yield from C.passthrough(m, cat, split.inputs[0])


def concat_split_elim(m: Match, split: Node):
    cat = m.src(split.inputs[0], "Concat")
    if cat is None or len(cat.inputs) != len(split.outputs):
        return
    rank = len(m.shape(cat.outputs[0]) or ())
    axis = split.attrs.get("axis", 0) % rank
    if cat.attrs["axis"] % rank != axis:
        return
    sizes = [m.shape(i)[axis] for i in cat.inputs]
    got = [m.shape(o)[axis] for o in split.outputs]
    if sizes != got:
        return
    yield Rewrite([], dict(zip(split.outputs, cat.inputs, strict=True)), remove=[split])


def concat_unary_hoist(m: Match, cat: Node):
    """Concat(u(a), u(b), ...) → u(Concat(a, b, ...)) for one elementwise unary op u."""
    srcs = [m.src(i) for i in cat.inputs]
    if len(srcs) < 2 or any(s is None or s.op not in C.UNARY or not m.private(s) for s in srcs):
        return
    if len({(s.op, tuple(sorted((k, str(v)) for k, v in s.attrs.items()))) for s in srcs}) != 1:
        return
    c = m.new("Concat", [s.inputs[0] for s in srcs], **cat.attrs)
    u = Node(m.g.fresh(srcs[0].op), srcs[0].op, c.outputs, (m.g.fresh("hoisted"),), srcs[0].attrs)
    yield Rewrite([c, u], {cat.outputs[0]: u.outputs[0]})


def relu_idempotent(m: Match, n: Node):
    inner = m.src(n.inputs[0], "Relu")
    if inner is not None:
        yield Rewrite([], {n.outputs[0]: inner.outputs[0]}, remove=[n])


RULES: list[Rule] = [
    Rule("identity_elim", "eliminate", "Identity", identity_elim, ex.unary("Identity"),
         "Identity(x) → x."),
    Rule("dropout_elim", "eliminate", "Dropout", dropout_elim, ex.unary("Dropout"),
         "Dropout at inference (no mask output used) → x."),
    Rule("neutral_elim", "eliminate", ("Mul", "Add", "Sub", "Div"), neutral_elim, ex.neutral,
         "x · 1, x + 0, x − 0, x / 1 (shape-preserving) → x."),
    Rule("cse", "eliminate", "*", cse, ex.cse,
         "Two identical operators on the same inputs → one (common subexpression)."),
    Rule("split_concat_elim", "eliminate", "Concat", split_concat_elim, ex.split_concat,
         "Concat of all of a Split's outputs, in order and on its axis → its input."),
    Rule("concat_split_elim", "eliminate", "Split", concat_split_elim, ex.concat_split,
         "Split of a Concat into the concatenated pieces → the pieces."),
    Rule("concat_unary_hoist", "layout", "Concat", concat_unary_hoist, ex.concat_unary,
         "Concat(u(a), u(b), …) → u(Concat(a, b, …)) for one elementwise unary u."),
    Rule("relu_idempotent", "eliminate", "Relu", relu_idempotent, ex.unary("Relu"),
         "Relu(Relu(x)) → Relu(x)."),
]  # fmt: skip

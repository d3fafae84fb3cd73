"""Verified subgraph substitutions, as data.

A :class:`Rule` is a pattern (the op type a match is anchored at) plus a rewrite function that
looks at the anchor's neighbourhood and returns zero or more :class:`Rewrite`\\ s (new nodes, new
initializers, and which old tensors the new ones replace). Old nodes that nothing reads any more
are dropped by dead-code elimination in :meth:`Graph.replace`. Every rule also carries an
``example``: a random instance of its pattern, which the tests rewrite and compare against the
original with onnxruntime (``tests/test_xrlflow_rules.py``).

Categories follow TASO's and extend them: ``fold`` (BatchNorm / scalar Mul and Add into weights),
``fuse`` (bias into Gemm/Conv), ``merge`` (parallel matmuls/convolutions sharing an input, Q/K/V
projections), ``enlarge`` (conv kernels, so convolutions can merge), ``algebra``
(distributivity, associativity), ``layout`` (transpose/reshape elimination and movement),
``eliminate`` (identities, dropout, common subexpressions, split/concat pairs) and ``const``
(constant folding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xrlflow.ir import Graph, GraphError, Node, check

# ---------------------------------------------------------------------------- data types


@dataclass
class Rewrite:
    """New nodes and initializers, and ``rename``: old tensor → the new tensor carrying its value."""

    add: list[Node]
    rename: dict[str, str]
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    remove: list[Node] = field(default_factory=list)


@dataclass(frozen=True)
class Rule:
    name: str
    category: str
    anchor: str | tuple[str, ...]
    """op type(s) a match starts at ("*": any op)"""
    rewrite: Callable[[Match, Node], Iterator[Rewrite]]
    example: Callable[[np.random.Generator], onnx.ModelProto]
    doc: str = ""


@dataclass(frozen=True)
class Candidate:
    """One applicable substitution: rule ``rule`` at ``node`` (``index``-th rewrite there)."""

    rule: str
    node: str
    index: int
    graph: Graph = field(compare=False, repr=False)


class Match:
    """Lookups a rewrite function needs (built once per graph)."""

    def __init__(self, g: Graph):
        self.g = g
        self.prod = g.producer_of()
        self.cons = g.consumers_of()
        self.outs = set(g.output_names)

    def c(self, t: str) -> np.ndarray | None:
        return self.g.initializers.get(t)

    def src(self, t: str, op: str | tuple[str, ...] | None = None) -> Node | None:
        n = self.prod.get(t)
        if n is None or (op is not None and n.op not in ((op,) if isinstance(op, str) else op)):
            return None
        return n

    def sole_use(self, t: str) -> Node | None:
        """The only consumer of ``t``, when ``t`` is not a graph output."""
        users = self.cons.get(t, [])
        return users[0] if len(users) == 1 and t not in self.outs else None

    def private(self, n: Node) -> bool:
        """Every output of ``n`` has at most one consumer and none is a graph output."""
        return all(len(self.cons.get(o, [])) <= 1 and o not in self.outs for o in n.outputs)

    def shape(self, t: str) -> tuple[int, ...] | None:
        return self.g.static_shape(t)

    def new(self, op: str, inputs, n_out: int = 1, **attrs) -> Node:
        outs = tuple(self.g.fresh(op.lower()) for _ in range(n_out))
        return Node(self.g.fresh(op), op, tuple(inputs), outs, attrs)

    def init(self, arr: np.ndarray, hint: str = "w") -> tuple[str, dict[str, np.ndarray]]:
        name = self.g.fresh(hint)
        return name, {name: np.ascontiguousarray(arr)}


def candidates(g: Graph, rules: list[Rule], limit: int | None = None) -> list[Candidate]:
    """Every (rule, location) whose rewrite passes :func:`check`, de-duplicated by graph hash."""
    m = Match(g)
    seen = {g.structural_hash()}
    out: list[Candidate] = []
    by_anchor: dict[str, list[Rule]] = {}
    for r in rules:
        for a in (r.anchor,) if isinstance(r.anchor, str) else r.anchor:
            by_anchor.setdefault(a, []).append(r)
    for n in list(g.nodes):
        for rule in by_anchor.get(n.op, []) + by_anchor.get("*", []):
            for i, rw in enumerate(_safe(rule, m, n)):
                new = apply(g, rw)
                if new is None:
                    continue
                h = new.structural_hash()
                if h in seen:
                    continue
                seen.add(h)
                out.append(Candidate(rule.name, n.name, i, new))
                if limit is not None and len(out) >= limit:
                    return out
    return out


def _safe(rule: Rule, m: Match, n: Node) -> list[Rewrite]:
    try:
        return list(rule.rewrite(m, n))
    except (ValueError, IndexError, KeyError, TypeError, ZeroDivisionError, FloatingPointError):
        return []  # a pattern that does not fit this instance (odd shapes, dtypes) is no match


def apply(g: Graph, rw: Rewrite) -> Graph | None:
    """The rewritten graph, or None when it fails :func:`check` (never a broken graph)."""
    try:
        new = g.replace(rw.remove, rw.add, rw.inits, rw.rename)
        return check(new, g.outputs)
    except GraphError:
        return None


def apply_named(g: Graph, rules: list[Rule], rule: str, node: str, index: int = 0) -> Graph:
    """Apply one recorded substitution (e.g. to replay a rewrite log)."""
    r = next(x for x in rules if x.name == rule)
    n = next(x for x in g.nodes if x.name == node)
    rws = _safe(r, Match(g), n)
    if index >= len(rws) or (new := apply(g, rws[index])) is None:
        raise GraphError(f"rule {rule} does not apply at {node}[{index}]")
    return new


# ---------------------------------------------------------------------------- helpers

FLOAT = (np.float32, np.float64, np.float16)


def _is_float(a: np.ndarray | None) -> bool:
    return a is not None and a.dtype in FLOAT


def _channel_vec(c: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
    """``c`` as a per-channel vector along ``axis`` of a rank-``rank`` tensor, if it is one."""
    if c.ndim > rank:
        return None
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    for i, d in enumerate(full.shape):
        if d != 1 and i != axis % rank:
            return None
    v = full.reshape(-1) if full.size > 1 else np.full((1,), full.reshape(-1)[0])
    if v.size not in (1, channels):
        return None
    return np.broadcast_to(v, (channels,)).astype(c.dtype)


def _conv_parts(m: Match, conv: Node):
    w = m.c(conv.inputs[1])
    if not _is_float(w):
        return None
    b = (
        m.c(conv.inputs[2])
        if len(conv.inputs) > 2 and conv.inputs[2]
        else np.zeros(w.shape[0], w.dtype)
    )
    if b is None:
        return None
    return w, b


def _conv(m: Match, like: Node, x: str, w: np.ndarray, b: np.ndarray, **attrs) -> tuple[Node, dict]:
    wn, wi = m.init(w.astype(w.dtype), "conv_w")
    bn, bi = m.init(b.astype(w.dtype), "conv_b")
    node = m.new("Conv", (x, wn, bn), **{**like.attrs, **attrs})
    return node, {**wi, **bi}


def _binary_const(m: Match, n: Node) -> tuple[str, np.ndarray] | None:
    """(variable input, constant input) of a binary elementwise node, either order."""
    a, b = n.inputs[0], n.inputs[1]
    if m.c(b) is not None and m.c(a) is None:
        return a, m.c(b)
    if n.op in ("Add", "Mul") and m.c(a) is not None and m.c(b) is None:
        return b, m.c(a)
    return None


def _same_out_shape(m: Match, n: Node, x: str) -> bool:
    return m.shape(n.outputs[0]) is not None and m.shape(n.outputs[0]) == m.shape(x)


def _after(m: Match, n: Node, op: str) -> tuple[Node, str, np.ndarray] | None:
    """(producer, its output, constant) when ``n`` combines a private ``op`` output with a
    constant without changing its shape: the pattern every fold into weights starts from."""
    bc = _binary_const(m, n)
    p = m.src(bc[0], op) if bc else None
    if p is None or not m.private(p) or not _same_out_shape(m, n, bc[0]):
        return None
    return p, bc[0], bc[1]


def _conv_channel_fold(m: Match, n: Node):
    """(conv, weight, bias, per-output-channel constant) for Conv → Mul/Add by a constant."""
    hit = _after(m, n, "Conv")
    parts = _conv_parts(m, hit[0]) if hit else None
    if parts is None:
        return None
    v = _channel_vec(hit[2], parts[0].shape[0], len(m.shape(hit[1])), 1)
    return None if v is None else (hit[0], *parts, v)


# ---------------------------------------------------------------------------- example DSL


def _model(rng: np.random.Generator, nodes: list, inputs: dict[str, list[int]], outputs: list[str],
           inits: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:  # fmt: skip
    """A float32 ONNX model; ``nodes`` are ``(op, inputs, outputs, attrs)`` tuples."""
    g = helper.make_graph(
        [
            helper.make_node(op, list(i), list(o), name=f"n{k}", **(a or {}))
            for k, (op, i, o, a) in enumerate(nodes)
        ],  # fmt: skip
        "example",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _r(rng, *shape, scale=0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _pos(rng, *shape) -> np.ndarray:
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)


def _i64(*v) -> np.ndarray:
    return np.array(v, dtype=np.int64)


# ---------------------------------------------------------------------------- fold


def conv_bn_fold(m: Match, bn: Node):
    conv = m.src(bn.inputs[0], "Conv")
    if conv is None or not m.private(conv) or len(bn.outputs) != 1:
        return
    parts = _conv_parts(m, conv)
    s, beta, mean, var = (m.c(t) for t in bn.inputs[1:5])
    if parts is None or any(x is None for x in (s, beta, mean, var)):
        return
    w, b = parts
    scale = s / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    node, inits = _conv(m, conv, conv.inputs[0], w * scale.reshape(-1, *[1] * (w.ndim - 1)),
                        (b - mean) * scale + beta)  # fmt: skip
    yield Rewrite([node], {bn.outputs[0]: node.outputs[0]}, inits)


def _ex_conv_then(op: str, const_shape):
    def ex(rng):
        nodes = [
            ("Conv", ["x", "w", "b"], ["c"], {"pads": [1, 1, 1, 1]}),
            (op, ["c", "k"], ["y"], None),
        ]
        return _model(rng, nodes, {"x": [1, 4, 6, 6]}, ["y"],
                      {"w": _r(rng, 5, 4, 3, 3), "b": _r(rng, 5), "k": _pos(rng, *const_shape)})  # fmt: skip

    return ex


def _ex_conv_bn(rng):
    nodes = [("Conv", ["x", "w", "b"], ["c"], {"pads": [1, 1, 1, 1]}),
             ("BatchNormalization", ["c", "s", "t", "mu", "var"], ["y"], {"epsilon": 1e-3})]  # fmt: skip
    return _model(rng, nodes, {"x": [1, 4, 6, 6]}, ["y"], {"w": _r(rng, 5, 4, 3, 3), "b": _r(rng, 5),
                  "s": _pos(rng, 5), "t": _r(rng, 5), "mu": _r(rng, 5), "var": _pos(rng, 5)})  # fmt: skip


def conv_mul_fold(m: Match, mul: Node):
    hit = _conv_channel_fold(m, mul)
    if hit is None:
        return
    conv, w, b, v = hit
    node, inits = _conv(m, conv, conv.inputs[0], w * v.reshape(-1, *[1] * (w.ndim - 1)), b * v)
    yield Rewrite([node], {mul.outputs[0]: node.outputs[0]}, inits)


def conv_add_fold(m: Match, add: Node):
    hit = _conv_channel_fold(m, add)
    if hit is None:
        return
    conv, w, b, v = hit
    node, inits = _conv(m, conv, conv.inputs[0], w, b + v)
    yield Rewrite([node], {add.outputs[0]: node.outputs[0]}, inits)


def matmul_mul_fold(m: Match, mul: Node):
    hit = _after(m, mul, "MatMul")
    if hit is None:
        return
    mm, x, k = hit
    w = m.c(mm.inputs[1])
    if not _is_float(w) or w.ndim != 2:
        return
    v = _channel_vec(k, w.shape[1], len(m.shape(x)), -1)
    if v is None:
        return
    wn, inits = m.init(w * v[None, :], "mm_w")
    node = m.new("MatMul", (mm.inputs[0], wn))
    yield Rewrite([node], {mul.outputs[0]: node.outputs[0]}, inits)


def _ex_matmul_then(op: str, const_shape, rank3: bool = False):
    def ex(rng):
        nodes = [("MatMul", ["x", "w"], ["c"], None), (op, ["c", "k"], ["y"], None)]
        x = [2, 3, 8] if rank3 else [3, 8]
        return _model(
            rng, nodes, {"x": x}, ["y"], {"w": _r(rng, 8, 6), "k": _pos(rng, *const_shape)}
        )

    return ex


def matmul_add_to_gemm(m: Match, add: Node):
    hit = _after(m, add, "MatMul")
    if hit is None:
        return
    mm, x, k = hit
    xs = m.shape(mm.inputs[0])
    w = m.c(mm.inputs[1])
    if xs is None or len(xs) != 2 or not _is_float(w) or w.ndim != 2:
        return
    v = _channel_vec(k, w.shape[1], 2, -1)
    if v is None:
        return
    cn, inits = m.init(v, "gemm_c")
    node = m.new("Gemm", (mm.inputs[0], mm.inputs[1], cn))
    yield Rewrite([node], {add.outputs[0]: node.outputs[0]}, inits)


def gemm_to_matmul_add(m: Match, gemm: Node):
    a = gemm.attrs
    if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
        return
    if len(gemm.inputs) < 3 or not gemm.inputs[2]:
        return
    b = gemm.inputs[1]
    nodes = []
    if a.get("transB", 0):
        t = m.new("Transpose", (b,), perm=[1, 0])
        nodes.append(t)
        b = t.outputs[0]
    mm = m.new("MatMul", (gemm.inputs[0], b))
    add = m.new("Add", (mm.outputs[0], gemm.inputs[2]))
    yield Rewrite(nodes + [mm, add], {gemm.outputs[0]: add.outputs[0]})


def _ex_gemm(trans_b: int = 0, alpha: float = 1.0):
    def ex(rng):
        w = _r(rng, 6, 8) if trans_b else _r(rng, 8, 6)
        nodes = [("Gemm", ["x", "w", "c"], ["y"], {"transB": trans_b, "alpha": alpha})]
        return _model(rng, nodes, {"x": [3, 8]}, ["y"], {"w": w, "c": _r(rng, 6)})

    return ex


def gemm_add_fold(m: Match, add: Node):
    hit = _after(m, add, "Gemm")
    if hit is None:
        return
    gemm, x, k = hit
    n_out = m.shape(x)[1]
    v = _channel_vec(k, n_out, 2, -1)
    if v is None:
        return
    beta = gemm.attrs.get("beta", 1.0)
    c = m.c(gemm.inputs[2]) if len(gemm.inputs) > 2 and gemm.inputs[2] else np.zeros(n_out, v.dtype)
    if c is None:
        return
    cn, inits = m.init(beta * c + v, "gemm_c")
    node = m.new("Gemm", (gemm.inputs[0], gemm.inputs[1], cn), **{**gemm.attrs, "beta": 1.0})
    yield Rewrite([node], {add.outputs[0]: node.outputs[0]}, inits)


def gemm_mul_fold(m: Match, mul: Node):
    hit = _after(m, mul, "Gemm")
    if hit is None:
        return
    gemm, x, k = hit
    w = m.c(gemm.inputs[1])
    if not _is_float(w):
        return
    n_out = m.shape(x)[1]
    v = _channel_vec(k, n_out, 2, -1)
    if v is None:
        return
    w2 = w * (v[:, None] if gemm.attrs.get("transB", 0) else v[None, :])
    wn, inits = m.init(w2, "gemm_w")
    ins = [gemm.inputs[0], wn]
    if len(gemm.inputs) > 2 and gemm.inputs[2]:
        c = m.c(gemm.inputs[2])
        if c is None:
            return
        cn, ci = m.init(np.broadcast_to(c, np.broadcast_shapes(c.shape, v.shape)) * v, "gemm_c")
        ins.append(cn)
        inits |= ci
    node = m.new("Gemm", ins, **gemm.attrs)
    yield Rewrite([node], {mul.outputs[0]: node.outputs[0]}, inits)


def _ex_gemm_then(op: str):
    def ex(rng):
        nodes = [
            ("Gemm", ["x", "w", "c"], ["g"], {"transB": 1, "beta": 0.5}),
            (op, ["g", "k"], ["y"], None),
        ]
        return _model(rng, nodes, {"x": [3, 8]}, ["y"],
                      {"w": _r(rng, 6, 8), "c": _r(rng, 6), "k": _pos(rng, 6)})  # fmt: skip

    return ex


def bn_to_mul_add(m: Match, bn: Node):
    if len(bn.outputs) != 1:
        return
    s, beta, mean, var = (m.c(t) for t in bn.inputs[1:5])
    xs = m.shape(bn.inputs[0])
    if any(x is None for x in (s, beta, mean, var)) or xs is None:
        return
    scale = s / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    shift = beta - mean * scale
    shape = (-1,) + (1,) * (len(xs) - 2)
    sn, i1 = m.init(scale.reshape(shape), "bn_scale")
    tn, i2 = m.init(shift.reshape(shape), "bn_shift")
    mul = m.new("Mul", (bn.inputs[0], sn))
    add = m.new("Add", (mul.outputs[0], tn))
    yield Rewrite([mul, add], {bn.outputs[0]: add.outputs[0]}, i1 | i2)


def _ex_bn(rng):
    nodes = [("Relu", ["x"], ["r"], None),
             ("BatchNormalization", ["r", "s", "t", "mu", "var"], ["y"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [2, 3, 4, 4]}, ["y"], {"s": _pos(rng, 3), "t": _r(rng, 3),
                  "mu": _r(rng, 3), "var": _pos(rng, 3)})  # fmt: skip


def _const_chain(op: str):
    def rule(m: Match, n: Node):
        bc = _binary_const(m, n)
        inner = m.src(bc[0], op) if bc else None
        if inner is None or not m.private(inner):
            return
        ic = _binary_const(m, inner)
        if ic is None or not _is_float(ic[1]) or not _is_float(bc[1]):
            return
        c = ic[1] * bc[1] if op == "Mul" else ic[1] + bc[1]
        if c.ndim > len(m.shape(n.outputs[0]) or ()):
            return
        cn, inits = m.init(c, "k")
        node = m.new(op, (ic[0], cn))
        yield Rewrite([node], {n.outputs[0]: node.outputs[0]}, inits)

    return rule


def _ex_chain(op: str, op2: str | None = None):
    def ex(rng):
        nodes = [("Relu", ["x"], ["r"], None), (op, ["r", "k1"], ["a"], None),
                 (op2 or op, ["a", "k2"], ["y"], None)]  # fmt: skip
        return _model(rng, nodes, {"x": [2, 5]}, ["y"], {"k1": _pos(rng, 5), "k2": _pos(rng, 1)})

    return ex


def div_const_to_mul(m: Match, div: Node):
    c = m.c(div.inputs[1])
    if not _is_float(c) or np.any(c == 0):
        return
    cn, inits = m.init((1.0 / c).astype(c.dtype), "recip")
    node = m.new("Mul", (div.inputs[0], cn))
    yield Rewrite([node], {div.outputs[0]: node.outputs[0]}, inits)


def sub_const_to_add(m: Match, sub: Node):
    c = m.c(sub.inputs[1])
    if not _is_float(c) or m.c(sub.inputs[0]) is not None:
        return
    cn, inits = m.init(-c, "neg")
    node = m.new("Add", (sub.inputs[0], cn))
    yield Rewrite([node], {sub.outputs[0]: node.outputs[0]}, inits)


def _ex_binary(op: str, value=None):
    def ex(rng):
        k = _pos(rng, 5) if value is None else np.full((5,), value, np.float32)
        nodes = [("Relu", ["x"], ["r"], None), (op, ["r", "k"], ["y"], None)]
        return _model(rng, nodes, {"x": [2, 5]}, ["y"], {"k": k})

    return ex


# ---------------------------------------------------------------------------- const


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli", "Dropout"}  # fmt: skip
_FOLD_LIMIT = 1 << 22  # elements: never materialise huge constants


def constant_fold(m: Match, n: Node):
    if n.domain or n.op in _NONDETERMINISTIC or n.op == "Constant":
        return
    ins = [i for i in n.inputs if i]
    if not ins or any(m.c(i) is None for i in ins):
        return
    from onnx.reference import ReferenceEvaluator

    sub = helper.make_graph(
        [helper.make_node(n.op, list(n.inputs), list(n.outputs), **n.attrs)], "fold",
        [], [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in n.outputs if o],
        [numpy_helper.from_array(m.c(i), i) for i in dict.fromkeys(ins)],
    )  # fmt: skip
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


def _ex_fold(rng):
    nodes = [("Transpose", ["w"], ["wt"], {"perm": [1, 0]}), ("MatMul", ["x", "wt"], ["y"], None)]
    return _model(rng, nodes, {"x": [3, 6]}, ["y"], {"w": _r(rng, 4, 6)})


def shape_fold(m: Match, n: Node):
    """Shape(x) of a statically shaped x → a constant (then ``constant_fold`` cascades)."""
    shape = m.shape(n.inputs[0])
    if shape is None:
        return
    start, end = n.attrs.get("start", 0), n.attrs.get("end", None)
    name, inits = m.init(np.array(shape[start:end], dtype=np.int64), "shape")
    yield Rewrite([], {n.outputs[0]: name}, inits, remove=[n])


def _ex_shape(rng):
    nodes = [("Relu", ["x"], ["r"], None), ("Shape", ["r"], ["s"], {"start": 1}),
             ("Reshape", ["x", "s"], ["a"], None), ("Sigmoid", ["a"], ["y"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [1, 3, 4]}, ["y"])


def constant_to_initializer(m: Match, n: Node):
    value = n.attrs.get("value")
    if value is None:
        return
    arr = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
    name, inits = m.init(arr, "const")
    yield Rewrite([], {n.outputs[0]: name}, inits, remove=[n])


def _ex_constant(rng):
    k = numpy_helper.from_array(_pos(rng, 5))
    nodes = [("Constant", [], ["k"], {"value": k}), ("Mul", ["x", "k"], ["y"], None)]
    return _model(rng, nodes, {"x": [2, 5]}, ["y"])


# ---------------------------------------------------------------------------- eliminate


def _passthrough(m: Match, n: Node, src: str):
    if m.shape(src) is None or m.shape(src) != m.shape(n.outputs[0]):
        return
    if m.g.elem_type(src) != m.g.elem_type(n.outputs[0]):
        return
    yield Rewrite([], {n.outputs[0]: src}, remove=[n])


def identity_elim(m: Match, n: Node):
    yield from _passthrough(m, n, n.inputs[0])


def dropout_elim(m: Match, n: Node):
    if len(n.inputs) > 2 and n.inputs[2]:
        mode = m.c(n.inputs[2])
        if mode is None or bool(mode):
            return
    if len(n.outputs) > 1 and n.outputs[1] and (m.cons.get(n.outputs[1]) or n.outputs[1] in m.outs):
        return
    yield from _passthrough(m, n, n.inputs[0])


def _ex_unary(op: str, **attrs):
    def ex(rng):
        nodes = [
            ("Relu", ["x"], ["r"], None),
            (op, ["r"], ["a"], attrs or None),
            ("Sigmoid", ["a"], ["y"], None),
        ]
        return _model(rng, nodes, {"x": [2, 5]}, ["y"])

    return ex


def neutral_elim(m: Match, n: Node):
    """x * 1, x + 0, x - 0, x / 1 (shape-preserving) → x."""
    c = m.c(n.inputs[1])
    if c is None or m.c(n.inputs[0]) is not None:
        return
    neutral = 1.0 if n.op in ("Mul", "Div") else 0.0
    if c.size and np.all(c == neutral):
        yield from _passthrough(m, n, n.inputs[0])


def _ex_neutral(rng):
    nodes = [("Relu", ["x"], ["r"], None), ("Mul", ["r", "one"], ["a"], None),
             ("Add", ["a", "zero"], ["b"], None), ("Sub", ["b", "zero"], ["c"], None),
             ("Div", ["c", "one"], ["y"], None)]  # fmt: skip
    return _model(
        rng,
        nodes,
        {"x": [2, 5]},
        ["y"],
        {"one": np.ones(5, np.float32), "zero": np.zeros((1, 5), np.float32)},
    )


def cse(m: Match, n: Node):
    """Common subexpression: an earlier node with the same op, attributes and inputs."""
    if n.op in _NONDETERMINISTIC or not n.inputs:
        return
    key = _node_key(n)
    for other in m.cons.get(n.inputs[0], []):
        if other is n:
            return  # only rewrite the later duplicate, using the earlier one
        if _node_key(other) == key and len(other.outputs) == len(n.outputs):
            yield Rewrite([], dict(zip(n.outputs, other.outputs, strict=True)), remove=[n])
            return


def _node_key(n: Node):
    from xrlflow.ir import _attr_key

    return (n.domain, n.op, n.inputs, sorted((k, _attr_key(v)) for k, v in n.attrs.items()))


def _ex_cse(rng):
    nodes = [("MatMul", ["x", "w"], ["a"], None), ("MatMul", ["x", "w"], ["b"], None),
             ("Add", ["a", "b"], ["y"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [3, 4]}, ["y"], {"w": _r(rng, 4, 4)})


def split_concat_elim(m: Match, cat: Node):
    split = m.src(cat.inputs[0], "Split")
    if split is None or tuple(cat.inputs) != tuple(split.outputs):
        return
    rank = len(m.shape(split.inputs[0]) or ())
    if rank == 0 or split.attrs.get("axis", 0) % rank != cat.attrs["axis"] % rank:
        return
    yield from _passthrough(m, cat, split.inputs[0])


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


def _ex_split_concat(rng):
    nodes = [("Relu", ["x"], ["r"], None), ("Split", ["r", "s"], ["a", "b"], {"axis": 1}),
             ("Concat", ["a", "b"], ["c"], {"axis": 1}), ("Sigmoid", ["c"], ["y"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [2, 6]}, ["y"], {"s": _i64(2, 4)})


def _ex_concat_split(rng):
    nodes = [("Concat", ["x", "z"], ["c"], {"axis": 1}), ("Split", ["c", "s"], ["a", "b"], {"axis": 1}),
             ("Mul", ["a", "a"], ["y1"], None), ("Relu", ["b"], ["y2"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [2, 2], "z": [2, 4]}, ["y1", "y2"], {"s": _i64(2, 4)})


def concat_unary_hoist(m: Match, cat: Node):
    """Concat(u(a), u(b), ...) → u(Concat(a, b, ...)) for one elementwise unary op u."""
    srcs = [m.src(i) for i in cat.inputs]
    if len(srcs) < 2 or any(s is None or s.op not in _UNARY or not m.private(s) for s in srcs):
        return
    if len({(s.op, tuple(sorted((k, str(v)) for k, v in s.attrs.items()))) for s in srcs}) != 1:
        return
    c = m.new("Concat", [s.inputs[0] for s in srcs], **cat.attrs)
    u = Node(m.g.fresh(srcs[0].op), srcs[0].op, c.outputs, (m.g.fresh("hoisted"),), srcs[0].attrs)
    yield Rewrite([c, u], {cat.outputs[0]: u.outputs[0]})


def _ex_concat_unary(rng):
    nodes = [("Relu", ["x"], ["a"], None), ("Relu", ["z"], ["b"], None),
             ("Concat", ["a", "b"], ["c"], {"axis": 1}), ("Sigmoid", ["c"], ["y"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [2, 3], "z": [2, 4]}, ["y"])


def relu_idempotent(m: Match, n: Node):
    inner = m.src(n.inputs[0], "Relu")
    if inner is not None:
        yield Rewrite([], {n.outputs[0]: inner.outputs[0]}, remove=[n])


# ---------------------------------------------------------------------------- layout


def _perm(n: Node, rank: int) -> list[int]:
    return list(n.attrs.get("perm", list(range(rank))[::-1]))


def transpose_pair(m: Match, n: Node):
    inner = m.src(n.inputs[0], "Transpose")
    xs = m.shape(n.inputs[0])
    if inner is None or xs is None:
        return
    p1, p2 = _perm(inner, len(xs)), _perm(n, len(xs))
    perm = [p1[i] for i in p2]
    if perm == list(range(len(perm))):
        yield from _passthrough(m, n, inner.inputs[0])
        return
    node = m.new("Transpose", (inner.inputs[0],), perm=perm)
    yield Rewrite([node], {n.outputs[0]: node.outputs[0]})


def transpose_identity_elim(m: Match, n: Node):
    xs = m.shape(n.inputs[0])
    if xs is not None and _perm(n, len(xs)) == list(range(len(xs))):
        yield from _passthrough(m, n, n.inputs[0])


def _ex_transposes(rng):
    nodes = [("Transpose", ["x"], ["a"], {"perm": [0, 2, 1]}), ("Transpose", ["a"], ["b"], {"perm": [2, 1, 0]}),
             ("Transpose", ["b"], ["c"], {"perm": [0, 1, 2]}), ("Sigmoid", ["c"], ["y"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [2, 3, 4]}, ["y"])


def _ex_transpose_back(rng):
    nodes = [("Transpose", ["x"], ["a"], {"perm": [1, 0]}), ("Relu", ["a"], ["r"], None),
             ("Transpose", ["r"], ["y"], {"perm": [1, 0]})]  # fmt: skip
    return _model(rng, nodes, {"x": [3, 4]}, ["y"])


_SHAPE_OPS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")


def reshape_chain(m: Match, n: Node):
    """Two shape-only ops in a row → one Reshape (or nothing, when the shape comes back)."""
    inner = m.src(n.inputs[0], _SHAPE_OPS)
    if inner is None:
        return
    src, out = inner.inputs[0], m.shape(n.outputs[0])
    if out is None or m.shape(src) is None:
        return
    if m.shape(src) == out:
        yield from _passthrough(m, n, src)
        return
    sn, inits = m.init(np.array(out, dtype=np.int64), "shape")
    node = m.new("Reshape", (src, sn))
    yield Rewrite([node], {n.outputs[0]: node.outputs[0]}, inits)


def reshape_identity_elim(m: Match, n: Node):
    yield from _passthrough(m, n, n.inputs[0])


def _ex_reshapes(rng):
    nodes = [("Relu", ["x"], ["r"], None), ("Reshape", ["r", "s1"], ["a"], None),
             ("Unsqueeze", ["a", "ax"], ["b"], None), ("Reshape", ["b", "s2"], ["c"], None),
             ("Sigmoid", ["c"], ["y"], None)]  # fmt: skip
    return _model(
        rng, nodes, {"x": [2, 3, 4]}, ["y"], {"s1": _i64(6, 4), "ax": _i64(0), "s2": _i64(2, 3, 4)}
    )


def _ex_reshape_same(rng):
    nodes = [
        ("Relu", ["x"], ["r"], None),
        ("Reshape", ["r", "s"], ["a"], None),
        ("Sigmoid", ["a"], ["y"], None),
    ]
    return _model(rng, nodes, {"x": [2, 3, 4]}, ["y"], {"s": _i64(2, -1, 4)})


_UNARY = ("Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Erf", "LeakyRelu", "Elu", "Softplus")


def transpose_after_unary(m: Match, n: Node):
    """Unary(Transpose(x)) → Transpose(Unary(x)): moves transposes towards each other."""
    t = m.src(n.inputs[0], "Transpose")
    if t is None or not m.private(t):
        return
    u = Node(m.g.fresh(n.op), n.op, (t.inputs[0],), (m.g.fresh(n.op.lower()),), n.attrs)
    nt = m.new("Transpose", (u.outputs[0],), **t.attrs)
    yield Rewrite([u, nt], {n.outputs[0]: nt.outputs[0]})


def transpose_before_unary(m: Match, t: Node):
    """Transpose(Unary(x)) → Unary(Transpose(x)) (the reverse movement)."""
    u = m.src(t.inputs[0], _UNARY)
    if u is None or not m.private(u):
        return
    nt = m.new("Transpose", (u.inputs[0],), **t.attrs)
    nu = Node(m.g.fresh(u.op), u.op, (nt.outputs[0],), (m.g.fresh(u.op.lower()),), u.attrs)
    yield Rewrite([nt, nu], {t.outputs[0]: nu.outputs[0]})


def matmul_transpose_to_gemm(m: Match, mm: Node):
    """MatMul(x, Transpose(y)) on 2-D operands → Gemm(x, y, transB=1)."""
    t = m.src(mm.inputs[1], "Transpose")
    xs, ys = m.shape(mm.inputs[0]), m.shape(mm.inputs[1])
    if t is None or xs is None or ys is None or len(xs) != 2 or len(ys) != 2:
        return
    if _perm(t, 2) != [1, 0]:
        return
    node = m.new("Gemm", (mm.inputs[0], t.inputs[0]), transB=1)
    yield Rewrite([node], {mm.outputs[0]: node.outputs[0]})


def _ex_matmul_transpose(rng):
    nodes = [("Relu", ["w"], ["r"], None), ("Transpose", ["r"], ["t"], {"perm": [1, 0]}),
             ("MatMul", ["x", "t"], ["y"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [3, 5], "w": [4, 5]}, ["y"])


def conv_pad_fold(m: Match, conv: Node):
    pad = m.src(conv.inputs[0], "Pad")
    if pad is None or pad.attrs.get("mode", b"constant") not in (b"constant", "constant"):
        return
    pads = m.c(pad.inputs[1])
    value = m.c(pad.inputs[2]) if len(pad.inputs) > 2 and pad.inputs[2] else np.zeros(1)
    if (
        pads is None
        or value is None
        or np.any(value != 0)
        or (len(pad.inputs) > 3 and pad.inputs[3])
    ):
        return
    if conv.attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return
    r = len(pads) // 2
    if np.any(pads < 0) or pads[0] or pads[1] or pads[r] or pads[r + 1]:
        return  # only spatial padding folds
    old = list(conv.attrs.get("pads", [0] * (2 * (r - 2))))
    sp = [int(p) for p in list(pads[2:r]) + list(pads[r + 2 :])]
    node = Node(m.g.fresh("Conv"), "Conv", (pad.inputs[0], *conv.inputs[1:]),
                (m.g.fresh("conv"),), {**conv.attrs, "pads": [a + b for a, b in zip(old, sp, strict=True)]})  # fmt: skip
    yield Rewrite([node], {conv.outputs[0]: node.outputs[0]})


def _ex_pad_conv(rng):
    nodes = [
        ("Pad", ["x", "p"], ["xp"], None),
        ("Conv", ["xp", "w", "b"], ["y"], {"pads": [0, 1, 0, 1]}),
    ]
    return _model(rng, nodes, {"x": [1, 3, 6, 6]}, ["y"],
                  {"p": _i64(0, 0, 1, 1, 0, 0, 1, 0), "w": _r(rng, 4, 3, 3, 3), "b": _r(rng, 4)})  # fmt: skip


# ---------------------------------------------------------------------------- merge / enlarge


def _conv_key(n: Node):
    a = n.attrs
    return (tuple(a.get("strides", ())), tuple(a.get("pads", ())), tuple(a.get("dilations", ())),
            a.get("group", 1), a.get("auto_pad", b"NOTSET"))  # fmt: skip


def _split(m: Match, src: str, sizes: list[int], axis: int, olds: list[str]):
    sn, inits = m.init(np.array(sizes, dtype=np.int64), "split")
    node = m.new("Split", (src, sn), n_out=len(sizes), axis=axis)
    return node, dict(zip(olds, node.outputs, strict=True)), inits


def merge_parallel_conv(m: Match, a: Node):
    pa = _conv_parts(m, a)
    if pa is None or a.attrs.get("group", 1) != 1:
        return
    for b in m.cons.get(a.inputs[0], []):
        if b is a or b.op != "Conv" or m.g.nodes.index(b) < m.g.nodes.index(a):
            continue
        pb = _conv_parts(m, b)
        if pb is None or _conv_key(a) != _conv_key(b) or pa[0].shape[1:] != pb[0].shape[1:]:
            continue
        node, inits = _conv(
            m, a, a.inputs[0], np.concatenate([pa[0], pb[0]]), np.concatenate([pa[1], pb[1]])
        )
        split, rename, si = _split(m, node.outputs[0], [pa[0].shape[0], pb[0].shape[0]], 1,
                                   [a.outputs[0], b.outputs[0]])  # fmt: skip
        yield Rewrite([node, split], rename, inits | si)


def _ex_parallel_conv(k2: int):
    def ex(rng):
        nodes = [("Conv", ["x", "w1", "b1"], ["a"], {"pads": [1, 1, 1, 1]}),
                 ("Conv", ["x", "w2", "b2"], ["b"], {"pads": [k2 // 2] * 4}),
                 ("Relu", ["a"], ["y1"], None), ("Relu", ["b"], ["y2"], None)]  # fmt: skip
        return _model(rng, nodes, {"x": [1, 3, 6, 6]}, ["y1", "y2"], {"w1": _r(rng, 4, 3, 3, 3),
                      "b1": _r(rng, 4), "w2": _r(rng, 2, 3, k2, k2), "b2": _r(rng, 2)})  # fmt: skip

    return ex


def enlarge_conv_kernel(m: Match, a: Node):
    """Pad a k×k kernel with zeros to a sibling conv's larger K×K (stride 1), so they can merge."""
    pa = _conv_parts(m, a)
    if (
        pa is None
        or a.attrs.get("group", 1) != 1
        or any(s != 1 for s in a.attrs.get("strides", [1, 1]))
    ):
        return
    if any(d != 1 for d in a.attrs.get("dilations", [1, 1])) or pa[0].ndim != 4:
        return
    kh, kw = pa[0].shape[2:]
    pads = list(a.attrs.get("pads", [0, 0, 0, 0]))
    done = set()
    for b in m.cons.get(a.inputs[0], []):
        pb = _conv_parts(m, b) if b.op == "Conv" and b is not a else None
        if pb is None or pb[0].ndim != 4:
            continue
        KH, KW = pb[0].shape[2:]  # noqa: N806
        if (KH, KW) in done or KH < kh or KW < kw or (KH, KW) == (kh, kw):
            continue
        dh, dw = KH - kh, KW - kw
        if dh % 2 or dw % 2:
            continue
        done.add((KH, KW))
        w = np.pad(pa[0], ((0, 0), (0, 0), (dh // 2, dh // 2), (dw // 2, dw // 2)))
        new_pads = [pads[0] + dh // 2, pads[1] + dw // 2, pads[2] + dh // 2, pads[3] + dw // 2]
        node, inits = _conv(m, a, a.inputs[0], w, pa[1], pads=new_pads, kernel_shape=[KH, KW])
        yield Rewrite([node], {a.outputs[0]: node.outputs[0]}, inits)


def _matmul_branch(m: Match, mm: Node):
    """(weight, bias or None, output) of MatMul(x, W const 2-D) optionally followed by Add(b)."""
    w = m.c(mm.inputs[1])
    if not _is_float(w) or w.ndim != 2:
        return None
    add = m.sole_use(mm.outputs[0])
    if add is not None and add.op == "Add":
        bc = _binary_const(m, add)
        if bc is not None and bc[0] == mm.outputs[0]:
            v = _channel_vec(bc[1], w.shape[1], len(m.shape(mm.outputs[0]) or (1, 1)), -1)
            if v is not None and _same_out_shape(m, add, mm.outputs[0]):
                return w, v, add.outputs[0]
    return w, None, mm.outputs[0]


def _merge_matmuls(m: Match, x: str, branches: list[tuple[np.ndarray, np.ndarray | None, str]]):
    use_bias = any(b is not None for _, b, _ in branches)
    wn, inits = m.init(np.concatenate([w for w, _, _ in branches], axis=1), "merged_w")
    mm = m.new("MatMul", (x, wn))
    nodes, out = [mm], mm.outputs[0]
    if use_bias:
        b = np.concatenate(
            [bb if bb is not None else np.zeros(w.shape[1], w.dtype) for w, bb, _ in branches]
        )
        bn, bi = m.init(b, "merged_b")
        add = m.new("Add", (out, bn))
        nodes.append(add)
        inits |= bi
        out = add.outputs[0]
    rank = len(m.shape(x) or (1, 1))
    split, rename, si = _split(m, out, [w.shape[1] for w, _, _ in branches], rank - 1,
                               [o for _, _, o in branches])  # fmt: skip
    return Rewrite(nodes + [split], rename, inits | si)


def merge_parallel_matmul(m: Match, a: Node):
    """x·W1, x·W2 (each with an optional bias Add) → x·[W1|W2] (+[b1|b2]), then Split."""
    ba = _matmul_branch(m, a)
    if ba is None:
        return
    for b in m.cons.get(a.inputs[0], []):
        if (
            b is a
            or b.op != "MatMul"
            or b.inputs[0] != a.inputs[0]
            or m.g.nodes.index(b) < m.g.nodes.index(a)
        ):
            continue
        bb = _matmul_branch(m, b)
        if bb is None or bb[0].shape[0] != ba[0].shape[0] or bb[0].dtype != ba[0].dtype:
            continue
        yield _merge_matmuls(m, a.inputs[0], [ba, bb])


def merge_all_projections(m: Match, a: Node):
    """Attention: every projection x·W_i (+b_i) of one input (Q, K, V, ...) → one matmul + Split."""
    x = a.inputs[0]
    mms = [n for n in m.cons.get(x, []) if n.op == "MatMul" and n.inputs[0] == x]
    if len(mms) < 3 or mms[0] is not a:
        return
    branches = [_matmul_branch(m, n) for n in mms]
    if (
        any(b is None for b in branches)
        or len({(b[0].shape[0], b[0].dtype) for b in branches}) != 1
    ):
        return
    yield _merge_matmuls(m, x, branches)


def _ex_parallel_matmul(n: int, bias: bool):
    def ex(rng):
        nodes, inits, outs = [], {}, []
        for i in range(n):
            nodes.append(("MatMul", ["x", f"w{i}"], [f"m{i}"], None))
            inits[f"w{i}"] = _r(rng, 8, 4 + i)
            out = f"m{i}"
            if bias:
                nodes.append(("Add", [f"m{i}", f"b{i}"], [f"a{i}"], None))
                inits[f"b{i}"] = _r(rng, 4 + i)
                out = f"a{i}"
            nodes.append(("Relu", [out], [f"y{i}"], None))
            outs.append(f"y{i}")
        return _model(rng, nodes, {"x": [2, 3, 8]}, outs, inits)

    return ex


def merge_parallel_gemm(m: Match, a: Node):
    def parts(g: Node):
        w = m.c(g.inputs[1])
        if not _is_float(w) or g.attrs.get("transA", 0):
            return None
        w = w.T if g.attrs.get("transB", 0) else w
        c = m.c(g.inputs[2]) if len(g.inputs) > 2 and g.inputs[2] else np.zeros(w.shape[1], w.dtype)
        if c is None:
            return None
        c = _channel_vec(c, w.shape[1], 2, -1)
        if c is None:
            return None
        return w * g.attrs.get("alpha", 1.0), c * g.attrs.get("beta", 1.0)

    pa = parts(a)
    if pa is None:
        return
    for b in m.cons.get(a.inputs[0], []):
        if (
            b is a
            or b.op != "Gemm"
            or b.inputs[0] != a.inputs[0]
            or m.g.nodes.index(b) < m.g.nodes.index(a)
        ):
            continue
        pb = parts(b)
        if pb is None or pb[0].shape[0] != pa[0].shape[0]:
            continue
        wn, inits = m.init(np.concatenate([pa[0], pb[0]], axis=1), "merged_w")
        cn, ci = m.init(np.concatenate([pa[1], pb[1]]), "merged_c")
        g = m.new("Gemm", (a.inputs[0], wn, cn))
        split, rename, si = _split(m, g.outputs[0], [pa[0].shape[1], pb[0].shape[1]], 1,
                                   [a.outputs[0], b.outputs[0]])  # fmt: skip
        yield Rewrite([g, split], rename, inits | ci | si)


def _ex_parallel_gemm(rng):
    nodes = [("Gemm", ["x", "w1", "c1"], ["a"], {"transB": 1, "alpha": 0.5}),
             ("Gemm", ["x", "w2", "c2"], ["b"], {"beta": 2.0}),
             ("Relu", ["a"], ["y1"], None), ("Relu", ["b"], ["y2"], None)]  # fmt: skip
    return _model(rng, nodes, {"x": [3, 8]}, ["y1", "y2"],
                  {"w1": _r(rng, 5, 8), "c1": _r(rng, 5), "w2": _r(rng, 8, 6), "c2": _r(rng, 6)})  # fmt: skip


# ---------------------------------------------------------------------------- algebra


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
    if not (_is_float(wa) and _is_float(wb)) or wa.shape != wb.shape:
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


def _ex_two_matmuls(shared: str):
    def ex(rng):
        if shared == "x":
            nodes = [("MatMul", ["x", "w1"], ["a"], None), ("MatMul", ["x", "w2"], ["b"], None)]
            ins = {"x": [3, 6]}
        else:
            nodes = [("MatMul", ["x", "w1"], ["a"], None), ("MatMul", ["z", "w1"], ["b"], None)]
            ins = {"x": [3, 6], "z": [3, 6]}
        nodes.append(("Add", ["a", "b"], ["y"], None))
        return _model(rng, nodes, ins, ["y"], {"w1": _r(rng, 6, 5), "w2": _r(rng, 6, 5)})

    return ex


def matmul_assoc(m: Match, mm: Node):
    """(x·W1)·W2 → x·(W1·W2)  (associativity; folds the constant product)."""
    inner = m.src(mm.inputs[0], "MatMul")
    if inner is None or not m.private(inner):
        return
    w1, w2 = m.c(inner.inputs[1]), m.c(mm.inputs[1])
    if not (_is_float(w1) and _is_float(w2)) or w1.ndim != 2 or w2.ndim != 2:
        return
    wn, inits = m.init(w1 @ w2, "assoc_w")
    node = m.new("MatMul", (inner.inputs[0], wn))
    yield Rewrite([node], {mm.outputs[0]: node.outputs[0]}, inits)


def _ex_assoc(rng):
    nodes = [("MatMul", ["x", "w1"], ["a"], None), ("MatMul", ["a", "w2"], ["y"], None)]
    return _model(rng, nodes, {"x": [2, 3, 6]}, ["y"], {"w1": _r(rng, 6, 8), "w2": _r(rng, 8, 4)})


def scale_into_matmul(m: Match, mm: Node):
    """(x·s)·W → x·(s·W) for a scalar constant s."""
    mul = m.src(mm.inputs[0], "Mul")
    w = m.c(mm.inputs[1])
    if mul is None or not m.private(mul) or not _is_float(w):
        return
    bc = _binary_const(m, mul)
    if bc is None or bc[1].size != 1 or not _same_out_shape(m, mul, bc[0]):
        return
    wn, inits = m.init(w * bc[1].reshape(()), "scaled_w")
    node = m.new("MatMul", (bc[0], wn))
    yield Rewrite([node], {mm.outputs[0]: node.outputs[0]}, inits)


def _ex_scale_matmul(rng):
    nodes = [("Mul", ["x", "s"], ["a"], None), ("MatMul", ["a", "w"], ["y"], None)]
    return _model(
        rng, nodes, {"x": [3, 6]}, ["y"], {"s": np.array(0.125, np.float32), "w": _r(rng, 6, 4)}
    )


# ---------------------------------------------------------------------------- the library

RULES: list[Rule] = [
    Rule("conv_bn_fold", "fold", "BatchNormalization", conv_bn_fold, _ex_conv_bn),
    Rule("conv_mul_fold", "fold", "Mul", conv_mul_fold, _ex_conv_then("Mul", (5, 1, 1))),
    Rule("conv_add_fold", "fuse", "Add", conv_add_fold, _ex_conv_then("Add", (1, 5, 1, 1))),
    Rule("matmul_mul_fold", "fold", "Mul", matmul_mul_fold, _ex_matmul_then("Mul", (6,), rank3=True)),
    Rule("matmul_add_to_gemm", "fuse", "Add", matmul_add_to_gemm, _ex_matmul_then("Add", (6,))),
    Rule("gemm_to_matmul_add", "fuse", "Gemm", gemm_to_matmul_add, _ex_gemm(trans_b=1)),
    Rule("gemm_add_fold", "fuse", "Add", gemm_add_fold, _ex_gemm_then("Add")),
    Rule("gemm_mul_fold", "fold", "Mul", gemm_mul_fold, _ex_gemm_then("Mul")),
    Rule("bn_to_mul_add", "fold", "BatchNormalization", bn_to_mul_add, _ex_bn),
    Rule("mul_chain_fold", "fold", "Mul", _const_chain("Mul"), _ex_chain("Mul")),
    Rule("add_chain_fold", "fold", "Add", _const_chain("Add"), _ex_chain("Add")),
    Rule("div_const_to_mul", "fold", "Div", div_const_to_mul, _ex_binary("Div")),
    Rule("sub_const_to_add", "fold", "Sub", sub_const_to_add, _ex_binary("Sub")),
    Rule("constant_fold", "const", "*", constant_fold, _ex_fold),
    Rule("shape_fold", "const", "Shape", shape_fold, _ex_shape),
    Rule("constant_to_initializer", "const", "Constant", constant_to_initializer, _ex_constant),
    Rule("identity_elim", "eliminate", "Identity", identity_elim, _ex_unary("Identity")),
    Rule("dropout_elim", "eliminate", "Dropout", dropout_elim, _ex_unary("Dropout")),
    Rule("neutral_elim", "eliminate", ("Mul", "Add", "Sub", "Div"), neutral_elim, _ex_neutral),
    Rule("cse", "eliminate", "*", cse, _ex_cse),
    Rule("split_concat_elim", "eliminate", "Concat", split_concat_elim, _ex_split_concat),
    Rule("concat_split_elim", "eliminate", "Split", concat_split_elim, _ex_concat_split),
    Rule("concat_unary_hoist", "layout", "Concat", concat_unary_hoist, _ex_concat_unary),
    Rule("relu_idempotent", "eliminate", "Relu", relu_idempotent, _ex_unary("Relu")),
    Rule("transpose_pair", "layout", "Transpose", transpose_pair, _ex_transposes),
    Rule("transpose_identity_elim", "layout", "Transpose", transpose_identity_elim, _ex_transposes),
    Rule("reshape_chain", "layout", _SHAPE_OPS, reshape_chain, _ex_reshapes),
    Rule("reshape_identity_elim", "layout", "Reshape", reshape_identity_elim, _ex_reshape_same),
    Rule("transpose_after_unary", "layout", _UNARY, transpose_after_unary, _ex_transpose_back),
    Rule("transpose_before_unary", "layout", "Transpose", transpose_before_unary, _ex_transpose_back),
    Rule("matmul_transpose_to_gemm", "layout", "MatMul", matmul_transpose_to_gemm, _ex_matmul_transpose),
    Rule("conv_pad_fold", "fold", "Conv", conv_pad_fold, _ex_pad_conv),
    Rule("merge_parallel_conv", "merge", "Conv", merge_parallel_conv, _ex_parallel_conv(3)),
    Rule("enlarge_conv_kernel", "enlarge", "Conv", enlarge_conv_kernel, _ex_parallel_conv(5)),
    Rule("merge_parallel_matmul", "merge", "MatMul", merge_parallel_matmul, _ex_parallel_matmul(2, True)),
    Rule("merge_qkv_projections", "merge", "MatMul", merge_all_projections, _ex_parallel_matmul(3, True)),
    Rule("merge_parallel_gemm", "merge", "Gemm", merge_parallel_gemm, _ex_parallel_gemm),
    Rule("distribute_matmul", "algebra", "Add", distribute_matmul, _ex_two_matmuls("x")),
    Rule("factor_matmul", "algebra", "Add", factor_matmul, _ex_two_matmuls("w")),
    Rule("matmul_assoc", "algebra", "MatMul", matmul_assoc, _ex_assoc),
    Rule("scale_into_matmul", "fold", "MatMul", scale_into_matmul, _ex_scale_matmul),
]  # fmt: skip

BY_NAME = {r.name: r for r in RULES}
assert len(BY_NAME) == len(RULES), "rule names must be unique"

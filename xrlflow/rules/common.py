"""Pattern helpers and op sets more than one rule family uses."""

from __future__ import annotations

import numpy as np

from xrlflow.ir import Node
from xrlflow.rules.engine import Match, Rewrite

FLOAT = (np.float32, np.float64, np.float16)


def is_float(a: np.ndarray | None) -> bool:
    return a is not None and a.dtype in FLOAT


def channel_vec(c: np.ndarray, channels: int, rank: int, axis: int) -> np.ndarray | None:
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


def conv_parts(m: Match, conv: Node):
    w = m.c(conv.inputs[1])
    if not is_float(w):
        return None
    b = (
        m.c(conv.inputs[2])
        if len(conv.inputs) > 2 and conv.inputs[2]
        else np.zeros(w.shape[0], w.dtype)
    )
    if b is None:
        return None
    return w, b


def conv(m: Match, like: Node, x: str, w: np.ndarray, b: np.ndarray, **attrs) -> tuple[Node, dict]:
    wn, wi = m.init(w.astype(w.dtype), "conv_w")
    bn, bi = m.init(b.astype(w.dtype), "conv_b")
    node = m.new("Conv", (x, wn, bn), **{**like.attrs, **attrs})
    return node, {**wi, **bi}


def binary_const(m: Match, n: Node) -> tuple[str, np.ndarray] | None:
    """(variable input, constant input) of a binary elementwise node, either order."""
    a, b = n.inputs[0], n.inputs[1]
    if m.c(b) is not None and m.c(a) is None:
        return a, m.c(b)
    if n.op in ("Add", "Mul") and m.c(a) is not None and m.c(b) is None:
        return b, m.c(a)
    return None


def same_out_shape(m: Match, n: Node, x: str) -> bool:
    return m.shape(n.outputs[0]) is not None and m.shape(n.outputs[0]) == m.shape(x)


def after(m: Match, n: Node, op: str) -> tuple[Node, str, np.ndarray] | None:
    """(producer, its output, constant) when ``n`` combines a private ``op`` output with a
    constant without changing its shape: the pattern every fold into weights starts from."""
    bc = binary_const(m, n)
    p = m.src(bc[0], op) if bc else None
    if p is None or not m.private(p) or not same_out_shape(m, n, bc[0]):
        return None
    return p, bc[0], bc[1]


def conv_channel_fold(m: Match, n: Node):
    """(conv, weight, bias, per-output-channel constant) for Conv → Mul/Add by a constant."""
    hit = after(m, n, "Conv")
    parts = conv_parts(m, hit[0]) if hit else None
    if parts is None:
        return None
    v = channel_vec(hit[2], parts[0].shape[0], len(m.shape(hit[1])), 1)
    return None if v is None else (hit[0], *parts, v)


NONDETERMINISTIC = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}


def passthrough(m: Match, n: Node, src: str):
    if m.shape(src) is None or m.shape(src) != m.shape(n.outputs[0]):
        return
    if m.g.elem_type(src) != m.g.elem_type(n.outputs[0]):
        return
    yield Rewrite([], {n.outputs[0]: src}, remove=[n])


UNARY = ("Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Erf", "LeakyRelu", "Elu", "Softplus")

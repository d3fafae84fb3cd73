"""Layout: transpose and reshape elimination and movement, transposes into Gemm, pads into
Conv."""

from __future__ import annotations

import numpy as np

from xrlflow.ir import Node
from xrlflow.rules import common as C
from xrlflow.rules import examples as ex
from xrlflow.rules.engine import Match, Rewrite, Rule


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
        yield from C.passthrough(m, n, inner.inputs[0])
        return
    node = m.new("Transpose", (inner.inputs[0],), perm=perm)
    yield Rewrite([node], {n.outputs[0]: node.outputs[0]})


def transpose_identity_elim(m: Match, n: Node):
    xs = m.shape(n.inputs[0])
    if xs is not None and _perm(n, len(xs)) == list(range(len(xs))):
        yield from C.passthrough(m, n, n.inputs[0])


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
        yield from C.passthrough(m, n, src)
        return
    sn, inits = m.init(np.array(out, dtype=np.int64), "shape")
    node = m.new("Reshape", (src, sn))
    yield Rewrite([node], {n.outputs[0]: node.outputs[0]}, inits)


def reshape_identity_elim(m: Match, n: Node):
    yield from C.passthrough(m, n, n.inputs[0])


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
    u = m.src(t.inputs[0], C.UNARY)
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
    node = Node(
        m.g.fresh("Conv"),
        "Conv",
        (pad.inputs[0], *conv.inputs[1:]),
        (m.g.fresh("conv"),),
        {**conv.attrs, "pads": [a + b for a, b in zip(old, sp, strict=True)]},
    )
    yield Rewrite([node], {conv.outputs[0]: node.outputs[0]})


RULES: list[Rule] = [
    Rule("transpose_pair", "layout", "Transpose", transpose_pair, ex.transposes,
         "Transpose(Transpose(x)) → one Transpose with the composed permutation."),
    Rule("transpose_identity_elim", "layout", "Transpose", transpose_identity_elim, ex.transposes,
         "A Transpose whose permutation is the identity → x."),
    Rule("reshape_chain", "layout", _SHAPE_OPS, reshape_chain, ex.reshapes,
         "Two shape-only ops in a row → one Reshape (or nothing when the shape returns)."),
    Rule("reshape_identity_elim", "layout", "Reshape", reshape_identity_elim, ex.reshape_same,
         "Reshape to the shape its input already has → x."),
    Rule("transpose_after_unary", "layout", C.UNARY, transpose_after_unary, ex.transpose_back,
         "Unary(Transpose(x)) → Transpose(Unary(x)): moves transposes together."),
    Rule("transpose_before_unary", "layout", "Transpose", transpose_before_unary, ex.transpose_back,
         "Transpose(Unary(x)) → Unary(Transpose(x)) (the reverse movement)."),
    Rule("matmul_transpose_to_gemm", "layout", "MatMul", matmul_transpose_to_gemm,
         ex.matmul_transpose,
         "MatMul(x, Transpose(W)) of 2-D tensors → Gemm with transB."),
    Rule("conv_pad_fold", "fold", "Conv", conv_pad_fold, ex.pad_conv,
         "Pad with zeros of the spatial dims → Conv: the conv's own pads."),
]  # fmt: skip

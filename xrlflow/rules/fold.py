"""Folding constants into weights: BatchNorm, per-channel Mul/Add, biases into Gemm/Conv,
constant chains."""

from __future__ import annotations

import numpy as np

from xrlflow.ir import Node
from xrlflow.rules import common as C
from xrlflow.rules import examples as ex
from xrlflow.rules.engine import Match, Rewrite, Rule


def conv_bn_fold(m: Match, bn: Node):
    conv = m.src(bn.inputs[0], "Conv")
    if conv is None or not m.private(conv) or len(bn.outputs) != 1:
        return
    parts = C.conv_parts(m, conv)
    s, beta, mean, var = (m.c(t) for t in bn.inputs[1:5])
    if parts is None or any(x is None for x in (s, beta, mean, var)):
        return
    w, b = parts
    scale = s / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
    node, inits = C.conv(
        m,
        conv,
        conv.inputs[0],
        w * scale.reshape(-1, *[1] * (w.ndim - 1)),
        (b - mean) * scale + beta,
    )
    yield Rewrite([node], {bn.outputs[0]: node.outputs[0]}, inits)


def conv_mul_fold(m: Match, mul: Node):
    hit = C.conv_channel_fold(m, mul)
    if hit is None:
        return
    conv, w, b, v = hit
    node, inits = C.conv(m, conv, conv.inputs[0], w * v.reshape(-1, *[1] * (w.ndim - 1)), b * v)
    yield Rewrite([node], {mul.outputs[0]: node.outputs[0]}, inits)


def conv_add_fold(m: Match, add: Node):
    hit = C.conv_channel_fold(m, add)
    if hit is None:
        return
    conv, w, b, v = hit
    node, inits = C.conv(m, conv, conv.inputs[0], w, b + v)
    yield Rewrite([node], {add.outputs[0]: node.outputs[0]}, inits)


def matmul_mul_fold(m: Match, mul: Node):
    hit = C.after(m, mul, "MatMul")
    if hit is None:
        return
    mm, x, k = hit
    w = m.c(mm.inputs[1])
    if not C.is_float(w) or w.ndim != 2:
        return
    v = C.channel_vec(k, w.shape[1], len(m.shape(x)), -1)
    if v is None:
        return
    wn, inits = m.init(w * v[None, :], "mm_w")
    node = m.new("MatMul", (mm.inputs[0], wn))
    yield Rewrite([node], {mul.outputs[0]: node.outputs[0]}, inits)


def matmul_add_to_gemm(m: Match, add: Node):
    hit = C.after(m, add, "MatMul")
    if hit is None:
        return
    mm, x, k = hit
    xs = m.shape(mm.inputs[0])
    w = m.c(mm.inputs[1])
    if xs is None or len(xs) != 2 or not C.is_float(w) or w.ndim != 2:
        return
    v = C.channel_vec(k, w.shape[1], 2, -1)
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


def gemm_add_fold(m: Match, add: Node):
    hit = C.after(m, add, "Gemm")
    if hit is None:
        return
    gemm, x, k = hit
    n_out = m.shape(x)[1]
    v = C.channel_vec(k, n_out, 2, -1)
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
    hit = C.after(m, mul, "Gemm")
    if hit is None:
        return
    gemm, x, k = hit
    w = m.c(gemm.inputs[1])
    if not C.is_float(w):
        return
    n_out = m.shape(x)[1]
    v = C.channel_vec(k, n_out, 2, -1)
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


def _const_chain(op: str):
    def rule(m: Match, n: Node):
        bc = C.binary_const(m, n)
        inner = m.src(bc[0], op) if bc else None
        if inner is None or not m.private(inner):
            return
        ic = C.binary_const(m, inner)
        if ic is None or not C.is_float(ic[1]) or not C.is_float(bc[1]):
            return
        c = ic[1] * bc[1] if op == "Mul" else ic[1] + bc[1]
        if c.ndim > len(m.shape(n.outputs[0]) or ()):
            return
        cn, inits = m.init(c, "k")
        node = m.new(op, (ic[0], cn))
        yield Rewrite([node], {n.outputs[0]: node.outputs[0]}, inits)

    return rule


def div_const_to_mul(m: Match, div: Node):
    c = m.c(div.inputs[1])
    if not C.is_float(c) or np.any(c == 0):
        return
    cn, inits = m.init((1.0 / c).astype(c.dtype), "recip")
    node = m.new("Mul", (div.inputs[0], cn))
    yield Rewrite([node], {div.outputs[0]: node.outputs[0]}, inits)


def sub_const_to_add(m: Match, sub: Node):
    c = m.c(sub.inputs[1])
    if not C.is_float(c) or m.c(sub.inputs[0]) is not None:
        return
    cn, inits = m.init(-c, "neg")
    node = m.new("Add", (sub.inputs[0], cn))
    yield Rewrite([node], {sub.outputs[0]: node.outputs[0]}, inits)


RULES: list[Rule] = [
    Rule("conv_bn_fold", "fold", "BatchNormalization", conv_bn_fold, ex.conv_bn,
         "Conv → BatchNormalization: fold the normalisation into the conv's weights and bias."),
    Rule("conv_mul_fold", "fold", "Mul", conv_mul_fold, ex.conv_then("Mul", (5, 1, 1)),
         "Conv → Mul by a per-channel constant: scale the conv's weights and bias instead."),
    Rule("conv_add_fold", "fuse", "Add", conv_add_fold, ex.conv_then("Add", (1, 5, 1, 1)),
         "Conv → Add of a per-channel constant: add it to the conv's bias."),
    Rule("matmul_mul_fold", "fold", "Mul", matmul_mul_fold, ex.matmul_then("Mul", (6,), rank3=True),
         "MatMul by constant W → Mul by a per-column constant: scale W's columns instead."),
    Rule("matmul_add_to_gemm", "fuse", "Add", matmul_add_to_gemm, ex.matmul_then("Add", (6,)),
         "2-D MatMul by constant W → Add of a bias: one Gemm."),
    Rule("gemm_to_matmul_add", "fuse", "Gemm", gemm_to_matmul_add, ex.gemm(trans_b=1),
         "Gemm → MatMul + Add (the reverse, so other MatMul rules can apply)."),
    Rule("gemm_add_fold", "fuse", "Add", gemm_add_fold, ex.gemm_then("Add"),
         "Gemm → Add of a per-column constant: fold it into the Gemm's bias."),
    Rule("gemm_mul_fold", "fold", "Mul", gemm_mul_fold, ex.gemm_then("Mul"),
         "Gemm → Mul by a per-column constant: scale the Gemm's weights and bias instead."),
    Rule("bn_to_mul_add", "fold", "BatchNormalization", bn_to_mul_add, ex.bn,
         "BatchNormalization on its own → Mul + Add by per-channel constants."),
    Rule("mul_chain_fold", "fold", "Mul", _const_chain("Mul"), ex.chain("Mul"),
         "(x · c1) · c2 → x · (c1 · c2): one Mul by a folded constant."),
    Rule("add_chain_fold", "fold", "Add", _const_chain("Add"), ex.chain("Add"),
         "(x + c1) + c2 → x + (c1 + c2): one Add of a folded constant."),
    Rule("div_const_to_mul", "fold", "Div", div_const_to_mul, ex.binary("Div"),
         "x / c → x · (1/c) for a float constant c."),
    Rule("sub_const_to_add", "fold", "Sub", sub_const_to_add, ex.binary("Sub"),
         "x − c → x + (−c), so Add chains and folds apply."),
]  # fmt: skip

"""Merging parallel operators of one input (convolutions, matmuls, Q/K/V, Gemms), and enlarging
conv kernels so that they can merge."""

from __future__ import annotations

import numpy as np

from xrlflow.ir import Node
from xrlflow.rules import common as C
from xrlflow.rules import examples as ex
from xrlflow.rules.engine import Match, Rewrite, Rule


def _conv_key(n: Node):
    a = n.attrs
    return (
        tuple(a.get("strides", ())),
        tuple(a.get("pads", ())),
        tuple(a.get("dilations", ())),
        a.get("group", 1),
        a.get("auto_pad", b"NOTSET"),
    )


def _split(m: Match, src: str, sizes: list[int], axis: int, olds: list[str]):
    sn, inits = m.init(np.array(sizes, dtype=np.int64), "split")
    node = m.new("Split", (src, sn), n_out=len(sizes), axis=axis)
    return node, dict(zip(olds, node.outputs, strict=True)), inits


def merge_parallel_conv(m: Match, a: Node):
    pa = C.conv_parts(m, a)
    if pa is None or a.attrs.get("group", 1) != 1:
        return
    for b in m.cons.get(a.inputs[0], []):
        if b is a or b.op != "Conv" or m.g.nodes.index(b) < m.g.nodes.index(a):
            continue
        pb = C.conv_parts(m, b)
        if pb is None or _conv_key(a) != _conv_key(b) or pa[0].shape[1:] != pb[0].shape[1:]:
            continue
        node, inits = C.conv(
            m, a, a.inputs[0], np.concatenate([pa[0], pb[0]]), np.concatenate([pa[1], pb[1]])
        )
        split, rename, si = _split(
            m, node.outputs[0], [pa[0].shape[0], pb[0].shape[0]], 1, [a.outputs[0], b.outputs[0]]
        )
        yield Rewrite([node, split], rename, inits | si)


def enlarge_conv_kernel(m: Match, a: Node):
    """Pad a k×k kernel with zeros to a sibling conv's larger K×K (stride 1), so they can merge."""
    pa = C.conv_parts(m, a)
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
        pb = C.conv_parts(m, b) if b.op == "Conv" and b is not a else None
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
        node, inits = C.conv(m, a, a.inputs[0], w, pa[1], pads=new_pads, kernel_shape=[KH, KW])
        yield Rewrite([node], {a.outputs[0]: node.outputs[0]}, inits)


def _matmul_branch(m: Match, mm: Node):
    """(weight, bias or None, output) of MatMul(x, W const 2-D) optionally followed by Add(b)."""
    w = m.c(mm.inputs[1])
    if not C.is_float(w) or w.ndim != 2:
        return None
    add = m.sole_use(mm.outputs[0])
    if add is not None and add.op == "Add":
        bc = C.binary_const(m, add)
        if bc is not None and bc[0] == mm.outputs[0]:
            v = C.channel_vec(bc[1], w.shape[1], len(m.shape(mm.outputs[0]) or (1, 1)), -1)
            if v is not None and C.same_out_shape(m, add, mm.outputs[0]):
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
    split, rename, si = _split(
        m, out, [w.shape[1] for w, _, _ in branches], rank - 1, [o for _, _, o in branches]
    )
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


def merge_parallel_gemm(m: Match, a: Node):
    def parts(g: Node):
        w = m.c(g.inputs[1])
        if not C.is_float(w) or g.attrs.get("transA", 0):
            return None
        w = w.T if g.attrs.get("transB", 0) else w
        c = m.c(g.inputs[2]) if len(g.inputs) > 2 and g.inputs[2] else np.zeros(w.shape[1], w.dtype)
        if c is None:
            return None
        c = C.channel_vec(c, w.shape[1], 2, -1)
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
        split, rename, si = _split(
            m, g.outputs[0], [pa[0].shape[1], pb[0].shape[1]], 1, [a.outputs[0], b.outputs[0]]
        )
        yield Rewrite([g, split], rename, inits | ci | si)


def split_matmul(m: Match, split: Node):
    """x·W (+ b) → Split on the last axis → one matmul (+ bias) per piece: the reverse of
    merge_parallel_matmul. On TVM the Split is a copy kernel per piece, so a merged projection
    can cost more than the matmuls it replaced."""
    src = m.src(split.inputs[0])
    if src is None or m.sole_use(src.outputs[0]) is not split:
        return
    mm, bias = src, None
    if src.op == "Add":
        bc = C.binary_const(m, src)
        mm = m.src(bc[0], "MatMul") if bc is not None else None
        if mm is None or m.sole_use(mm.outputs[0]) is not src:
            return
        bias = bc[1]
    w = m.c(mm.inputs[1]) if mm.op == "MatMul" else None
    shape = m.shape(split.inputs[0])
    if not C.is_float(w) or w.ndim != 2 or shape is None or len(shape) < 2:
        return
    if split.attrs.get("axis", 0) % len(shape) != len(shape) - 1:
        return
    sizes = [(m.shape(o) or (None,))[-1] for o in split.outputs]
    if None in sizes or sum(sizes) != w.shape[1]:
        return
    if bias is not None:
        bias = C.channel_vec(bias, w.shape[1], len(shape), -1)
        if bias is None or not C.same_out_shape(m, src, mm.outputs[0]):
            return
    nodes, inits, rename, start = [], {}, {}, 0
    for out, k in zip(split.outputs, sizes, strict=True):
        wn, wi = m.init(np.ascontiguousarray(w[:, start : start + k]), "split_w")
        piece = m.new("MatMul", (mm.inputs[0], wn))
        nodes.append(piece)
        inits |= wi
        if bias is not None:
            bn, bi = m.init(np.ascontiguousarray(bias[start : start + k]), "split_b")
            piece = m.new("Add", (piece.outputs[0], bn))
            nodes.append(piece)
            inits |= bi
        rename[out] = piece.outputs[0]
        start += k
    yield Rewrite(nodes, rename, inits)


RULES: list[Rule] = [
    Rule("merge_parallel_conv", "merge", "Conv", merge_parallel_conv, ex.parallel_conv(3),
         "Sibling convs of one input with equal attributes → one conv + Split."),
    Rule("enlarge_conv_kernel", "enlarge", "Conv", enlarge_conv_kernel, ex.parallel_conv(5),
         "Pad a k×k kernel with zeros to a sibling's larger K×K, so they can merge."),
    Rule("merge_parallel_matmul", "merge", "MatMul", merge_parallel_matmul,
         ex.parallel_matmul(2, True),
         "Two matmuls x·W1, x·W2 (+ biases) of one input → one matmul + Split."),
    Rule("merge_qkv_projections", "merge", "MatMul", merge_all_projections,
         ex.parallel_matmul(3, True),
         "Every projection x·W_i (+ b_i) of one input (Q, K, V) → one matmul + Split."),
    Rule("merge_parallel_gemm", "merge", "Gemm", merge_parallel_gemm, ex.parallel_gemm,
         "Sibling Gemms of one input with equal attributes → one Gemm + Split."),
    Rule("split_matmul", "merge", "Split", split_matmul, ex.matmul_split,
         "x·W (+ b) → Split on the last axis → one matmul (+ bias) per piece (for TVM)."),
]  # fmt: skip

"""Lowerings where TVM's differ from what onnxruntime (and PyTorch, numpy) compute.

TVM's ``relu`` is ``max(x, 0)`` and its ``clip`` ``max(min(x, hi), lo)``; the LLVM backend
lowers ``max(a, b)`` to ``a > b ? a : b``, so a NaN in ``x`` came out as 0 (or ``hi``): a
silently wrong answer where onnxruntime returns NaN. With the constant first
(``max(0, x)`` is ``0 > x ? 0 : x``) NaN goes through, and every other value is unchanged, at the
same cost. :data:`LEGALIZE` is passed to ``relax.transform.LegalizeOps``.
"""

from __future__ import annotations


def _relu(bb, call):
    from tvm import te, tirx, topi

    def relu(x):
        zero = tirx.const(0, x.dtype)
        return te.compute(
            x.shape, lambda *i: te.max(zero, x(*i)), name="compute", tag=topi.tag.ELEMWISE
        )

    return bb.call_te(relu, call.args[0], primfunc_name_hint="relu")


def _clip(bb, call):
    import tvm
    from tvm import te, tirx, topi

    def clip(x, a_min, a_max):
        def bound(v):
            return tirx.Cast(x.dtype, v) if tvm.ir.is_prim_expr(v) else tirx.const(v, x.dtype)

        lo, hi = bound(a_min), bound(a_max)
        return te.compute(
            x.shape, lambda *i: te.max(lo, te.min(hi, x(*i))), name="compute", tag=topi.tag.ELEMWISE
        )

    return bb.call_te(clip, *call.args, primfunc_name_hint="tir_clip")


LEGALIZE = {"relax.nn.relu": _relu, "relax.clip": _clip}

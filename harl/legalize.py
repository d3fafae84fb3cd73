"""Lowerings where TVM's differ from what onnxruntime (and PyTorch, numpy) compute.

TVM's ``relu`` is ``max(x, 0)`` and its ``clip`` ``max(min(x, hi), lo)``; the LLVM backend
lowers ``max(a, b)`` to ``a > b ? a : b``, so a NaN in ``x`` came out as 0 (or ``hi``): a
silently wrong answer where onnxruntime returns NaN. With the constant first
(``max(0, x)`` is ``0 > x ? 0 : x``) NaN goes through, and every other value is unchanged, at the
same cost.

TVM's float32 ``tanh`` is a rational approximation with an absolute error near 6e-8, which is
a relative error of 1e-3 for arguments near 1e-4 (``Mish`` of -10 came out 0.13% off, outside
ONNX's conformance tolerance, where onnxruntime is exact). Below 1/16 its Taylor series
(four terms: error under 1e-12) is used instead; a select per element (in
:mod:`harl.fast_math`, with the other transcendental functions).

:data:`LEGALIZE` is passed to ``relax.transform.LegalizeOps``: these lowerings, the fast,
vectorisable transcendental ones of :mod:`harl.fast_math`, and convolutions whose output layout
differs from their input's (:mod:`harl.layouts`: the model's input transpose folded away).
"""

from __future__ import annotations

from harl.fast_math import FAST_MATH
from harl.layouts import conv2d_mixed_layouts


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


def _extremum(is_max: bool):
    """``relax.max``/``relax.min`` over floats starting from -inf/+inf, as numpy and onnxruntime
    do; TVM starts from the largest finite value, so the max of a row of -inf (a fully masked
    attention row) came out -3.4e38 and the model's own ``== -inf`` test never fired."""

    def legalize(bb, call):
        from tvm import te, tirx, topi

        x = call.args[0]
        axis = None if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
        keepdims = bool(call.attrs.keepdims)
        if not str(x.ty.dtype).startswith("float"):
            return bb.call_te(topi.max if is_max else topi.min, x, axis, keepdims)

        def reduce(x):
            ndim = len(x.shape)
            axes = sorted({a % ndim for a in axis}) if axis is not None else list(range(ndim))
            start = tirx.const(float("-inf") if is_max else float("inf"), x.dtype)
            combine = te.max if is_max else te.min
            reducer = te.comm_reducer(lambda a, b: combine(a, b), lambda t: start, name="extremum")
            ks = {a: te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes}
            shape = [(1 if a in ks else x.shape[a]) for a in range(ndim) if keepdims or a not in ks]

            def f(*idx):
                it = iter(idx)
                full = []
                for a in range(ndim):
                    if a in ks:
                        full.append(ks[a])
                        if keepdims:
                            next(it)
                    else:
                        full.append(next(it))
                return reducer(x(*full), axis=list(ks.values()))

            return te.compute(shape, f, name="red", tag="comm_reduce")

        return bb.call_te(reduce, x, primfunc_name_hint="max" if is_max else "min")

    return legalize


LEGALIZE = {
    **FAST_MATH,
    "relax.nn.relu": _relu,
    "relax.clip": _clip,
    "relax.max": _extremum(True),
    "relax.min": _extremum(False),
    "relax.nn.conv2d": conv2d_mixed_layouts,
}

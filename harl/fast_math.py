"""Transcendental functions as vectorisable polynomials: ``exp``, ``erf``, ``tanh``,
``sigmoid``, both GELUs, SiLU and softmax legalized with TVM's fast approximations
(``topi.fast_exp``, ``topi.fast_erf``, ``topi.fast_tanh``: Cephes' and Eigen's rational
polynomials) instead of ``tirx.exp``/``tirx.erf``, which the LLVM backend lowers to one libm call
per element (no vector form). ``bench/fast_math.py`` (one core, 4 M float32 arguments, both
lowerings alternated): the fast forms ran 6.3x (``exp``), 34x (``erf``), 13x (``tanh``), 6.8x
(``sigmoid``) and 32x (GELU) faster, at 35-50 % of a numpy copy's bandwidth over the same bytes.

Accuracy against float64, in ulp (max / 99.9th percentile): ``exp`` 4.5 / 3.1, ``erf`` 7.4 / 3.5,
``tanh`` 5.2 / 3.0 (TVM's own ``tanh``: 1.3e5, near 0), ``sigmoid`` 4.5 / 2.6. ``exp`` reaches inf
from x = 88.03 instead of 88.72 (results within 2x of float32's largest value); below -88.4 it
gives 0 (the true value is a denormal or 0), so exp(-inf) is 0 and a fully masked softmax
row is NaN, as in onnxruntime. The artifact's verification against onnxruntime (1e-4 +
1e-3 relative) is far looser. NaN goes through as NaN (the clamps inside ``fast_erf`` and
``fast_tanh`` would turn it into ±1: a ``select`` keeps it), and ``tanh`` keeps the Taylor
series below 1/16 (:mod:`harl.legalize`). Other dtypes use TVM's lowerings unchanged.

This is TVM's ``relax.transform.FastMathTransform`` done inside ``LegalizeOps``, so that it also
reaches the exponentials inside softmax, sigmoid and SiLU, which that pass does not see.
"""

from __future__ import annotations

import math

FAST_DTYPES = ("float32",)
"""what the fast forms take; the legalizations hand other dtypes to TVM's own (``tanh``:
float16 keeps the small-argument series over TVM's ``tanh``)"""


def _keep_nan(x, y):
    """``y`` where ``x`` is a number, ``x`` (NaN) where it is not."""
    from tvm import te, tirx

    return te.compute(
        x.shape,
        lambda *i: tirx.Select(tirx.isnan(x(*i)), x(*i), y(*i)),
        name="keep_nan",
        tag="elemwise",
    )


EXP_LOW = -88.3762626647949  # where topi.fast_exp clamps its argument


def fast_exp(x):
    """``topi.fast_exp``, and exactly 0 below its clamp (where exp(x) is a float32 denormal or
    0): a fully masked softmax row (all -inf) then gives 0/0 = NaN as onnxruntime does, not
    the uniform row the clamp would make."""
    from tvm import te, tirx, topi

    e = topi.fast_exp(x)
    low, zero = tirx.const(EXP_LOW, x.dtype), tirx.const(0, x.dtype)
    return te.compute(
        x.shape, lambda *i: tirx.Select(x(*i) < low, zero, e(*i)), name="exp", tag="elemwise"
    )


def fast_erf(x):
    from tvm import topi

    return _keep_nan(x, topi.fast_erf(x))


def fast_tanh(x):
    """``topi.fast_tanh`` (float32; TVM's ``tanh`` for float16) with the small-argument series
    of :mod:`harl.legalize`; other dtypes TVM's ``tanh``."""
    import tvm
    from tvm import te, tirx, topi

    if x.dtype not in ("float32", "float16"):
        return topi.tanh(x)
    rational = topi.fast_tanh(x) if x.dtype in FAST_DTYPES else topi.tanh(x)

    def f(*i):
        v = x(*i)
        c = lambda k: tirx.const(k, x.dtype)  # noqa: E731
        s = v * v
        series = v * (c(1) + s * (c(-1 / 3) + s * (c(2 / 15) + s * c(-17 / 315))))
        small = tirx.Select(tvm.te.abs(v) < c(0.0625), series, rational(*i))
        return tirx.Select(tirx.isnan(v), v, small)

    return te.compute(x.shape, f, name="compute", tag="elemwise")


def fast_sigmoid(x):
    """``1 / (1 + exp(-x))`` with the fast ``exp``."""
    from tvm import te, tirx, topi

    e = fast_exp(topi.negative(x))
    one = tirx.const(1, x.dtype)
    return te.compute(x.shape, lambda *i: one / (one + e(*i)), name="sigmoid", tag="elemwise")


def fast_softmax(x, axis: int):
    """Softmax over ``axis`` with the fast ``exp``: max, exp of the difference, sum, divide
    (``topi.nn.softmax``'s blocks)."""
    from tvm import topi

    axis = axis % len(x.shape)
    e = fast_exp(topi.subtract(x, topi.max(x, axis=axis, keepdims=True)))
    return topi.divide(e, topi.sum(e, axis=axis, keepdims=True))


def _float32_only(fast):
    """``fast`` for float32 operands; TVM's own legalization of the operator otherwise."""

    def legalize(bb, call):
        import tvm

        if str(call.args[0].ty.dtype) in FAST_DTYPES:
            return fast(bb, call)
        return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)

    return legalize


def _unary(fn, hint: str):
    def legalize(bb, call):
        return bb.call_te(fn, call.args[0], primfunc_name_hint=hint)

    return _float32_only(legalize)


def _gelu(bb, call):
    from tvm import tirx

    def gelu(x):
        half = tirx.const(0.5, x.dtype)
        return x * (half + fast_erf(x * tirx.const(0.5**0.5, x.dtype)) * half)

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _gelu_tanh(bb, call):
    from tvm import tirx

    def gelu_tanh(x):
        c = lambda k: tirx.const(k, x.dtype)  # noqa: E731
        inner = c(math.sqrt(2.0 / math.pi)) * x * (c(1) + c(0.044715) * x * x)
        return c(0.5) * x * (c(1) + fast_tanh(inner))

    return bb.call_te(gelu_tanh, call.args[0], primfunc_name_hint="gelu_tanh")


def _silu(bb, call):
    from tvm import topi

    return bb.call_te(
        lambda x: topi.multiply(x, fast_sigmoid(x)), call.args[0], primfunc_name_hint="silu"
    )


def _softmax(bb, call):
    return bb.call_te(
        fast_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax"
    )


FAST_MATH = {
    "relax.exp": _unary(fast_exp, "exp"),
    "relax.erf": _unary(fast_erf, "erf"),
    "relax.tanh": lambda bb, call: bb.call_te(
        fast_tanh, call.args[0], primfunc_name_hint="tir_tanh"
    ),
    "relax.sigmoid": _unary(fast_sigmoid, "sigmoid"),
    "relax.nn.gelu": _float32_only(_gelu),
    "relax.nn.gelu_tanh": _float32_only(_gelu_tanh),
    "relax.nn.silu": _float32_only(_silu),
    "relax.nn.softmax": _float32_only(_softmax),
}

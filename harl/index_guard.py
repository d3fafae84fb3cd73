"""Bounds checks for the indices a caller controls: compiled into the artifact, so a bad token id
is an error from ``model.so`` itself, never an out-of-bounds read.

TVM lowers ONNX ``Gather`` to ``take`` in its "fast" mode, which reads ``data[i]`` for whatever
``i`` arrives ("fast mode segfaults when there are out-of-bounds indices"); ``GatherElements``,
``GatherND``, ``ScatterElements`` and ``ScatterND`` index as blindly. :func:`guard_indices` puts a
small kernel in front of each such operator whose indices are not constants: it copies the
indices through and asserts that every one lies in the operator's range. A failed assertion stops
the VM with an error (``RuntimeError`` in Python, an error code for C callers) that names the
check; it never reads past a buffer. Negative indices keep their ONNX meaning: the importer has
already wrapped them (``i + n`` for ``i < 0``), and the check runs on what the operator reads.

Why in the compiled graph and not (only) in the Python wrapper: callers of the raw ``model.so``
(a C++ server, another language's TVM runtime) get the same protection, and indices computed
inside the model (a position from an ``ArgMax``, a ``Shape``-derived offset) are checked too,
which no input check can see. :mod:`harlflow.runtime` turns the error into
:class:`~harlflow.core.errors.IndexRangeError` naming the input and the offending value, from the
check's description (:func:`index_checks`) that the manifest records.

The check kernels are marked scheduled (``tirx.is_scheduled``): they are no tuning tasks.
"""

from __future__ import annotations

import json
import math
from typing import Any

from harlflow.core.errors import INDEX_CHECK_PREFIX

CHECK_ATTR = "harlflow.index_check"

# Relax operator → (ONNX name, position of the indices argument, indices are "nd" tuples,
# the importer wrapped negative indices before the operator)
_GUARDED = {
    "relax.take": ("Gather", 1, False, True),
    "relax.gather_elements": ("GatherElements", 1, False, True),
    "relax.gather_nd": ("GatherND", 1, True, True),
    "relax.scatter_elements": ("ScatterElements", 1, False, False),
    "relax.scatter_nd": ("ScatterND", 1, True, True),
}


def message(check: dict[str, Any]) -> str:
    """The error text the check kernel raises: its id, the operator and the valid ranges."""
    ranges = " x ".join(f"[{lo}, {hi}]" for lo, hi in check["ranges"])
    return f"{INDEX_CHECK_PREFIX} {check['id']}: {check['operator']} indices must lie in {ranges}"


def _kernel(check: dict[str, Any], rows: int, width: int, dtype: str, bounds: list[tuple]):
    """A TIR function ``(idx[rows, width]) -> copy of idx`` asserting ``lo_k <= idx[:, k] < hi_k``
    (``bounds``: what the operator itself accepts, after the importer's wrapping)."""
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the parsed source refers to T)

    text = message(check).replace('"', "'")
    lines = []
    for k, (lo, hi) in enumerate(bounds):
        ref = f"idx[vm, {k}]"
        lines.append(
            f'                assert {ref} >= T.{dtype}({lo}) and {ref} < T.{dtype}({hi}), "{text}"'
        )
        lines.append(f"                out[vm, {k}] = {ref}")
    body = "\n".join(lines)
    src = f"""
@T.prim_func(private=True)
def check(idx: T.Buffer((T.int64({rows}), T.int64({width})), "{dtype}"),
          out: T.Buffer((T.int64({rows}), T.int64({width})), "{dtype}")):
    T.func_attr({{"tirx.noalias": True, "op_pattern": 8, "tirx.is_scheduled": True}})
    with T.sblock("root"):
        for m in range(T.int64({rows})):
            with T.sblock("check"):
                vm = T.axis.spatial(T.int64({rows}), m)
                T.reads(idx[vm, 0:{width}])
                T.writes(out[vm, 0:{width}])
{body}
"""
    func = tvm.script.from_source(src, check_well_formed=False)
    return func.with_attr(CHECK_ATTR, json.dumps(check))


def static_shape(ty) -> tuple[int, ...] | None:
    """A Relax tensor type's shape as ints, or None when it is unknown or symbolic."""
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (AttributeError, TypeError):
        return None


def _source_input(mutator, expr, params: list) -> str | None:
    """The model input whose values reach ``expr`` unchanged (through the importer's wrapping
    of negatives, casts, reshapes and transposes), or None when the indices are computed."""
    import tvm
    from tvm import relax

    passthrough = {
        "relax.astype": 0,
        "relax.reshape": 0,
        "relax.expand_dims": 0,
        "relax.squeeze": 0,
        "relax.flatten": 0,
        "relax.permute_dims": 0,
        "relax.where": 2,  # where(i < 0, i + n, i): the importer's wrapping
    }
    for _ in range(32):
        if any(expr.same_as(p) for p in params):
            return expr.name
        if isinstance(expr, relax.Var):
            bound = mutator.lookup_binding(expr)
            if bound is None:
                return None
            expr = bound
            continue
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            pos = passthrough.get(expr.op.name)
            if pos is None:
                return None
            expr = expr.args[pos]
            continue
        return None
    return None


def _constant(mutator, expr, depth: int = 16) -> bool:
    """Whether ``expr`` is computed from constants alone (through the function's bindings)."""
    import tvm
    from tvm import relax

    if isinstance(expr, (tvm.ir.expr.Constant, relax.ShapeExpr)):
        return True
    if depth == 0:
        return False
    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        return bound is not None and _constant(mutator, bound, depth - 1)
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        if expr.op.name == "relax.shape_of":  # of a tensor whose shape is static
            return static_shape(expr.args[0].ty) is not None
        return all(_constant(mutator, a, depth - 1) for a in expr.args)
    if isinstance(expr, relax.Tuple):
        return all(_constant(mutator, f, depth - 1) for f in expr.fields)
    return False


def guard_indices(mod):
    """``mod`` with a bounds check in front of every indexing operator whose indices are not
    constants (see the module's docstring); the checks are described by :func:`index_checks`."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    checks: list[dict[str, Any]] = []

    @mutator
    class _Guard(PyExprMutator):
        params: list = []  # the function's parameters: the model's inputs

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name not in _GUARDED:
                return call
            if call.op.name == "relax.take" and call.attrs.mode != "fast":
                return call  # "wrap"/"clip"/"nan" never read out of bounds
            onnx_op, pos, nd, wrapped = _GUARDED[call.op.name]
            data, idx = call.args[0], call.args[pos]
            if _constant(self, idx):
                return call  # computed from constants only (the importer's wrapping of a
                # constant index): nothing a caller sends can change it
            ishape, dshape = static_shape(idx.ty), static_shape(data.ty)
            if ishape is None or dshape is None:
                return call  # symbolic shapes: harlflow imports static shapes only
            dtype = str(idx.ty.dtype)
            if nd:
                width = ishape[-1] if ishape else 1
                rows = math.prod(ishape[:-1])
                first = int(call.attrs.batch_dims) if call.op.name == "relax.gather_nd" else 0
                extents = dshape[first : first + width]
            else:
                width, rows = 1, math.prod(ishape)
                axis = call.attrs.axis
                axis = 0 if axis is None else int(axis)
                extents = [dshape[axis if axis >= 0 else axis + len(dshape)]]
            signed = not dtype.startswith("uint")
            # what the operator reads (after the importer's wrapping), and what the caller may send
            bounds = [((0 if wrapped or not signed else -n), n) for n in extents]
            ranges = [((-n if signed else 0), n - 1) for n in extents]
            check = {
                "id": len(checks),
                "operator": onnx_op,
                "input": _source_input(self, idx, self.params),
                "ranges": ranges,
            }
            checks.append(check)
            gv = self.builder_.add_func(
                _kernel(check, rows, width, dtype, bounds), f"harlflow_index_check{check['id']}"
            )
            view = relax.TensorType([rows, width], dtype)
            flat = self.builder_.emit(relax.op.reshape(idx, [rows, width]))
            checked = self.builder_.emit(relax.call_tir(gv, [flat], view))
            back = self.builder_.emit(relax.op.reshape(checked, ishape))
            args = list(call.args)
            args[pos] = back
            return relax.Call(call.op, args, call.attrs)

    guard = _Guard(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            guard.params = list(func.params)
            guard.builder_.update_func(gv, guard.visit_expr(func))
    return guard.builder_.get() if checks else mod


def index_checks(mod) -> list[dict[str, Any]]:
    """The checks :func:`guard_indices` compiled into ``mod``, by id: for each, the ONNX operator,
    the model input its indices come from unchanged (or None) and the valid range per index
    position (ONNX's: negatives count from the end)."""
    from tvm import tirx

    found = [
        json.loads(str(f.attrs[CHECK_ATTR]))
        for f in mod.functions.values()
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and CHECK_ATTR in f.attrs
    ]
    return sorted(found, key=lambda c: c["id"])


def is_check_kernel(func) -> bool:
    """True for a check kernel (no tuning task: it is already scheduled)."""
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))

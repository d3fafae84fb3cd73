"""Convolutions in NHWC, operator by operator: TVM's ``ConvertLayout`` where it can, the
model's own layout around the operators it cannot handle.

``relax.transform.ConvertLayout`` rewrites the whole function at once, and one operator whose
layout inference is wrong aborts it for every convolution of the model. On ONNX models a
``Sum`` of N tensors imports as ``broadcast_to``s, a ``stack`` along a new axis and a ``sum``;
the ``stack``'s inference fails ("can't find S in source layout ABCDE"), and every convolution
of the model stayed NCHW (a zoo ShuffleNet and ResNet-50 ran 1.9x and 6.2x slower than
onnxruntime). Here such operators are hidden from the pass inside private functions, which it
treats as opaque (their inputs are converted back to the model's layout); the pass converts
everything else, and the hidden calls are put back in place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from harlflow.core.errors import first_line

log = logging.getLogger("harl.layouts")

NHWC = {"relax.nn.conv2d": ["NHWC", "OHWI"]}


@dataclass
class LayoutResult:
    """The converted module and what could not be converted."""

    mod: Any
    kept: list[str] = field(default_factory=list)  # operators left in the model's layout
    error: str | None = None  # ConvertLayout's message on the whole model, when it failed
    converted: bool = True  # False: no convolution changed layout


def to_nhwc(mod, desired: dict[str, list[str]] | None = None) -> LayoutResult:
    """``mod`` with its convolutions in ``desired`` layouts (NHWC/OHWI by default).

    When ``ConvertLayout`` fails on the whole module, the operators whose inference breaks it
    are found by hiding one operator kind at a time (then several, greedily) and are left in
    the model's layout; the rest is converted. Only when no hiding helps does the module stay
    as it was (``converted`` False).
    """
    from tvm import relax

    desired = desired or NHWC
    convert = relax.transform.ConvertLayout(desired)
    try:
        return LayoutResult(convert(mod))
    except Exception as e:
        error = first_line(e)
    kinds = sorted(_op_kinds(mod) - set(desired))
    hidden: list[str] = []
    for kind in kinds:  # the usual case: one operator kind is at fault
        out = _try(mod, convert, [kind])
        if out is not None:
            return LayoutResult(out, [kind], error)
    for kind in kinds:  # several: hide them one by one until the pass goes through
        hidden.append(kind)
        out = _try(mod, convert, hidden)
        if out is not None:
            return LayoutResult(out, _needed(mod, convert, hidden), error)
    return LayoutResult(mod, [], error, converted=False)


def _needed(mod, convert, hidden: list[str]) -> list[str]:
    """The kinds of ``hidden`` that must stay hidden (each dropped if the pass works without)."""
    keep = list(hidden)
    for kind in list(hidden):
        fewer = [k for k in keep if k != kind]
        if fewer and _try(mod, convert, fewer) is not None:
            keep = fewer
    return keep


def _try(mod, convert, kinds: list[str]):
    try:
        hidden_mod, calls = _hide(mod, set(kinds))
        return _unhide(convert(hidden_mod), calls)
    except Exception as e:
        log.debug("ConvertLayout with %s hidden failed: %s", kinds, first_line(e))
        return None


def _op_kinds(mod) -> set[str]:
    import tvm
    from tvm import relax

    found: set[str] = set()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            found.add(e.op.name)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


@dataclass
class _Hidden:
    """A call taken out of the function: its operator, attributes, and how its flattened
    arguments regroup (``None`` for a plain argument, n for a tuple of n fields)."""

    call: Any
    shape: list[int | None]


def _hide(mod, kinds: set[str]):
    """Every call to an operator in ``kinds`` replaced by a call to a private function holding
    it, its arguments (tuples flattened) as the function's parameters."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    calls: dict[str, _Hidden] = {}

    @mutator
    class Hide(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name in kinds):
                return call
            flat, shape = [], []
            for a in call.args:
                if isinstance(a, relax.Tuple):
                    flat.extend(a.fields)
                    shape.append(len(a.fields))
                else:
                    flat.append(a)
                    shape.append(None)
            params = [relax.Var(f"a{i}", a.ty) for i, a in enumerate(flat)]
            inner = relax.Call(call.op, _regroup(params, shape), call.attrs, call.ty_args)
            bb = relax.BlockBuilder()
            name = f"harl_hidden_{len(calls)}"
            with bb.function(name, params, private=True):
                bb.emit_func_output(bb.emit(inner))
            gv = self.builder_.add_func(bb.get()[name], name)
            calls[gv.name_hint] = _Hidden(call, shape)
            return relax.Call(gv, flat)

    hide = Hide(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            hide.builder_.update_func(gv, hide.visit_expr(func))
    return hide.builder_.get(), calls


def _regroup(flat: list, shape: list[int | None]) -> list:
    from tvm import relax

    out, i = [], 0
    for n in shape:
        if n is None:
            out.append(flat[i])
            i += 1
        else:
            out.append(relax.Tuple(flat[i : i + n]))
            i += n
    return out


def _unhide(mod, calls: dict[str, _Hidden]):
    """The hidden calls put back, on the (converted) arguments the pass gave them."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Unhide(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, relax.GlobalVar) and call.op.name_hint in calls:
                h = calls[call.op.name_hint]
                args = _regroup(list(call.args), h.shape)
                return relax.Call(h.call.op, args, h.call.attrs, h.call.ty_args)
            return call

    unhide = Unhide(mod)
    out = {}
    for gv, func in mod.functions.items():
        if gv.name_hint in calls:
            continue
        out[gv] = unhide.visit_expr(func) if isinstance(func, relax.Function) else func
    return relax.transform.Normalize()(tvm.IRModule(out, attrs=mod.attrs))


TO_NHWC_AXES = [0, 2, 3, 1]


def fold_input_transposes(mod):
    """A convolution fed by a transpose of NCHW data into NHWC reads the NCHW data itself
    (``data_layout="NCHW"``, ``out_layout="NHWC"``; lowered by :func:`conv2d_mixed_layouts`):
    the transpose ``ConvertLayout`` puts at the model's input (a kernel, a buffer and its
    allocation on every call) folds into the first convolution's loads. Grouped convolutions
    keep their transpose."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    conv2d = tvm.ir.Op.get("relax.nn.conv2d")
    permute = tvm.ir.Op.get("relax.permute_dims")

    def folds(call, source) -> bool:
        a = call.attrs
        return (
            isinstance(source, relax.Call)
            and source.op.same_as(permute)
            and source.attrs.axes is not None
            and [int(x) for x in source.attrs.axes] == TO_NHWC_AXES
            and a.data_layout == "NHWC"
            and a.out_layout == "NHWC"
            and int(a.groups) == 1
        )

    @mutator
    class _Fold(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(conv2d) or not isinstance(call.args[0], relax.Var):
                return call
            source = self.lookup_binding(call.args[0])
            if not folds(call, source):
                return call
            a = call.attrs
            return relax.op.nn.conv2d(
                source.args[0],
                call.args[1],
                strides=a.strides,
                padding=a.padding,
                dilation=a.dilation,
                groups=a.groups,
                data_layout="NCHW",
                kernel_layout=a.kernel_layout,
                out_layout="NHWC",
                out_dtype=_dtype(a.out_dtype),
            )

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            func = _Fold(mod).visit_expr(func)
            mod[gv] = relax.analysis.remove_all_unused(func)
    return mod


def _dtype(attr) -> str | None:
    """A convolution's ``out_dtype`` attribute, None when unset (the input's)."""
    text = str(attr)
    return None if text in ("", "void", "None") else text


def conv2d_mixed_layouts(bb, call):
    """Lowering of a ``relax.nn.conv2d`` whose output layout differs from its input's (TOPI's
    needs them equal), any of NCHW/NHWC data with a 4-d kernel layout, ungrouped: one compute
    reading the input in its layout and writing the output in its own."""
    from tvm import te, topi

    a = call.attrs
    dl, kl, ol = str(a.data_layout), str(a.kernel_layout), str(a.out_layout)
    if dl == ol or int(a.groups) != 1 or len(dl) != 4 or len(kl) != 4 or len(ol) != 4:
        return call.op.get_attr("FLegalize")(bb, call)  # TVM's own lowering
    strides = [int(s) for s in a.strides]
    dilation = [int(d) for d in a.dilation]
    top, left, bottom, right = (int(p) for p in a.padding)
    out_dtype = _dtype(a.out_dtype) or str(call.args[0].ty.dtype)

    def conv(data, weight):
        shape = dict(zip(dl, data.shape, strict=True))
        kshape = dict(zip(kl, weight.shape, strict=True))
        before = [{"H": top, "W": left}.get(d, 0) for d in dl]
        after = [{"H": bottom, "W": right}.get(d, 0) for d in dl]
        padded = topi.nn.pad(data, before, after, name="pad_temp")
        kh, kw = kshape["H"], kshape["W"]
        oh = (shape["H"] + top + bottom - dilation[0] * (kh - 1) - 1) // strides[0] + 1
        ow = (shape["W"] + left + right - dilation[1] * (kw - 1) - 1) // strides[1] + 1
        sizes = {"N": shape["N"], "C": kshape["O"], "H": oh, "W": ow}
        rc = te.reduce_axis((0, kshape["I"]), name="rc")
        ry = te.reduce_axis((0, kh), name="ry")
        rx = te.reduce_axis((0, kw), name="rx")

        def compute(*index):
            i = dict(zip(ol, index, strict=True))
            at = {
                "N": i["N"],
                "C": rc,
                "H": i["H"] * strides[0] + ry * dilation[0],
                "W": i["W"] * strides[1] + rx * dilation[1],
            }
            w = {"O": i["C"], "I": rc, "H": ry, "W": rx}
            return te.sum(
                padded[tuple(at[d] for d in dl)].astype(out_dtype)
                * weight[tuple(w[d] for d in kl)].astype(out_dtype),
                axis=[rc, ry, rx],
            )

        return te.compute([sizes[d] for d in ol], compute, name="conv2d", tag="conv2d_mixed")

    return bb.call_te(conv, call.args[0], call.args[1], primfunc_name_hint="conv2d")

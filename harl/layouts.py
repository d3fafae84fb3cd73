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

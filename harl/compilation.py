"""From a Relax module to tuning tasks and back to a compiled program: prepare the model, fuse it
into kernels with its weights marked layout-free, extract MetaSchedule's tasks, and compile it
with a tuning database (each kernel's best record, or a fallback schedule), folding the chosen
weight layouts into the constants.

This is TVM's CPU flow (``relax.pipeline.static_shape_tuning_pipeline(cpu_weight_prepack=True)``)
with one difference that keeps the artifact's interface plain: harlflow imports weights as
Relax constants, not as function parameters, so the layout transforms MetaSchedule inserts for
them (``RewriteLayout``) are evaluated once by ``FoldConstant`` at compile time. The compiled
``main`` takes the model's inputs only, as before; no ``transform_params`` call for users.

Task extraction (:func:`extract_tasks`) and compilation (:func:`compile_module`) run the same
fusion passes, so the kernels they see are structurally equal and database records apply.
"""

from __future__ import annotations

import logging
from typing import Any

from harl.database import FAILED_RUN_SECS, best_records
from harl.index_guard import guard_indices, is_check_kernel
from harl.legalize import LEGALIZE
from harl.sampling import fallback_trace
from harlflow.core.errors import TuningError, first_line


def prepare(mod):
    """Inference decompositions, convolutions in NHWC, canonical bindings and bounds checks on
    the indices of every gather/scatter (:mod:`harl.index_guard`): the module that is compiled
    in the end.

    NHWC puts the output channels innermost, so a convolution's micro-kernel vectorises over
    channels (16 fp32 lanes, multiples of 16 in most layers) and broadcasts inputs; NCHW would
    vectorise over the image width (7, 14, 28, 56 in ResNet-18). The weights' transposes are
    constants and fold away; the model keeps its NCHW inputs and outputs.
    """
    from tvm import relax

    try:
        mod = relax.transform.DecomposeOpsForInference()(mod)
        try:
            mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
        except Exception as e:  # a layout choice, not a requirement: NCHW still compiles
            logging.getLogger("harl.compilation").warning(
                "convolutions stay in NCHW: TVM's ConvertLayout failed on this model (%s)",
                first_line(e),
            )
        mod = fold_constant_layouts(relax.transform.CanonicalizeBindings()(mod))
        return guard_indices(mod)
    except Exception as e:
        raise TuningError(f"preparing the model for TVM failed: {first_line(e)}") from None


def fold_constant_layouts(mod):
    """Transposes and reshapes of constants (the NHWC weights and the broadcast biases that
    ``ConvertLayout`` and the ONNX importer leave) computed with numpy, in place of
    ``FoldConstant`` building a kernel for each: the same module, 3x faster to fuse (ResNet-18
    2.5 s to 0.7 s), which is what makes pricing every rewrite candidate with TVM affordable."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def constant(e):
        return e.value.numpy() if isinstance(e, tvm.ir.expr.Constant) else None

    @mutator
    class _Fold(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            op = call.op.name if isinstance(call.op, tvm.ir.Op) else None
            if op not in ("relax.permute_dims", "relax.reshape"):
                return call
            arr = constant(call.args[0])
            if arr is None:
                return call
            if op == "relax.reshape":
                return relax.const(arr.reshape([int(d) for d in call.args[1].values]))
            axes = call.attrs.axes
            axes = None if axes is None else [int(a) for a in axes]
            return relax.const(np.ascontiguousarray(np.transpose(arr, axes)))

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = _Fold(mod).visit_expr(func)
    return mod


def _fusion_passes(target, prepack: bool) -> list:
    from tvm import relax
    from tvm.relax import pipeline

    return [
        *pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(LEGALIZE),  # NaN-propagating relu and clip
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # constants and weights feeding a kernel may be stored in any layout the schedule picks
        *([relax.transform.AttachAttrLayoutFreeBuffers()] if prepack else []),
    ]


def fuse(mod, target: dict[str, Any], *, prepack: bool = True):
    """Legalize and fuse a prepared module: one PrimFunc per kernel, weights marked layout-free."""
    import tvm

    tgt = tvm.target.Target(target)
    with tgt:
        return tvm.transform.Sequential(_fusion_passes(tgt, prepack))(mod)


def apply_database(mod, target: dict[str, Any], database, *, prepack: bool = True):
    """The fused module with each kernel scheduled by its record in ``database`` and, with
    ``prepack``, the weight-layout rewrites of the chosen schedules split out of the kernels and
    folded into the constants: paid once here, never per inference."""
    import tvm
    from tvm import relax

    tgt = tvm.target.Target(target)
    post = (
        [
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
            # the prepacking kernels and the (empty) transform_params ran at compile time
            relax.transform.DeadCodeElimination(["main"]),
        ]
        if prepack
        else []
    )
    with tgt, database, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(_fusion_passes(tgt, prepack))(mod)
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        mod = tvm.transform.Sequential(post)(mod)
    # the weights are constants, so LiftTransformParams leaves an empty, unused transform_params
    keep = {
        gv: f for gv, f in mod.functions.items() if not gv.name_hint.endswith("_transform_params")
    }
    return tvm.IRModule(keep, attrs=mod.attrs)


def compile_module(mod, target: dict[str, Any], database, *, prepack: bool = True):
    """Compile a prepared (un-fused) module with the records of ``database`` applied, the chosen
    weight layouts folded into the constants when ``prepack``."""
    try:
        return _build(mod, target, database, prepack=prepack)
    except Exception as e:
        raise TuningError(f"compilation failed: {first_line(e)}") from None


def _build(mod, target: dict[str, Any], database, *, prepack: bool):
    import tvm
    from tvm import relax

    tgt = tvm.target.Target(target)
    scheduled = apply_database(mod, target, database, prepack=prepack)

    @tvm.transform.module_pass(opt_level=3)
    def _lower(m, _ctx):
        return tvm.transform.Sequential(_lowering_passes())(m)

    with tgt, tvm.transform.PassContext(opt_level=3):
        return relax.build(scheduled, target=tgt, relax_pipeline=_lower)


def _lowering_passes() -> list:
    """Relax's CPU lowering and finalisation (``relax.backend.cpu_generic``; written out because
    ``relax.pipeline.dataflow_lower_passes`` looks them up under a name TVM 0.27 lacks)."""
    from tvm import relax

    t = relax.transform
    return [
        t.RewriteDataflowReshape(),
        t.ToNonDataflow(),
        t.RemovePurityChecking(),
        t.CallTIRRewrite(),
        t.StaticPlanBlockMemory(),
        t.LowerAllocTensor(),
        t.KillAfterLastUse(),
        t.LowerRuntimeBuiltin(),
        t.ComputePrimValue(),
        t.VMShapeLower(),
        t.AttachGlobalSymbol(),
    ]


def extract_tasks(mod, target: dict[str, Any], *, prepack: bool = True) -> list:
    """MetaSchedule's tuning tasks of a prepared module, fused as :func:`compile_module` fuses it
    (weights marked layout-free when ``prepack``, so schedules may choose their layouts).

    A module whose operators all run as VM builtins (e.g. only ``Unique``) has no task: it
    compiles as it is. The index checks are no tasks either: they are scheduled already.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    try:
        fused = fuse(mod, target, prepack=prepack)
        tasks = ms.relax_integration.extract_tasks(fused, tvm.target.Target(target))
        return [t for t in tasks if not is_check_kernel(t.dispatched[0]["main"])]
    except Exception as e:
        raise TuningError(f"task extraction failed: {first_line(e)}") from None


def compile_database(db, tasks, target: dict[str, Any], seed: int):
    """An in-memory database with the best record per task for this target, or a fallback.

    Returns ``(database, sources)`` where ``sources[task_name]`` is ``"database"`` or
    ``"fallback"`` (or ``"default"`` when even the fallback could not be produced).
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mem = ms.database.MemoryDatabase(module_equality="structural")
    tgt = tvm.target.Target(target)
    sources: dict[str, str] = {}
    for task in tasks:
        mod = task.dispatched[0]
        best = best_records(db, mod, target)
        if best:
            trace, run_secs, args = best[0].trace, best[0].run_secs, best[0].args_info
            sources[task.task_name] = "database"
        else:
            trace = fallback_trace(task, target, seed)
            if trace is None:
                sources[task.task_name] = "default"
                continue
            run_secs = [FAILED_RUN_SECS / 10]  # ranks below any measured record
            args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
            sources[task.task_name] = "fallback"
        wl = mem.commit_workload(mod)
        mem.commit_tuning_record(ms.database.TuningRecord(trace, wl, run_secs, tgt, args))
    return mem, sources


def compile_untuned(mod, target: dict[str, Any]):
    """TVM's default build with no schedules: the baseline tuning has to beat."""
    import tvm

    return tvm.compile(mod, target=tvm.target.Target(target))


def task_flop(task) -> float:
    """A task's floating-point operations per call (NaN when TVM cannot count them)."""
    import math

    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # e.g. a kernel with data-dependent loops
        return math.nan

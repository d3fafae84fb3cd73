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

log = logging.getLogger("harl.compilation")


def prepare(mod, *, index_checks: bool = True):
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
        if _calls(mod, "relax.nn.conv2d"):  # the pass crashes (SIGFPE) on some models
            mod = _nhwc(mod)
        mod = fold_constant_layouts(relax.transform.CanonicalizeBindings()(mod))
        return guard_indices(mod) if index_checks else mod  # False: bench/index_checks.py
    except Exception as e:
        raise TuningError(f"preparing the model for TVM failed: {first_line(e)}") from None


def _nhwc(mod):
    """Convolutions in NHWC (:mod:`harl.layouts`), the first ones reading the model's NCHW input
    directly; a layout choice, not a requirement: what cannot be converted stays in the model's
    layout and still compiles."""
    from harl.layouts import fold_input_transposes, to_nhwc

    out = to_nhwc(mod)
    if not out.converted:
        log.warning("convolutions stay in NCHW: TVM's ConvertLayout failed (%s)", out.error)
    elif out.kept:
        log.warning(
            "NHWC around every operator but %s, whose layout inference fails in TVM's "
            "ConvertLayout (%s): kept in NCHW between transposes",
            ", ".join(k.removeprefix("relax.") for k in out.kept),
            out.error,
        )
    return fold_input_transposes(out.mod) if out.converted else out.mod


def _calls(mod, op_name: str) -> bool:
    """Whether any Relax function of ``mod`` calls the operator ``op_name``."""
    import tvm
    from tvm import relax

    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == op_name:
            found.append(e)

    for func in mod.functions.values():
        if isinstance(func, relax.Function) and not found:
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


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
            return relax.const(np.transpose(arr, axes).copy(order="C"))  # 0-d stays 0-d

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = _Fold(mod).visit_expr(func)
    return mod


def _fusion_passes(target, prepack: bool) -> list:
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    return [
        *pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(LEGALIZE),  # where TVM differs from onnxruntime
        relax.transform.AnnotateTIROpPattern(),
        tvm.transform.module_pass(_unfused_slices, opt_level=0, name="UnfusedSlices"),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # constants and weights feeding a kernel may be stored in any layout the schedule picks
        *([relax.transform.AttachAttrLayoutFreeBuffers()] if prepack else []),
        tvm.transform.module_pass(_root_extern_kernels, opt_level=0, name="RootExternKernels"),
    ]


SLICES = ("strided_slice", "split")
OPAQUE = 8  # relax's OpPatternKind::kOpaque: FuseOps fuses nothing into or after it


def _unfused_slices(mod, _ctx):
    """Slices and splits kept out of fused kernels. Fused after a convolution, a slice reads
    only part of the convolution's bias; MetaSchedule's weight-layout rewrite then sizes the
    bias's new layout by the part read, and its prepacking writes every channel into it modulo
    that size (``bias_global[c % 4] = bias[c]`` for 8 channels): the artifact computed wrong
    values (a ShuffleNet-style split after a convolution; caught by verification, not
    packaged). A separate slice costs one copy of its output."""
    from tvm import tirx

    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith(SLICES):
            mod[gv] = func.with_attr("op_pattern", OPAQUE)
    return mod


def _root_extern_kernels(mod, _ctx):
    """Kernels TVM writes as one opaque block (scatter, sort, top-k: no compute block to
    schedule) put under a root block and marked scheduled: ``SplitLayoutRewritePreproc`` refuses
    a function whose single subtree is not a compute block (every model with ScatterElements
    failed to compile), and MetaSchedule has nothing to tune in them."""
    from tvm import s_tir, tirx

    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc) or not isinstance(func.body, s_tir.SBlockRealize):
            continue
        if func.body.block.name_hint == "root":
            continue
        root = s_tir.SBlock([], [], [], "root", func.body)
        func = func.with_body(s_tir.SBlockRealize([], True, root))
        mod[gv] = func.with_attr("tirx.is_scheduled", True)
    return mod


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
            tvm.transform.module_pass(_constant_fields, opt_level=0, name="ConstantFields"),
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


def _constant_fields(mod, _ctx):
    """``t[i]`` of a tuple of constants replaced by the constant. Folding the prepacked weights
    leaves each kernel's weights as a tuple constant taken apart field by field; the VM built
    the tuple and took it apart again on every call (a tuple, two ``tuple_getitem`` and a
    ``kill_object`` per kernel). With the fields constant, dead-code elimination drops the
    tuple."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def is_constant(e) -> bool:
        return isinstance(e, tvm.ir.expr.Constant)

    @mutator
    class _Fields(PyExprMutator):
        def visit_tuple_getitem_(self, op):
            op = super().visit_tuple_getitem_(op)
            tup = op.tuple_value
            if isinstance(tup, relax.Var):
                tup = self.lookup_binding(tup)
            if isinstance(tup, relax.Tuple):
                field = tup.fields[op.index]
                if is_constant(field):
                    return field
            return op

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = _Fields(mod).visit_expr(func)
    return mod


def compile_module(mod, target: dict[str, Any], database, *, prepack: bool = True):
    """Compile a prepared (un-fused) module with the records of ``database`` applied, the chosen
    weight layouts folded into the constants when ``prepack``."""
    try:
        return _build(mod, target, database, prepack=prepack)
    except Exception as e:
        raise TuningError(f"compilation failed: {first_line(e)}") from None


def _build(mod, target: dict[str, Any], database, *, prepack: bool, exec_mode: str = "bytecode"):
    """``exec_mode="compiled"``: the VM's instructions compiled to C (``bench/vm_overhead.py``
    compares the two)."""
    import tvm
    from tvm import relax

    tgt = tvm.target.Target(target)
    scheduled = apply_database(mod, target, database, prepack=prepack)

    @tvm.transform.module_pass(opt_level=3)
    def _lower(m, _ctx):
        return tvm.transform.Sequential(_lowering_passes())(m)

    with tgt, tvm.transform.PassContext(opt_level=3):
        return relax.build(scheduled, target=tgt, relax_pipeline=_lower, exec_mode=exec_mode)


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
    """An in-memory database with the best record per task for this target, or else the
    schedule of the nearest workload the store measured (:mod:`harl.transfer`), or else a
    fallback.

    Returns ``(database, sources)`` where ``sources[task_name]`` is ``"database"``,
    ``"transferred"`` or ``"fallback"`` (or ``"default"`` when even the fallback could not be
    produced).
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from harl.transfer import Sources, transferred

    mem = ms.database.MemoryDatabase(module_equality="structural")
    tgt = tvm.target.Target(target)
    sources: dict[str, str] = {}
    offered = None  # what the store can transfer, read when the first task needs it
    for task in tasks:
        mod = task.dispatched[0]
        best = _applicable(best_records(db, mod, target, k=8), mod, task.task_name)
        moved = []
        if best is None:
            offered = offered or Sources(db, target)
            moved = transferred(offered, task, seed)
        if best is not None:
            trace, run_secs, args = best.trace, best.run_secs, best.args_info
            sources[task.task_name] = "database"
        elif moved:  # the nearest measured workload's schedule, re-fitted (harl.transfer)
            trace = moved[0].trace
            run_secs = [FAILED_RUN_SECS / 10]
            args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
            sources[task.task_name] = "transferred"
        else:
            try:
                trace = fallback_trace(task, target, seed)
            except Exception as e:  # MetaSchedule cannot sketch it: TVM's default lowering
                log.warning(
                    "no fallback schedule for %s (%s): compiled unscheduled",
                    task.task_name,
                    first_line(e),
                )
                trace = None
            if trace is None:
                sources[task.task_name] = "default"
                continue
            run_secs = [FAILED_RUN_SECS / 10]  # ranks below any measured record
            args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
            sources[task.task_name] = "fallback"
        wl = mem.commit_workload(mod)
        mem.commit_tuning_record(ms.database.TuningRecord(trace, wl, run_secs, tgt, args))
    return mem, sources


def _applicable(records: list, mod, task_name: str):
    """The first record whose schedule applies to ``mod``, or None. A record can match a task's
    workload (structurally equal) and still not apply: its trace names blocks by the names of the
    model it was tuned on (a re-exported checkpoint: "get-block" fails). Such a record is skipped
    with a warning, never a failed compilation."""
    from tvm import s_tir

    for r in records:
        try:
            r.trace.apply_to_schedule(s_tir.Schedule(mod), remove_postproc=False)
            return r
        except Exception as e:
            log.warning(
                "a tuning record of %s does not apply to it (%s): skipped", task_name, first_line(e)
            )
    return None


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

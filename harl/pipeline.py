"""The Relax pipeline around tuning: fuse the model into kernels, mark its weights layout-free,
and compile it with a tuning database, folding the chosen weight layouts into the constants.

This is TVM's CPU flow (``relax.pipeline.static_shape_tuning_pipeline(cpu_weight_prepack=True)``)
with one difference that keeps the artifact's interface plain: harlflow imports weights as
Relax constants, not as function parameters, so the layout transforms MetaSchedule inserts for
them (``RewriteLayout``) are evaluated once by ``FoldConstant`` at compile time. The compiled
``main`` takes the model's inputs only, as before; no ``transform_params`` call for users.

Task extraction (:func:`fuse`) and compilation (:func:`compile_with_database`) run the same
fusion passes, so the kernels they see are structurally equal and database records apply.
"""

from __future__ import annotations

from typing import Any


def _fusion_passes(target, prepack: bool) -> list:
    from tvm import relax
    from tvm.relax import pipeline

    return [
        *pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
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
    post = [relax.transform.SplitLayoutRewritePreproc(), relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
            # the prepacking kernels and the (empty) transform_params ran at compile time
            relax.transform.DeadCodeElimination(["main"])] if prepack else []  # fmt: skip
    with tgt, database, tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(_fusion_passes(tgt, prepack))(mod)
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        mod = tvm.transform.Sequential(post)(mod)
    # the weights are constants, so LiftTransformParams leaves an empty, unused transform_params
    keep = {gv: f for gv, f in mod.functions.items()
            if not gv.name_hint.endswith("_transform_params")}  # fmt: skip
    return tvm.IRModule(keep, attrs=mod.attrs)


def compile_with_database(mod, target: dict[str, Any], database, *, prepack: bool = True):
    """Compile a prepared (un-fused) module with :func:`apply_database`'s kernels."""
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
        t.RewriteDataflowReshape(), t.ToNonDataflow(), t.RemovePurityChecking(), t.CallTIRRewrite(),
        t.StaticPlanBlockMemory(), t.LowerAllocTensor(), t.KillAfterLastUse(),
        t.LowerRuntimeBuiltin(), t.ComputePrimValue(), t.VMShapeLower(), t.AttachGlobalSymbol(),
    ]  # fmt: skip


def extract_tasks(fused, target: dict[str, Any]) -> list:
    """MetaSchedule's tuning tasks of a fused module (:func:`fuse`)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(fused, tvm.target.Target(target)))

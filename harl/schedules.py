"""Replaying traces into valid schedules: the one place that runs the postprocessors."""

from __future__ import annotations

SPATIAL, REDUCE = 0, 2
"""``IterVar.iter_type`` of a data-parallel and of a reduction axis (``kDataPar``,
``kCommReduce``)"""


def root_blocks(sch) -> list:
    """The blocks directly under a schedule's root block: a fused kernel's stages, in order."""
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def postprocess(sch, postprocs) -> bool:
    """Mark the postprocessing phase, as MetaSchedule does, then run every postprocessor.

    Without the ``EnterPostproc`` marker a stored trace keeps the postprocessors' instructions
    as if they were the design's; replaying it with ``remove_postproc=True`` then applies them
    twice, and MetaSchedule's evolutionary search aborts ("old_outputs.size() ==
    new_outputs.size()") when it starts from such a record.
    """
    sch.enter_postproc()
    return all(p.apply(sch) for p in postprocs)


def replay(mod, trace, postprocs, seed: int):
    """``trace`` applied to a fresh schedule of ``mod`` and post-processed; ``None`` if invalid.

    Sampling instructions without a decision in ``trace`` draw one from ``seed``.
    """
    from tvm.s_tir import Schedule

    sch = Schedule(mod, seed=seed % (2**31 - 2) + 1)  # TVM wants seeds in [1, 2^31)
    try:
        trace.apply_to_schedule(sch, remove_postproc=True)
    except Exception:  # a decision the replay rejects (e.g. an unreachable compute location)
        return None
    return sch if postprocess(sch, postprocs) else None

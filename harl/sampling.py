"""Starting points for a task's search: seeded samples of its design spaces, biased towards
register-blocked micro-kernels.

MetaSchedule's CPU design space tiles each compute block with ``SSRSRS`` (four levels per spatial
loop, two per reduction loop); its uniform random samples are mostly far from fast: on a ResNet
3×3 convolution (NHWC, 64 channels, 56²) 16 random samples had a median of 20 ms and a best of
8.9 ms. Library kernels (MLAS, oneDNN) are register-blocked outer products: a tile of ``rows``
output positions × one or two 16-lane vectors of the contiguous output dimension, accumulated
over the reduction with one broadcast and ``rows × vectors`` FMAs per step.
:func:`micro_kernel_trace` sets the innermost tile decisions of a sampled trace to such a tile
(other levels stay random), and 16 such samples had a median of 2.2 ms and a best of 2.0 ms on
the same convolution (``bench/trial_profile.py`` measures this).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from harl._fast_import import import_tensor_intrinsics
from harl.reductions import row_reduction
from harl.schedules import postprocess, replay

TILE, CATEGORICAL = "SamplePerfectTile", "SampleCategorical"
VECTOR_LANES = 16  # fp32 lanes of an AVX-512 register
MAX_ACCUMULATORS = 24  # of 32 vector registers, keep some for the broadcasts and the weights


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _random_split(extent: int, levels: int, rng: np.random.Generator) -> list[int]:
    """``levels`` factors whose product is ``extent``, in random order."""
    out = []
    for _ in range(levels - 1):
        d = int(rng.choice(_divisors(extent)))
        out.append(d)
        extent //= d
    out.append(extent)
    rng.shuffle(out)
    return out


def micro_kernel_trace(trace, rng: np.random.Generator):
    """``trace`` with each multi-level tiling's innermost tile set to a register block.

    Spatial loops are tiled in 4 levels, reductions in 2 (the ``SSRSRS`` structure). The last
    spatial loop (contiguous in the output) gets an innermost factor of one or two vectors;
    the one before it a handful of rows; the other spatial loops 1; the last reduction a small
    factor, the others 1 or their whole extent. Outer levels are random perfect splits. The
    unroll depth is drawn from the two largest choices, so the block unrolls into registers.
    """
    tiles = [i for i in trace.insts if i.kind.name == TILE and i in trace.decisions]
    spatial = [i for i in tiles if int(i.attrs[0]) == 4]
    reduce = [i for i in tiles if int(i.attrs[0]) == 2]
    if not spatial:
        return trace

    def extent(inst) -> int:
        return math.prod(int(x) for x in trace.decisions[inst])

    new: dict[Any, Any] = {}
    last = extent(spatial[-1])
    vectors = [d for d in _divisors(last) if d <= 2 * VECTOR_LANES and d % VECTOR_LANES == 0]
    vec = int(rng.choice(vectors)) if vectors else max(d for d in _divisors(last) if d <= 32)
    regs = max(1, vec // VECTOR_LANES)
    rows = [1]
    if len(spatial) > 1:
        fit = [
            d for d in _divisors(extent(spatial[-2])) if d <= 12 and d * regs <= MAX_ACCUMULATORS
        ]
        rows = [d for d in fit if d >= 2] or fit
    row = int(rng.choice(rows))
    for k, inst in enumerate(spatial):
        inner = vec if k == len(spatial) - 1 else row if k == len(spatial) - 2 else 1
        new[inst] = [*_random_split(extent(inst) // inner, 3, rng), inner]
    for k, inst in enumerate(reduce):
        e = extent(inst)
        small = [d for d in _divisors(e) if d <= 8]
        inner = int(rng.choice(small)) if k == len(reduce) - 1 else int(rng.choice([1, e]))
        new[inst] = [e // inner, inner]
    for inst in trace.insts:
        if inst.kind.name == CATEGORICAL and inst in trace.decisions:
            n = len(inst.attrs[0])
            if n >= 2:
                new[inst] = int(rng.choice([n - 2, n - 1]))
    for inst, decision in new.items():
        trace = trace.with_decision(inst, decision, remove_postproc=True)
    return trace


def _context(task, target: dict[str, Any], seed: int):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    import_tensor_intrinsics()
    return ms.TuneContext(
        mod=task.dispatched[0],
        target=tvm.target.Target(target),
        space_generator="post-order-apply",
        rand_state=seed + 1,
        num_threads=1,
    )


def sample_schedules(
    task, target: dict[str, Any], count: int, seed: int, micro_kernel: float = 0.0
) -> list:
    """``count`` valid schedules of a task, post-processed; a ``micro_kernel`` fraction of them
    (rounded up) with register-blocked innermost tiles (:func:`micro_kernel_trace`).

    Each round asks the space generator for its sketches again, which samples every decision
    afresh from the context's random state (seeded), so the same seed gives the same schedules
    and the sketches take turns. Samples the postprocessors reject are skipped.
    """
    ctx = _context(task, target, seed)
    mod = task.dispatched[0]
    postprocs = ctx.space_generator.postprocs
    rng = np.random.default_rng(seed)
    want_micro = math.ceil(micro_kernel * count)
    out: list = []
    for _ in range(4 * count):  # each call samples every decision of every sketch afresh
        for sch in ctx.space_generator.generate_design_space(mod):
            if len(out) >= count:
                break
            if len(out) < want_micro:
                try:
                    trace = micro_kernel_trace(sch.trace, rng)
                except Exception:  # a decision this sketch's replay rejects: keep the sample
                    trace = None
                seed_ = int(rng.integers(1, 2**31 - 1))
                shaped = replay(mod, trace, postprocs, seed_) if trace is not None else None
                if shaped is not None:
                    out.append(shaped)
                    continue
            if postprocess(sch, postprocs):
                out.append(sch)
        if len(out) >= count:
            break
    return out


def postprocessors(task, target: dict[str, Any]) -> list:
    """MetaSchedule's postprocessors for ``task`` on ``target`` (what makes a schedule valid)."""
    return _context(task, target, 0).space_generator.postprocs


def first_samples(task, target: dict[str, Any], count: int, seed: int,
                  micro_kernel: float = 0.0) -> list:  # fmt: skip
    """``count`` schedules of a task, the first the one it compiles with before it is measured:
    the row-reduction schedule where the kernel has that shape (``harl.reductions``), then
    :func:`sample_schedules`'s."""
    built = row_reduction(task, postprocessors(task, target)) if count > 0 else None
    rest = sample_schedules(task, target, count - (built is not None), seed, micro_kernel)
    return [built, *rest] if built is not None else rest


def fallback_trace(task, target: dict[str, Any], seed: int):
    """A measurement-free schedule for a task never measured on this target (``--trials 0``):
    the row-reduction schedule where it applies, else one register-blocked sample
    (:func:`sample_schedules`), else one random sample."""
    samples = first_samples(task, target, 1, seed, micro_kernel=1.0)
    return samples[0].trace if samples else None


def unscheduled(task):
    """The task's kernel as TVM lowers it with no schedule: one thread, no launch of the thread
    pool. For kernels of a few µs (a transpose, a small reduction) the pool's launch costs more
    than the parallel work saves, so tiny tasks measure this candidate too."""
    from tvm.s_tir import Schedule

    sch = Schedule(task.dispatched[0])
    sch.get_sblock("root")  # a no-op: MetaSchedule's get_top_k skips records with empty traces
    return sch

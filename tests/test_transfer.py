"""Schedules transferred across workloads (harl.transfer): a convolution measured at one shape
gives its schedule to a convolution of another shape, which builds, runs, verifies, and keeps
the register block; the nearest-workload lookup; the ``--trials 0`` fallback drawing on it."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harl import compilation, database, sampling, transfer
from harlflow.core.signature import TensorSpec
from harlflow.core.targets import resolve_target
from tasks.importing import import_model, to_relax

pytestmark = pytest.mark.slow


def conv(path, cin: int, cout: int, hw: int):
    """A 3×3 convolution + ReLU as ONNX, and its Relax tasks on this host's CPU."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((cout, cin, 3, 3)).astype("float32"), "w"
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    g = helper.make_graph(nodes, "conv", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    mod = compilation.prepare(to_relax(path, [TensorSpec("x", (1, cin, hw, hw), "float32")]))
    target = resolve_target("cpu")
    tasks = [t for t in compilation.extract_tasks(mod, target) if "conv2d" in t.task_name]
    assert len(tasks) == 1
    return target, tasks[0]


def _tiles(trace) -> list[list[int]]:
    return [
        [int(x) for x in trace.decisions[i]]
        for i in transfer._sampling(trace)
        if i.kind.name == transfer.TILE
    ]


def _commit(db, task, trace, target) -> None:
    """``trace`` as a measured record of ``task``'s workload (10 µs) on ``target``."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    db.commit_tuning_record(
        ms.database.TuningRecord(
            trace, db.commit_workload(mod), [1e-5], tvm.target.Target(target),
            ms.arg_info.ArgInfo.from_prim_func(mod["main"]),
        )
    )  # fmt: skip


def test_refit_keeps_the_innermost_factor_and_the_extent():
    assert transfer.refit_tile([2, 4, 2, 16], 128) == [1, 4, 2, 16]  # the outermost absorbs it
    assert transfer.refit_tile([1, 7, 1, 8], 56) == [1, 7, 1, 8]
    assert transfer.refit_tile([2, 1, 3, 32], 48) == [1, 1, 2, 24]  # 32 does not divide 48
    for factors, extent in [([4, 2, 2, 16], 96), ([3, 3], 10), ([1, 1, 1, 1], 7)]:
        out = transfer.refit_tile(factors, extent)
        assert math.prod(out) == extent and len(out) == len(factors)


def test_a_schedule_moves_to_another_convolution_and_verifies(tmp_path):
    """Measured at 16→32 channels on 14², the schedule goes to 24→64 channels on 10²: the
    store's nearest compatible workload is found, the transferred schedule keeps its
    register block, and the model compiled with it (``--trials 0``) verifies."""

    target, small = conv(tmp_path / "a.onnx", 16, 32, 14)
    _, other = conv(tmp_path / "b.onnx", 24, 64, 10)
    source = sampling.sample_schedules(small, target, 1, seed=3, micro_kernel=1.0)[0]
    db = database.open_database(tmp_path / "db")
    _commit(db, small, source.trace, target)

    offered = transfer.Sources(db, target)
    found = offered.nearest(other)
    assert len(found) == 1 and 0 < found[0][0] < math.inf
    assert offered.nearest(small) == []  # its own workload needs no transfer
    moved = transfer.transferred(offered, other)
    assert len(moved) == 1
    before, after = _tiles(source.trace), _tiles(moved[0].trace)
    assert len(before) == len(after)
    for b, a in zip(before, after, strict=True):
        assert a[-1] == b[-1] or math.prod(a) % b[-1] != 0  # the register block kept
    # --trials 0 on the other model: its convolution compiles with the transferred schedule
    _, sources = compilation.compile_database(db, [other], target, seed=0)
    assert sources == {other.task_name: "transferred"}
    from tasks.packaging import package

    m = import_model(str(tmp_path / "b.onnx"), cache_dir=tmp_path / "cache")
    art = package(
        m, target, database_dir=tmp_path / "db", home=tmp_path / "home", tune_summary={},
        measure=False, log=lambda *_: None,
    )  # fmt: skip
    assert art.manifest["tuning"]["kernels"][other.task_name] == "transferred"  # and verified


def test_incompatible_structures_are_not_transferred(tmp_path):
    """A matmul's record offers nothing to a convolution: their tilings differ."""
    from store_worker import matmul

    target, task = conv(tmp_path / "a.onnx", 16, 32, 14)
    _, _, mm_tasks = matmul(32)
    mm = mm_tasks[0]
    sch = sampling.sample_schedules(mm, target, 1, seed=0)[0]
    db = database.open_database(tmp_path / "db")
    _commit(db, mm, sch.trace, target)
    assert transfer.Sources(db, target).nearest(task) == []
    _, sources = compilation.compile_database(db, [task], target, seed=0)
    assert sources == {task.task_name: "fallback"}

"""The tuning machinery that makes artifacts fast: persistent build workers, time budgets,
register-blocked samples, prepacked weights and the runtime's thread count, on real TVM."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from harl import compilation, database, tuning
from harl.budget import UNLIMITED_TRIALS, Deadline
from harl.builders import PersistentBuilder, build_timeout_s, default_builder, persistent_builder
from harl.sampling import sample_schedules
from harlflow.core.durations import format_duration, parse_duration
from harlflow.core.errors import BadInputError
from harlflow.core.targets import resolve_target
from tasks.importing import import_model, to_relax


def _conv_onnx(path):
    """Conv 8→16 channels, 3×3, on 1×8×16×16, then ReLU: a tiny model with a weight to prepack."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype("float32") * 0.2, "w"
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "conv", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    work = tmp_path_factory.mktemp("conv")
    imported = import_model(str(_conv_onnx(work / "conv.onnx")), cache_dir=work / "cache")
    mod = compilation.prepare(to_relax(imported.onnx_path, imported.inputs))
    target = resolve_target("cpu")
    tasks = compilation.extract_tasks(mod, target)
    task = max(tasks, key=compilation.task_flop)
    return imported, mod, target, task


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_durations_parse_and_bad_ones_are_clear_errors():
    assert parse_duration("90s") == 90 and parse_duration("20m") == 1200
    assert parse_duration("1h") == 3600 and parse_duration("1.5h") == 5400
    assert parse_duration("300") == 300 and parse_duration(" 2 MIN ") == 120
    for bad in ("20x", "", "m", "-5m", "1e3s", "twenty minutes"):
        with pytest.raises(BadInputError, match="invalid --time-budget"):
            parse_duration(bad)
    with pytest.raises(BadInputError, match="more than 0 seconds"):
        parse_duration("0s")
    assert format_duration(3900) == "1h05m" and format_duration(250) == "4m10s"
    assert format_duration(42) == "42s"


def test_deadline_cuts_batches_to_what_fits():
    unlimited = Deadline(None)
    assert unlimited.affordable(32) == 32 and not unlimited.expired()
    d = Deadline(10.0)
    assert d.affordable(32) == 32  # no pace known yet
    d.per_trial_s = 1.0
    assert 8 <= d.affordable(32) <= 10  # about 10 s left at 1 s per trial
    assert Deadline(10.0, start=time.monotonic() - 11).affordable(32) == 0


def test_register_blocked_samples_are_valid_and_tile_the_output_channels(conv):
    _, _, target, task = conv
    samples = sample_schedules(task, target, 4, seed=3, micro_kernel=1.0)
    assert len(samples) == 4
    again = sample_schedules(task, target, 4, seed=3, micro_kernel=1.0)
    assert [str(s.trace) for s in samples] == [str(s.trace) for s in again]  # seeded
    for sch in samples:
        tiles = [
            sch.trace.decisions[i]
            for i in sch.trace.insts
            if i.kind.name == "SamplePerfectTile" and int(i.attrs[0]) == 4
        ]
        assert int(tiles[-1][-1]) == 16  # 16 output channels: one 16-lane vector innermost


def _build_inputs(conv, n: int) -> list:
    """``n`` register-blocked samples of the convolution, as MetaSchedule builder inputs."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    _, _, target, task = conv
    tgt = tvm.target.Target(target)
    return [
        ms.builder.BuilderInput(s.mod, tgt)
        for s in sample_schedules(task, target, n, seed=0, micro_kernel=1.0)
    ]


def test_persistent_builder_builds_survives_dead_workers_and_leaves_no_process(conv):
    import tvm

    inputs = _build_inputs(conv, 4)
    builder = PersistentBuilder(max_workers=2, timeout_sec=60)
    seen: set[int] = set()
    try:
        first = builder.build(inputs)
        assert [r.error_msg for r in first] == [None] * 4
        for r in first:  # ready-linked shared objects: loading needs no compiler
            assert r.artifact_path.endswith(".so")
            tvm.runtime.load_module(r.artifact_path)
        workers = builder.worker_pids()
        assert len(workers) == 2
        seen.update(workers)

        # a worker killed while idle is replaced: the next round builds everything
        os.kill(workers[0], signal.SIGKILL)
        second = builder.build(inputs)
        assert [r.error_msg for r in second] == [None] * 4
        seen.update(builder.worker_pids())

        # a worker killed while building is restarted and the candidate it held built again:
        # the round loses nothing
        out: list = []
        job = threading.Thread(target=lambda: out.extend(builder.build(inputs * 3)))
        job.start()
        time.sleep(0.3)
        victim = builder.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        job.join(timeout=300)
        seen.update(builder.worker_pids())
        assert [r.error_msg for r in out] == [None] * 12
        assert victim not in builder.worker_pids()
        assert [r.error_msg for r in builder.build(inputs[:2])] == [None, None]
        seen.update(builder.worker_pids())
    finally:
        builder.close()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in seen if _alive(p)]


def test_a_build_past_its_timeout_fails_its_candidate_and_a_time_budget_shortens_it(conv):
    inputs = _build_inputs(conv, 2)
    with persistent_builder(max_workers=1, timeout_sec=0.05) as builder:
        out = builder.build(inputs)
    assert [r.artifact_path for r in out] == [None, None]
    assert all("timeout, killed after 0.05 s" in r.error_msg for r in out)
    # a 5-minute budget gives a build 15 s, not 60: a candidate LLVM cannot finish holds a
    # worker that long; a short budget still gives 10 s, a long one (or none) 60
    assert default_builder(time_budget_s=300).timeout_sec == 15
    assert [build_timeout_s(b) for b in (60, 3600, None)] == [10, 60, 60]


@pytest.mark.slow
@pytest.mark.alone  # 12 s must leave time to measure a trial
def test_time_budget_stops_tuning_keeps_every_trial_and_leaves_no_process(conv, tmp_path):
    _, mod, target, _ = conv
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = tuning.tune(
        mod,
        target,
        tmp_path / "db",
        trials=UNLIMITED_TRIALS,
        time_budget_s=12,
        min_trials_per_task=4,
    )
    assert 0 < result.trials < UNLIMITED_TRIALS  # the deadline, not the trial count, ended it
    assert result.summary()["time_budget_s"] == 12
    assert len(result.history) == result.trials  # progress after every measured trial
    assert all(p.remaining_s is not None for p in result.history)
    db = database.open_database(tmp_path / "db")
    tasks = compilation.extract_tasks(mod, target)
    assert database.count_records(db, tasks, target) == result.trials  # every trial was kept
    time.sleep(1)
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert not left, [p.cmdline() for p in left]


@pytest.mark.slow
def test_a_trial_budget_is_spent_exactly(conv, tmp_path):
    """MetaSchedule lets its last round overshoot ``max_trials_global``; the budgeted rounds cut
    it: warm-up (2 + 2 × 2 for the tiny transposes) plus search add up to --trials."""
    _, mod, target, _ = conv
    result = tuning.tune(mod, target, tmp_path / "db", trials=13, min_trials_per_task=2)
    assert result.trials == 13
    db = database.open_database(tmp_path / "db")
    assert database.count_records(db, compilation.extract_tasks(mod, target), target) == 13


@pytest.mark.slow
def test_prepacked_conv_artifact_verifies_through_the_runtime(conv, tmp_path):
    import tvm

    from harlflow import runtime
    from harlflow.core.outputs import load_reference
    from tasks.packaging import package

    imported, mod, target, _ = conv
    db_dir = tmp_path / "db"
    # a budget under the warm-up (4 for the conv, 2 + 2 for the transposes) is not exceeded
    result = tuning.tune(mod, target, db_dir, trials=3, min_trials_per_task=4)
    assert result.trials == 3
    tasks = compilation.extract_tasks(mod, target)
    assert database.count_records(database.open_database(db_dir), tasks, target) == 3

    # the tuned convolution reads its weight in a blocked layout that was folded at compile time
    db = database.open_database(db_dir)
    compiled_db, _ = compilation.compile_database(
        db, compilation.extract_tasks(mod, target), target, 0
    )
    scheduled = compilation.apply_database(mod, target, compiled_db)
    main = scheduled["main"]
    assert len(main.params) == 1  # the model's input only: no transform_params for users
    calls = [b.value for blk in main.body.blocks for b in blk.bindings]
    prepacked = [c for c in calls if "prepacked" in c.args[0].name_hint]
    assert len(prepacked) == 1, main.script()
    weights = [a for a in prepacked[0].args[1].fields if isinstance(a, tvm.ir.expr.Constant)]
    # not the OHWI weight the NHWC model gives the kernel (16, 3, 3, 8) but the schedule's own
    # layout (tiles, or with 16 output channels as one vector, input channels outermost)
    shape = tuple(weights[0].value.shape) if weights else None
    assert shape is not None and shape != (16, 3, 3, 8) and np.prod(shape) == 16 * 3 * 3 * 8
    assert not [
        gv.name_hint
        for gv in scheduled.functions
        if "weight_prepack" in gv.name_hint or "transform_params" in gv.name_hint
    ]

    artifact = package(
        imported,
        target,
        database_dir=db_dir,
        home=tmp_path / "home",
        tune_summary=result.summary(),
        measure=False,
        log=lambda *_: None,
    )
    model = runtime.load(artifact.directory)
    inputs, expected = load_reference(str(imported.reference_path))
    got = model(**inputs)
    np.testing.assert_allclose(got, expected["y"], rtol=1e-3, atol=1e-4)


def test_measurement_fills_arguments_as_a_model_could():
    """The runner's arguments: bools mixed (MetaSchedule's fill made every mask all True, so a
    causal-mask kernel was timed on a mask that masks everything), integers small and non-zero
    (MetaSchedule's were float bit patterns). The kernel asserts both; MetaSchedule's own
    allocation, run as the control, fails its asserts."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.script import tirx as T

    from harl.builders import build_shared_object
    from harl.runners import make_runner

    @T.prim_func(s_tir=True)
    def check(idx: T.Buffer((64,), "int64"), mask: T.Buffer((64,), "bool"),
              out: T.Buffer((1,), "int64")):  # fmt: skip
        out[0] = T.int64(0)
        for i in range(64):
            assert 1 <= idx[i] and idx[i] <= 8, "an integer argument outside [1, 8]"
            out[0] = out[0] + T.Cast("int64", mask[i])
        assert 0 < out[0] and out[0] < 64, "a bool argument of one value only"

    path = build_shared_object(tvm.IRModule({"main": check}), tvm.target.Target("llvm"))
    info = ms.arg_info.ArgInfo.from_prim_func(check)
    ours = make_runner(None).run([ms.runner.RunnerInput(path, "cpu", info)])[0].result()
    assert ours.error_msg is None and len(ours.run_secs) > 0
    theirs = ms.runner.LocalRunner().run([ms.runner.RunnerInput(path, "cpu", info)])[0].result()
    assert theirs.error_msg is not None and "outside [1, 8]" in theirs.error_msg

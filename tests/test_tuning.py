"""harl.tuning as a library: targets, seeded design-space samples, per-target database records."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harl import compilation, database, sampling, tuning
from harlflow.core.errors import BadInputError
from harlflow.core.signature import TensorSpec
from harlflow.core.targets import resolve_target
from tasks.importing import to_relax


@pytest.fixture(scope="module")
def matmul_tasks(tmp_path_factory):
    """A 64×64 matmul as ONNX → Relax → MetaSchedule tasks."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((64, 64)).astype("float32"), "w"
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [w])
    path = tmp_path_factory.mktemp("mm") / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    mod = compilation.prepare(to_relax(path, [TensorSpec("x", (64, 64), "float32")]))
    target = resolve_target("cpu")
    return mod, target, compilation.extract_tasks(mod, target)


def test_target_shorthands_and_errors():
    host = resolve_target("host")
    assert host["kind"] == "llvm" and host["mcpu"] and host["num-cores"] >= 1
    assert resolve_target(None) == host
    assert resolve_target('{"kind": "llvm", "mcpu": "znver5"}')["num-cores"] == host["num-cores"]
    for bad, msg in [
        ("llvm -mcpu=znver5", "unknown target"),
        ("{nope", "not valid JSON"),
        ('{"kind": "no-such-kind"}', "invalid TVM target"),
        ('{"kind": "cuda"}', "unsupported --target kind 'cuda'"),
        ('{"kind": "c"}', "CPU .llvm. targets only"),
    ]:
        with pytest.raises(BadInputError, match=msg):
            resolve_target(bad)


def test_samples_are_valid_and_seeded(matmul_tasks):
    _, target, tasks = matmul_tasks
    task = next(t for t in tasks if "matmul" in t.task_name)
    a = sampling.sample_schedules(task, target, 4, seed=1)
    b = sampling.sample_schedules(task, target, 4, seed=1)
    c = sampling.sample_schedules(task, target, 4, seed=2)
    assert len(a) == 4
    assert [str(s.trace) for s in a] == [str(s.trace) for s in b]
    assert [str(s.trace) for s in a] != [str(s.trace) for s in c]
    import tvm

    for sch in a:  # each sample compiles and computes the matmul
        f = tvm.compile(sch.mod, target=tvm.target.Target(target))
        dev = tvm.cpu()
        xs = [
            np.random.default_rng(i).standard_normal((64, 64)).astype("float32") for i in range(2)
        ]
        args = [tvm.runtime.tensor(v, dev) for v in xs] + [
            tvm.runtime.tensor(np.zeros((64, 64), "float32"), dev)
        ]
        f(*args)
        np.testing.assert_allclose(args[2].numpy(), xs[0] @ xs[1], rtol=1e-4, atol=1e-4)


def test_records_are_per_target(matmul_tasks, tmp_path):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    _, target, tasks = matmul_tasks
    task = tasks[0]
    db = database.open_database(tmp_path / "db")
    sch = sampling.sample_schedules(task, target, 1, seed=0)[0]
    mod = task.dispatched[0]
    db.commit_tuning_record(
        ms.database.TuningRecord(
            sch.trace,
            db.commit_workload(mod),
            [1e-5],
            tvm.target.Target(target),
            ms.arg_info.ArgInfo.from_prim_func(mod["main"]),
        )
    )
    assert len(database.best_records(db, mod, target)) == 1
    other = {**target, "mcpu": "skylake-avx512" if target["mcpu"] != "skylake-avx512" else "znver4"}
    assert database.best_records(db, mod, other) == []
    # the compile database falls back for the other target and uses the record for this one
    _, sources = compilation.compile_database(db, [task], target, seed=0)
    assert sources == {task.task_name: "database"}
    _, sources = compilation.compile_database(db, [task], other, seed=0)
    assert sources == {task.task_name: "fallback"}


def test_negative_budget_and_unknown_strategy(matmul_tasks, tmp_path):
    mod, target, _ = matmul_tasks
    with pytest.raises(BadInputError, match="--trials must be >= 0"):
        tuning.tune(mod, target, tmp_path / "db", trials=-1)
    with pytest.raises(BadInputError, match="unknown strategy 'annealing'"):
        tuning.tune(mod, target, tmp_path / "db", trials=4, strategy="annealing")


def test_a_flop_tiny_task_that_takes_time_is_searched():
    """Tiny by FLOPs decides the warm-up; the measured time decides the search: a global mean
    (few FLOPs, 8 % of inception's kernel time) is searched, a 0.1 % reshape and a task the
    warm-up did not reach are not."""
    S = tuning.TaskSummary
    conv = S("conv", weight=2.0, flop=1e8, best_us=40.0)
    mean = S("mean", weight=1.0, flop=5e4, best_us=8.0)
    reshape = S("reshape", weight=4.0, flop=0.0, best_us=0.02)
    unmeasured = S("pool", weight=1.0, flop=1e4)
    tiny = {"mean", "reshape", "pool"}
    assert tuning.still_tiny(tiny, [conv, mean, reshape, unmeasured]) == {"reshape", "pool"}
    mean.best_us = 0.5  # 0.6 % of the measured 80.58 µs
    assert tuning.still_tiny(tiny, [conv, mean, reshape, unmeasured]) == tiny


def test_warmup_records_replay_and_search_continues_from_them(matmul_tasks, tmp_path):
    """Warm-up records must mark their postprocessing (EnterPostproc), or MetaSchedule's
    evolutionary search aborts when it starts from them (a bug we hit on small_cnn)."""
    mod, target, tasks = matmul_tasks
    progress = []
    res = tuning.tune(
        mod,
        target,
        tmp_path / "db",
        trials=8,
        min_trials_per_task=2,
        seed=0,
        on_progress=progress.append,
    )
    assert res.trials >= 8 and progress and progress[-1].trials == res.trials
    assert all(t.schedule == "tuned" and t.best_us > 0 for t in res.tasks)
    db = database.open_database(tmp_path / "db")
    for task in tasks:
        records = database.best_records(db, task.dispatched[0], target, k=100)
        assert records
        for r in records:
            assert "EnterPostproc" in [i.kind.name for i in r.trace.insts]
    # a second call finds every workload measured: nothing is measured again
    again = tuning.tune(mod, target, tmp_path / "db", trials=8, min_trials_per_task=2)
    assert again.trials == 0 and all(t.schedule == "database" for t in again.tasks)


def test_a_model_with_no_tuning_task_is_packaged_with_what_tvm_compiles(tmp_path):
    """Only a ``Unique``: TVM runs it as a VM builtin, so there is no kernel to tune."""
    import onnx
    from onnx import TensorProto, helper

    from harl.spec import TuningSpec
    from tasks.importing import import_model
    from tasks.packaging import package
    from tasks.tuning import tune_model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    node = helper.make_node("Unique", ["x"], ["y"], sorted=1)
    graph = helper.make_graph([node], "unique", [x], [y])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        tmp_path / "unique.onnx",
    )
    m = import_model(str(tmp_path / "unique.onnx"), cache_dir=tmp_path / "cache")
    target = resolve_target("cpu")
    result = tune_model(
        m,
        target,
        database_dir=tmp_path / "db",
        spec=TuningSpec(8, min_trials_per_task=1),
        log=lambda *_: None,
    )
    assert result.tasks == [] and result.trials == 0
    art = package(
        m,
        target,
        database_dir=tmp_path / "db",
        home=tmp_path / "home",
        tune_summary=result.summary(),
        measure=False,
        log=lambda *_: None,
    )
    assert all(r["within_tolerance"] for r in art.manifest["verification"].values())


def test_dataset_collect_from_a_tuning_database(matmul_tasks, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from harl.cost_model import dataset
    from harlflow.cli import main
    from harlflow.core.errors import StoreError

    mod, target, _ = matmul_tasks
    tuning.tune(mod, target, tmp_path / "db", trials=6, min_trials_per_task=3, seed=4)
    out = tmp_path / "ds" / "measured.parquet"
    assert main(["dataset", "collect", str(tmp_path / "db"), "--out", str(out)]) == 0
    assert "rows" in capsys.readouterr().out
    rows = dataset.load(out)
    valid = [r for r in rows if not r["failed"]]
    assert valid and all(r["features"].shape == (r["n_stores"], 164) for r in rows)
    assert all(r["run_us"] > 0 and r["target"] == database.target_key(target) for r in valid)
    keys = [tuple(r[k] for k in dataset.KEY) for r in rows]
    assert len(keys) == len(set(keys))  # one row per distinct program
    again = dataset.collect([tmp_path / "db"], out)  # collecting twice adds nothing
    assert again["new_rows"] == 0 and pq.read_table(out).num_rows == len(rows)
    # A row stored as failed is superseded by a valid measurement of the same program.
    table = pq.read_table(out)
    first = valid[0]
    at = next(i for i, r in enumerate(rows) if r["program"] == first["program"])
    failed = table.column("failed").to_pylist()
    failed[at] = True
    pq.write_table(table.set_column(table.schema.get_field_index("failed"), "failed",
                                    pa.array(failed)), out)  # fmt: skip
    assert dataset.collect([tmp_path / "db"], out)["new_rows"] == 0
    merged = dataset.load(out)
    assert len(merged) == len(rows) and sum(r["failed"] for r in merged) == sum(
        r["failed"] for r in rows
    )
    # Only the named workloads are collected; a task's id is its rows' workload column.
    (task,) = matmul_tasks[2]
    wid = dataset.task_workload_id(task)
    assert dataset.programs_per_workload(out) == {(wid, database.target_key(target)): len(rows)}
    assert dataset.collect([tmp_path / "db"], tmp_path / "none.parquet",
                           workloads={"0" * 16})["rows"] == 0  # fmt: skip
    assert dataset.programs_per_workload(tmp_path / "missing.parquet") == {}
    with pytest.raises(BadInputError, match="is not a tuning database"):
        dataset.collect([tmp_path / "ds"], out)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(StoreError, match="is not a harlflow dataset"):
        dataset.collect([tmp_path / "db"], tmp_path / "bad.parquet")


@pytest.mark.parametrize("strategy", ["evolutionary", "harl"])
def test_learned_cost_model_plugs_into_both_strategies(matmul_tasks, tmp_path, strategy):
    from harl.cost_model.online import create_cost_model, untrained
    from harlflow import rl

    mod, target, _ = matmul_tasks
    rl.setup(0)
    model = untrained(target)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    result = tuning.tune(
        mod,
        target,
        tmp_path / "db",
        trials=10,
        min_trials_per_task=2,
        strategy=strategy,
        cost_model=model,
        seed=1,
    )
    assert result.trials >= 10 and result.tasks[0].best_us is not None
    after = model.net.state_dict()
    assert any(not (before[k] == after[k]).all() for k in before)  # it learned online
    model.save(tmp_path / "cm.pt")
    assert create_cost_model(str(tmp_path / "cm.pt"), target) is not None
    with pytest.raises(BadInputError, match="not a harlflow cost model"):
        (tmp_path / "junk.pt").write_bytes(b"\x00junk")
        create_cost_model(str(tmp_path / "junk.pt"), target)

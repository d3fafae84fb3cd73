"""A process of its own on a shared tuning store, for tests/test_store.py.

``python store_worker.py write URL SEED...``: commits one sampled schedule of a 64×64 matmul per
seed, each in its own transaction, with a run time drawn from the seed and the process id
(two writers of one program measure it differently), and prints what it wrote as JSON lines.
``python store_worker.py tune URL TRIALS``: tunes that matmul into the store (resumable).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harl import compilation, database, sampling, tuning
from harl.sql_database import record_json
from harlflow.core.signature import TensorSpec
from harlflow.core.targets import resolve_target
from tasks.importing import to_relax


def matmul(n: int = 64):
    """The matmul's prepared module, this host's target and its one task."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype("f4"), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [w])
    path = Path(tempfile.mkdtemp()) / "mm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    mod = compilation.prepare(to_relax(path, [TensorSpec("x", (n, n), "float32")]))
    target = resolve_target("cpu")
    return mod, target, compilation.extract_tasks(mod, target)


def records(db, task, target, seeds, run_secs):
    """One record per seed: that seed's sampled schedule, measured at ``run_secs(seed)``."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    wl = db.commit_workload(mod)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    for seed in seeds:
        sch = sampling.sample_schedules(task, target, 1, seed=seed)[0]
        yield ms.database.TuningRecord(
            sch.trace, wl, [run_secs(seed)], tvm.target.Target(target), args
        )


def main() -> None:
    mode, url = sys.argv[1], sys.argv[2]
    mod, target, tasks = matmul()
    if mode == "write":
        db = database.open_database(url)
        seeds = [int(s) for s in sys.argv[3:]]
        for r in records(
            db, tasks[0], target, seeds, lambda s: 1e-5 * (1 + (s * 7 + os.getpid()) % 5)
        ):
            db.commit_tuning_record(r)
            print(
                json.dumps({"trace": record_json(r)[0], "secs": float(r.run_secs[0])}), flush=True
            )
    elif mode == "tune":
        res = tuning.tune(mod, target, url, trials=int(sys.argv[3]), min_trials_per_task=2, seed=0)
        print(json.dumps({"trials": res.trials, "resumed_trials": res.resumed_trials}))


if __name__ == "__main__":
    main()

"""``harlflow dataset generate`` (killed and resumed) and ``harlflow cost-model train`` (fine-tuning
on a store's records, registered in MLflow), as a user runs them: through the CLI, in
subprocesses, on the embedded stores of a fresh home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from services import BIN, embedded_env, harlflow, kill_tree

from harlflow.core.targets import target_key
from tasks.datasets import target_slug


def _host_target() -> str:
    """This host's CPU on one core: code for another CPU (znver5's AVX-512 on a znver3 host)
    kills the measuring worker, and every trial would fail."""
    from tvm.target.codegen import llvm_get_system_cpu

    return json.dumps({"kind": "llvm", "mcpu": llvm_get_system_cpu(), "num-cores": 1})


TARGET = _host_target()


@pytest.fixture(scope="module")
def env(prefect_api, tmp_path_factory) -> dict:
    """The embedded stores of a fresh home; the flows run on the session's Prefect server (each
    command on a temporary one would start it: ~9 s, tests/test_signals.py covers that)."""
    home = tmp_path_factory.mktemp("dataset-home")
    return {**embedded_env(home), "PREFECT_API_URL": prefect_api}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


@pytest.fixture(scope="module")
def generated(env, tmp_path_factory) -> dict:
    """A generation of the tiny MLP's tasks, SIGKILLed after its first trials, then the same
    command again (it resumes), then once more in a new work directory (nothing left to
    measure: the dataset file says so)."""
    from harl.cost_model import dataset

    tmp = tmp_path_factory.mktemp("generate")
    out, work = tmp / "records.parquet", tmp / "work"
    cmd = [str(BIN / "harlflow"), "dataset", "generate", "--out", str(out), "--work", str(work),
           "--units", "tiny_mlp", "--trials-per-task", "6", "--warm-up", "2",
           "--target", TARGET]  # fmt: skip
    records = work / target_slug(json.loads(TARGET)) / "database_tuning_record.json"
    with open(tmp / "killed.log", "wb") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            deadline = time.monotonic() + 400
            while len(_lines(records)) < 2 and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            os.killpg(p.pid, signal.SIGKILL)  # the run and its build/measure workers
            p.wait()
            kill_tree(p.pid)
    killed = len(_lines(records))
    assert p.returncode == -9 and 2 <= killed < 12, (tmp / "killed.log").read_text()[-2000:]
    assert not out.exists()  # nothing collected from a half-measured target
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = len(_lines(records))
    rows = dataset.load(out)
    # Once more in a new work directory: the dataset file alone says what is measured.
    cmd[cmd.index("--work") + 1] = str(tmp / "new-work")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    return {"out": out, "records": records, "killed": killed, "after": after, "rows": rows,
            "resumed": resumed, "again": again}  # fmt: skip


def test_a_unit_counts_as_measured_with_half_its_programs_per_task_over_the_unit():
    from tasks.datasets import measured

    have = {("a", "t"): 60, ("b", "t"): 2, ("c", "t"): 4, ("d", "t"): 3, ("c", "u"): 34}
    assert measured(have, ["a", "b"], "t", 34)  # uneven, as the task scheduler leaves it
    assert not measured(have, ["c", "d"], "t", 34)  # a stopped unit's warm-up only
    assert not measured(have, ["a", "e"], "t", 34)  # "e": never measured
    assert measured(have, ["c"], "u", 34) and not measured(have, ["a"], "u", 34)  # per target
    many = {(f"w{i}", "t"): 34 for i in range(40)}
    assert measured(many, [f"w{i}" for i in range(42)], "t", 34)  # 2 of 42 never reached
    assert not measured(many, [f"w{i}" for i in range(43)], "t", 34)  # 3 of 43: too many


def test_generate_resumes_after_a_kill_without_measuring_twice(generated):
    from harl.cost_model import dataset

    resumed = generated["resumed"]
    assert "resuming an interrupted run" in resumed.stderr + resumed.stdout
    assert generated["after"] == 12  # 2 tasks × 6 trials: what was measured before is kept
    rows = generated["rows"]
    keys = [tuple(r[k] for k in dataset.KEY) for r in rows]
    assert len(keys) == len(set(keys)) and len(rows) <= generated["after"]
    assert len({r["workload"] for r in rows}) == 2  # one workload per task, not one per record
    assert {r["target"] for r in rows} == {target_key(json.loads(TARGET))}
    again = generated["again"]  # a finished generation measures nothing, even in a new work dir
    assert "0 trials measured now" in again.stdout
    assert "2 tasks already in" in again.stderr + again.stdout
    assert not list((generated["out"].parent / "new-work").glob("*/database_tuning_record.json"))
    assert len(dataset.load(generated["out"])) == len(rows)


def test_cost_model_train_on_the_store_registers_it_and_transfer_uses_it(env, generated):
    home = Path(env["HARLFLOW_HOME"])
    r = harlflow(env, "cost-model", "train")  # an empty store: nothing to train on
    assert r.returncode != 0 and "no tuning records" in r.stderr
    assert not (home / "cost_model" / "model.pt").exists()
    # the store's tuning database is the generated one (as if optimize had measured it)
    (home / "tuning_db").symlink_to(generated["records"].parent, target_is_directory=True)
    r = harlflow(env, "cost-model", "train", "--epochs", "2", "--holdout", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out workloads after" in r.stdout
    assert "registered harlflow-cost-model version 1" in r.stdout
    model_file = home / "cost_model" / "model.pt"
    assert model_file.is_file() and (home / "cost_model" / "records.parquet").is_file()

    os.environ["HARLFLOW_HOME"], saved = str(home), os.environ["HARLFLOW_HOME"]
    try:
        from mlflow import MlflowClient

        from harl.cost_model.model import CostModel
        from harl.cost_model.online import create_cost_model, transfer_model_path
        from harlflow.core import config

        assert transfer_model_path() == model_file
        c = MlflowClient(tracking_uri=config.embedded_tracking_uri())
        (mv,) = c.search_model_versions("name='harlflow-cost-model'")
        assert mv.tags["targets"] == target_key(json.loads(TARGET))
        run = c.get_run(mv.run_id)
        assert run.info.status == "FINISHED" and "after_pairwise_accuracy" in run.data.metrics
        assert run.data.params["recipe"] == "full"
        assert [a.path for a in c.list_artifacts(mv.run_id, "cost_model")] == [
            "cost_model/model.pt"
        ]
        learned = create_cost_model("transfer", json.loads(TARGET))
        assert learned.model.targets == CostModel.load(model_file).targets
    finally:
        os.environ["HARLFLOW_HOME"] = saved

    bad = home / "bad.parquet"
    bad.write_text("not a dataset")
    r = harlflow(env, "cost-model", "train", "--dataset", str(bad))
    assert r.returncode != 0 and "is not a harlflow dataset" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = harlflow(env, "cost-model", "train", "--scratch", "--recipe", "head")
    assert r.returncode == 2 and "--recipe head fine-tunes a trained model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_serve_schedules_the_nightly_cost_model_refresh(env, generated, tmp_path):
    """`harlflow serve --job cost-model-train` puts the training flow on the Prefect server with
    a nightly schedule; a run of the deployment (triggered by hand, as the schedule would) trains
    on its parameters' dataset, writes the model and registers it in MLflow as a version of its
    own run."""
    out = tmp_path / "nightly.pt"
    cmd = [str(BIN / "harlflow"), "serve", "--job", "cost-model-train", "--cron", "0 2 * * *",
           "--deployment", "nightly", "--param", f"datasets={json.dumps([str(generated['out'])])}",
           "--param", "epochs=1", "--param", "holdout=0", "--param", f"out={out}"]  # fmt: skip
    serve_env = {**env, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        serve = subprocess.Popen(cmd, env=serve_env, stdout=f, stderr=f, start_new_session=True)
    try:
        run = [str(BIN / "prefect"), "deployment", "run", "cost-model-train/nightly", "--watch"]
        deadline = time.monotonic() + 240
        while True:  # until the deployment is registered and its run has finished
            r = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
            if r.returncode == 0 or "not found" not in (r.stdout + r.stderr).lower():
                break
            assert time.monotonic() < deadline and serve.poll() is None, log.read_text()[-3000:]
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-2000:] + log.read_text()[-3000:]
    finally:
        kill_tree(serve.pid)
    assert out.is_file()
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{Path(env['HARLFLOW_HOME']) / 'mlflow.db'}")
    exp = c.get_experiment_by_name("harlflow")
    (ran,) = c.search_runs([exp.experiment_id], "params.epochs = '1'")
    assert ran.info.run_name == "cost-model-train" and ran.info.status == "FINISHED"
    versions = c.search_model_versions("name='harlflow-cost-model'")
    assert ran.info.run_id in {v.run_id for v in versions}

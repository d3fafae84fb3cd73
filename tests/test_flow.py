"""The whole pipeline on real components: Prefect harness, sqlite MLflow, moto S3 over HTTP,
real TVM tuning/compilation/measurement; then pull + run against onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import onnxruntime as ort
import pytest

from flows.settings import RunSettings
from harlflow import runtime
from harlflow.cli import main
from harlflow.core.errors import BadInputError, IntegrityError, StoreError
from harlflow.core.hashing import sha256_file
from tasks.pulling import pull_mlflow, pull_s3, verify_directory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(prefect_harness, s3_endpoint, tmp_path_factory):
    from flows.optimize import optimize

    model = tmp_path_factory.mktemp("models") / "tiny.onnx"
    assert main(["export-example", "tiny_mlp", "--out", str(model)]) == 0
    summary = optimize(
        model=str(model),
        settings=RunSettings(
            trials=6, min_trials_per_task=2, s3_uri="s3://models/ci", measure_seconds=0.5
        ),
    )
    return model, summary


def _client():
    from tasks.tracking import client

    return client()


def test_flow_publishes_to_mlflow_registry_and_s3(first_run):
    model, s = first_run
    art = Path(s["artifact"])
    assert s["trials"] >= 4 and s["version"] == art.name
    manifest = verify_directory(art)  # every file's sha256 matches
    assert {"model.so", "reference.npz", "tuning_db/database_tuning_record.json"} <= set(
        manifest["files"]
    )
    assert manifest["verification"]["output"]["within_tolerance"]
    # measured side by side (harlflow.measure): the untuned build only on request
    assert set(manifest["latency_ms"]) == {"tvm_tuned", "onnxruntime"}
    for lat in manifest["latency_ms"].values():
        assert lat["ci_ms"][0] <= lat["median_ms"] <= lat["ci_ms"][1] and lat["blocks"] >= 3
    lo, hi = manifest["ratio_ci"]
    assert lo <= manifest["ratio_to_onnxruntime"] <= hi
    assert manifest["measurement"]["rounds"] >= 3 * 5 and s["ratio_ci"] == [lo, hi]
    assert manifest["tuning"]["trials"] == s["trials"]

    c = _client()
    parent = c.get_run(s["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    # the embedded store keeps its run artifacts under the home, not in the working directory
    from harlflow.core.config import mlflow_artifact_root

    assert parent.info.artifact_uri.startswith(mlflow_artifact_root())
    assert parent.data.params["budget"] == "6" and parent.data.params["strategy"] == "evolutionary"
    assert "version_tvm" in parent.data.params and "seed" in parent.data.params
    children = c.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"import", "rewrite", "tune", "package", "publish"}
    assert by_name["rewrite"].data.params["rewrite"] == "greedy"
    assert all(r.info.status == "FINISHED" for r in children)
    tune = by_name["tune"]
    assert tune.data.metrics["tuning/trials"] == s["trials"]
    history = c.get_metric_history(tune.info.run_id, "charts/best_weighted_latency_us")
    assert [m.step for m in history] == sorted(m.step for m in history) and history[-1].step == s[
        "trials"
    ]
    tune_files = {f.path for f in c.list_artifacts(tune.info.run_id, "plots")}
    assert "plots/convergence.png" in tune_files
    assert any(f.path == "model" for f in c.list_artifacts(by_name["import"].info.run_id))
    pkg = by_name["package"].data.metrics
    assert pkg["latency/tvm_tuned_median_ms"] > 0 and "speedup/vs_onnxruntime" in pkg
    assert pkg["ratio_to_onnxruntime_ci_low"] == lo and pkg["latency/tvm_tuned_ci_high_ms"] > 0

    mv = c.get_model_version("tiny", s["published"]["mlflow"].rsplit("/", 1)[1])
    assert mv.tags["source_sha256"] == sha256_file(model)
    assert json.loads(mv.tags["target"])["kind"] == "llvm" and "speedup_vs_onnxruntime" in mv.tags
    assert mv.tags["ratio_ci"] == f"{lo:.4f}-{hi:.4f}"

    s3 = boto3.client("s3")
    key_root = f"ci/tiny/{s['version']}"
    for rel, digest in manifest["files"].items():
        head = s3.head_object(Bucket="models", Key=f"{key_root}/{rel}")
        assert head["Metadata"]["sha256"] == digest


def test_pull_from_registry_and_run_matches_onnxruntime(first_run, tmp_path, capsys):
    model, _ = first_run
    dest = tmp_path / "pulled"
    assert main(["pull", "tiny:1", "--dest", str(dest)]) == 0
    x = np.random.default_rng(7).standard_normal((1, 32)).astype("float32")
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    got = runtime.load(dest)(x)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)

    np.save(tmp_path / "x.npy", x)
    assert (
        main(
            [
                "run",
                str(dest),
                "--input",
                str(tmp_path / "x.npy"),
                "--output",
                str(tmp_path / "y.npy"),
            ]
        )
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-3, atol=1e-4)
    assert main(["pull", "tiny", "--dest", str(tmp_path / "latest")]) == 0  # no version: newest


def test_corruption_is_detected_and_leaves_nothing(first_run, tmp_path):
    _, s = first_run
    # a tampered object in S3: its bytes no longer match the manifest nor its metadata
    s3 = boto3.client("s3")
    s3.put_object(
        Bucket="models",
        Key=f"ci/tiny/{s['version']}/reference.npz",
        Body=b"tampered",
        Metadata={"sha256": "0" * 64},
    )
    dest = tmp_path / "from-s3"
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        pull_s3(f"s3://models/ci/tiny/{s['version']}", dest)
    assert not dest.exists() and not list(tmp_path.glob(".from-s3*"))

    # a file corrupted after a good pull
    good = pull_mlflow("tiny:1", tmp_path / "good")
    (good / "model.so").write_bytes(b"\0" + (good / "model.so").read_bytes()[1:])
    with pytest.raises(IntegrityError, match="model.so"):
        verify_directory(good)
    assert main(["run", str(good), "--input", "unused.npy"]) != 0
    with pytest.raises(StoreError, match="not empty"):
        pull_mlflow("tiny:1", good)


def test_second_run_reuses_database_and_zero_trials_compiles(first_run):
    from flows.optimize import optimize

    model, s1 = first_run
    s2 = optimize(
        model=str(model), settings=RunSettings(trials=6, min_trials_per_task=2, measure=False)
    )
    assert s2["trials"] == 0  # every workload was measured by the first run
    assert int(s2["version"]) == int(s1["version"]) + 1
    manifest = verify_directory(Path(s2["artifact"]))
    assert manifest["tuning"]["tasks_from_database"] == manifest["tuning"]["tasks"]
    assert set(manifest["tuning"]["kernels"].values()) == {"database"}


def test_failed_stage_marks_child_run_failed(first_run):
    from flows.optimize import optimize
    from harlflow.core.errors import TuningError

    model, _ = first_run
    c = _client()
    exp = c.get_experiment_by_name("harlflow")
    runs_before = len(c.search_runs([exp.experiment_id]))
    # a bad option is refused before the flow writes anything
    with pytest.raises(BadInputError, match="unknown strategy 'bogus'"):
        optimize(model=str(model), settings=RunSettings(trials=2, strategy="bogus", measure=False))
    assert len(c.search_runs([exp.experiment_id])) == runs_before
    # a stage that fails (no RPC tracker answers on port 1) marks its run and the parent FAILED
    with pytest.raises(TuningError, match="unreachable"):
        optimize(model=str(model), settings=RunSettings(trials=2, rpc="127.0.0.1:1:nokey"))
    failed = c.search_runs([exp.experiment_id], "attributes.status = 'FAILED'")
    names = {r.info.run_name for r in failed}
    assert "tune" in names and "optimize tiny" in names
    tune = next(r for r in failed if r.info.run_name == "tune")
    assert "unreachable" in tune.data.tags["error"]


def test_cli_optimize_trials_zero_from_database(first_run, capsys):
    model, _ = first_run
    assert main(["optimize", str(model), "--trials", "0", "--no-measure", "--name", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "artifact  tiny v" in out and "tuning    0 trials" in out


@pytest.mark.alone  # 25 s must leave time to measure a trial
def test_cli_time_budget_stops_tuning_and_packages(first_run, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((16, 24), 0.1, dtype="float32"), "w")  # a new workload
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 24])],
        [w],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "budget.onnx"))
    assert (
        main(
            [
                "optimize",
                str(tmp_path / "budget.onnx"),
                "--time-budget",
                "25s",
                "--no-measure",
                "--rewrite",
                "none",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "artifact  budget v1" in out and "of a 25s budget" in out, out
    assert "seconds per stage: import" in out and "package" in out, out  # the budget's split
    trials = int(out.split("tuning    ")[1].split(" trials")[0])
    # no --trials: the deadline alone ended tuning (25 s: what is left after the import, the
    # package stage's reserve and onnxruntime's timing still measures the warm-up's first chunk)
    assert trials > 0
    run = _client().search_runs(
        [_client().get_experiment_by_name("harlflow").experiment_id],
        "attributes.run_name = 'optimize budget'",
        max_results=1,
    )[0]
    assert float(run.data.params["time_budget_s"]) == 25.0


def test_verification_mismatch_refuses_to_package(first_run, tmp_path):
    from harlflow.core.config import tuning_db_dir
    from harlflow.core.errors import VerificationError
    from harlflow.core.targets import resolve_target
    from tasks.importing import import_model
    from tasks.packaging import package

    model, _ = first_run
    m = import_model(str(model), cache_dir=tmp_path / "cache")
    ins, outs = m.reference()
    np.savez(
        m.reference_path,
        **{f"input/{k}": v for k, v in ins.items()},
        **{f"output/{k}": v + 0.5 for k, v in outs.items()},
    )  # a reference the model can't meet
    home = tmp_path / "home"
    with pytest.raises(VerificationError, match="differ from the reference, not packaged"):
        package(
            m,
            resolve_target("cpu"),
            database_dir=tuning_db_dir(),
            home=home,
            tune_summary={},
            measure=False,
            log=lambda *_: None,
        )
    assert list((home / "tiny").iterdir()) == []  # no version, no half-written temporary


def _redundant_model(path: Path, width: int = 32, hidden: int = 64) -> Path:
    """A small MLP padded with work a rewrite removes: transpose pairs, ×1, identities.

    ``width`` and ``hidden`` set the kernels' shapes: a test whose rewrite is priced on TVM uses
    its own, so no other test's noisy 2-trial records of the same kernels decide its estimates."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, x = [], "x"
    for i in range(6):
        nodes += [
            helper.make_node("Transpose", [x], [f"t{i}"], perm=[1, 0]),
            helper.make_node("Transpose", [f"t{i}"], [f"u{i}"], perm=[1, 0]),
        ]
        x = f"u{i}"
    nodes += [
        helper.make_node("MatMul", [x, "w1"], ["h"]),
        helper.make_node("Mul", ["h", "one"], ["h1"]),
        helper.make_node("Identity", ["h1"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(a, n)
        for n, a in [
            ("w1", rng.standard_normal((width, hidden)).astype(np.float32) * 0.2),
            ("one", np.ones(hidden, np.float32)),
            ("w2", rng.standard_normal((hidden, 16)).astype(np.float32) * 0.2),
            ("b", np.zeros(16, np.float32) + 0.1),
        ]
    ]
    g = helper.make_graph(
        nodes,
        "redundant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    import onnx

    onnx.save(m, str(path))
    return path


def test_xrlflow_rewrite_stage_in_the_flow(first_run, tmp_path, capsys):
    """--rewrite xrlflow: an agent is trained (none saved yet), the rewritten graph is tuned and
    packaged, and the artifact is verified against the ORIGINAL model's reference outputs."""
    from harlflow.core.config import xrlflow_agent_path

    model = _redundant_model(tmp_path / "redundant.onnx")
    assert not xrlflow_agent_path().exists()
    assert (
        main(
            [
                "optimize",
                str(model),
                "--rewrite",
                "xrlflow",
                "--trials",
                "2",
                "--min-trials-per-task",
                "1",
                "--no-measure",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "rewrite   xrlflow:" in out
    assert xrlflow_agent_path().is_file()  # trained here, saved for the next run

    c = _client()
    exp = c.get_experiment_by_name("harlflow")
    parent = c.search_runs([exp.experiment_id], "tags.model = 'redundant'")[0]
    rw = c.search_runs(
        [exp.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = 'rewrite'",
    )[0]
    m = rw.data.metrics
    assert rw.data.params["rewrite"] == "xrlflow" and m["rewrite/substitutions"] >= 1
    assert m["rewrite/latency_after_ms"] <= m["rewrite/latency_before_ms"]  # never slower
    assert (
        len(c.get_metric_history(rw.info.run_id, "charts/mean_return")) == 10
    )  # the learning curve
    rewritten = [f.path for f in c.list_artifacts(rw.info.run_id, "rewritten")]
    assert rewritten == ["rewritten/model.onnx"]
    art = Path(parent.data.tags["artifact"])
    manifest = verify_directory(art)
    assert manifest["verification"]["y"]["within_tolerance"]
    original = ort.InferenceSession(str(model)).run(
        None, {"x": np.load(art / "reference.npz")["input/x"]}
    )
    assert np.allclose(np.load(art / "reference.npz")["output/y"], original[0], atol=1e-5)


def test_rlflow_rewrite_stage_in_the_flow(first_run, tmp_path, capsys):
    """--rewrite rlflow (judged on TVM, the default oracle): a world model and controller are
    trained (none saved yet) with their curves in MLflow, both oracles' estimates are logged,
    and the artifact is verified against the ORIGINAL model's reference outputs."""
    from harlflow.core.config import rlflow_agent_path

    model = _redundant_model(tmp_path / "redundant_rl.onnx", width=24, hidden=48)
    assert not rlflow_agent_path().exists()
    args = ["optimize", str(model), "--name", "redundant-rl", "--rewrite", "rlflow"]
    assert main([*args, "--trials", "2", "--min-trials-per-task", "1", "--no-measure"]) == 0
    assert "rewrite   rlflow:" in capsys.readouterr().out
    assert rlflow_agent_path().is_file()  # trained here, saved for the next run

    c = _client()
    exp = c.get_experiment_by_name("harlflow")
    parent = c.search_runs([exp.experiment_id], "tags.model = 'redundant-rl'")[0]
    rw = c.search_runs(
        [exp.experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = 'rewrite'",
    )[0]
    m = rw.data.metrics
    assert rw.data.params["rewrite"] == "rlflow" and rw.data.params["oracle"] == "tvm"
    assert m["rewrite/substitutions"] >= 1
    assert m["rewrite/tvm_estimate_after_ms"] < m["rewrite/tvm_estimate_before_ms"]
    assert m["rewrite/onnxruntime_measured_before_ms"] > 0
    assert c.get_metric_history(rw.info.run_id, "charts/real_return")  # grounded in real runs
    assert c.get_metric_history(rw.info.run_id, "world/latent_nll")
    art = Path(parent.data.tags["artifact"])
    assert verify_directory(art)["verification"]["y"]["within_tolerance"]
    original = ort.InferenceSession(str(model)).run(
        None, {"x": np.load(art / "reference.npz")["input/x"]}
    )
    assert np.allclose(np.load(art / "reference.npz")["output/y"], original[0], atol=1e-5)


def test_rewrite_train_rlflow_logs_its_run(first_run, tmp_path, capsys):
    """rewrite-train --agent rlflow (a Prefect flow): the curve, the world model's losses and
    the agent file go to one MLflow run, the file is registered as a version of rlflow-agent
    and loads; a bad option is one line."""
    from xrlflow.rlflow import RLFlowAgent

    model = _redundant_model(tmp_path / "train.onnx")
    out = tmp_path / "agent.pt"
    args = ["rewrite-train", str(model), "--agent", "rlflow", "--out", str(out)]
    assert main([*args, "--iterations", "2", "--episodes", "1", "--max-steps", "4"]) == 0
    assert "saved" in capsys.readouterr().out
    RLFlowAgent.load(out)
    c = _client()
    exp = c.get_experiment_by_name("harlflow")
    run = c.search_runs([exp.experiment_id], "attributes.run_name = 'rewrite-train'")[0]
    assert run.info.status == "FINISHED" and run.data.params["agent"] == "rlflow"
    assert len(c.get_metric_history(run.info.run_id, "charts/imagined_return")) == 2
    assert c.get_metric_history(run.info.run_id, "world/latent_nll_fit")
    assert [f.path for f in c.list_artifacts(run.info.run_id, "agent")] == ["agent/agent.pt"]
    (version,) = c.search_model_versions("name = 'rlflow-agent'")
    assert version.run_id == run.info.run_id  # the file registered as a model version
    assert main([*args, "--iterations", "0"]) == 2
    assert "--iterations" in capsys.readouterr().err


def test_credentials_never_reach_stores_or_manifests(first_run, session_home):
    """After runs that uploaded to S3: the AWS key id and secret appear in no MLflow param, tag
    or model-version tag, and in no byte of any file under HARLFLOW_HOME (sqlite store, run
    artifacts, manifests, tuning databases, Prefect results)."""
    from conftest import AWS_ACCESS_KEY_ID, AWS_SECRET

    secrets = [AWS_ACCESS_KEY_ID, AWS_SECRET]
    c = _client()
    exp = c.get_experiment_by_name("harlflow")
    runs = c.search_runs([exp.experiment_id], max_results=1000)
    assert any("s3_uri" in r.data.params for r in runs)  # an S3 upload did happen
    for r in runs:
        blob = json.dumps([r.data.params, r.data.tags])
        assert not any(s in blob for s in secrets), r.info.run_name
    for mv in c.search_model_versions():
        assert not any(s in json.dumps(mv.tags) for s in secrets)
    scanned = 0
    for f in session_home.rglob("*"):
        if f.is_file() and f.stat().st_size < 50 << 20:
            data = f.read_bytes()
            scanned += 1
            assert not any(s.encode() in data for s in secrets), f
    assert scanned > 20

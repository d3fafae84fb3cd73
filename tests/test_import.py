"""Import stage: every accepted source, and every bad input failing with one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from harlflow.cli import main
from harlflow.core.errors import ModelImportError
from harlflow.core.signature import TensorSpec, parse_input_spec
from tasks.importing import import_model


def _onnx(path: Path, op: str, opset: int, dims=(1, 8)) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    g = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], name=f"{op.lower()}0")], "g", [x], [y]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(m, str(path))
    return path


def test_onnx_import_canonicalises_and_matches_onnxruntime(tmp_path):
    src = _onnx(tmp_path / "relu13.onnx", "Relu", 13)
    m = import_model(str(src), cache_dir=tmp_path / "cache", seed=3)
    assert m.opset >= 17 and m.source_kind == "onnx" and m.name == "relu13"
    proto = onnx.load(str(m.onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 8]
    assert onnx.load(str(src)).ir_version > 13 >= proto.ir_version  # onnxruntime reads <= 13
    ins, outs = m.reference()
    np.testing.assert_array_equal(outs["y"], np.maximum(ins["x"], 0))
    sess = ort.InferenceSession(str(m.onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, ins)[0], outs["y"])
    # same content, same seed → the same cached directory
    assert import_model(str(src), cache_dir=tmp_path / "cache", seed=3).directory == m.directory


def test_pt2_and_factory_with_checkpoint(tmp_path, monkeypatch):
    from harlflow.examples import tiny_mlp

    net = tiny_mlp(seed=5)
    ep = torch.export.export(net, (torch.randn(1, 32),))
    torch.export.save(ep, str(tmp_path / "mlp.pt2"))
    # torch.export.load unpickles: refused unless the user vouches for the file
    with pytest.raises(ModelImportError, match="HARLFLOW_TRUST_PT2=1"):
        import_model(str(tmp_path / "mlp.pt2"), cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    monkeypatch.setenv("HARLFLOW_TRUST_PT2", "1")
    m1 = import_model(str(tmp_path / "mlp.pt2"), cache_dir=tmp_path / "c")
    assert m1.source_kind == "pt2" and m1.inputs == [TensorSpec("x", (1, 32), "float32")]

    torch.save(net.state_dict(), tmp_path / "w.pt")
    m2 = import_model(
        "harlflow.examples:tiny_mlp", cache_dir=tmp_path / "c", checkpoint=str(tmp_path / "w.pt")
    )
    ins, _ = m2.reference()
    # the checkpoint's weights, not the factory's defaults, are in the graph
    _, out1 = m1.reference()
    _, out2 = m2.reference()
    np.testing.assert_allclose(list(out1.values())[0], list(out2.values())[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want = net(torch.from_numpy(ins["x"])).numpy()
    np.testing.assert_allclose(list(out2.values())[0], want, rtol=1e-5, atol=1e-6)


def test_dynamic_dimension_needs_input_spec(tmp_path):
    src = _onnx(tmp_path / "dyn.onnx", "Relu", 17, dims=("batch", 8))
    with pytest.raises(ModelImportError, match=r"input 'x' has a dynamic dimension 0 \(batch\)"):
        import_model(str(src), cache_dir=tmp_path / "c")
    m = import_model(str(src), cache_dir=tmp_path / "c", inputs=[parse_input_spec("x:4x8:float32")])
    assert m.inputs == [TensorSpec("x", (4, 8), "float32")]


def _bad_inputs(tmp_path: Path, tiny_onnx: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "notes.onnx").write_text("this is not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_onnx.read_bytes()[: tiny_onnx.stat().st_size // 2])
    _onnx(tmp_path / "celu.onnx", "Celu", 17)
    _onnx(tmp_path / "dyn.onnx", "Relu", 17, dims=("batch", 8))
    from harlflow.examples import tiny_mlp

    torch.save(tiny_mlp(), tmp_path / "whole_module.pt")  # a pickled nn.Module, not a state dict
    return {
        "missing": ([str(tmp_path / "nope.onnx")], "model file not found"),
        "not a model": ([str(tmp_path / "notes.onnx")], "not a valid ONNX model"),
        "truncated": ([str(truncated)], "not a valid ONNX model"),
        "unsupported op": ([str(tmp_path / "celu.onnx")],
                           "operators TVM cannot import: Celu (node 'celu0')"),
        "dynamic dim": ([str(tmp_path / "dyn.onnx")], "dynamic dimension 0 (batch)"),
        "pickled module": (["harlflow.examples:tiny_mlp",
                            "--checkpoint", str(tmp_path / "whole_module.pt")],
                           "will not unpickle"),
        "bad input spec": ([str(tiny_onnx), "--input", "x:1xfoo:float32"],
                           "expected NAME:DIMS:DTYPE"),
        "bad target": ([str(tiny_onnx), "--target", "llvm -mcpu=znver5"], "unknown target"),
        "cuda target": ([str(tiny_onnx), "--target", '{"kind": "cuda"}'],
                        "unsupported --target kind 'cuda'"),
        "bad name": ([str(tiny_onnx), "--name", "../escape"], "invalid model name"),
        "bad time budget": ([str(tiny_onnx), "--time-budget", "20x"],
                            "invalid --time-budget '20x'"),
        "zero time budget": ([str(tiny_onnx), "--time-budget", "0m"], "more than 0 seconds"),
    }  # fmt: skip


def test_bad_inputs_fail_with_one_line_and_write_nothing(tmp_path, tiny_onnx, capsys, monkeypatch):
    home = tmp_path / "home"  # a home of its own: earlier tests' stores cannot hide a write
    monkeypatch.setenv("HARLFLOW_HOME", str(home))
    before: list[str] = []
    for label, (args, message) in _bad_inputs(tmp_path, tiny_onnx).items():
        code = main(["optimize", *args, "--trials", "0"])
        err = capsys.readouterr().err.strip()
        assert code != 0, label
        assert "budget" not in label or code == 2, (label, code)
        assert len(err.splitlines()) == 1 and err.startswith("harlflow: error:"), (label, err)
        assert message in err, (label, err)
    with pytest.raises(SystemExit) as exit_:  # argparse's choices: refused before any work
        main(["optimize", str(tiny_onnx), "--strategy", "foo"])
    assert exit_.value.code == 2 and "invalid choice: 'foo'" in capsys.readouterr().err
    after = sorted(p.name for p in home.iterdir()) if home.exists() else []
    assert set(after) - set(before) <= {"cache"}, after  # no MLflow db, no artifacts, no Prefect
    for store in ("mlflow.db", "mlruns", "tuning_db"):
        assert store not in set(after) - set(before)

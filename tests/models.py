"""Models and artifacts several test modules build: artifacts packaged without tuning, and a
deliberately slow model with the bundled tiny MLP's signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harlflow.core.targets import resolve_target


def untuned_artifact(onnx_path: Path, tmp: Path):
    """Import and package ``onnx_path`` with fallback schedules (no trial measured); the
    imported model (its canonical ONNX is what onnxruntime runs) and the artifact."""
    from tasks.importing import import_model

    return untuned_artifact_of(import_model(str(onnx_path), cache_dir=tmp / "cache"), tmp)


def untuned_artifact_of(m, tmp: Path):
    """Package an imported model with fallback schedules: (the model, the artifact)."""
    from tasks.packaging import package

    return m, package(
        m,
        resolve_target("cpu"),
        database_dir=tmp / "db",
        home=tmp / "home",
        tune_summary={},
        measure=False,
        log=lambda *_: None,
    )


def tiny_mlp_onnx(path: Path) -> Path:
    """The bundled tiny MLP (``x`` 1×32 → ``output`` 1×16) exported to ONNX at ``path``."""
    from harlflow.core.signature import TensorSpec
    from harlflow.examples import tiny_mlp
    from tasks.importing import _torch_to_onnx

    net = tiny_mlp()
    specs = [TensorSpec(n, tuple(s), d) for n, s, d in net.harlflow_inputs]
    _torch_to_onnx(net, specs, path, "tiny_mlp")
    return path


def slow_mlp(path: Path, width: int = 1024, layers: int = 6) -> Path:
    """An ONNX model with ``tiny_mlp``'s signature (``x`` 1×32 → ``output`` 1×16) that does
    ~``layers × width²`` multiply-adds (6 M by default, ~2 000× the tiny MLP's): a new
    "checkpoint" slower by orders of magnitude, not percent."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name, *shape):
        w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        return numpy_helper.from_array(w, name)

    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "w_out"], ["output"]))
    g = helper.make_graph(
        nodes,
        "slow_mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 16])],
        [init("w_in", 32, width), init("w", width, width), init("w_out", width, 16)],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path

"""Models as other tools export them: weights computed by constant subgraphs, old opsets and IR
versions, external data, training leftovers, several and odd outputs, and a store whose records
match a task's workload but do not apply to it. Each is a small model built here, imported and
packaged (fallback schedules, verified against onnxruntime)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harlflow.core.targets import resolve_target
from tasks.importing import import_model
from tasks.packaging import package

RNG = np.random.default_rng(0)


def arr(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype("float32")


def save(graph, path: Path, opset: int = 17, ir: int | None = None) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        model.ir_version = ir
    onnx.save(model, str(path))
    return path


def packaged(path: Path, tmp: Path, db: Path | None = None):
    m = import_model(str(path), cache_dir=tmp / "cache")
    art = package(
        m,
        resolve_target("cpu"),
        database_dir=db or tmp / "db",
        home=tmp / "home",
        tune_summary={},
        measure=False,
        log=lambda *_: None,
    )
    assert all(r["within_tolerance"] for r in art.manifest["verification"].values())
    return m, art


def conv_net(weights: str) -> onnx.GraphProto:
    """Conv → Relu → Flatten → MatMul; its weights ``"constant"`` initializers, or
    ``"computed"`` as zoo exports ship them: ConstantOfShape, Constant → Cast, Shape → Gather."""
    w, b, fc = arr(8, 3, 3, 3), arr(8), arr(8 * 8 * 8, 10)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    if weights == "constant":
        inits = [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (fc, "fc"))]
        nodes += [
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("MatMul", ["f", "fc"], ["y"]),
        ]
        return helper.make_graph(nodes, "conv_const", [x], [y], inits)
    zeros = helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])
    nodes = [
        # w = ConstantOfShape([8,3,3,3], 0) + w_delta; b from a float64 Constant → Cast
        helper.make_node(
            "Constant", [], ["wshape"], value=numpy_helper.from_array(np.array(w.shape, np.int64))
        ),
        helper.make_node("ConstantOfShape", ["wshape"], ["w0"], value=zeros),
        helper.make_node("Add", ["w0", "w_delta"], ["w"]),
        helper.make_node(
            "Constant", [], ["b64"], value=numpy_helper.from_array(b.astype(np.float64))
        ),
        helper.make_node("Cast", ["b64"], ["b"], to=TensorProto.FLOAT),
        *nodes,
        # reshape target from Shape → Gather → Concat, as torch exports flatten
        helper.make_node("Shape", ["r"], ["rs"]),
        helper.make_node("Gather", ["rs", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["r", "target"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w_delta"),
        numpy_helper.from_array(fc, "fc"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    return helper.make_graph(nodes, "conv_computed", [x], [y], inits)


def test_weights_computed_by_constant_subgraphs_are_folded_at_import(tmp_path):
    from tvm_ffi import structural_hash

    from harl import compilation
    from tasks.importing import to_relax

    computed, _ = packaged(save(conv_net("computed"), tmp_path / "computed.onnx"), tmp_path)
    constant, _ = packaged(save(conv_net("constant"), tmp_path / "constant.onnx"), tmp_path)
    ops = onnx.load(str(computed.onnx_path)).graph.node
    assert [n.op_type for n in ops] == ["Conv", "Relu", "Reshape", "MatMul"]
    # the same kernels either way: records of one apply to the other
    target = resolve_target("cpu")

    def kernels(m):
        mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
        tasks = compilation.extract_tasks(mod, target)
        return sorted(structural_hash(t.dispatched[0]) for t in tasks)

    assert kernels(computed) == kernels(constant)


def test_old_opset_ir3_with_training_leftovers_identities_and_unused_weights(tmp_path):
    """Opset 9, IR 3 (initializers listed as inputs too), BatchNormalization with its training
    outputs, Dropout with a ratio, an Identity chain and an initializer nothing uses."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])
    weights = {
        "scale": np.abs(arr(4)) + 0.5,
        "bias": arr(4),
        "mean": arr(4),
        "var": np.abs(arr(4)) + 0.5,
        "unused": arr(100),
    }
    nodes = [
        helper.make_node(
            "BatchNormalization",
            ["x", "scale", "bias", "mean", "var"],
            ["bn", "m_out", "v_out", "saved_m", "saved_v"],
        ),
        helper.make_node("Dropout", ["bn"], ["d", "mask"], ratio=0.3),
        helper.make_node("Identity", ["d"], ["i1"]),
        helper.make_node("Identity", ["i1"], ["i2"]),
        helper.make_node("Relu", ["i2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    listed = [
        helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape))
        for k, v in weights.items()
    ]
    graph = helper.make_graph(nodes, "old", [x, *listed], [y], inits)
    m, art = packaged(save(graph, tmp_path / "old.onnx", opset=9, ir=3), tmp_path)
    assert [s.name for s in m.inputs] == ["x"]
    proto = onnx.load(str(m.onnx_path))
    assert [n.op_type for n in proto.graph.node] == ["BatchNormalization", "Relu"]
    assert "unused" not in {t.name for t in proto.graph.initializer}


def test_external_data_is_loaded_hashed_and_packaged(tmp_path):
    w = arr(64, 32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ext",
        [x],
        [y],
        [numpy_helper.from_array(w, "w")],
    )
    d = tmp_path / "model_dir"
    d.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(
        model,
        str(d / "ext.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (d / "weights.bin").stat().st_size == w.nbytes
    m, art = packaged(d / "ext.onnx", tmp_path)
    # new weights in the data file, same .onnx file: a different model
    from tasks.importing import source_hash

    before = source_hash(str(d / "ext.onnx"), "onnx", None)
    (d / "weights.bin").write_bytes(arr(64, 32).tobytes())
    assert source_hash(str(d / "ext.onnx"), "onnx", None) != before
    (d / "weights.bin").unlink()
    with pytest.raises(Exception, match="weights.bin"):
        import_model(str(d / "ext.onnx"), cache_dir=tmp_path / "cache2")


def test_several_outputs_an_input_as_output_integer_and_bool_outputs(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5])
    outs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5]),
        helper.make_tensor_value_info("relu", TensorProto.FLOAT, [3, 5]),
        helper.make_tensor_value_info("positive", TensorProto.BOOL, [3, 5]),
        helper.make_tensor_value_info("argmax", TensorProto.INT64, [3]),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("Greater", ["x", "zero"], ["positive"]),
        helper.make_node("ArgMax", ["x"], ["argmax"], axis=1, keepdims=0),
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    graph = helper.make_graph(nodes, "outs", [x], outs, [zero])
    m, art = packaged(save(graph, tmp_path / "outs.onnx"), tmp_path)
    from harlflow import runtime

    model = runtime.load(art.directory)
    xv = arr(3, 5)
    got = model(x=xv)
    assert [g.dtype for g in got] == [np.float32, np.float32, np.bool_, np.int64]
    np.testing.assert_array_equal(got[0], xv)
    np.testing.assert_array_equal(got[2], xv > 0)
    np.testing.assert_array_equal(got[3], xv.argmax(1))


def test_a_record_that_matches_a_workload_but_does_not_apply_is_skipped(tmp_path, caplog):
    """A re-exported checkpoint in a store that holds records of the model's other form: the
    kernels are structurally equal (the workload matches) but their blocks are named otherwise,
    so the records' traces fail ("get-block"). The task gets its fallback, with a warning."""
    import re
    from types import SimpleNamespace

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from harl import compilation, database
    from harl.sampling import fallback_trace
    from tasks.importing import to_relax

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    w = numpy_helper.from_array(arr(32, 16), "w")
    path = save(helper.make_graph(nodes, "mm", [x], [y], [w]), tmp_path / "mm.onnx")
    m = import_model(str(path), cache_dir=tmp_path / "cache")
    target = resolve_target("cpu")
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
    (task,) = compilation.extract_tasks(mod, target)
    # the same kernel with other block names, tuned earlier: its record is in the store
    other_src = re.sub(r'sblock\("(?!root)(\w+)"', r'sblock("\1_v2"', task.dispatched[0].script())
    other = tvm.script.from_source(other_src)
    assert other.script() != task.dispatched[0].script()
    db = database.open_database(tmp_path / "db")
    trace = fallback_trace(SimpleNamespace(dispatched=[other]), target, 0)
    db.commit_tuning_record(
        ms.database.TuningRecord(
            trace,
            db.commit_workload(other),
            [1e-6],
            tvm.target.Target(target),
            ms.arg_info.ArgInfo.from_prim_func(other["main"]),
        )
    )
    assert database.best_records(
        database.open_database(tmp_path / "db"), task.dispatched[0], target
    )
    with caplog.at_level(logging.WARNING, logger="harl.compilation"):
        _, art = packaged(path, tmp_path, db=tmp_path / "db")
    assert art.manifest["tuning"]["kernels"][task.task_name] == "fallback"
    warned = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert warned and task.task_name in warned[0]


def test_convolutions_go_nhwc_around_an_operator_convert_layout_cannot_handle(tmp_path, caplog):
    """An opset-9 ``Sum`` imports as a ``stack`` whose layout inference aborts TVM's
    ConvertLayout for the whole model; the convolutions go NHWC anyway, the ``stack`` stays
    NCHW between transposes, and the artifact (with a channel shuffle) still verifies."""
    from tvm import relax

    from harl.compilation import prepare
    from tasks.importing import to_relax

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Sum", ["r", "c"], ["s"]),
        # channel shuffle, as ShuffleNet exports it: reshape to groups, swap, flatten back
        helper.make_node("Reshape", ["s", "g5"], ["s5"]),
        helper.make_node("Transpose", ["s5"], ["t5"], perm=[0, 2, 1, 3, 4]),
        helper.make_node("Reshape", ["t5", "g4"], ["sh"]),
        helper.make_node("Conv", ["sh", "w2"], ["y"], pads=[1, 1, 1, 1], group=2),
    ]
    inits = [
        numpy_helper.from_array(arr(8, 3, 3, 3), "w1"),
        numpy_helper.from_array(arr(8, 4, 3, 3), "w2"),
        numpy_helper.from_array(np.array([1, 2, 4, 8, 8], np.int64), "g5"),
        numpy_helper.from_array(np.array([1, 8, 8, 8], np.int64), "g4"),
    ]
    path = save(helper.make_graph(nodes, "sum_shuffle", [x], [y], inits), tmp_path / "m.onnx", 9)
    with caplog.at_level(logging.WARNING, logger="harl.compilation"):
        m, _ = packaged(path, tmp_path)
    assert "NHWC around every operator but stack" in caplog.text

    calls = []
    main = prepare(to_relax(m.onnx_path, m.inputs))["main"]
    relax.analysis.post_order_visit(main, lambda e: calls.append(e))
    ops = [c for c in calls if isinstance(c, relax.Call)]
    convs = [c for c in ops if getattr(c.op, "name", "") == "relax.nn.conv2d"]
    assert [c.attrs.out_layout for c in convs] == ["NHWC", "NHWC"]
    # the first reads the model's NCHW input itself (no transpose before it)
    assert [c.attrs.data_layout for c in convs] == ["NCHW", "NHWC"]
    assert any(getattr(c.op, "name", "") == "relax.stack" for c in ops)


def test_a_channel_shuffle_exported_with_run_time_shapes_becomes_static(tmp_path):
    """TorchScript's exporter writes ``view``/``chunk`` on a tensor's own shape as Shape →
    Gather → Div → Concat → Reshape, twice in a row: the second chain's input shape is known
    only once the first is folded. Folding repeats until nothing is left, so TVM sees static
    shapes (it failed with "emit_te now only supports Tensor that has ShapeExpr shape")."""
    import torch
    from models import untuned_artifact

    class Shuffle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            y = torch.cat([a, self.conv(torch.cat([b, b], 1))[:, :4]], 1)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            n, c, h, w = y.shape
            return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)

    torch.manual_seed(0)
    path = tmp_path / "shuffle.onnx"
    torch.onnx.export(
        Shuffle().eval(), (torch.randn(1, 8, 6, 6),), str(path), dynamo=False, opset_version=11
    )
    assert "Shape" in {n.op_type for n in onnx.load(str(path)).graph.node}
    m, art = untuned_artifact(path, tmp_path)
    assert "Shape" not in m.op_counts
    (check,) = art.manifest["verification"].values()
    assert check["within_tolerance"], check

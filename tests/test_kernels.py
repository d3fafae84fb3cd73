"""The code harlflow generates for what is not a GEMM: transcendental functions as vectorised
polynomials (no libm call per element), checked on the packaged artifact and against
onnxruntime."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import untuned_artifact
from onnx import TensorProto, helper, numpy_helper

LIBM = {"expf", "erff", "tanhf", "exp", "erf", "tanh"}


def gelu_softmax_layernorm(path: Path) -> Path:
    """MatMul → GELU as torch exports it (Div, Erf, Add, Mul, Mul) → LayerNormalization →
    Softmax → Sigmoid, plus Tanh: the non-GEMM code of a transformer block."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64])
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Div", ["m", "sqrt2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
        helper.make_node("Mul", ["m", "a"], ["g2"]),
        helper.make_node("Mul", ["g2", "half"], ["g"]),
        helper.make_node("LayerNormalization", ["g", "scale", "bias"], ["ln"], axis=-1),
        helper.make_node("Softmax", ["ln"], ["s"], axis=-1),
        helper.make_node("Sigmoid", ["s"], ["sg"]),
        helper.make_node("Tanh", ["ln"], ["t"]),
        helper.make_node("Add", ["sg", "t"], ["y"]),
    ]
    consts = {
        "w": (rng.standard_normal((64, 64)) * 0.3).astype(np.float32),
        "sqrt2": np.array(2**0.5, np.float32),
        "one": np.array(1, np.float32),
        "half": np.array(0.5, np.float32),
        "scale": rng.uniform(0.5, 2, 64).astype(np.float32),
        "bias": rng.standard_normal(64).astype(np.float32),
    }
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph(nodes, "block", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_transcendental_functions_compile_to_polynomials_and_verify(tmp_path):
    _, art = untuned_artifact(gelu_softmax_layernorm(tmp_path / "block.onnx"), tmp_path)
    # verified against onnxruntime on the reference inputs (rtol 1e-3) by the package stage
    (check,) = art.manifest["verification"].values()
    assert check["within_tolerance"], check
    assert check["max_abs"] < 1e-4, check

    # the library imports no libm transcendental: every exp/erf/tanh is inline vector code
    symbols = subprocess.run(
        ["nm", "-D", "--undefined-only", str(Path(art.directory) / "model.so")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    imported = {s.split("@")[0] for s in symbols}  # erff@GLIBC_2.2.5
    assert not LIBM & imported, sorted(LIBM & imported)


def test_row_reductions_get_vectorised_partial_sums(tmp_path):
    """Softmax and layer norm over the contiguous axis (the block above, which the test before
    verifies packaged at ``--trials 0``) compile with the row-reduction schedule: rows in
    parallel, each reduction accumulating 16-lane partial vectors (an ``rfactor`` block with a
    vectorised loop) inside its row, the output row vectorised."""
    from tvm import s_tir

    from harl import compilation
    from harl.sampling import fallback_trace
    from harlflow.core.targets import resolve_target
    from tasks.importing import import_model, to_relax

    m = import_model(str(gelu_softmax_layernorm(tmp_path / "b.onnx")), cache_dir=tmp_path / "c")
    target = resolve_target("cpu")
    tasks = compilation.extract_tasks(compilation.prepare(to_relax(m.onnx_path, m.inputs)), target)
    rows = [t for t in tasks if "softmax" in t.task_name or "layer_norm" in t.task_name]
    assert len(rows) == 2, [t.task_name for t in tasks]
    (mm,) = [t for t in tasks if "matmul" in t.task_name]  # a contraction: never a row reduction
    sch = s_tir.Schedule(mm.dispatched[0])
    fallback_trace(mm, target, 0).apply_to_schedule(sch, remove_postproc=False)
    assert "_rf" not in sch.mod.script() and "_global = T.sblock_alloc_buffer" in sch.mod.script()
    for task in rows:
        sch = s_tir.Schedule(task.dispatched[0])
        fallback_trace(task, target, 0).apply_to_schedule(sch, remove_postproc=False)
        text = sch.mod.script()
        names = re.findall(r'T\.sblock\("([^"]+)"\)', text)
        assert any("_rf" in n for n in names), (task.task_name, names)  # partial vectors
        assert text.count("T.parallel") == 1, task.task_name  # one parallel loop: the rows
        assert text.count("T.vectorized") >= 2, task.task_name  # partials and the output row


def conv_and_matmul(path: Path) -> Path:
    """A 3x3 convolution (64 → 64 channels, 28²) and a 256 × 512 matrix product."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 28, 28])
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [64, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 28, 28])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [64, 512])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["a", "b"], ["z"]),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 64, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((256, 512)).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(nodes, "conv_mm", [x, a], [y, z], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def conv_mm(tmp_path_factory):
    """The conv + matmul model prepared for TVM: (module, target, its tasks)."""
    from harl import compilation
    from harlflow.core.targets import resolve_target
    from tasks.importing import import_model, to_relax

    tmp = tmp_path_factory.mktemp("conv_mm")
    m = import_model(str(conv_and_matmul(tmp / "m.onnx")), cache_dir=tmp / "cache")
    target = resolve_target("cpu")
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
    return mod, target, compilation.extract_tasks(mod, target)


def test_fallback_schedules_are_parallel_vectorised_register_blocked(conv_mm):
    """What an unmeasured convolution or matmul compiles with (``--trials 0``): outer loops
    parallel, the contiguous output axis vectorised, a register tile of rows × vector lanes
    accumulated in a local buffer, weights read in a prepacked layout."""
    import tvm
    from tvm import s_tir

    from harl import compilation
    from harl.sampling import fallback_trace

    mod, target, tasks = conv_mm
    empty = tvm.s_tir.meta_schedule.database.MemoryDatabase()
    _, sources = compilation.compile_database(empty, tasks, target, seed=0)
    anchors = [t for t in tasks if "conv2d" in t.task_name or "matmul" in t.task_name]
    assert len(anchors) == 2, [t.task_name for t in tasks]
    for task in anchors:
        assert sources[task.task_name] == "fallback"
        sch = s_tir.Schedule(task.dispatched[0])
        fallback_trace(task, target, 0).apply_to_schedule(sch, remove_postproc=False)
        text = sch.mod.script()
        assert "T.parallel" in text and "T.vectorized" in text, text
        assert "layout_rewrite_preproc" in text, text  # the weights' tiles folded at compile time
        assert "_global = T.sblock_alloc_buffer" in text, text  # accumulated in a register tile


def test_the_first_measured_sample_of_a_task_is_its_fallback_schedule(conv_mm, tmp_path):
    """A tuned task compiles with its best measured record; its first warm-up sample is the
    schedule it would compile with unmeasured, so a short run is never worse than
    ``--trials 0`` (up to timing noise) and ``--trials 1`` spends exactly one trial."""
    from harl import database, tuning
    from harl.sampling import fallback_trace

    mod, target, tasks = conv_mm
    result = tuning.tune(mod, target, tmp_path / "db", trials=1, min_trials_per_task=4, seed=3)
    assert result.trials == 1
    db = database.open_database(tmp_path / "db")
    measured = [(t, database.records_on_target(db, t.dispatched[0], target)) for t in tasks]
    (task, records), *others = sorted(measured, key=lambda tr: -len(tr[1]))
    assert len(records) == 1 and not any(r for _, r in others)
    assert str(records[0].trace) == str(fallback_trace(task, target, 3))


def test_the_input_transpose_folds_into_the_first_convolution(conv_mm):
    """The NCHW input is read by the NHWC convolution itself: no transpose kernel (and no
    buffer) between the model's input and its first convolution. Its numbers are checked by
    every packaged CNN's verification (``test_runtime_safety``, ``test_throughput``)."""
    import tvm
    from tvm import relax

    mod, _, tasks = conv_mm
    convs, permuted = [], []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            if e.op.name == "relax.nn.conv2d":
                convs.append(e)
            elif e.op.name == "relax.permute_dims":
                permuted.append(e.args[0])

    relax.analysis.post_order_visit(mod["main"], visit)
    (conv,) = convs
    x = mod["main"].params[0]
    assert conv.args[0].same_as(x), conv.args[0]  # the model's input itself
    assert (conv.attrs.data_layout, conv.attrs.out_layout) == ("NCHW", "NHWC")
    assert not any(p.same_as(x) for p in permuted)
    # the output goes back to NCHW; the only transpose kernel left is that one
    transposes = [t.task_name for t in tasks if "transpose" in t.task_name]
    assert len(transposes) <= 1, transposes

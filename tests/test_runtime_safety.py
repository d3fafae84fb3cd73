"""What a caller may send a deployed artifact: out-of-range token ids, NaN, extreme integers,
wrong dtypes and shapes, odd memory layouts. Each ends in onnxruntime's outputs or one clear
error, never a crash or an out-of-bounds read.

The artifacts are compiled with no tuning (fallback schedules): what is tested is the graph's
bounds checks and the runtime's argument handling, not the schedules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import tiny_mlp_onnx, untuned_artifact, untuned_artifact_of
from onnx import TensorProto, helper, numpy_helper
from services import BIN

from harlflow.core.errors import BadInputError, IndexRangeError
from harlflow.core.targets import resolve_target

VOCAB = 64


def gpt_like(path: Path) -> Path:
    """Token ids → embedding (Gather) + positions → LayerNorm → logits, and a second output that
    indexes a table with the logits' ArgMax (indices computed inside the model)."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype("float32"), name)

    nodes = [
        helper.make_node("Gather", ["wte", "ids"], ["tok"], name="embed"),
        helper.make_node("Add", ["tok", "wpe"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "g", "b"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "head"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["best"], axis=-1, keepdims=0),
        helper.make_node("Gather", ["table", "best"], ["picked"], name="pick"),
    ]
    g = helper.make_graph(
        nodes,
        "gpt_like",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, VOCAB]),
            helper.make_tensor_value_info("picked", TensorProto.FLOAT, [1, 8, 4]),
        ],
        [
            init("wte", VOCAB, 16),
            init("wpe", 8, 16),
            init("g", 16),
            init("b", 16),
            init("head", 16, VOCAB),
            init("table", VOCAB, 4),
        ],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpt")
    m, art = untuned_artifact(gpt_like(tmp / "gpt_like.onnx"), tmp)
    return m.onnx_path, Path(art.directory)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlp")
    m, art = untuned_artifact(tiny_mlp_onnx(tmp / "tiny_mlp.onnx"), tmp)
    return m.onnx_path, Path(art.directory)


def ort(onnx_path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as rt

    sess = rt.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_out_of_range_token_id_is_one_clear_line_not_a_crash(gpt, tmp_path):
    onnx_path, art = gpt
    manifest_checks = json.loads((art / "manifest.json").read_text())["index_checks"]
    # the embedding's ids come from the input; ArgMax's come from inside the model
    assert [(c["operator"], c["input"], c["ranges"]) for c in manifest_checks] == [
        ("Gather", "ids", [[-VOCAB, VOCAB - 1]]),
        ("Gather", None, [[-VOCAB, VOCAB - 1]]),
    ]
    ids = np.array([[1, 2, 3, 100000, 5, 6, 7, 8]], dtype=np.int64)
    np.save(tmp_path / "bad.npy", ids)
    r = subprocess.run(
        [str(BIN / "harlflow"), "run", str(art), "--input", f"ids={tmp_path / 'bad.npy'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harlflow: error:"), r.stderr
    assert "'ids'" in lines[0] and "100000" in lines[0] and f"[-{VOCAB}, {VOCAB - 1}]" in lines[0]
    # a pickled .npz (object arrays) is refused unread, in one line
    np.savez(tmp_path / "pickled.npz", ids=np.array([object()] * 8, dtype=object).reshape(1, 8))
    r = subprocess.run(
        [str(BIN / "harlflow"), "run", str(art), "--input", str(tmp_path / "pickled.npz")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "is not a .npy/.npz array file" in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1

    # onnxruntime refuses it too; negative ids wrap as ONNX says, as onnxruntime computes them
    with pytest.raises(Exception, match="indices"):
        ort(onnx_path, {"ids": ids})
    from harlflow import runtime

    model = runtime.load(art)
    with pytest.raises(IndexRangeError, match=r"holds -65 at index \[0, 0\]") as err:
        model(ids=np.full((1, 8), -VOCAB - 1, dtype=np.int64))
    assert isinstance(err.value, ValueError)
    edge = np.array([[-VOCAB, -1, 0, VOCAB - 1, -3, 7, 63, -64]], dtype=np.int64)
    for got, want in zip(model(ids=edge), ort(onnx_path, {"ids": edge}), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_raw_model_so_refuses_bad_ids_without_the_wrapper(gpt):
    """A caller of model.so through TVM alone (no harlflow) gets an error, not a segfault."""
    _, art = gpt
    code = (
        "import numpy as np, tvm\n"
        "from tvm import relax\n"
        f"vm = relax.VirtualMachine(tvm.runtime.load_module('{art / 'model.so'}'), tvm.cpu())\n"
        "ids = np.full((1, 8), 2**62, dtype='int64')\n"
        "vm['main'](tvm.runtime.tensor(ids))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "harlflow index check 0: Gather indices must lie in [-64, 63]" in r.stderr


# --------------------------------------------------------------------------- property-based
def _bad_ints(dtype):
    info = np.iinfo(dtype)
    return st.one_of(
        st.integers(-VOCAB, VOCAB - 1),
        st.integers(int(info.min), int(info.max)),
        st.sampled_from([int(info.min), int(info.max), VOCAB, -VOCAB - 1, 0, -1]),
    )


_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([np.nan, np.inf, -np.inf, 1e-45, -1e-40, 3.4e38, -3.4e38, 0.0, -0.0]),
)


def _variants(base: np.ndarray):
    """The same values as the caller might hold them: contiguous, read-only, non-contiguous,
    big-endian, a nested list."""
    ro = base.copy()
    ro.setflags(write=False)
    wide = np.repeat(base, 2, axis=-1)[..., ::2]  # a strided view, same values
    return [base, ro, wide, base.astype(base.dtype.newbyteorder(">")), base.tolist()]


def _wrong(spec_shape, dtype):
    """Inputs no caller should get an answer for: each must be one clear error."""
    n = int(np.prod(spec_shape))
    return [
        np.zeros(spec_shape, dtype=np.float64 if dtype != np.float64 else np.float32),
        np.zeros((*spec_shape, 1), dtype=dtype),
        np.zeros((0, *spec_shape[1:]), dtype=dtype),
        np.array([object()] * n, dtype=object).reshape(spec_shape),
        np.array(["a"] * n).reshape(spec_shape),
        [[1, 2], [3]],
        None,
    ]


def _check(model, onnx_path, name, value):
    """One call: outputs equal to onnxruntime's on the same values, or a BadInputError that
    onnxruntime's refusal (or a wrong dtype/shape/layout) backs."""
    from harlflow.core.outputs import TOLERANCES

    try:
        got = model(**{name: value})
    except BadInputError:
        arr = np.asarray(value) if isinstance(value, np.ndarray) else None
        if arr is not None and arr.dtype.kind in "iuf" and arr.shape == model.inputs[0].shape:
            native = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("=")))
            if str(native.dtype) == model.inputs[0].dtype:
                with pytest.raises(Exception):  # noqa: B017  (onnxruntime's own error type)
                    ort(onnx_path, {name: native})
        return
    got = got if isinstance(got, list) else [got]
    want = ort(onnx_path, {name: np.ascontiguousarray(np.asarray(value, model.inputs[0].dtype))})
    for spec, g, w in zip(model.outputs, got, want, strict=True):
        atol, rtol = TOLERANCES.get(spec.dtype, (0.0, 0.0))
        assert g.shape == w.shape and g.dtype == w.dtype
        if w.dtype.kind == "f":  # float32 rounding at the outputs' scale: 1e29 sums cancel
            finite = np.abs(w[np.isfinite(w)])
            atol = max(atol, 1e-6 * float(finite.max(initial=0.0)))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)


def _property(examples: int):
    """Hypothesis settings for a test that calls a loaded artifact ``examples`` times, with the
    same examples on every run (derandomized): sums that overflow float32 in one summation
    order and not in another differ between any two runtimes, and CI must not draw them at
    random one day."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


@_property(40)
@given(data=st.data())
def test_runtime_takes_anything_token_ids(gpt, data):
    onnx_path, art = gpt
    model = _load_once(art)
    ids = np.array(data.draw(st.lists(_bad_ints(np.int64), min_size=8, max_size=8)), np.int64)
    for value in _variants(ids.reshape(1, 8)):
        _check(model, onnx_path, "ids", value)


@_property(30)
@given(data=st.data())
def test_runtime_takes_anything_floats(mlp, data):
    onnx_path, art = mlp
    model = _load_once(art)
    spec = model.inputs[0]
    n = int(np.prod(spec.shape))
    x = np.array(data.draw(st.lists(_FLOATS, min_size=n, max_size=n)), np.float32)
    for value in _variants(x.reshape(spec.shape)):
        _check(model, onnx_path, spec.name, value)


def test_wrong_names_dtypes_shapes_and_objects_are_one_clear_error(gpt, mlp):
    for _, art in (gpt, mlp):
        model = _load_once(art)
        spec = model.inputs[0]
        for value in _wrong(spec.shape, np.dtype(spec.dtype)):
            with pytest.raises(BadInputError, match=repr(spec.name)):
                model(**{spec.name: value})
        ok = np.zeros(spec.shape, spec.dtype)
        with pytest.raises(BadInputError, match="missing"):
            model(other=ok)
        with pytest.raises(BadInputError, match="unknown"):
            model(**{spec.name: ok, "extra": ok})
        with pytest.raises(BadInputError, match="takes 1 inputs, got 2"):
            model(ok, ok)
        with pytest.raises(BadInputError, match="takes 1 inputs, got 0"):
            model()


_LOADED: dict = {}


def _load_once(art: Path):
    from harlflow import runtime

    if art not in _LOADED:
        _LOADED[art] = runtime.load(art)
    return _LOADED[art]


def test_tvm_warnings_are_reported_once_per_kind_with_a_count(tmp_path, capfd):
    """Pricing rewrite candidates compiles the model again and again: TVM's "Fast mode
    segfaults..." warning for each Gather is shown once, then counted, in the log and the
    rewrite run's summary; harlflow's own lines still come through."""
    from tasks.importing import import_model
    from tasks.rewriting import rewrite_model

    m = import_model(str(gpt_like(tmp_path / "gpt.onnx")), cache_dir=tmp_path / "cache")
    lines: list[str] = []
    out = rewrite_model(
        m,
        "greedy",
        work_dir=tmp_path / "rewrite",
        target=resolve_target("cpu"),
        database_dir=tmp_path / "db",
        log=lines.append,
    )
    warned = {k: n for k, n in out.summary["tvm_warnings"].items() if "Fast mode" in k}
    assert len(warned) == 1 and next(iter(warned.values())) > 1, out.summary["tvm_warnings"]
    err = capfd.readouterr().err
    assert err.count("Fast mode segfaults") == 1, err
    assert any(line.startswith(f"warned {next(iter(warned.values()))} times") for line in lines)
    assert any(line.startswith("rewrite: greedy over") for line in lines)


def test_the_measuring_worker_answers_bad_references_in_one_line(gpt, tmp_path):
    """``python -m harlflow.measure`` (the verifier and timer the pipeline runs in a child
    process) on a reference with an out-of-range id, a pickled object array, or no file."""
    _, art = gpt
    np.savez(tmp_path / "bad_ids.npz", **{"input/ids": np.full((1, 8), 10**6, np.int64)})
    np.savez(tmp_path / "pickled.npz", **{"input/ids": np.array([object()], dtype=object)})
    for ref, kind, message in (
        ("bad_ids.npz", "verify", "holds 1000000"),
        ("bad_ids.npz", "tvm", "holds 1000000"),
        ("pickled.npz", "verify", "not a readable reference"),
        ("missing.npz", "tvm", "not a readable reference"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "harlflow.measure", kind, "--path", str(art),
             "--reference", str(tmp_path / ref)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 2, (ref, kind, r.stderr[-1500:])
        assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "example",
    ["small_cnn", "squeezenet_small", "inception_small", "vit_small", "bert_encoder", "resnet18"],
)
def test_every_bundled_example_takes_special_floats(example, tmp_path):
    """Each bundled example, packaged untuned, on inputs with NaN, ±Inf, denormals and huge
    values planted in a seeded normal array: onnxruntime's outputs, NaN for NaN.

    Huge magnitudes come as a scale of the whole array (1e30). A single huge value planted
    among normal ones is left out: sums then hang on rounding, and ResNet-18's outputs differ
    from onnxruntime's by 1.06e-3 relative for one -1e30 (just outside the tolerance); at
    float32's maximum (3.4e38) ViT's LayerNorm overflows to NaN in TVM where onnxruntime stays
    finite. Both are in the issue's closing note as found, not fixed."""
    from harlflow import runtime
    from tasks.importing import import_model

    imported = import_model(f"harlflow.examples:{example}", cache_dir=tmp_path / "cache")
    m, art = untuned_artifact_of(imported, tmp_path)
    model = runtime.load(art.directory)
    spec = model.inputs[0]
    base = np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)

    @_property(6)
    @given(
        scale=st.sampled_from([1.0, 1e-40, 1e30]),
        planted=st.lists(
            st.tuples(
                st.integers(0, base.size - 1),
                st.sampled_from([np.nan, np.inf, -np.inf, 1e-45, -1e-38, 0.0]),
            ),
            max_size=4,
        ),
    )
    def check(scale, planted):
        x = (base * np.float32(scale)).astype(np.float32)
        for i, v in planted:
            x.flat[i] = v
        _check(model, m.onnx_path, spec.name, x)

    check()

"""Import stage: an ONNX file, a ``torch.export`` program or a model factory → a checked graph.

Output, in a content-addressed directory: ``model.onnx`` (canonical: opset >= 17, static shapes,
shape-inferred, checked) and ``reference.npz`` (seeded inputs and onnxruntime's outputs). The Relax
module is rebuilt from the canonical ONNX on demand (:func:`to_relax`), so the result is a few paths
and a signature that Prefect can cache across processes.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harlflow.core.errors import ModelImportError, first_line
from harlflow.core.hashing import sha256_bytes, sha256_file
from harlflow.core.outputs import load_reference
from harlflow.core.signature import TensorSpec, example_inputs
from tasks.onnx_passes import fold_constants, inference_form

MIN_OPSET = 17
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_ONNX_TO_NP = {
    1: "float32",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}


@dataclass
class ImportedModel:
    """What the import stage hands to the next stages (plain data; cacheable)."""

    name: str
    source: str
    source_kind: str  # "onnx" | "pt2" | "factory"
    source_sha256: str
    directory: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    seed: int
    checkpoint: str | None = None
    num_nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    original_directory: str | None = None
    """set by the rewrite stage: where the imported (un-rewritten) model lives"""

    @property
    def onnx_path(self) -> Path:
        return Path(self.directory) / "model.onnx"

    @property
    def original_onnx_path(self) -> Path:
        """The imported model before any rewrite (what onnxruntime is measured on)."""
        return Path(self.original_directory or self.directory) / "model.onnx"

    @property
    def reference_path(self) -> Path:
        return Path(self.directory) / "reference.npz"

    def reference(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The seeded reference inputs and onnxruntime's outputs for them."""
        return load_reference(self.reference_path)


# --------------------------------------------------------------------------- source detection
def detect_kind(model: str) -> str:
    """``onnx``, ``pt2`` or ``factory`` for a model argument; a clear error for anything else."""
    path = Path(model)
    if path.is_dir():
        raise ModelImportError(f"{model} is a directory, not a model file")
    if path.exists():
        if path.stat().st_size == 0:
            raise ModelImportError(f"{model} is empty: not a model")
        if zipfile.is_zipfile(path):
            return "pt2"
        return "onnx"
    if _FACTORY.match(model) and path.suffix.lower() not in (".onnx", ".pt2"):
        return "factory"
    raise ModelImportError(
        f"model file not found: {model} (give an .onnx file, a torch.export .pt2 file, "
        "or a factory as package.module:function)"
    )


def source_hash(model: str, kind: str, checkpoint: str | None) -> str:
    """Content hash of what the user brought: the file (an ONNX file with the external data
    files it names), or the factory's source plus checkpoint."""
    if kind == "onnx":
        digest = sha256_file(model)
        extra = [sha256_file(f) for f in external_data_files(model)]
        return sha256_bytes("\0".join([digest, *extra]).encode()) if extra else digest
    if kind == "pt2":
        return sha256_file(model)
    module_name, fn_name = model.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelImportError(f"cannot import module {module_name!r} for {model}: {e}") from None
    src = Path(module.__file__ or "")
    parts = [model.encode(), src.read_bytes() if src.is_file() else b""]
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise ModelImportError(f"checkpoint file not found: {checkpoint}")
        parts.append(sha256_file(checkpoint).encode())
    return sha256_bytes(b"\0".join(parts))


def external_data_files(model: str) -> list[Path]:
    """The external data files an ONNX model's tensors live in (``onnx.save(...,
    save_as_external_data=True)``, forced on models over protobuf's 2 GB), in a stable order;
    one that is missing or outside the model's directory is a :class:`ModelImportError`."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.load(model, load_external_data=False)
    except Exception:
        return []  # not parseable: _load_onnx reports it
    base = Path(model).resolve().parent
    found = []
    for t in onnx.external_data_helper._get_all_tensors(proto):
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            path = (base / loc).resolve()
            if base not in path.parents or not path.is_file():
                raise ModelImportError(
                    f"{model}: tensor {t.name!r} names external data {loc!r}, which is not a "
                    f"file in {base}"
                )
            found.append(path)
    return sorted(set(found))


def import_key(
    model: str, inputs: list[TensorSpec] | None, checkpoint: str | None, seed: int
) -> str:
    """Cache key of an import: the content hash plus every option that changes its output."""
    kind = detect_kind(model)
    blob = json.dumps(
        {
            "sha": source_hash(model, kind, checkpoint),
            "inputs": [s.to_dict() for s in inputs or []],
            "seed": seed,
            "min_opset": MIN_OPSET,
            "form": 2,  # canonical form: 2 = constants folded, training leftovers removed
        },
        sort_keys=True,
    )
    return sha256_bytes(blob.encode())


# --------------------------------------------------------------------------- PyTorch sources
def load_factory(model: str, checkpoint: str | None):
    """The network ``package.module:function`` builds, with ``checkpoint``'s state dict loaded
    (``weights_only``: never unpickles code), in eval mode."""
    import torch

    module_name, fn_name = model.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), fn_name)
    except ImportError as e:
        raise ModelImportError(f"cannot import module {module_name!r} for {model}: {e}") from None
    except AttributeError:
        raise ModelImportError(f"module {module_name!r} has no function {fn_name!r}") from None
    try:
        net = factory()
    except Exception as e:
        raise ModelImportError(f"model factory {model} failed: {type(e).__name__}: {e}") from None
    if not isinstance(net, torch.nn.Module):
        raise ModelImportError(
            f"model factory {model} returned {type(net).__name__}, not nn.Module"
        )
    if checkpoint:
        state = load_state_dict(checkpoint)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelImportError(
                f"checkpoint {checkpoint} does not fit {model}: {first_line(e)}"
            ) from None
    return net.eval()


def load_state_dict(checkpoint: str) -> dict[str, Any]:
    """Load a state dict with ``weights_only=True``: pickled code is refused, never executed."""
    import pickle

    import torch

    if not Path(checkpoint).is_file():
        raise ModelImportError(f"checkpoint file not found: {checkpoint}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelImportError(
            f"checkpoint {checkpoint} holds pickled Python objects (e.g. a whole nn.Module), "
            "which harlflow will not unpickle: save model.state_dict() instead"
        ) from None
    except Exception as e:
        raise ModelImportError(
            f"checkpoint {checkpoint} is not a readable PyTorch state dict: {type(e).__name__}: {e}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelImportError(f"checkpoint {checkpoint} is not a state dict of tensors")
    return state


def _torch_to_onnx(net, specs: list[TensorSpec], dest: Path, model: str) -> None:
    import torch

    args = tuple(torch.from_numpy(v) for v in example_inputs(specs, 0).values())
    try:
        with torch.no_grad():
            out = net(*args)
    except Exception as e:
        raise ModelImportError(
            f"{model} fails on inputs {[str(s) for s in specs]}: {type(e).__name__}: {e}"
        ) from None
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    try:
        torch.onnx.export(
            net,
            args,
            str(dest),
            input_names=[s.name for s in specs],
            output_names=["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)],
            opset_version=MIN_OPSET,
            dynamo=False,
        )
    except Exception as e:
        raise ModelImportError(f"cannot export {model} to ONNX: {first_line(e)}") from None


def _frozen(module):
    """Wrap an exported program's module for the TorchScript exporter, which calls
    ``.train(False)``: exported modules refuse ``train()``, and are in inference form already."""
    import torch

    class Frozen(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def train(self, mode: bool = True):
            return self

        def forward(self, *args):
            return self.inner(*args)

    return Frozen()


def _pt2_specs(ep, model: str, given: dict[str, TensorSpec]) -> list[TensorSpec]:
    """Input specs of an ExportedProgram from its placeholders' fake tensors (or ``--input``)."""
    import torch

    specs = []
    user_inputs = list(ep.graph_signature.user_inputs)
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for name in user_inputs:
        if name in given:
            specs.append(given[name])
            continue
        val = nodes[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ModelImportError(f"{model}: input {name!r} is not a tensor; pass --input")
        dims = []
        for i, d in enumerate(val.shape):
            if not isinstance(d, int):
                raise ModelImportError(
                    f"{model}: input {name!r} has a dynamic dimension {i} ({d}); "
                    f"fix it with --input {name}:<dims>:<dtype>"
                )
            dims.append(d)
        specs.append(TensorSpec(name, tuple(dims), str(val.dtype).removeprefix("torch.")))
    return specs


def check_pt2_trusted(model: str) -> None:
    """``torch.export.load`` unpickles parts of a .pt2 file (weights_only=False, pickle.loads),
    which can run code from the file: only with ``HARLFLOW_TRUST_PT2=1`` (files you produced)."""
    if os.environ.get("HARLFLOW_TRUST_PT2") != "1":
        raise ModelImportError(
            f"{model}: loading a .pt2 program unpickles data from the file (torch.export.load), "
            "which can run code; harlflow does not do that for files it cannot trust. Export the "
            "model to ONNX, or set HARLFLOW_TRUST_PT2=1 if you produced this file yourself"
        )


def _pytorch_source(
    model: str, kind: str, checkpoint: str | None, given: dict[str, TensorSpec], dest: Path
) -> None:
    """Export a .pt2 program or a factory's module to ONNX at ``dest``."""
    import torch

    if kind == "pt2":
        if checkpoint:
            raise ModelImportError("--checkpoint applies to a model factory, not a .pt2 program")
        check_pt2_trusted(model)
        try:
            ep = torch.export.load(model)
        except Exception as e:
            raise ModelImportError(
                f"{model} is not a readable torch.export program: {type(e).__name__}: {e}"
            ) from None
        specs = _pt2_specs(ep, model, given)
        net = _frozen(ep.module())
    else:
        net = load_factory(model, checkpoint)
        declared = getattr(net, "harlflow_inputs", None)
        if given:
            specs = list(given.values())
        elif declared:
            specs = [TensorSpec(n, tuple(s), d) for n, s, d in declared]
        else:
            raise ModelImportError(
                f"model factory {model} declares no input shapes: pass --input NAME:DIMS:DTYPE "
                "(e.g. --input x:1x3x224x224:float32)"
            )
    _torch_to_onnx(net, specs, dest, model)


# --------------------------------------------------------------------------- ONNX canonicalisation
def _load_onnx(path: str):
    import onnx

    try:
        return onnx.load(path)
    except Exception as e:
        raise ModelImportError(
            f"{path} is not a valid ONNX model (protobuf parse failed: "
            f"{type(e).__name__}: {str(e).strip() or 'truncated or corrupted'})"
        ) from None


def canonicalize(model_proto, source: str, given: dict[str, TensorSpec]):
    """Check, upgrade to opset >= 17, fix input shapes, infer every shape, fold constant
    subgraphs and drop training leftovers (:mod:`tasks.onnx_passes`); returns the proto."""
    import onnx
    from onnx import version_converter

    try:
        onnx.checker.check_model(model_proto)
    except Exception as e:
        raise ModelImportError(f"{source} fails the ONNX checker: {str(e).strip()}") from None
    if not model_proto.graph.node:
        raise ModelImportError(f"{source} has an empty graph: not a model")
    # training leftovers first: the opset converter refuses BatchNormalization's training outputs
    model_proto, _ = inference_form(model_proto)
    opset = next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        try:
            model_proto = version_converter.convert_version(model_proto, MIN_OPSET)
        except Exception as e:
            raise ModelImportError(
                f"{source}: cannot upgrade opset {opset} to {MIN_OPSET}: {str(e).strip()}"
            ) from None
    inits = {i.name for i in model_proto.graph.initializer}
    graph_inputs = [i for i in model_proto.graph.input if i.name not in inits]
    unknown = set(given) - {i.name for i in graph_inputs}
    if unknown:
        raise ModelImportError(
            f"--input names {sorted(unknown)} are not inputs of {source} "
            f"(its inputs: {[i.name for i in graph_inputs]})"
        )
    for inp in graph_inputs:
        tt = inp.type.tensor_type
        if inp.name in given:
            spec = given[inp.name]
            if _ONNX_TO_NP.get(tt.elem_type) != spec.dtype:
                raise ModelImportError(
                    f"--input {spec}: {source} declares {inp.name!r} as "
                    f"{_ONNX_TO_NP.get(tt.elem_type, tt.elem_type)}"
                )
            tt.shape.ClearField("dim")
            for d in spec.shape:
                tt.shape.dim.add().dim_value = d
            continue
        if tt.elem_type not in _ONNX_TO_NP:
            raise ModelImportError(f"{source}: input {inp.name!r} has unsupported element type")
        for i, d in enumerate(tt.shape.dim):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                label = d.dim_param or "?"
                raise ModelImportError(
                    f"{source}: input {inp.name!r} has a dynamic dimension {i} ({label}); "
                    f"fix it with --input {inp.name}:<dims>:<dtype>"
                )
    # The IR version only names the file format: lower it to what the opsets need, so that
    # runtimes older than the onnx package (onnxruntime 1.31 reads IR <= 13) load the model.
    needed = onnx.helper.find_min_ir_version_for(
        list(model_proto.opset_import), ignore_unknown=True
    )
    model_proto.ir_version = min(model_proto.ir_version, max(needed, 8))
    model_proto = _inferred(model_proto, source)
    # Folding a Shape chain lets shape inference see through the Reshape it fed, which may
    # make more Shapes static (a ShuffleNet's channel shuffle exported with its shapes computed
    # at run time: TVM imported it with dynamic shapes and could not extract its tasks)
    for _ in range(FOLD_ROUNDS):
        model_proto, folded = fold_constants(model_proto)
        if not folded:
            break
        model_proto, _ = inference_form(model_proto)
        model_proto = _inferred(model_proto, source)
    return model_proto


FOLD_ROUNDS = 8


def _inferred(model_proto, source: str):
    """Shapes inferred strictly from the inputs (stale value_info cleared first), then checked."""
    import onnx
    from onnx import shape_inference

    del model_proto.graph.value_info[:]
    try:
        model_proto = shape_inference.infer_shapes(model_proto, check_type=True, strict_mode=True)
        onnx.checker.check_model(model_proto, full_check=True)
    except Exception as e:
        raise ModelImportError(f"{source}: shape inference failed: {str(e).strip()}") from None
    return model_proto


def _signature(model_proto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inits = {i.name for i in model_proto.graph.initializer}

    def spec(vi) -> TensorSpec:
        tt = vi.type.tensor_type
        return TensorSpec(
            vi.name,
            tuple(d.dim_value for d in tt.shape.dim),
            _ONNX_TO_NP.get(tt.elem_type, str(tt.elem_type)),
        )

    ins = [spec(i) for i in model_proto.graph.input if i.name not in inits]
    return ins, [spec(o) for o in model_proto.graph.output]


def check_tvm_support(model_proto, source: str) -> None:
    """Name every operator the TVM ONNX frontend has no converter for, and every use of one that
    TVM 0.27 imports but computes wrongly (:func:`_known_wrong`, found by ``bench/conformance.py``
    against ONNX's own cases), before trying it."""
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map())
    missing = sorted({n.op_type for n in model_proto.graph.node if n.op_type not in known})
    if missing:
        where = {
            op: next(n.name or n.op_type for n in model_proto.graph.node if n.op_type == op)
            for op in missing
        }
        listing = ", ".join(f"{op} (node {where[op]!r})" for op in missing)
        raise ModelImportError(f"{source}: operators TVM cannot import: {listing}")
    g = model_proto.graph
    constants = {t.name: t for t in g.initializer}
    values = [*g.input, *g.value_info, *g.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in g.initializer})
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in values}
    for node in g.node:
        why = _known_wrong(node, constants, types, ranks)
        if why:
            raise ModelImportError(
                f"{source}: operator {node.op_type} (node {node.name or '(unnamed)'!r}) {why}: "
                "TVM computes it wrongly, so harlflow does not compile it"
            )


def _known_wrong(node, constants: dict, types: dict, ranks: dict) -> str | None:
    """Why TVM 0.27 gets this node wrong or cannot compile it (the conformance cases it fails),
    or None."""
    from onnx import TensorProto, helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def const(i: int):
        name = node.input[i] if len(node.input) > i else ""
        return numpy_helper.to_array(constants[name]) if name in constants else None

    op = node.op_type
    if op == "NonMaxSuppression":
        return "returns no boxes"
    if op == "Expand" and const(1) is None:
        return "with a shape given at run time"
    if op == "BatchNormalization" and attrs.get("training_mode", 0):
        return "in training mode"
    if op == "Dropout" and len(node.input) > 2 and node.input[2]:
        mode = const(2)
        if mode is None or bool(mode):
            return "in training mode (random masks)"
    if op == "BitShift":
        shift = const(1)
        if shift is None or shift.min() < 0 or shift.max() >= 8 * shift.dtype.itemsize:
            return "with shift amounts not known to lie in [0, bit width)"
    if op == "IsInf" and not (attrs.get("detect_negative", 1) and attrs.get("detect_positive", 1)):
        return "detecting only one sign"
    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    if op == "Mod" and types.get(node.input[1]) in floats:
        divisor = const(1)
        if divisor is None or not np.isfinite(divisor).all():
            return "on floats with divisors not known to be finite"
    if op == "Pow" and types.get(node.input[0]) not in floats:
        return "on integers"
    if op == "SpaceToDepth" and attrs.get("mode", b"DCR") in (b"CRD", "CRD"):
        return "in CRD mode"
    if op == "RoiAlign" and attrs.get("mode", b"avg") in (b"max", "max"):
        return "in max mode"
    # what TVM imports but cannot compile: refused here, naming the node, not as a late error
    if op == "ConstantOfShape" and const(0) is None:
        return "with a shape given at run time"
    if (
        op == "RMSNormalization"
        and attrs.get("axis", -1) % max(1, ranks.get(node.input[0], 1)) == 0
    ):
        return "normalizing over every axis"
    return None


def to_relax(onnx_path: str | Path, inputs: list[TensorSpec], source: str | None = None):
    """The Relax IRModule of a canonical ONNX file (weights embedded as constants); a failure is
    a :class:`ModelImportError` naming ``source`` (default: the file) and the operator and node
    TVM's importer stopped at."""
    import contextlib
    import io

    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    proto = onnx.load(str(onnx_path))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the importer prints its failures too
            mod = from_onnx(
                proto,
                shape_dict={s.name: list(s.shape) for s in inputs},
                dtype_dict={s.name: s.dtype for s in inputs},
            )
    except Exception as e:
        raise ModelImportError(
            f"{source or onnx_path}: TVM cannot import {_failing_node(e)}: {first_line(e)}"
        ) from None
    check_outputs(mod, proto, source or str(onnx_path))
    return mod


def check_outputs(mod, proto, source: str) -> None:
    """Refuse a module whose outputs TVM types otherwise than ONNX's shape inference does (a
    LayerNormalization's Mean as a scalar, a ConvTranspose ignoring ``output_shape``, a Dropout
    mask as float, a data-dependent shape made static): the artifact would answer with wrong
    shapes or dtypes. Names the output and the operator that makes it."""
    from tvm import relax

    from harl.index_guard import static_shape

    _, outs = _signature(proto)
    ret = mod["main"].ret_ty
    got = list(ret.fields) if len(outs) > 1 and hasattr(ret, "fields") else [ret]
    makers = {o: n for n in proto.graph.node for o in n.output}
    for spec, ty in zip(outs, got, strict=False):
        if isinstance(ty, relax.TensorType):
            dtype, shape = str(ty.dtype), static_shape(ty)  # None: data-dependent in TVM too
        else:
            dtype, shape = type(ty).__name__, None
        # a static shape where ONNX's is data-dependent (an Expand or NonMaxSuppression fed at
        # run time) is TVM fixing what it cannot know: refused as well
        if dtype == spec.dtype and (shape is None or shape == spec.shape):
            continue
        node = makers.get(spec.name)
        where = f"{node.op_type} (node {node.name or '(unnamed)'!r})" if node else "the model"
        raise ModelImportError(
            f"{source}: TVM computes output {spec.name!r} of operator {where} as {dtype}"
            f"{list(shape) if shape is not None else ''}, where ONNX says {spec.dtype}"
            f"{list(spec.shape)}: not supported"
        )
    if len(got) != len(outs):
        raise ModelImportError(
            f"{source}: TVM's import has {len(got)} outputs, the model {len(outs)}: not supported"
        )


def _failing_node(exc: BaseException) -> str:
    """``operator OP (node 'NAME')`` from the importer's frame that was converting a node when
    ``exc`` was raised, or ``the model`` when it failed elsewhere."""
    tb = exc.__traceback__
    found = "the model"
    while tb is not None:
        frame = tb.tb_frame
        node = frame.f_locals.get("node") if frame.f_code.co_name == "_construct_nodes" else None
        if node is not None and hasattr(node, "op_type"):
            found = f"operator {node.op_type} (node {node.name or '(unnamed)'!r})"
        tb = tb.tb_next
    return found


def _reference(proto_path: Path, inputs: list[TensorSpec], seed: int, source: str):
    import onnxruntime as ort

    feeds = example_inputs(inputs, seed)
    try:
        sess = ort.InferenceSession(str(proto_path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, feeds)
    except Exception as e:
        raise ModelImportError(f"{source}: onnxruntime cannot run the model: {e}") from None
    return feeds, dict(zip(names, outs, strict=True))


# --------------------------------------------------------------------------- the stage
def import_model(
    model: str,
    *,
    cache_dir: str | Path,
    inputs: list[TensorSpec] | None = None,
    checkpoint: str | None = None,
    name: str | None = None,
    seed: int = 0,
) -> ImportedModel:
    """Import ``model`` into ``cache_dir/<content key>/`` (reused when already complete)."""
    import onnx

    given = {s.name: s for s in inputs or []}
    if len(given) != len(inputs or []):
        raise ModelImportError("--input names the same input twice")
    kind = detect_kind(model)
    if kind == "onnx" and checkpoint:
        raise ModelImportError("--checkpoint applies to a model factory, not an ONNX file")
    key = import_key(model, inputs, checkpoint, seed)
    final = Path(cache_dir) / key
    meta_path = final / "imported.json"
    if meta_path.is_file():
        return _with_name(_read_meta(meta_path), name or default_name(model))

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=cache_dir))
    try:
        if kind == "onnx":
            proto = _load_onnx(model)
        else:
            exported = tmp / "exported.onnx"
            _pytorch_source(model, kind, checkpoint, given, exported)
            proto = _load_onnx(str(exported))
            exported.unlink()
            given = {}  # shapes are already fixed by the export
        proto = canonicalize(proto, model, given)
        check_tvm_support(proto, model)
        ins, outs = _signature(proto)
        onnx.save(proto, str(tmp / "model.onnx"))
        to_relax(tmp / "model.onnx", ins, model)  # fail here, naming the problem, not in tuning
        feeds, ref = _reference(tmp / "model.onnx", ins, seed, model)
        np.savez(
            tmp / "reference.npz",
            **{f"input/{k}": v for k, v in feeds.items()},
            **{f"output/{k}": v for k, v in ref.items()},
        )
        ops: dict[str, int] = {}
        for n in proto.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        result = ImportedModel(
            name=default_name(model),
            source=os.path.abspath(model) if kind != "factory" else model,
            source_kind=kind,
            source_sha256=source_hash(model, kind, checkpoint),
            directory=str(final),
            inputs=ins,
            outputs=outs,
            opset=max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            seed=seed,
            checkpoint=os.path.abspath(checkpoint) if checkpoint else None,
            num_nodes=len(proto.graph.node),
            op_counts=dict(sorted(ops.items())),
        )
        _write_meta(tmp / "imported.json", result)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent import of the same content won: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return _with_name(_read_meta(meta_path), name or default_name(model))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_name(model: str) -> str:
    """The file's stem, or a factory's function name."""
    return (
        model.split(":")[-1]
        if _FACTORY.match(model) and not Path(model).exists()
        else Path(model).stem
    )


def _with_name(m: ImportedModel, name: str) -> ImportedModel:
    m.name = name
    return m


def _write_meta(path: Path, m: ImportedModel) -> None:
    d = {
        **m.__dict__,
        "inputs": [s.to_dict() for s in m.inputs],
        "outputs": [s.to_dict() for s in m.outputs],
    }
    path.write_text(json.dumps(d, indent=2))


def _read_meta(path: Path) -> ImportedModel:
    d = json.loads(path.read_text())
    d["inputs"] = [TensorSpec.from_dict(s) for s in d["inputs"]]
    d["outputs"] = [TensorSpec.from_dict(s) for s in d["outputs"]]
    d["directory"] = str(path.parent)
    return ImportedModel(**d)


def log_import(c, run_id: str, m: ImportedModel) -> None:
    """Import stage → MLflow: source, signature, operator counts, the canonical ONNX."""
    from tasks import tracking

    tracking.log_params(
        c,
        run_id,
        {
            "source": m.source,
            "source_kind": m.source_kind,
            "source_sha256": m.source_sha256,
            "checkpoint": m.checkpoint,
            "opset": m.opset,
            "inputs": ", ".join(str(s) for s in m.inputs),
            "outputs": ", ".join(str(s) for s in m.outputs),
        },
    )
    tracking.log_metrics(c, run_id, {"graph/nodes": m.num_nodes})
    c.log_dict(run_id, m.op_counts, "op_counts.json")
    c.log_artifact(run_id, str(m.onnx_path), "model")

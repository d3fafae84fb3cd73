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
    """Content hash of what the user brought: the file, or the factory's source plus checkpoint."""
    if kind in ("onnx", "pt2"):
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
    """Check, upgrade to opset >= 17, fix input shapes and infer every shape; returns the proto."""
    import onnx
    from onnx import shape_inference, version_converter

    try:
        onnx.checker.check_model(model_proto)
    except Exception as e:
        raise ModelImportError(f"{source} fails the ONNX checker: {str(e).strip()}") from None
    if not model_proto.graph.node:
        raise ModelImportError(f"{source} has an empty graph: not a model")
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
    # Clear stale value_info so inference sees the new input shapes, then infer strictly.
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
    """Name every operator the TVM ONNX frontend has no converter for, before trying it."""
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


def to_relax(onnx_path: str | Path, inputs: list[TensorSpec]):
    """The Relax IRModule of a canonical ONNX file (weights embedded as constants)."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    proto = onnx.load(str(onnx_path))
    try:
        return from_onnx(
            proto,
            shape_dict={s.name: list(s.shape) for s in inputs},
            dtype_dict={s.name: s.dtype for s in inputs},
        )
    except Exception as e:
        raise ModelImportError(
            f"{onnx_path}: TVM's ONNX importer failed: {first_line(e)}"
        ) from None


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
        to_relax(tmp / "model.onnx", ins)  # fail here, naming the problem, not in tuning
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

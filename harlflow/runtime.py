"""Run a packaged artifact: ``harlflow.runtime.load(DIR)`` gives a callable numpy → numpy.

Needs only TVM and numpy (no Prefect, MLflow or PyTorch), so it is what a deployment imports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from harlflow.core.errors import INDEX_CHECK_PREFIX, BadInputError, IndexRangeError, StoreError
from harlflow.core.signature import TensorSpec
from harlflow.core.targets import use_target_threads


class CompiledModel:
    """A loaded ``model.so`` with its signature; call it with arrays in input order or by name."""

    def __init__(self, directory: str | Path):
        import tvm
        from tvm import relax

        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise StoreError(f"{self.directory} is not a harlflow artifact (no manifest.json)")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        self.inputs = [TensorSpec.from_dict(d) for d in self.manifest["inputs"]]
        use_target_threads(self.manifest["target"])
        self.outputs = [TensorSpec.from_dict(d) for d in self.manifest["outputs"]]
        self._device = (
            tvm.cpu()
            if self.manifest["target"].get("kind", "llvm") == "llvm"
            else (tvm.device(self.manifest["target"]["kind"]))
        )
        lib = tvm.runtime.load_module(str(self.directory / "model.so"))
        self._vm = relax.VirtualMachine(lib, self._device)
        # looked up once: ``vm["main"]`` builds a new function object each time it is asked
        # (1.5 µs a call here, 5 % of the README demo's latency, when done per call)
        self._main = self._vm["main"]
        self._tvm = tvm

    def _arguments(self, args: tuple, kwargs: dict) -> list:
        if args and kwargs:
            raise BadInputError("pass inputs either by position or by name, not both")
        if kwargs:
            missing = [s.name for s in self.inputs if s.name not in kwargs]
            extra = sorted(set(kwargs) - {s.name for s in self.inputs})
            if missing or extra:
                raise BadInputError(f"inputs missing {missing}, unknown {extra}")
            args = tuple(kwargs[s.name] for s in self.inputs)
        if len(args) != len(self.inputs):
            raise BadInputError(f"the model takes {len(self.inputs)} inputs, got {len(args)}")
        return [
            self._tvm.runtime.tensor(_array(spec, a), self._device)
            for spec, a in zip(self.inputs, args, strict=True)
        ]

    def run_tvm(self, tensors: list):
        """Run on TVM tensors (no conversion): what latency measurement calls. An index the
        model's bounds checks refuse raises :class:`IndexRangeError`."""
        try:
            return self._main(*tensors)
        except RuntimeError as e:
            found = re.search(rf"{INDEX_CHECK_PREFIX} (\d+): [^\n]*", str(e))
            if found is None:
                raise
            arrays = {s.name: t.numpy() for s, t in zip(self.inputs, tensors, strict=True)}
            raise _index_error(self.manifest, int(found.group(1)), found.group(0), arrays) from None

    def __call__(self, *args: np.ndarray, **kwargs: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Run once: one output comes back as an array, several as a list in manifest order."""
        result = self.run_tvm(self._arguments(args, kwargs))
        outs = [result] if hasattr(result, "numpy") else list(result)
        arrays = [o.numpy() for o in outs]
        return arrays[0] if len(arrays) == 1 else arrays


def _array(spec: TensorSpec, value: Any) -> np.ndarray:
    """``value`` as a contiguous, native-byte-order array of ``spec``'s dtype and shape, or a
    :class:`BadInputError` naming the input (object arrays, strings, ragged lists included)."""
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:
        raise BadInputError(f"input {spec.name!r} is not an array: {e}") from None
    if a.dtype.byteorder not in ("=", "|"):
        a = a.astype(a.dtype.newbyteorder("="))  # big-endian data, same values
    if tuple(a.shape) != spec.shape or str(a.dtype) != spec.dtype:
        raise BadInputError(
            f"input {spec.name!r} must be {spec} (shape {spec.shape}, {spec.dtype}); "
            f"got shape {tuple(a.shape)}, {a.dtype}"
        )
    return c_contiguous(a)


def c_contiguous(a: np.ndarray) -> np.ndarray:
    """``a`` in C order, copied only when it is not (``np.ascontiguousarray`` would turn a
    0-d array into shape (1,), which a model with a scalar input refuses)."""
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _index_error(
    manifest: dict[str, Any], check_id: int, text: str, arrays: dict[str, np.ndarray]
) -> IndexRangeError:
    """The error for a refused index: naming the input, the value and the valid range when the
    check's indices are an input's values (the manifest says which), else the check's own text."""
    check = next((c for c in manifest.get("index_checks", []) if c["id"] == check_id), None)
    a = arrays.get(check["input"]) if check and check.get("input") else None
    if a is not None:
        ranges = check["ranges"]
        cols = a[..., None] if len(ranges) == 1 else a
        if cols.ndim and cols.shape[-1] == len(ranges):
            lo = np.array([r[0] for r in ranges])
            hi = np.array([r[1] for r in ranges])
            bad = np.argwhere((cols < lo) | (cols > hi))
            if len(bad):
                at = tuple(int(i) for i in bad[0][: a.ndim])
                span = " x ".join(f"[{r[0]}, {r[1]}]" for r in ranges)
                return IndexRangeError(
                    f"input {check['input']!r} holds {a[at]} at index {list(at)}, outside "
                    f"the valid range {span} of the model's {check['operator']}"
                )
    return IndexRangeError(f"{text} (the indices are computed from the model's inputs)")


def load(directory: str | Path) -> CompiledModel:
    """Load a packaged artifact directory (``model.so`` + ``manifest.json``)."""
    return CompiledModel(directory)

"""Run a packaged artifact: ``harlflow.runtime.load(DIR)`` gives a callable numpy → numpy.

Needs only TVM and numpy (no Prefect, MLflow or PyTorch), so it is what a deployment imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from harlflow.core.errors import BadInputError, StoreError
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
        out = []
        for spec, a in zip(self.inputs, args, strict=True):
            a = np.asarray(a)
            if tuple(a.shape) != spec.shape or str(a.dtype) != spec.dtype:
                raise BadInputError(
                    f"input {spec.name!r} must be {spec} (shape {spec.shape}, {spec.dtype}); "
                    f"got shape {tuple(a.shape)}, {a.dtype}"
                )
            out.append(self._tvm.runtime.tensor(np.ascontiguousarray(a), self._device))
        return out

    def run_tvm(self, tensors: list):
        """Run on TVM tensors (no conversion): what latency measurement calls."""
        return self._vm["main"](*tensors)

    def __call__(self, *args: np.ndarray, **kwargs: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Run once: one output comes back as an array, several as a list in manifest order."""
        result = self.run_tvm(self._arguments(args, kwargs))
        outs = [result] if hasattr(result, "numpy") else list(result)
        arrays = [o.numpy() for o in outs]
        return arrays[0] if len(arrays) == 1 else arrays


def load(directory: str | Path) -> CompiledModel:
    """Load a packaged artifact directory (``model.so`` + ``manifest.json``)."""
    return CompiledModel(directory)

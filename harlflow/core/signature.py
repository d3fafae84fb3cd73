"""Tensor signatures: ``name:1x3x224x224:float32`` specs, and seeded example inputs."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from harlflow.core.errors import BadInputError

SUPPORTED_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
_SPEC = re.compile(r"^(?P<name>[^:]+):(?P<shape>\d+(?:x\d+)*|scalar):(?P<dtype>\w+)$")


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor with a static shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(name=d["name"], shape=tuple(int(s) for s in d["shape"]), dtype=d["dtype"])

    def __str__(self) -> str:
        dims = "x".join(str(s) for s in self.shape) or "scalar"
        return f"{self.name}:{dims}:{self.dtype}"


def parse_input_spec(text: str) -> TensorSpec:
    """Parse ``name:1x3x224x224:float32`` (``scalar`` for rank 0)."""
    m = _SPEC.match(text.strip())
    if not m:
        raise BadInputError(
            f"bad --input {text!r}: expected NAME:DIMS:DTYPE, e.g. input:1x3x224x224:float32"
        )
    dtype = m["dtype"]
    if dtype not in SUPPORTED_DTYPES:
        raise BadInputError(
            f"bad --input {text!r}: dtype {dtype!r} is not one of {', '.join(SUPPORTED_DTYPES)}"
        )
    shape = () if m["shape"] == "scalar" else tuple(int(d) for d in m["shape"].split("x"))
    if any(d <= 0 for d in shape):
        raise BadInputError(f"bad --input {text!r}: every dimension must be positive")
    return TensorSpec(m["name"], shape, dtype)


def example_inputs(specs: list[TensorSpec], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: floats ~ N(0, 1); integers in [0, 2) (valid indices); random bools."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        if s.dtype.startswith("float"):
            out[s.name] = rng.standard_normal(s.shape).astype(s.dtype)
        elif s.dtype == "bool":
            out[s.name] = rng.integers(0, 2, s.shape).astype(bool)
        else:
            out[s.name] = rng.integers(0, 2, s.shape).astype(s.dtype)
    return out

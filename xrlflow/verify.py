"""Numerical equivalence of two graphs with onnxruntime (graph optimisations off, so the graph
as written is what runs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from harlflow.core.ort import session_options
from xrlflow.ir import Graph, to_onnx


def session(model: onnx.ModelProto | Graph, level: str = "disable", threads: int = 1):
    """An onnxruntime CPU session; ``level``: disable | basic | extended | all."""
    if isinstance(model, Graph):
        model = to_onnx(model)
    so = session_options(level, threads)
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def random_inputs(g: Graph, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every graph input (floats ~N(0,1); integers in [0, 2))."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in g.inputs:
        if v.shape is None or not all(isinstance(d, int) for d in v.shape):
            raise ValueError(f"input {v.name!r} has no static shape: {v.shape}")
        if np.issubdtype(v.dtype, np.floating):
            feeds[v.name] = rng.standard_normal(v.shape).astype(v.dtype)
        else:
            feeds[v.name] = rng.integers(0, 2, v.shape).astype(v.dtype)
    return feeds


def run(g: Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(g).run(None, feeds)


def max_mismatch(
    a: Graph, b: Graph, seed: int = 0, rtol: float = 1e-3, atol: float = 1e-4
) -> str | None:
    """None when ``b`` computes what ``a`` computes on seeded random inputs; else what differs."""
    feeds = random_inputs(a, seed)
    ra, rb = run(a, feeds), run(b, feeds)
    for name, x, y in zip(a.output_names, ra, rb, strict=True):
        if x.shape != y.shape:
            return f"output {name}: shape {x.shape} != {y.shape}"
        if not np.allclose(x, y, rtol=rtol, atol=atol):
            return f"output {name}: max abs diff {float(np.max(np.abs(x - y))):.3g}"
    return None

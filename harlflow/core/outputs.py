"""Outputs against a reference: the one comparison the rewrite stage, verification and the
measurement worker all use.

A ``reference.npz`` holds the import's random inputs (``input/<name>``) and the original model's
outputs on them under onnxruntime (``output/<name>``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harlflow.core.errors import BadInputError

# |got - want| <= atol + rtol * |want| elementwise, per dtype (integers and bools: exact).
# Tuned schedules reorder float reductions, so float results differ in the last bits.
TOLERANCES = {"float32": (1e-4, 1e-3), "float64": (1e-8, 1e-6), "float16": (1e-2, 1e-2)}


def load_reference(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read a ``reference.npz``: (inputs by name, expected outputs by name). A file that is
    missing, not an .npz, or holds pickled objects (never unpickled) is a BadInputError."""
    try:
        with np.load(path, allow_pickle=False) as data:
            ins = {k[len("input/") :]: data[k] for k in data.files if k.startswith("input/")}
            outs = {k[len("output/") :]: data[k] for k in data.files if k.startswith("output/")}
    except (OSError, ValueError, EOFError) as e:
        raise BadInputError(f"{path} is not a readable reference .npz: {e}") from None
    return ins, outs


def compare(specs, got: list[np.ndarray], expected: dict[str, np.ndarray]) -> dict:
    """Per-output report of ``got`` against the reference: shape, max abs/rel error, and whether
    it is within the dtype's tolerance (integers: exact). ``specs`` name the outputs in order."""
    report = {}
    for spec, g in zip(specs, got, strict=True):
        e = expected[spec.name]
        if g.shape != e.shape:
            report[spec.name] = {"shape_mismatch": [list(g.shape), list(e.shape)]}
            continue
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        rel = diff / np.maximum(np.abs(e.astype(np.float64)), 1e-6)
        atol, rtol = TOLERANCES.get(spec.dtype, (0.0, 0.0))
        report[spec.name] = {
            "dtype": spec.dtype,
            "atol": atol,
            "rtol": rtol,
            "within_tolerance": bool(np.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True)),
            "max_abs": float(diff.max(initial=0.0)),
            "max_rel": float(rel.max(initial=0.0)),
        }
    return report


def mismatches(report: dict[str, dict]) -> list[str]:
    """The outputs of a :func:`compare` report outside their tolerance, as readable lines
    (empty: every output matches)."""
    bad = []
    for name, r in report.items():
        if "shape_mismatch" in r:
            bad.append(f"{name}: shape {r['shape_mismatch'][0]} != {r['shape_mismatch'][1]}")
        elif not r["within_tolerance"]:
            bad.append(
                f"{name}: max abs error {r['max_abs']:.3g}, max rel error {r['max_rel']:.3g}"
            )
    return bad

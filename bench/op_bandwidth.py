"""Memory-bound operators as harlflow compiles them and as onnxruntime runs them: the bandwidth
each achieves, next to a STREAM-like kernel measured in the same run.

    python bench/op_bandwidth.py [--ops gelu,softmax,...] [--trials 0] [--max-seconds 8]
                                 [--out bench/results/op_bandwidth.json]

Each operator is a one-node ONNX model (GELU as PyTorch exports it, five nodes) on about 1 MiB
of float32: ``[256, 1024]`` for the element-wise and last-axis operators, NCHW maps for pooling.
Each is imported, tuned with ``--trials`` (0: the fallback schedules a kernel gets before it is
measured) and packaged by the pipeline's own stages, then timed side by side with onnxruntime by
harlflow's protocol (fresh processes, alternating rounds, 95 % intervals over blocks). The
``stream`` row, ``x + 1`` over the same bytes, is the STREAM-like reference: what each runtime
moves when there is nothing to compute. Bandwidth is the model's input and output bytes over
its median latency (one call: the VM's or the session's own cost per call is included, as a
user pays it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

ROWS = [256, 1024]


def _ops() -> dict:
    """name: (nodes, input shapes, initializers), in the examples DSL of xrlflow.rules."""
    d = ROWS[-1]
    rng = np.random.default_rng(0)
    f32 = np.float32
    return {
        "stream": ([("Add", ["x", "one"], ["y"], None)], {"x": ROWS}, {"one": f32(1.0)}),
        "exp": ([("Exp", ["x"], ["y"], None)], {"x": ROWS}, {}),
        "tanh": ([("Tanh", ["x"], ["y"], None)], {"x": ROWS}, {}),
        "sigmoid": ([("Sigmoid", ["x"], ["y"], None)], {"x": ROWS}, {}),
        "gelu": (
            [
                ("Div", ["x", "sqrt2"], ["s"], None),
                ("Erf", ["s"], ["e"], None),
                ("Add", ["e", "one"], ["a"], None),
                ("Mul", ["x", "a"], ["m"], None),
                ("Mul", ["m", "half"], ["y"], None),
            ],
            {"x": ROWS},
            {"sqrt2": f32(math.sqrt(2)), "one": f32(1.0), "half": f32(0.5)},
        ),
        "softmax": ([("Softmax", ["x"], ["y"], {"axis": -1})], {"x": ROWS}, {}),
        "layernorm": (
            [("LayerNormalization", ["x", "g", "b"], ["y"], {"axis": -1})],
            {"x": ROWS},
            {"g": rng.uniform(0.5, 1.5, d).astype(f32), "b": rng.standard_normal(d).astype(f32)},
        ),
        "reduce_mean": ([("ReduceMean", ["x"], ["y"], {"axes": [-1]})], {"x": ROWS}, {}),
        "global_avg_pool": (
            [("GlobalAveragePool", ["x"], ["y"], None)],
            {"x": [1, 256, 32, 32]},
            {},
        ),  # fmt: skip
        "max_pool": (
            [
                (
                    "MaxPool",
                    ["x"],
                    ["y"],
                    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
                )
            ],  # fmt: skip
            {"x": [1, 64, 64, 64]},
            {},
        ),
    }


def _onnx(name: str, spec, directory: Path) -> Path:
    import onnx

    from xrlflow.rules.examples import model

    nodes, inputs, inits = spec
    m = model(np.random.default_rng(0), nodes, inputs, ["y"], inits)
    path = directory / f"{name}.onnx"
    onnx.save(m, str(path))
    return path


def _bytes(path: Path) -> int:
    """Input and output bytes of a float32 model with static shapes."""
    import onnx

    g = onnx.load(str(path)).graph
    shapes = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*g.input, *g.output)]
    return sum(4 * math.prod(s) for s in shapes)


def main() -> None:
    from common import tuned_artifact

    from harlflow.core.targets import resolve_target
    from harlflow.measure import Runtime, side_by_side
    from tasks.importing import import_model
    from tasks.packaging import measure_threads

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(_ops()))
    p.add_argument("--trials", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=8.0, help="per side-by-side timing")
    p.add_argument("--out", default="bench/results/op_bandwidth.json")
    a = p.parse_args()
    target, out, ops = resolve_target(None), Path(a.out), _ops()
    rows: list[dict] = []
    print(
        f"{'op':16s} {'MiB':>5s} {'tvm us':>8s} {'ort us':>8s} {'tvm GB/s':>9s} {'ort GB/s':>9s} "
        f"{'tvm/ort':>8s} {'95% interval':>13s} {'tvm of stream':>14s} {'ort of stream':>14s}"
    )
    with tempfile.TemporaryDirectory(prefix="harlflow-bench-") as tmp:
        work = Path(tmp)
        for name in a.ops.split(","):
            path = _onnx(name, ops[name], work)
            moved = _bytes(path)
            m = import_model(str(path), cache_dir=work / "cache")
            directory, res = tuned_artifact(m, target, work, name, a.trials)
            tvm = Runtime("tvm", "tvm", directory)
            ort = Runtime("onnxruntime", "ort", str(m.onnx_path))
            s = side_by_side(
                [tvm, ort], m.reference_path, threads=measure_threads(target),
                max_seconds=a.max_seconds,
            )  # fmt: skip
            r = s.ratio("tvm", "onnxruntime")
            t_ms, o_ms = s.estimate("tvm").median_ms, s.estimate("onnxruntime").median_ms
            row = {
                "op": name,
                "bytes": moved,
                "tvm_us": t_ms * 1e3,
                "onnxruntime_us": o_ms * 1e3,
                "tvm_gb_s": moved / t_ms / 1e6,
                "onnxruntime_gb_s": moved / o_ms / 1e6,
                "tvm_over_onnxruntime": r.value,
                "ratio_ci": list(r.ci),
                "trials": res.trials,
                "measurement": s.session(),
            }
            stream = rows[0] if rows and rows[0]["op"] == "stream" else row
            row["tvm_of_stream"] = row["tvm_gb_s"] / stream["tvm_gb_s"]
            row["onnxruntime_of_stream"] = row["onnxruntime_gb_s"] / stream["onnxruntime_gb_s"]
            rows.append(row)
            print(
                f"{name:16s} {moved / 2**20:5.2f} {row['tvm_us']:8.1f} "
                f"{row['onnxruntime_us']:8.1f} {row['tvm_gb_s']:9.1f} "
                f"{row['onnxruntime_gb_s']:9.1f} {r.value:8.2f} {r.ci[0]:6.2f}-{r.ci[1]:<6.2f} "
                f"{row['tvm_of_stream']:14.0%} {row['onnxruntime_of_stream']:14.0%}",
                flush=True,
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"target": target, "trials": a.trials, "rows": rows},
                                      indent=2))  # fmt: skip
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""Transcendental functions as TVM compiles them: libm per element (``tirx.exp``, ``tirx.erf``,
...) against harlflow's polynomial lowerings (``harl/fast_math.py``): accuracy in ulp against a
float64 reference, and throughput on one core next to a STREAM-like copy of the same bytes.

    python bench/fast_math.py [--n 4194304] [--rounds 7] [--out bench/results/fast_math.json]

Each function is compiled twice from the same TE expression (TVM's lowering and harlflow's) with
the contiguous axis vectorised by 16 and the outer loop serial: one core, no thread pool, so
both variants are timed in one process, alternating A B A B over ``--rounds`` rounds (the
minimum of each round's calls is kept; the table shows the median round and the spread).
Accuracy is measured on ``--n`` arguments: normal around 0 with scale 3, plus a log-uniform
sweep of both signs from 1e-6 to 1e2, for both lowerings (GELU's ``x * (1 + erf(x/√2)) / 2``
cancels for large negative ``x`` in either: its ulp error there is the formula's).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _functions():
    import scipy.special as sp
    from tvm import topi

    from harl import fast_math

    return {
        # name: (TVM's lowering, harlflow's, float64 reference)
        "exp": (topi.exp, fast_math.fast_exp, np.exp),
        "erf": (topi.erf, fast_math.fast_erf, sp.erf),
        "tanh": (topi.tanh, fast_math.fast_tanh, np.tanh),
        "sigmoid": (topi.sigmoid, fast_math.fast_sigmoid, lambda v: 1 / (1 + np.exp(-v))),
        "gelu": (
            lambda x: topi.multiply(x, 0.5 + topi.erf(x * (0.5**0.5)) * 0.5),
            lambda x: x * (0.5 + fast_math.fast_erf(x * (0.5**0.5)) * 0.5),
            lambda v: v * 0.5 * (1 + sp.erf(v / np.sqrt(2))),
        ),
    }


def _build(fn, n: int, target):
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    a = te.placeholder((n,), name="A")
    sch = Schedule(te.create_prim_func([a, fn(a)]))
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    for b in blocks[:-1]:
        sch.compute_inline(b)
    (i,) = sch.get_loops(blocks[-1])
    _, inner = sch.split(i, [None, 16])
    sch.vectorize(inner)
    return tvm.compile(sch.mod, target=target)


def _arguments(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    half = n // 2
    sweep = 10 ** rng.uniform(-6, 2, n - half) * rng.choice([-1, 1], n - half)
    return np.concatenate([rng.normal(0, 3, half), sweep]).astype(np.float32)


def _ulp(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Error in units of float32's spacing at the reference, below float32's top binade
    (2**127: exp(x) for x > 88.03, where the fast exp's 2**n scaling overflows to inf; the true
    value is finite up to x = 88.72)."""
    keep = np.abs(ref) < 2.0**127
    ref, got = ref[keep], got[keep]
    spacing = np.spacing(np.abs(ref.astype(np.float32))).astype(np.float64)
    return np.abs(got.astype(np.float64) - ref) / np.maximum(spacing, np.finfo(np.float32).tiny)


def _best_ms(f, args, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        f(*args)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1 << 22)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default="bench/results/fast_math.json")
    a = p.parse_args()

    import tvm

    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": 1}
    )
    x = _arguments(a.n)
    dev = tvm.cpu()
    xt, yt = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.empty_like(x), dev)
    # STREAM-like: numpy copying the same bytes (read n floats, write n floats), one core
    dst = np.empty_like(x)
    copy_ms = min(_best_ms(lambda: np.copyto(dst, x), (), 20) for _ in range(3))
    copy_gbs = 2 * x.nbytes / copy_ms / 1e6
    rows = []
    fns = _functions()
    print(
        f"{'function':9s} {'max ulp':>8s} {'p99.9 ulp':>9s} {'libm ulp':>9s} {'libm ms':>8s} "
        f"{'fast ms':>8s} "
        f"{'speedup':>8s} {'spread':>13s} {'fast GB/s':>9s} {'of copy':>7s}"
    )
    for name, (plain_fn, fast_fn, ref) in fns.items():
        plain, fast = _build(plain_fn, a.n, target), _build(fast_fn, a.n, target)
        exact = ref(x.astype(np.float64))
        fast(xt, yt)
        err = _ulp(yt.numpy(), exact)
        plain(xt, yt)
        plain_err = _ulp(yt.numpy(), exact)
        ratios, plain_ms, fast_ms = [], [], []
        for _ in range(a.rounds):  # A B A B ...
            plain_ms.append(_best_ms(plain, (xt, yt), 5))
            fast_ms.append(_best_ms(fast, (xt, yt), 5))
            ratios.append(plain_ms[-1] / fast_ms[-1])
        med_fast = float(np.median(fast_ms))
        row = {
            "function": name,
            "max_ulp": float(err.max()),
            "p999_ulp": float(np.quantile(err, 0.999)),
            "libm_max_ulp": float(plain_err.max()),
            "libm_ms": float(np.median(plain_ms)),
            "fast_ms": med_fast,
            "speedup": float(np.median(ratios)),
            "speedup_range": [float(min(ratios)), float(max(ratios))],
            "fast_gb_s": 2 * x.nbytes / med_fast / 1e6,
            "of_copy": 2 * x.nbytes / med_fast / 1e6 / copy_gbs,
        }
        rows.append(row)
        print(
            f"{name:9s} {row['max_ulp']:8.3g} {row['p999_ulp']:9.2f} {row['libm_max_ulp']:9.3g} "
            f"{row['libm_ms']:8.2f} "
            f"{row['fast_ms']:8.2f} {row['speedup']:7.1f}x {min(ratios):5.1f}-{max(ratios):<6.1f} "
            f"{row['fast_gb_s']:9.1f} {row['of_copy']:6.0%}",
            flush=True,
        )
    print(f"copy (STREAM-like, numpy, one core): {copy_gbs:.1f} GB/s")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": a.n, "copy_gb_s": copy_gbs, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

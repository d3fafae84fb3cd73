"""The target's measured profile (``harl.calibration``): measured once, kept in the store and
the machine's cache, and what makes the TVM oracle merge projections only where wide GEMMs pay."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harl import calibration
from harl.calibration import COPY_BYTES, GEMM_GRID, TargetProfile
from harlflow.core.targets import resolve_target, target_key
from tasks.rewrite_oracle import TvmOracle
from xrlflow import ir, search
from xrlflow.rules.examples import model, rand

SMALL_GRID = {"m": (1, 16), "n": (16, 64), "k": (32,)}


def test_profile_is_measured_once_and_shared_through_the_machine_cache(tmp_path, monkeypatch):
    """A store without a profile measures one (every shape of the grid, every time positive) and
    saves it in the store and the machine cache; a second store on the same machine
    takes the cached one (equal to the float: nothing measured again); an unreadable store
    profile is replaced from the cache with a warning; another target gets its own file."""
    monkeypatch.setattr(calibration, "GEMM_GRID", SMALL_GRID)
    monkeypatch.setattr(calibration, "COPY_BYTES", (4 << 10, 64 << 10))
    target, cache = resolve_target(None), tmp_path / "machine"
    first = calibration.load_or_measure(tmp_path / "a", target, cache)
    assert first.measured and first.target == target_key(target)
    assert len(first.gemm) == 4 and len(first.copy) == 2
    assert all(s > 0 and math.isfinite(s) for *_, s in first.gemm + first.copy)
    assert first.launch_s > 0
    assert {(m, n, k) for m, n, k, _ in first.gemm} == {(1, 16, 32), (1, 64, 32), (16, 16, 32),
                                                       (16, 64, 32)}  # fmt: skip
    stored = calibration.profile_path(tmp_path / "a", target)
    assert stored.is_file() and calibration.profile_path(cache, target).is_file()

    assert calibration.load_or_measure(tmp_path / "b", target, cache) == first
    stored.write_text("{not json")
    assert calibration.load_or_measure(tmp_path / "a", target, cache) == first
    assert TargetProfile.from_json(stored.read_text()) == first
    other = {**target, "num-cores": 1}
    assert calibration.profile_path(cache, other) != calibration.profile_path(cache, target)


def test_gemm_rate_interpolates_between_measured_shapes():
    """At a grid point the rate is the measured one; between two points on one axis it lies
    between theirs; outside the grid it is the edge's."""
    rates = {n: 5e9 * (1 + i) for i, n in enumerate(GEMM_GRID["n"])}
    p = _profile(lambda n: rates[n])
    n0, n1 = GEMM_GRID["n"][:2]
    m, k = GEMM_GRID["m"][1], GEMM_GRID["k"][0]
    assert p.gemm_rate(m, n0, k) == pytest.approx(rates[n0])
    assert rates[n0] < p.gemm_rate(m, (n0 * n1) ** 0.5, k) < rates[n1]
    assert p.gemm_rate(m, GEMM_GRID["n"][-1] * 8, k) == pytest.approx(rates[GEMM_GRID["n"][-1]])
    assert p.bandwidth(COPY_BYTES[0] / 4) == pytest.approx(40e9)


def _profile(rate_of_columns) -> TargetProfile:
    """A profile whose GEMM rate depends on the output columns only, copies at 40 GB/s."""
    target = resolve_target(None)
    gemm = tuple(
        (m, n, k, 2.0 * m * n * k / rate_of_columns(n))
        for m in GEMM_GRID["m"]
        for n in GEMM_GRID["n"]
        for k in GEMM_GRID["k"]
    )
    return TargetProfile(target_key(target), 1e-6, gemm, tuple((b, b / 40e9) for b in COPY_BYTES))


def _projections(d: int = 128, t: int = 64) -> ir.Graph:
    """Three projections (+ bias, ReLU) of one [1, t, d] input: attention's Q, K and V."""
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], {}, []
    for i in range(3):
        nodes += [
            ("MatMul", ["x", f"w{i}"], [f"m{i}"], None),
            ("Add", [f"m{i}", f"b{i}"], [f"a{i}"], None),
            ("Relu", [f"a{i}"], [f"y{i}"], None),
        ]
        inits |= {f"w{i}": rand(rng, d, d), f"b{i}": rand(rng, d)}
        outs.append(f"y{i}")
    return ir.check(ir.from_onnx(model(rng, nodes, {"x": [1, t, d]}, outs, inits)))


def test_tvm_oracle_merges_projections_where_the_targets_wide_gemms_pay():
    """The same three projections are merged into one GEMM on a target whose wide GEMMs run
    faster per FLOP (as on this host's: 128 -> 384 columns, +25 %) and left apart on one whose
    narrow GEMMs do; the decision follows the profile, not a rule."""
    target, g = resolve_target(None), _projections()
    merges = {"merge_qkv_projections", "merge_parallel_matmul"}

    def taken(profile: TargetProfile) -> set[str]:
        return {s.rule for s in search.greedy(g, TvmOracle(target, profile=profile)).steps}

    assert merges & taken(_profile(lambda n: 4e9 * n**0.5))
    assert not merges & taken(_profile(lambda n: 2e12 / n))

"""The side-by-side measuring protocol (harlflow.measure) on real artifacts in real worker
processes: the structure of blocks and rounds, the intervals, the gate's decision on an A/A pair,
and ``harlflow compare``. No timing thresholds: the slowed model is ~2 000× the work."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from models import slow_mlp, tiny_mlp_onnx, untuned_artifact
from services import BIN

from harlflow.measure import Runtime, bootstrap_median_ci, gate, side_by_side
from harlflow.measure.protocol import log_t_interval


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The tiny MLP's artifact, a byte-identical copy of it (A/A), and the slow model's."""
    tmp = tmp_path_factory.mktemp("measure")
    _, fast = untuned_artifact(tiny_mlp_onnx(tmp / "tiny_mlp.onnx"), tmp)
    copy = shutil.copytree(fast.directory, tmp / "copy")
    _, slow = untuned_artifact(slow_mlp(tmp / "slow.onnx"), tmp)
    return Path(fast.directory), copy, Path(slow.directory)


@pytest.mark.alone
def test_rounds_alternate_in_blocks_of_fresh_processes_and_an_aa_pair_is_promoted(artifacts):
    fast, copy, _ = artifacts
    m = side_by_side(
        [Runtime("production", "tvm", str(fast)), Runtime("new", "tvm", str(copy))],
        fast / "reference.npz",
        threads=1,
        max_seconds=0.1,  # the time limit comes first: exactly the 3 blocks every session has
        rounds_per_block=10,  # 4 let an A/A pair's median ratio reach 1.22 once
        stop=None,
    )
    assert m.stopped == "time limit" and m.blocks == 3 and len(m.rounds) == 30
    assert m.block_of == [0] * 10 + [1] * 10 + [2] * 10
    assert m.order == ["production", "new"] * 30  # A B A B ...: never two rounds of one in a row
    for r in m.rounds:
        assert {k: len(v) for k, v in r.items()} == m.calls and min(min(v) for v in r.values()) > 0
    for label in m.labels:
        e = m.estimate(label)
        assert e.ci_ms[0] <= e.median_ms <= e.ci_ms[1] and e.blocks == 3 and e.rounds == 30
    r = m.ratio("new", "production")
    assert r.ci[0] <= r.value <= r.ci[1]
    d = gate(m, max_regression=0.05)
    assert d.promote, d.describe()  # the same artifact twice is not a regression
    assert d.to_dict()["decision"] == "promote" and d.rounds == 30 and d.blocks == 3


@pytest.mark.alone
def test_compare_separates_a_slow_model_and_says_bad_input_in_one_line(artifacts, tmp_path):
    fast, _, slow = artifacts
    x = np.load(fast / "reference.npz")["input/x"]
    np.savez(tmp_path / "x.npz", x=x)  # inputs by plain name, as a user has them
    r = subprocess.run(
        [BIN / "harlflow", "compare", fast, slow, "--input", tmp_path / "x.npz", "--json",
         "--measure-seconds", "0.1", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    ratio = out["ratios_to"][str(fast)][str(slow)]
    assert ratio["ci"][0] > 10, ratio  # ~2 000× the work: separated from the first blocks on
    assert out["session"]["stopped"] == "decided" and out["session"]["blocks"] == 3
    assert set(out["latency_ms"]) == {str(fast), str(slow)}

    bad = subprocess.run(
        [BIN / "harlflow", "compare", fast, tmp_path / "x.npz"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "neither a harlflow artifact" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_intervals_cover_at_their_level():
    """The t-interval over blocks (log scale) covers the true geometric mean ~95 % of the time
    for 3 to 8 lognormal blocks; the bootstrap interval is reproducible."""
    rng = np.random.default_rng(7)
    for n in (3, 5, 8):
        hits = 0
        for _ in range(2000):
            _, lo, hi = log_t_interval(np.exp(rng.normal(0.0, 0.05, n)))
            hits += lo <= 1.0 <= hi
        assert 0.93 <= hits / 2000 <= 0.97, (n, hits)
    v = rng.normal(1.0, 0.1, 25)
    assert bootstrap_median_ci(v) == bootstrap_median_ci(v)
    lo, hi = bootstrap_median_ci(v)
    assert lo <= np.median(v) <= hi

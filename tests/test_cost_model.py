"""The attention cost model on a toy set with a known order: it learns to rank held-out
workloads, it saves and loads, and a bad file is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from harl.cost_model.dataset import FEATURES
from harl.cost_model.model import CostModel, ModelConfig, split_by_workload
from harlflow import rl
from harlflow.core.errors import BadInputError


def _toy_rows(workloads: int = 20, programs: int = 16, seed: int = 0) -> list[dict]:
    """Programs of 1-3 statements; latency falls with the sum of feature 0 (the "vector
    width") and rises with feature 1, as a real program's would with its tiling. The other
    features are zero (most of PerStoreFeature's are, for any one statement)."""
    rng = np.random.default_rng(seed)
    rows = []
    for w in range(workloads):
        for p in range(programs):
            n = int(rng.integers(1, 4))
            f = np.zeros((n, FEATURES), np.float32)
            f[:, :2] = rng.uniform(0, 8, (n, 2))
            run_us = 100 * np.exp(-0.3 * f[:, 0].sum() + 0.1 * f[:, 1].sum())
            rows.append(
                {
                    "workload": f"w{w}",
                    "target": "t",
                    "program": f"{w}-{p}",
                    "n_stores": n,
                    "features": f,
                    "run_us": float(run_us),
                    "failed": False,
                    "flop": 1e6,
                }
            )
    return rows


def test_ranks_held_out_workloads_and_round_trips(tmp_path):
    rl.setup(0)
    train, test = split_by_workload(_toy_rows(), holdout=0.2, seed=0)
    assert {r["workload"] for r in train}.isdisjoint({r["workload"] for r in test})
    model = CostModel(ModelConfig(hidden=32, epochs=40), targets=["t"])
    before = model.evaluate(test)["pairwise_accuracy"]
    curve = model.fit(train, seed=0)
    after = model.evaluate(test)
    assert curve[-1] < curve[0]
    assert after["pairwise_accuracy"] > 0.85 and after["pairwise_accuracy"] > before, after
    assert 0 < after["top1"] <= after["top5"] <= 1.0
    model.save(tmp_path / "cm.pt")
    loaded = CostModel.load(tmp_path / "cm.pt")
    np.testing.assert_allclose(loaded.predict(test), model.predict(test), rtol=1e-5)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(BadInputError, match="is not a harlflow cost model"):
        CostModel.load(tmp_path / "bad.pt")
    with pytest.raises(BadInputError, match="not found"):
        CostModel.load(tmp_path / "none.pt")

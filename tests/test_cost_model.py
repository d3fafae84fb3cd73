"""The attention cost model on a toy set with a known order: it learns to rank held-out
workloads, it saves and loads, and a bad file is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    assert model.net.calibrated and model.net.scale[0] > 1  # feature 0 spreads over 0..8
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


def test_the_recipe_before_still_learns_and_its_checkpoints_load_as_they_were():
    """The shipped model was trained with the recipe before the defaults changed (sampled
    pairs, sign-log inputs, no LayerNorm): its settings still train (online updates of that
    model use them), and a checkpoint saved before those settings existed loads as that net."""
    from harl.cost_model.model import LEGACY

    rl.setup(0)
    train, test = split_by_workload(_toy_rows(), holdout=0.2, seed=0)
    old = CostModel(ModelConfig(hidden=32, epochs=40, pairs_per_group=64, **LEGACY), ["t"])
    old.fit(train, seed=0)
    assert old.evaluate(test)["pairwise_accuracy"] > 0.85
    blob = old.checkpoint()
    for field in LEGACY:
        del blob["config"][field]
    loaded = CostModel.restore(blob)
    assert not loaded.cfg.norm and loaded.cfg.inputs == "signlog" and not loaded.net.standard
    np.testing.assert_allclose(loaded.predict(test), old.predict(test), rtol=1e-5)


def test_evaluate_known_answer_for_all_pairs_and_clearly_ordered_ones():
    from harl.cost_model.model import evaluate

    # One group: 100 and 105 µs (5 % apart) ranked the wrong way round, 200 µs ranked last.
    lats = (100.0, 105.0, 200.0)
    rows = [dict(r, run_us=lat) for r, lat in zip(_toy_rows(1, 3), lats, strict=True)]
    got = evaluate(lambda g: np.array([2.0, 3.0, 1.0]), rows)
    assert got["pairwise_accuracy"] == pytest.approx(2 / 3)
    assert got["pairwise_accuracy_10pct"] == 1.0
    assert got["pairs_10pct_share"] == pytest.approx(2 / 3)
    assert got["top1"] == pytest.approx(100 / 105) and got["top5"] == 1.0 and got["groups"] == 1


def test_pruning_drops_near_duplicates_first_and_keeps_the_extremes():
    from harl.cost_model import pruning

    rows = []
    for p in range(20):  # 16 copies of one program (tiny latency noise), 4 distinct ones
        f = np.zeros((2, FEATURES), np.float32)
        f[:, 0] = 1.0 if p < 16 else 3.0 * p
        rows.append({"workload": "w", "target": "t", "program": str(p), "features": f,
                     "run_us": 100.0 + p, "failed": False})  # fmt: skip
    kept = pruning.prune(rows, keep=0.3, seed=0)
    names = {r["program"] for r in kept}
    assert len(kept) == 6 and {"0", "19"} <= names  # the fastest and the slowest
    assert {"16", "17", "18", "19"} <= names  # every distinct program before a second copy
    assert len(pruning.random_subset(rows, keep=0.3, seed=0)) == 6
    with pytest.raises(ValueError, match="keep"):
        pruning.prune(rows, keep=0.0)


def test_the_shipped_model_loads_and_is_what_transfer_starts_from(tmp_path, monkeypatch):
    from harl.cost_model.online import PRETRAINED, create_cost_model, transfer_model_path

    monkeypatch.setenv("HARLFLOW_HOME", str(tmp_path / "home"))
    assert PRETRAINED.is_file() and PRETRAINED.stat().st_size <= 5 * 2**20
    shipped = CostModel.load(PRETRAINED)
    assert len(shipped.targets) >= 2  # pre-trained on more than one target
    assert transfer_model_path() == PRETRAINED  # no team model yet
    target = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}  # never trained on
    learned = create_cost_model("transfer", target)
    assert learned.model.targets[: len(shipped.targets)] == shipped.targets
    assert len(learned.model.targets) == len(shipped.targets) + 1
    team = tmp_path / "home" / "cost_model" / "model.pt"
    shipped.save(team)
    assert transfer_model_path() == team


def test_the_head_recipe_fine_tunes_a_new_target_with_the_body_frozen():
    """Fine-tuning a pre-trained model on a new target's records (``recipe="head"``) trains
    that target's embedding and the output layer only; the pre-trained body is unchanged."""
    rl.setup(0)
    model = CostModel(ModelConfig(hidden=32, epochs=20), targets=["t"])
    model.fit(_toy_rows(workloads=8), seed=0)
    rows = [{**r, "target": "new"} for r in _toy_rows(workloads=4, seed=1)]
    tuned = model.with_targets(["new"])
    body = {k: v.clone() for k, v in tuned.net.state_dict().items()}
    tuned.fit(rows, seed=0, epochs=3, recipe="head")
    after = tuned.net.state_dict()
    changed = {k for k in body if not torch.equal(body[k], after[k])}
    assert changed == {"target.weight", "out.weight", "out.bias"}, changed
    with pytest.raises(ValueError, match="recipe must be one of full, head"):
        tuned.fit(rows, recipe="frozen")

"""RLFlow (world model + controller trained in imagination) and the TVM cost oracle.

The world model and the controller are checked on the fire-module problem
(``rewrite_problems``), whose optimum is known by exhaustive search; the TVM oracle against the
compiled latencies it predicts.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from rewrite_problems import ORACLE, exhaustive_best, fire_module

from harlflow import rl
from harlflow.core.targets import resolve_target
from tasks.rewrite_oracle import TvmOracle
from xrlflow import ir, search
from xrlflow import rlflow as RF
from xrlflow.env import RewriteEnv
from xrlflow.verify import max_mismatch
from xrlflow.world import WorldConfig, WorldModel, collect, load_episodes, save_episodes


@pytest.fixture(scope="module")
def fire():
    g = fire_module()
    return g, exhaustive_best(g)


def test_world_model_fits_the_fire_environment(fire, tmp_path):
    """Fitted on random episodes, the world model predicts held-out episodes: rewards with under
    a third of the error of always predicting their mean, terminations with over 90% accuracy,
    legal actions with over 95%, and a lower latent NLL than before fitting. The rollouts
    dataset round-trips through its file."""
    g, _ = fire
    rl.setup(0)
    env = RewriteEnv({"fire": g}, ORACLE, max_steps=6, measure_every=3)
    model = WorldModel(WorldConfig(rules=[r.name for r in RF.R.RULES]))
    train, steps = collect(env, model.actions, 40, seed=0)
    held_out, _ = collect(env, model.actions, 12, seed=1)
    assert steps == sum(len(ep.actions) for ep in train) > 40
    save_episodes(train, tmp_path / "rollouts.pt")
    loaded = load_episodes(tmp_path / "rollouts.pt")
    assert [ep.actions for ep in loaded] == [ep.actions for ep in train]
    pairs = zip(loaded[0].states, train[0].states, strict=True)
    assert all(np.array_equal(a.x, b.x) for a, b in pairs)

    before = model.evaluate(held_out)
    history = model.fit(loaded, epochs=30, seed=0)
    after = model.evaluate(held_out)
    assert history[-1]["world/reward"] < history[0]["world/reward"]
    assert after["world/latent_nll"] < before["world/latent_nll"]
    assert after["world/reward_mae"] < after["world/reward_mae_of_mean"] / 3, after
    assert after["world/done_accuracy"] > 0.9 and after["world/mask_accuracy"] > 0.95, after


def test_ppo_in_imagination_reaches_the_fire_optimum(fire, tmp_path):
    """The controller trained in the world model finds the optimum greedy search misses, on a
    bounded number of real environment steps (the world model's random episodes plus the
    re-grounding episodes: 196-220 for seeds 0-3); the checkpoint round-trips."""
    g, best = fire
    assert search.greedy(g, ORACLE).latency_after > best * 1.01
    rl.setup(0)
    env = RewriteEnv({"fire": g}, ORACLE, max_steps=6, measure_every=3)
    agent = RF.RLFlowAgent(seed=0)
    curve = RF.train(env, agent, iterations=60, random_episodes=48, seed=0)
    assert all(np.isfinite(m["losses/policy"]) for m in curve)
    real_steps = curve[-1]["charts/real_steps"]
    assert real_steps <= 300
    found = search.policy(g, agent, ORACLE, rollouts=0, max_steps=6)  # the greedy controller
    assert found.latency_after == pytest.approx(best), found.summary()
    assert "enlarge_conv_kernel" in [s.rule for s in found.steps]
    assert max_mismatch(g, found.graph) is None

    agent.save(tmp_path / "rlflow.pt")
    again = search.policy(g, RF.RLFlowAgent.load(tmp_path / "rlflow.pt"), ORACLE, rollouts=0)
    assert [s.rule for s in again.steps] == [s.rule for s in found.steps]


def _two_matmuls(fold: bool) -> ir.Graph:
    """``(x·W1)·W2`` (two kernels, 2·16·128·512 FLOPs each) or its folded ``x·(W1·W2)`` (one
    kernel with 16·128·128·2 FLOPs): what matmul_assoc does."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((128, 512)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((512, 128)) * 0.05).astype(np.float32)
    if fold:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(w1 @ w2, "w")]
    else:
        nodes = [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["y"]),
        ]
        inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    graph = helper.make_graph(
        nodes,
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 128])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.check(ir.from_onnx(model))


def test_tvm_oracle_prices_a_folded_matmul_chain_below_the_chain():
    """Two matmuls with a constant weight chain folded into one cost less than the chain (one
    kernel fewer, half the FLOPs); the estimates are deterministic (a second oracle gives the
    same numbers) and say where each kernel's price came from. (Whether such rankings hold once
    compiled is measured by ``bench/rewrite_oracles.py``, not by a test: wall-clock.)"""
    target = resolve_target(None)
    chain, folded = _two_matmuls(False), _two_matmuls(True)
    assert max_mismatch(chain, folded) is None
    oracle = TvmOracle(target)
    est_chain, est_folded = oracle.estimate(chain), oracle.estimate(folded)
    assert est_folded < est_chain
    assert TvmOracle(target).estimate(chain) == est_chain
    assert oracle.sources(chain) == {"roofline": 2} and oracle.sources(folded) == {"roofline": 1}


def _conv_bn_relu_chain(blocks: int = 4) -> ir.Graph:
    """``blocks`` × (Conv → BatchNormalization → Relu) on a 1×8×16×16 input."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for b in range(blocks):
        arrays = {
            f"w{b}": rng.standard_normal((8, 8, 3, 3)) * 0.2,
            f"scale{b}": rng.uniform(0.5, 1.5, 8),
            f"bias{b}": rng.standard_normal(8) * 0.1,
            f"mean{b}": rng.standard_normal(8) * 0.1,
            f"var{b}": rng.uniform(0.5, 1.5, 8),
        }
        inits += [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()]
        bn = [f"scale{b}", f"bias{b}", f"mean{b}", f"var{b}"]
        nodes += [
            helper.make_node("Conv", [x, f"w{b}"], [f"c{b}"], name=f"conv{b}", pads=[1] * 4),
            helper.make_node("BatchNormalization", [f"c{b}", *bn], [f"n{b}"], name=f"bn{b}"),
            helper.make_node("Relu", [f"n{b}"], [f"r{b}"], name=f"relu{b}"),
        ]
        x = f"r{b}"
    g = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ir.check(ir.from_onnx(model))


def test_tvm_oracle_prices_a_rewrite_by_the_region_it_changed():
    """A candidate priced from its base graph and the nodes the rewrite changed (with their
    neighbours) costs what pricing the whole candidate costs, to 1 %; the region imported is a
    fraction of the graph; an unchanged graph is its base's price."""
    from tasks.rewrite_oracle import _regions
    from xrlflow import rules as R

    g = _conv_bn_relu_chain()
    oracle = TvmOracle(resolve_target(None))
    cands = {c.rule: c for c in reversed(R.candidates(g, R.RULES))}  # one of each rule
    assert {"conv_bn_fold", "bn_to_mul_add"} <= set(cands)
    for c in cands.values():
        old, new = _regions(g, c.graph)
        assert 0 < len(old) <= len(g.nodes) // 2 and len(new) <= len(c.graph.nodes) // 2
        by_region = oracle.estimate_change(g, c.graph)
        assert by_region == pytest.approx(oracle.estimate(c.graph), rel=0.01), c.rule
    assert oracle.estimate_change(g, g) == oracle.estimate(g)

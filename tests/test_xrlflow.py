"""The rewrite environment, the X-RLflow agent and the baselines on a small known problem.

The known problem is a SqueezeNet-style fire module under the deterministic FLOP oracle: its best
graph needs a *slower* first step (enlarging the 1×1 kernel so the two expand convolutions can
merge), which greedy search never takes. Its best reachable cost is found by exhaustive search.
"""

from __future__ import annotations

import numpy as np
import pytest
from rewrite_problems import ORACLE, exhaustive_best, fire_module

from harlflow import rl
from harlflow.core.errors import BadInputError
from xrlflow import agent as A
from xrlflow import rules as R
from xrlflow import search
from xrlflow.cost import OrtOracle
from xrlflow.env import RewriteEnv
from xrlflow.verify import max_mismatch


@pytest.fixture(scope="module")
def fire():
    g = fire_module()
    return g, exhaustive_best(g)


def test_env_reset_and_step_invariants(fire):
    g, _ = fire
    env = RewriteEnv({"fire": g}, ORACLE, max_steps=3, measure_every=2)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    mask = info["action_mask"]
    assert (
        mask.shape == (env.action_space.n,) and mask[0] and mask.sum() == len(obs["candidates"]) + 1
    )
    with pytest.raises(ValueError, match="not legal"):
        env.step(int(mask.sum()) + 1)
    rewards = []
    for _ in range(3):
        obs, r, term, trunc, info = env.step(1)  # always the first candidate
        rewards.append(r)
        assert obs["graph"].output_names == ["y"]
        assert max_mismatch(g, obs["graph"]) is None
        if term or trunc:
            break
    assert trunc or term
    assert len(info["steps"]) == len(rewards) <= 3
    # the return is the measured relative improvement, whatever the per-step estimates said
    final = ORACLE.measure(obs["graph"])
    assert sum(rewards) == pytest.approx((info["start_latency"] - final) / info["start_latency"])
    obs, info = env.reset(options={"model": "fire"})
    _, r, term, trunc, _ = env.step(0)  # stop at once: nothing changes, nothing earned
    assert term and not trunc and r == pytest.approx(0.0)


def test_greedy_misses_what_backtracking_and_ppo_find(fire):
    g, best = fire
    greedy = search.greedy(g, ORACLE)
    assert greedy.latency_after > best * 1.01, "the known problem must need a temporary slowdown"
    bt = search.backtracking(g, ORACLE, alpha=1.05, budget=100)
    assert bt.latency_after == pytest.approx(best)
    assert "enlarge_conv_kernel" in [s.rule for s in bt.steps]

    env = RewriteEnv({"fire": g}, ORACLE, max_steps=6, measure_every=3)
    rl.setup(0)
    agent = A.XRLflowAgent(seed=0)
    curve = []
    A.train(env, agent, iterations=40, episodes_per_iter=4, callback=lambda i, m: curve.append(m))
    assert len(curve) == 40 and all(np.isfinite(m["losses/policy"]) for m in curve)
    found = search.policy(g, agent, ORACLE, rollouts=0, max_steps=6)  # the greedy policy only
    assert found.latency_after == pytest.approx(best), found.summary()
    assert max_mismatch(g, found.graph) is None


def test_greedy_stops_pricing_at_its_deadline_with_the_graph_reached(fire):
    import time

    g, _ = fire
    unbounded = search.greedy(g, ORACLE)
    assert unbounded.steps and unbounded.summary()["stopped"] is None
    later = search.greedy(g, ORACLE, deadline=time.monotonic() + 3600)
    assert [s.rule for s in later.steps] == [s.rule for s in unbounded.steps]
    passed = search.greedy(g, ORACLE, deadline=time.monotonic())  # the budget is spent
    assert passed.summary()["stopped"] == "time budget"
    assert passed.explored == 0 and not passed.steps and passed.graph is not None


def test_agent_checkpoint_round_trip(tmp_path, fire):
    g, _ = fire
    env = RewriteEnv({"fire": g}, ORACLE)
    obs, _ = env.reset(seed=0)
    agent = A.XRLflowAgent(seed=3)
    s = agent.state(obs, ORACLE, ORACLE.estimate(g))
    agent.save(tmp_path / "agent.pt")
    loaded = A.XRLflowAgent.load(tmp_path / "agent.pt")
    (a,), _ = agent.net([s])
    (b,), _ = loaded.net([s])
    assert np.allclose(a.detach().numpy(), b.detach().numpy())
    with pytest.raises(BadInputError, match=r"agent\.pt is not a X-RLflow agent: .*rule library"):
        A.XRLflowAgent.load(tmp_path / "agent.pt", rules=R.RULES[:-1])


def test_ort_oracle_caches_operators_and_result_never_slower(fire):
    g, _ = fire
    oracle = OrtOracle(op_seconds=0.005, e2e_seconds=0.02)
    first = oracle.estimate(g)
    n = oracle.op_measurements
    assert first > 0 and n == 4  # three Relus of one shape share a signature; 2 Convs, 1 Concat
    assert oracle.estimate(g) == first and oracle.op_measurements == n
    slower = search.Result("x", g, [], 1.0, 2.0, 0.0)
    kept = search.best_of(g, slower)
    assert kept.graph is g and kept.latency_after == 1.0 and kept.notes["reverted"]


def test_an_unknown_rule_is_an_error_not_the_first_rule(fire):
    g, _ = fire
    env = RewriteEnv({"fire": g}, ORACLE)
    obs, _ = env.reset(seed=0)
    rules_seen = {c.rule for c in obs["candidates"]}
    agent = A.XRLflowAgent(rules=[r for r in R.RULES if r.name not in rules_seen])
    with pytest.raises(ValueError, match="is not in this agent's rule library"):
        agent.state(obs, ORACLE, ORACLE.estimate(g))


def test_rewrite_methods_and_oracles_are_found_by_name(fire):
    """The stage finds methods and oracles in one registry: the flops oracle by name,
    backtracking reaching at least greedy's graph on the fire module, backtracking stopping at
    a spent deadline with nothing priced, and an unknown name refused with the choices."""
    import time

    from harlflow.core.errors import BadInputError
    from tasks.rewrite_methods import METHODS, RewriteJob, lookup, make_oracle

    g, _ = fire
    judge = make_oracle("flops")
    assert judge.name == "flops"
    quiet = lambda *_: None  # noqa: E731
    greedy = METHODS["greedy"].run(RewriteJob(g, judge, log=quiet))
    best_first = METHODS["backtracking"].run(RewriteJob(g, judge, log=quiet))
    assert best_first.latency_after <= greedy.latency_after < greedy.latency_before
    spent = RewriteJob(g, judge, log=quiet, deadline=time.monotonic())
    stopped = METHODS["backtracking"].run(spent)
    assert stopped.explored == 0 and not stopped.steps
    with pytest.raises(BadInputError, match="choose one of none, greedy, backtracking"):
        lookup(METHODS, "magic", "rewrite method")

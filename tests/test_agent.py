"""The parameter-level agent: GAE known answer, PPO learns a known task, persistence, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from harl.agent import ACTION_DIM, STATE_DIM, EditAgent, EditAgentConfig, EditState
from harlflow.rl import RolloutBuffer, Sample, compute_gae, setup


def test_gae_known_answer():
    adv, ret = compute_gae(
        np.array([1.0, 1.0, 1.0]),
        np.array([0.5, 0.5, 0.5]),
        np.array([False, False, True]),
        last_value=123.0,
        gamma=0.9,
        lam=0.95,
    )
    # by hand: δ2 = 0.5; δ1 = δ0 = 1 + 0.9·0.5 − 0.5 = 0.95;
    # A1 = 0.95 + 0.855·0.5; A0 = 0.95 + 0.855·A1
    np.testing.assert_allclose(adv, [2.1277625, 1.3775, 0.5])
    np.testing.assert_allclose(ret, adv + 0.5)
    # a cut-off trajectory bootstraps from last_value
    adv2, _ = compute_gae(np.array([0.0]), np.array([0.0]), np.array([False]), 2.0, 0.9, 0.95)
    assert adv2[0] == pytest.approx(1.8)


def _bandit_episode(agent: EditAgent, rng, greedy=False):
    """State names the rewarding edit (one of a variable number); reward 1 for picking it."""
    n = int(rng.integers(3, 7))
    good = int(rng.integers(0, n))
    state = np.zeros(STATE_DIM, np.float32)
    state[good] = 1.0
    actions = np.zeros((n, ACTION_DIM), np.float32)
    actions[np.arange(n), np.arange(n)] = 1.0
    a, logp, v = agent.act(EditState(state, actions), greedy=greedy)
    return Sample(EditState(state, actions), a, logp, v, float(a == good), True)


def test_ppo_reaches_the_best_of_a_known_task():
    setup(0)
    agent = EditAgent(EditAgentConfig(lr=3e-3), seed=0)
    rng = np.random.default_rng(0)
    before = np.mean([_bandit_episode(agent, rng, greedy=True).reward for _ in range(200)])
    for _ in range(60):
        agent.update(RolloutBuffer([[_bandit_episode(agent, rng)] for _ in range(32)]))
    after = np.mean([_bandit_episode(agent, rng, greedy=True).reward for _ in range(200)])
    assert before < 0.5 and after > 0.95, (before, after)


def test_save_load_round_trip_and_seeding(tmp_path):
    a = EditAgent(seed=3)
    rng = np.random.default_rng(1)
    a.update(RolloutBuffer([[_bandit_episode(a, rng)] for _ in range(8)]))
    a.save(tmp_path / "agent.pt")
    b = EditAgent.load(tmp_path / "agent.pt", seed=3)
    assert b.updates == 1
    for k, v in a.net.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), b.net.state_dict()[k].numpy())
    # same seed, same weights → the same sampled edits
    s = np.random.default_rng(5).standard_normal(STATE_DIM).astype(np.float32)
    acts = np.random.default_rng(6).standard_normal((9, ACTION_DIM)).astype(np.float32)
    c, d = (
        EditAgent.load(tmp_path / "agent.pt", seed=11),
        EditAgent.load(tmp_path / "agent.pt", seed=11),
    )
    state = EditState(s, acts)
    assert [c.act(state)[0] for _ in range(20)] == [d.act(state)[0] for _ in range(20)]


def test_checkpoints_are_versioned_and_every_failure_names_the_file(tmp_path):
    """Every learned thing saves through one helper: a file of the format before versions (no
    header, as the shipped agent was written) still loads; another kind, a newer format, a
    pickled object and a missing file are each one BadInputError naming the file."""
    import torch

    from harlflow.core.errors import BadInputError
    from harlflow.rl import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint

    agent = EditAgent(seed=0)
    agent.updates = 7
    legacy = tmp_path / "legacy.pt"
    torch.save({"net": agent.net.state_dict(), "opt": agent.opt.state_dict(),
                "config": agent.cfg.__dict__, "updates": 7}, legacy)  # fmt: skip
    assert EditAgent.load(legacy).updates == 7

    save_checkpoint(tmp_path / "cm.pt", "harlflow cost model", {"weights": {}})
    with pytest.raises(BadInputError, match=r"cm\.pt is not a HARL agent: it is a harlflow cost"):
        EditAgent.load(tmp_path / "cm.pt")
    torch.save({"harlflow": "HARL agent", "version": CHECKPOINT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(BadInputError, match=r"new\.pt is not a HARL agent: .*format 2"):
        load_checkpoint(tmp_path / "new.pt", "HARL agent")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(BadInputError, match=r"list\.pt is not a HARL agent"):
        EditAgent.load(tmp_path / "list.pt")
    with pytest.raises(BadInputError, match=r"HARL agent file not found: .*none\.pt"):
        EditAgent.load(tmp_path / "none.pt")


def test_rollout_buffer_bootstraps_only_cut_off_trajectories():
    """The buffer hands each trajectory's own bootstrap value to GAE: an ended one's is
    ignored (its last sample is done), a cut-off one's continues its return."""
    from harlflow.rl import PPOConfig

    def traj(done: bool) -> list[Sample]:
        return [Sample(None, 0, 0.0, 0.5, 1.0, False), Sample(None, 0, 0.0, 0.5, 1.0, done)]

    buffer = RolloutBuffer([traj(True), traj(False)], [99.0, 2.0])
    assert len(buffer) == 4 and buffer.returns() == [2.0, 2.0] and buffer.lengths() == [2, 2]
    cfg = PPOConfig(gamma=0.9, gae_lambda=1.0)
    samples, adv, ret = buffer.compute(cfg)
    assert len(samples) == 4
    # ended: returns 1 + 0.9·1 and 1; cut off: 1 + 0.9·(1 + 0.9·2) and 1 + 0.9·2
    np.testing.assert_allclose(ret, [1.9, 1.0, 1 + 0.9 * 2.8, 2.8])
    np.testing.assert_allclose(adv, ret - 0.5)

"""RLFlow: a controller trained by PPO inside the world model, the real environment consulted
only where it must be.

Training (:func:`train`) reads top to bottom:

1. **Real data**: ``random_episodes`` episodes of a random agent on the real environment
   (:func:`xrlflow.world.collect`); the world model is fitted on them.
2. **Imagination**: each PPO iteration rolls ``batch`` episodes out *in the world model* at once
   (one batched LSTM step per time step). They start from real start states with their real
   action masks; after the first step the masks, rewards, terminations and next states are the
   model's. PPO (clip 0.2, γ 0.99: :mod:`harlflow.rl`) updates the controller on them.
3. **Re-grounding**: every ``ground_every`` iterations the controller plays ``ground_episodes``
   real episodes; their return is the learning curve that counts, and they join the data the
   world model is refitted on (``refit_epochs``), so it learns where the controller goes.

Every real environment step is counted (``charts/real_steps``): that is what RLFlow saves
against X-RLflow, which learns from real steps only.

The controller sees ``[z, h]``: the encoded graph and the LSTM's memory of the episode, as in
World Models; in the real environment (:func:`run_episode`), ``z`` encodes the real graph and
``h`` is stepped with the actions taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from harlflow.rl import PPOAgent, PPOConfig, RolloutBuffer, Sample
from xrlflow import rules as R
from xrlflow.agent import OPS
from xrlflow.world import Episode, WorldConfig, WorldModel, collect, real_episode

KIND = "RLFlow agent"
"""what its checkpoints say they hold (``harlflow.rl.save_checkpoint``)"""


@dataclass
class ControllerConfig(PPOConfig):
    """The controller's network and PPO settings (RLFlow: clip 0.2, γ 0.99)."""

    hidden: int = 64
    """width of the controller's hidden layer"""
    lr: float = 1e-3
    """Adam learning rate"""
    ent_coef: float = 0.02
    """entropy bonus: imagined returns are easy to over-fit"""
    temperature: float = 1.0
    """sampling temperature of the world model's next-state mixture"""


class ImaginedState(NamedTuple):
    z: torch.Tensor  # (latent,)
    h: torch.Tensor  # (rnn,)
    mask: torch.Tensor  # (actions,) bool


class Controller(nn.Module):
    def __init__(self, latent: int, rnn: int, actions: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(latent + rnn, hidden), nn.Tanh())
        self.pi = nn.Linear(hidden, actions)
        self.v = nn.Linear(hidden, 1)

    def forward(self, z, h, mask):
        x = self.body(torch.cat([z, h], dim=1))
        logits = self.pi(x).masked_fill(~mask, -1e9)
        return logits, self.v(x).squeeze(1)


class RLFlowAgent(PPOAgent):
    """The world model and the controller (:class:`harlflow.rl.PPOAgent`: the controller is
    the policy network), trained together by :func:`train`. Its ``collect`` is
    :meth:`imagine`: rollouts in the world model."""

    kind = KIND
    name = "rlflow"

    def __init__(
        self,
        world: WorldConfig | None = None,
        cfg: ControllerConfig | None = None,
        rules: list[R.Rule] | None = None,
        seed: int = 0,
    ):
        rule_names = [r.name for r in (rules or R.RULES)]
        world = world or WorldConfig()
        if not world.rules:
            world.rules = rule_names
        if world.rules != rule_names:
            raise ValueError(
                "the world model's actions index another rule library; retrain it "
                "(harlflow rewrite-train --agent rlflow)"
            )
        cfg = cfg or ControllerConfig()
        self.world = WorldModel(world)
        self.actions = self.world.actions
        controller = Controller(world.latent, world.rnn, self.actions.n, cfg.hidden)
        super().__init__(controller, cfg, seed=seed)

    @property
    def reward_scale(self) -> float:
        """Imagined rewards are the world model's predictions divided by its scale: scaled
        back for the critic."""
        return self.world.cfg.reward_scale

    # ------------------------------------------------------------------ acting
    def act(
        self, state: ImaginedState, greedy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Actions for a batch of states (``z``, ``h``, ``mask`` each with a batch dimension
        first); their log-probabilities and the states' values."""
        logits, values = self.net(*state)
        dist = torch.distributions.Categorical(logits=logits)
        if greedy:
            a = logits.argmax(1)
        else:
            a = torch.multinomial(dist.probs, 1, generator=self.gen).squeeze(1)
        return a, dist.log_prob(a), values

    def evaluate(self, samples: list[Sample]):
        z = torch.stack([s.state.z for s in samples])
        h = torch.stack([s.state.h for s in samples])
        mask = torch.stack([s.state.mask for s in samples])
        logits, values = self.net(z, h, mask)
        dist = torch.distributions.Categorical(logits=logits)
        a = torch.tensor([s.action for s in samples])
        return dist.log_prob(a), dist.entropy(), values

    # ------------------------------------------------------------------ imagination
    @torch.no_grad()
    def imagine(self, starts: list[Episode], horizon: int) -> RolloutBuffer:
        """``len(starts)`` episodes rolled out in the world model from the episodes' first
        states (real masks at the first step); the buffer of their trajectories, the ones
        still going at ``horizon`` bootstrapped from the controller's value."""
        wm = self.world
        wm.eval()
        b = len(starts)
        z = wm.encode([ep.states[0] for ep in starts])
        mask = torch.as_tensor(np.stack([ep.masks[0] for ep in starts]))
        hc = wm.initial(b)
        alive = torch.ones(b, dtype=torch.bool)
        trajs: list[list[Sample]] = [[] for _ in range(b)]
        for _ in range(horizon):
            h = hc[0]
            a, logp, v = self.act(ImaginedState(z, h, mask))
            hc = wm.step(z, a, hc)
            done = (a == 0) | (wm.done(hc[0]).squeeze(1) > 0)
            reward = wm.reward(hc[0]).squeeze(1) / wm.cfg.reward_scale
            for i in torch.nonzero(alive).flatten().tolist():
                trajs[i].append(
                    Sample(
                        ImaginedState(z[i], h[i], mask[i]),
                        int(a[i]),
                        float(logp[i]),
                        float(v[i]),
                        float(reward[i]),
                        bool(done[i]),
                    )  # fmt: skip
                )
            alive &= ~done
            if not alive.any():
                break
            z = wm.sample_next(hc[0], self.gen, self.cfg.temperature)
            mask = wm.legal(hc[0])
        last = self.act(ImaginedState(z, hc[0], mask))[2]
        return RolloutBuffer(trajs, [0.0 if not alive[i] else float(last[i]) for i in range(b)])

    def episode(self, env, *, model=None, greedy: bool = False, seed=None) -> dict:
        """One real episode on ``env`` (:func:`run_episode`); its last info
        (``search.policy``)."""
        return run_episode(env, self, model, greedy, seed)[1]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        return {
            "world_config": asdict(self.world.cfg),
            "config": asdict(self.cfg),
            "ops": OPS,
            "world": self.world.state_dict(),
            "controller": self.net.state_dict(),
        }

    @classmethod
    def restore(
        cls, blob: dict, *, rules: list[R.Rule] | None = None, seed: int = 0
    ) -> RLFlowAgent:
        if blob.get("ops") != OPS:
            raise ValueError(
                "it was trained with another operator vocabulary; retrain it "
                "(harlflow rewrite-train --agent rlflow)"
            )
        agent = cls(
            WorldConfig(**blob["world_config"]), ControllerConfig(**blob["config"]), rules, seed
        )
        agent.world.load_state_dict(blob["world"])
        agent.net.load_state_dict(blob["controller"])
        return agent


# ---------------------------------------------------------------------------- the real environment


def controller_chooser(agent: RLFlowAgent, greedy: bool):
    """``choose`` for :func:`xrlflow.world.real_episode`: the controller on ``[z, h]``, with
    ``h`` stepped by the world model's LSTM along the episode."""
    memory = {"hc": agent.world.initial(1), "z": None}

    @torch.no_grad()
    def choose(state, mask, t: int) -> int:
        if t > 0:  # the previous step's (z, action) moves the memory on
            memory["hc"] = agent.world.step(memory["z"], memory["a"], memory["hc"])
        z = agent.world.encode([state])
        state = ImaginedState(z, memory["hc"][0], torch.as_tensor(mask)[None])
        a, _, _ = agent.act(state, greedy=greedy)
        memory["z"], memory["a"] = z, a
        return int(a[0])

    return choose


def run_episode(env, agent: RLFlowAgent, model=None, greedy=False, seed=None):
    """One real episode with the controller; returns (episode, last info)."""
    agent.world.eval()
    return real_episode(env, agent.actions, controller_chooser(agent, greedy), model, seed)


# ---------------------------------------------------------------------------- training


def train(
    env,
    agent: RLFlowAgent,
    *,
    iterations: int = 30,
    random_episodes: int = 24,
    world_epochs: int = 30,
    batch: int = 32,
    ground_every: int = 10,
    ground_episodes: int = 2,
    refit_epochs: int = 5,
    horizon: int | None = None,
    seed: int = 0,
    callback: Callable[[int, dict], None] | None = None,
    on_world_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """RLFlow's training (module docstring); ``callback(iteration, metrics)`` gets the curve:
    ``charts/imagined_return`` every iteration, ``charts/real_return`` and
    ``charts/real_steps`` when grounded, the world model's ``world/...`` losses."""
    rng = np.random.default_rng(seed)
    horizon = horizon or env.max_steps

    # ---- 1. real data from a random agent; the world model fitted on it
    data, real_steps = collect(env, agent.actions, random_episodes, seed=seed)
    world = agent.world.fit(data, epochs=world_epochs, seed=seed, on_epoch=on_world_epoch)[-1]
    starts = [ep for ep in data if ep.actions]

    history = []
    for it in range(iterations):
        # ---- 2. PPO on a batch of imagined episodes
        picks = [starts[k] for k in rng.integers(len(starts), size=batch)]
        buffer = agent.imagine(picks, horizon)
        metrics = agent.update(buffer)
        metrics["charts/imagined_return"] = float(np.mean(buffer.returns()))
        metrics["charts/imagined_steps"] = float(np.mean(buffer.lengths()))

        # ---- 3. re-grounding: real episodes with the controller, the world model refitted
        if (it + 1) % ground_every == 0 or it == iterations - 1:
            real, gains = [], []
            for _ in range(ground_episodes):
                ep, info = run_episode(env, agent, seed=int(rng.integers(2**31)))
                real.append(ep)
                gains.append(1 - info["best"][0] / info["start_latency"])
            real_steps += sum(len(ep.actions) for ep in real)
            metrics["charts/real_return"] = float(np.mean([sum(ep.rewards) for ep in real]))
            metrics["charts/mean_best_gain"] = float(np.mean(gains))
            data += real
            starts += [ep for ep in real if ep.actions]
            world = agent.world.fit(data, epochs=refit_epochs, seed=seed + it)[-1]
        metrics["charts/real_steps"] = float(real_steps)
        metrics |= world
        history.append(metrics)
        if callback:
            callback(it, metrics)
    return history

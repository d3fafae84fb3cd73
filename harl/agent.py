"""The parameter-level agent: an actor-critic that scores a variable set of decision edits.

A state is a fixed-size vector (pooled program features + decision encoding + search context);
an action is one edit of one sampling decision, described by a fixed-size feature vector. The
actor scores each (state, action) pair and a softmax over the legal edits gives the policy, so
one network serves every sketch of every task however many decisions it has. Trained with PPO
(clipped objective, GAE) on the trajectories the search strategy collects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

STATE_DIM = 2 * 164 + 24 + 4  # PerStoreFeature mean+max, decision encoding, search context
ACTION_DIM = 12


@dataclass
class PPOConfig:
    """Hyperparameters of the parameter-level agent."""

    hidden: int = 128
    """width of the state and action encoders"""
    lr: float = 3e-4
    """Adam learning rate"""
    gamma: float = 0.9
    """discount: edit episodes are short, late rewards matter less"""
    gae_lambda: float = 0.95
    """GAE λ: bias/variance trade-off of the advantage"""
    clip_coef: float = 0.2
    """PPO ratio clipping"""
    ent_coef: float = 0.01
    """entropy bonus: keeps edits diverse"""
    vf_coef: float = 0.5
    """value-loss weight"""
    update_epochs: int = 4
    """passes over each batch of transitions"""
    max_grad_norm: float = 0.5
    """gradient clipping"""


class Transition(NamedTuple):
    """One step of one trajectory, as stored in the rollout buffer."""

    state: np.ndarray  # (STATE_DIM,)
    actions: np.ndarray  # (n_actions, ACTION_DIM): the legal edits at this state
    action: int  # index of the edit taken
    logprob: float
    value: float
    reward: float
    done: bool


def compute_gae(rewards: np.ndarray, values: np.ndarray, dones: np.ndarray, last_value: float,
                gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Generalised advantage estimation over one trajectory (CleanRL's recursion).

    ``dones[t]`` is True when the episode ended after step ``t``; ``last_value`` bootstraps a
    trajectory cut off before its end. Returns (advantages, returns).
    """
    n = len(rewards)
    adv = np.zeros(n, dtype=np.float64)
    last = 0.0
    for t in reversed(range(n)):
        next_value = last_value if t == n - 1 else values[t + 1]
        nonterminal = 0.0 if dones[t] else 1.0
        delta = rewards[t] + gamma * next_value * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values


class ActorCritic(nn.Module):
    """Scores each legal edit against the state; the critic values the state."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.state_enc = nn.Sequential(
            nn.Linear(STATE_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.action_enc = nn.Sequential(nn.Linear(ACTION_DIM, hidden), nn.Tanh())
        self.actor = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.critic = nn.Linear(hidden, 1)

    def logits(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """state (STATE_DIM,), actions (n, ACTION_DIM) → logits (n,)."""
        s = self.state_enc(state).expand(actions.shape[0], -1)
        return self.actor(torch.cat([s, self.action_enc(actions)], dim=-1)).squeeze(-1)

    def value(self, state: torch.Tensor) -> torch.Tensor:
        return self.critic(self.state_enc(state)).squeeze(-1)


class EditAgent:
    """Policy + PPO update + persistence. Seeded: same seed, same sampled edits."""

    def __init__(self, config: PPOConfig | None = None, *, seed: int = 0):
        self.config = config or PPOConfig()
        torch.manual_seed(seed)
        self.net = ActorCritic(self.config.hidden)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.config.lr, eps=1e-5)
        self.rng = torch.Generator().manual_seed(seed)
        self.updates = 0

    @torch.no_grad()
    def act(
        self, state: np.ndarray, actions: np.ndarray, greedy: bool = False
    ) -> tuple[int, float, float]:
        """Pick an edit: (index, log-probability, state value)."""
        s = torch.as_tensor(state, dtype=torch.float32)
        logits = self.net.logits(s, torch.as_tensor(actions, dtype=torch.float32))
        probs = torch.softmax(logits, dim=-1)
        a = (
            int(torch.argmax(probs))
            if greedy
            else int(torch.multinomial(probs, 1, generator=self.rng))
        )
        return a, float(torch.log(probs[a] + 1e-12)), float(self.net.value(s))

    def update(self, trajectories: list[list[Transition]]) -> dict[str, float]:
        """One PPO update on complete or cut-off trajectories; returns CleanRL-style metrics."""
        cfg = self.config
        batch: list[tuple[Transition, float, float]] = []
        for traj in trajectories:
            if not traj:
                continue
            rewards = np.array([t.reward for t in traj])
            values = np.array([t.value for t in traj])
            dones = np.array([t.done for t in traj])
            last_value = 0.0 if traj[-1].done else traj[-1].value
            adv, ret = compute_gae(rewards, values, dones, last_value, cfg.gamma, cfg.gae_lambda)
            batch += list(zip(traj, adv, ret, strict=True))
        if len(batch) < 2:
            return {}
        advs = torch.tensor([b[1] for b in batch], dtype=torch.float32)
        advs = (advs - advs.mean()) / (advs.std() + 1e-8)
        rets = torch.tensor([b[2] for b in batch], dtype=torch.float32)
        old_logp = torch.tensor([b[0].logprob for b in batch], dtype=torch.float32)
        states = torch.as_tensor(np.stack([b[0].state for b in batch]), dtype=torch.float32)
        metrics: dict[str, float] = {}
        for _ in range(cfg.update_epochs):
            logps, ents = [], []
            for i, (t, _, _) in enumerate(batch):
                logits = self.net.logits(states[i], torch.as_tensor(t.actions, dtype=torch.float32))
                logp_all = torch.log_softmax(logits, dim=-1)
                logps.append(logp_all[t.action])
                ents.append(-(logp_all.exp() * logp_all).sum())
            logp = torch.stack(logps)
            entropy = torch.stack(ents).mean()
            values = self.net.value(states)

            # ---- policy loss: PPO's clipped surrogate
            ratio = (logp - old_logp).exp()
            pg_loss = torch.max(
                -advs * ratio, -advs * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)
            ).mean()
            # ---- value loss
            v_loss = 0.5 * ((values - rets) ** 2).mean()
            # ---- total, with an entropy bonus
            loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss

            self.opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm)
            self.opt.step()
            with torch.no_grad():
                approx_kl = ((ratio - 1) - (logp - old_logp)).mean()
            metrics = {"losses/policy": pg_loss.item(), "losses/value": v_loss.item(),
                       "losses/entropy": entropy.item(), "losses/approx_kl": approx_kl.item()}  # fmt: skip
        self.updates += 1
        return metrics

    def save(self, path: str | Path) -> None:
        """Weights, optimiser state and config (a plain state dict: loadable with weights_only)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({"net": self.net.state_dict(), "opt": self.opt.state_dict(),
                    "config": asdict(self.config), "updates": self.updates}, tmp)  # fmt: skip
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, *, seed: int = 0) -> EditAgent:
        state = torch.load(path, map_location="cpu", weights_only=True)
        agent = cls(PPOConfig(**state["config"]), seed=seed)
        agent.net.load_state_dict(state["net"])
        agent.opt.load_state_dict(state["opt"])
        agent.updates = int(state["updates"])
        return agent

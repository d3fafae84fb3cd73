"""The parameter-level agent: an actor-critic that scores a variable set of decision edits.

A state is a fixed-size vector (pooled program features + decision encoding + search context);
an action is one edit of one sampling decision, described by a fixed-size feature vector. The
actor scores each (state, action) pair and a softmax over the legal edits gives the policy, so
one network serves every sketch of every task however many decisions it has. Trained with PPO
(:mod:`harlflow.rl`) on the trajectories the search strategy collects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from harlflow.rl import PPOAgent, PPOConfig, Sample

PRETRAINED = Path(__file__).with_name("pretrained_agent.pt")
"""the agent pre-trained offline against the shipped cost model (``harlflow harl-train``; the
README names the command that regenerates it): where a HARL run with no agent of its own starts"""

KIND = "HARL agent"
STATE_DIM = 2 * 164 + 24 + 4  # PerStoreFeature mean+max, decision encoding, search context
ACTION_DIM = 12


@dataclass
class EditAgentConfig(PPOConfig):
    """Hyperparameters of the parameter-level agent."""

    hidden: int = 128
    """width of the state and action encoders"""
    gamma: float = 0.9
    """discount: edit episodes are short, late rewards matter less"""


class EditState(NamedTuple):
    """What the agent sees at one step: the schedule's state vector and its legal edits."""

    features: np.ndarray
    """(STATE_DIM,): pooled program features, decision encoding, search context"""
    edits: np.ndarray
    """(n_edits, ACTION_DIM): one feature row per legal edit"""


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


class EditAgent(PPOAgent):
    """HARL's parameter-level agent (:class:`harlflow.rl.PPOAgent`): the actor-critic over
    variable sets of edits; the search strategy collects its walks into a
    :class:`~harlflow.rl.RolloutBuffer`."""

    kind = KIND
    name = "harl"

    def __init__(self, cfg: EditAgentConfig | None = None, *, seed: int = 0):
        cfg = cfg or EditAgentConfig()
        super().__init__(ActorCritic(cfg.hidden), cfg, seed=seed, adam_eps=1e-5)

    @torch.no_grad()
    def act(self, state: EditState, greedy: bool = False) -> tuple[int, float, float]:
        """Pick an edit: (index, log-probability, state value)."""
        s = torch.as_tensor(state.features, dtype=torch.float32)
        logits = self.net.logits(s, torch.as_tensor(state.edits, dtype=torch.float32))
        probs = torch.softmax(logits, dim=-1)
        if greedy:
            a = int(torch.argmax(probs))
        else:
            a = int(torch.multinomial(probs, 1, generator=self.gen))
        return a, float(torch.log(probs[a] + 1e-12)), float(self.net.value(s))

    def evaluate(self, samples: list[Sample]) -> tuple[torch.Tensor, ...]:
        """Log-probabilities of the edits taken, policy entropies and state values, under the
        current weights (one softmax per sample: each has its own set of legal edits)."""
        logps, ents = [], []
        for s in samples:
            feats = torch.as_tensor(s.state.features, dtype=torch.float32)
            edits = torch.as_tensor(s.state.edits, dtype=torch.float32)
            logp_all = torch.log_softmax(self.net.logits(feats, edits), dim=-1)
            logps.append(logp_all[s.action])
            ents.append(-(logp_all.exp() * logp_all).sum())
        states = torch.as_tensor(np.stack([s.state.features for s in samples]), dtype=torch.float32)
        return torch.stack(logps), torch.stack(ents), self.net.value(states)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        """Weights, optimiser state, config and update count."""
        return {
            "net": self.net.state_dict(),
            "opt": self.opt.state_dict(),
            "config": asdict(self.cfg),
            "updates": self.updates,
        }

    @classmethod
    def restore(cls, blob: dict, *, seed: int = 0) -> EditAgent:
        agent = cls(EditAgentConfig(**blob["config"]), seed=seed)
        agent.net.load_state_dict(blob["net"])
        agent.opt.load_state_dict(blob["opt"])
        agent.updates = int(blob["updates"])
        return agent

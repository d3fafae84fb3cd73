"""RLFlow's world model of the rewrite environment: what the agent imagines instead of stepping.

RLFlow (Parker, Alabed, Yoneki, 2022) learns the rewrite environment and trains its controller
inside the learned model, where a rollout is a few small matrix products instead of candidate
generation and latency measurement. The pieces, as in its reference design:

- **Actions** (:class:`ActionSpace`): a fixed set, ``0`` = stop and ``(rule, slot)`` = the
  ``slot``-th place (in graph order) where ``rule`` applies, ``slots`` per rule. Places beyond
  the last slot are not reachable by this agent.
- **Encoder**: the X-RLflow GAT (:func:`xrlflow.agent.gat_pool`) to a ``latent``-dimensional
  state ``z`` (32). Decoder heads keep ``z`` informative: the graph's operator counts and cost
  (``summary``) and which actions are legal in it (``mask``).
- **Dynamics**: an MDN-RNN, an LSTM (256 units) over ``(z_t, action embedding)``, whose hidden
  state ``h_{t+1}`` gives a mixture of ``gaussians`` (8) diagonal Gaussians over ``z_{t+1}``,
  the reward of the step, whether the episode ended (*stop* always ends it; the head learns when
  no rule applies any more) and which actions are legal next.
- **Data** (:func:`collect`): real episodes of a random agent (or of a controller), stored as a
  dataset (:func:`save_episodes`); :meth:`WorldModel.fit` trains on them and
  :meth:`WorldModel.evaluate` reports the prediction error on held-out episodes: latent NLL,
  reward MAE (beside the MAE of always predicting the mean reward), termination and mask accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from harlflow.core.files import replacing
from xrlflow import rules as R
from xrlflow.agent import (
    EDGE_DIM,
    GLOBAL_DIM,
    NODE_DIM,
    OPS,
    GATLayer,
    GraphTensors,
    featurize,
    gat_pool,
)

SUMMARY_DIM = len(OPS) + 1 + GLOBAL_DIM


class ActionSpace:
    """``0`` stop; ``1 + rule * slots + slot``: the ``slot``-th candidate of ``rule``."""

    def __init__(self, rule_names: list[str], slots: int = 4):
        self.rule_names, self.slots = list(rule_names), slots
        self._index = {n: i for i, n in enumerate(self.rule_names)}
        self.n = 1 + len(self.rule_names) * slots

    def of(self, candidates: list[R.Candidate]) -> tuple[list[int | None], np.ndarray]:
        """Each candidate's action id (None when beyond its rule's slots) and the legal mask."""
        seen: dict[str, int] = {}
        ids: list[int | None] = []
        mask = np.zeros(self.n, dtype=bool)
        mask[0] = True
        for c in candidates:
            k = seen.get(c.rule, 0)
            seen[c.rule] = k + 1
            r = self._index.get(c.rule)
            if r is None or k >= self.slots:
                ids.append(None)
                continue
            ids.append(1 + r * self.slots + k)
            mask[ids[-1]] = True
        return ids, mask

    def describe(self, action: int) -> str:
        if action == 0:
            return "stop"
        r, k = divmod(action - 1, self.slots)
        return f"{self.rule_names[r]}[{k}]"


class Episode(NamedTuple):
    """One real episode: ``states[t]`` (featurised) and ``masks[t]`` (its legal actions);
    ``actions[t]``, ``rewards[t]`` and ``dones[t]`` of the step from ``states[t]`` to
    ``states[t+1]``."""

    states: list[GraphTensors]
    masks: list[np.ndarray]
    actions: list[int]
    rewards: list[float]
    dones: list[bool]


@dataclass
class WorldConfig:
    """The world model's sizes and training settings (RLFlow's reference sizes)."""

    hidden: int = 64
    """width of the GAT's node embeddings"""
    layers: int = 3
    """GAT message-passing steps"""
    latent: int = 32
    """size of the graph state ``z``"""
    action_dim: int = 16
    """size of an action's embedding"""
    rnn: int = 256
    """LSTM units"""
    gaussians: int = 8
    """mixture components of the next-state density"""
    lr: float = 1e-3
    """Adam learning rate"""
    reward_scale: float = 10.0
    """rewards are relative improvements (~0.01): scaled for the regression"""
    slots: int = 4
    """candidates per rule the action space reaches"""
    rules: list[str] = field(default_factory=list)
    """the rule library the actions index"""


class WorldModel(nn.Module):
    def __init__(self, cfg: WorldConfig):
        super().__init__()
        self.cfg = cfg
        self.actions = ActionSpace(cfg.rules, cfg.slots)
        d, z = cfg.hidden, cfg.latent
        # ---- encoder: GAT → z
        self.inp = nn.Linear(NODE_DIM, d)
        self.gat = nn.ModuleList(GATLayer(d) for _ in range(cfg.layers))
        self.to_z = nn.Sequential(nn.Linear(2 * d + GLOBAL_DIM, z), nn.Tanh())
        self.summary = nn.Linear(z, SUMMARY_DIM)
        self.mask = nn.Sequential(nn.Linear(z, d), nn.Tanh(), nn.Linear(d, self.actions.n))
        # ---- dynamics: MDN-RNN over (z, action)
        self.embed_action = nn.Embedding(self.actions.n, cfg.action_dim)
        self.rnn = nn.LSTMCell(z + cfg.action_dim, cfg.rnn)
        self.mdn = nn.Linear(cfg.rnn, cfg.gaussians * (1 + 2 * z))
        self.reward = nn.Linear(cfg.rnn, 1)
        self.done = nn.Linear(cfg.rnn, 1)
        self.next_mask = nn.Linear(cfg.rnn, self.actions.n)
        self.opt = torch.optim.Adam(self.parameters(), lr=cfg.lr)

    # ------------------------------------------------------------------ pieces
    def encode(self, graphs: list[GraphTensors]) -> torch.Tensor:
        return self.to_z(gat_pool(self.inp, self.gat, graphs))

    def initial(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(batch, self.cfg.rnn), torch.zeros(batch, self.cfg.rnn)

    def step(self, z, actions, hc):
        """One LSTM step from ``z`` taking ``actions``: the new ``(h, c)``."""
        return self.rnn(torch.cat([z, self.embed_action(actions)], dim=1), hc)

    def mixture(self, h):
        """The next-state mixture: log weights ``(B, G)``, means and log std-devs ``(B, G, z)``."""
        g, z = self.cfg.gaussians, self.cfg.latent
        out = self.mdn(h)
        logpi = torch.log_softmax(out[:, :g], dim=1)
        mu = out[:, g : g + g * z].reshape(-1, g, z)
        logsig = out[:, g + g * z :].reshape(-1, g, z).clamp(-5, 2)
        return logpi, mu, logsig

    def sample_next(self, h, gen: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
        logpi, mu, logsig = self.mixture(h)
        k = torch.multinomial(torch.softmax(logpi / temperature, 1), 1, generator=gen).squeeze(1)
        rows = torch.arange(len(k))
        noise = torch.randn(mu[rows, k].shape, generator=gen)
        return mu[rows, k] + noise * logsig[rows, k].exp() * math.sqrt(temperature)

    def legal(self, h) -> torch.Tensor:
        """The legal actions of the states the LSTM's ``h`` led to, as predicted (stop always
        legal). Predicted from ``h`` rather than from a sampled ``z``: a sample off the data's
        manifold would otherwise forbid every action."""
        m = self.next_mask(h) > 0
        m[:, 0] = True
        return m

    # ------------------------------------------------------------------ training
    def _losses(self, episodes: list[Episode]) -> dict[str, torch.Tensor]:
        """Mean losses over every state and transition of ``episodes`` (one batch)."""
        states = [s for ep in episodes for s in ep.states]
        z_all = self.encode(states)
        summary = torch.stack([_summary(s) for s in states])
        masks = torch.as_tensor(
            np.stack([m for ep in episodes for m in ep.masks]), dtype=torch.float32
        )
        losses = {
            "summary": ((self.summary(z_all) - summary) ** 2).mean(),
            "mask": nn.functional.binary_cross_entropy_with_logits(self.mask(z_all), masks),
        }
        # transitions, stepped in lockstep across the episodes (padded ones masked out)
        starts = np.cumsum([0] + [len(ep.states) for ep in episodes])[:-1]
        horizon = max(len(ep.actions) for ep in episodes)
        hc = self.initial(len(episodes))
        nll, rew, done, moves, legal = [], [], [], [], []
        for t in range(horizon):
            alive = [i for i, ep in enumerate(episodes) if t < len(ep.actions)]
            if not alive:
                break
            idx = torch.tensor([int(starts[i]) + t for i in alive])
            a = torch.tensor([episodes[i].actions[t] for i in alive])
            rows = torch.tensor(alive)
            h, c = self.step(z_all[idx], a, (hc[0][rows], hc[1][rows]))
            hc = (hc[0].index_copy(0, rows, h), hc[1].index_copy(0, rows, c))
            logpi, mu, logsig = self.mixture(h)
            target = z_all[idx + 1].detach()[:, None, :]
            log_n = (
                -0.5 * (((target - mu) / logsig.exp()) ** 2) - logsig - 0.5 * math.log(2 * math.pi)
            )
            nll.append(-torch.logsumexp(logpi + log_n.sum(-1), dim=1))
            r = torch.tensor([episodes[i].rewards[t] for i in alive]) * self.cfg.reward_scale
            rew.append((self.reward(h).squeeze(1) - r) ** 2)
            # stop always ends the episode (known, not learned): the head learns the rest, the
            # end of a rewrite sequence when no rule applies any more
            d = torch.tensor([float(episodes[i].dones[t]) for i in alive])
            moved = (a != 0).float()
            done.append(
                moved
                * nn.functional.binary_cross_entropy_with_logits(
                    self.done(h).squeeze(1), d, reduction="none"
                )
            )
            moves.append(moved)
            legal.append(
                nn.functional.binary_cross_entropy_with_logits(
                    self.next_mask(h), masks[idx + 1], reduction="none"
                ).mean(1)
            )
        losses["latent_nll"] = torch.cat(nll).mean() / self.cfg.latent
        losses["reward"] = torch.cat(rew).mean()
        losses["done"] = torch.cat(done).sum() / torch.cat(moves).sum().clamp(min=1)
        losses["next_mask"] = torch.cat(legal).mean()
        return losses

    def fit(
        self,
        episodes: list[Episode],
        epochs: int = 30,
        batch: int = 16,
        seed: int = 0,
        on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Train on ``episodes`` (those with at least one step); the mean losses per epoch."""
        episodes = [ep for ep in episodes if ep.actions]
        rng = np.random.default_rng(seed)
        history = []
        self.train()
        for epoch in range(epochs):
            order = rng.permutation(len(episodes))
            sums: dict[str, float] = {}
            for i in range(0, len(order), batch):
                losses = self._losses([episodes[j] for j in order[i : i + batch]])
                total = sum(losses.values())
                self.opt.zero_grad()
                total.backward()
                nn.utils.clip_grad_norm_(self.parameters(), 1.0)
                self.opt.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item() / math.ceil(len(order) / batch)
            metrics = {f"world/{k}": v for k, v in sums.items()}
            history.append(metrics)
            if on_epoch:
                on_epoch(epoch, metrics)
        return history

    @torch.no_grad()
    def evaluate(self, episodes: list[Episode]) -> dict[str, float]:
        """Prediction error on (held-out) ``episodes``: latent NLL per dimension, reward MAE (in
        the environment's units) beside the MAE of predicting their mean reward, termination
        accuracy and per-action mask accuracy."""
        episodes = [ep for ep in episodes if ep.actions]
        self.eval()
        losses = self._losses(episodes)
        rewards, predicted, done_hits, mask_hits = [], [], [], []
        for ep in episodes:
            z = self.encode(ep.states)
            mask_hits.append(((self.mask(z) > 0).numpy() == np.stack(ep.masks)).mean())
            hc = self.initial(1)
            for t, a in enumerate(ep.actions):
                hc = self.step(z[t : t + 1], torch.tensor([a]), hc)
                predicted.append(float(self.reward(hc[0])) / self.cfg.reward_scale)
                rewards.append(ep.rewards[t])
                ended = a == 0 or float(self.done(hc[0])) > 0
                done_hits.append(ended == ep.dones[t])
        rewards, predicted = np.array(rewards), np.array(predicted)
        return {
            "world/latent_nll": float(losses["latent_nll"]),
            "world/reward_mae": float(np.abs(rewards - predicted).mean()),
            "world/reward_mae_of_mean": float(np.abs(rewards - rewards.mean()).mean()),
            "world/done_accuracy": float(np.mean(done_hits)),
            "world/mask_accuracy": float(np.mean(mask_hits)),
        }

    def config(self) -> dict:
        return asdict(self.cfg)


def _summary(s: GraphTensors) -> torch.Tensor:
    """What the decoder reconstructs: log operator counts and the graph's global features."""
    return torch.cat([torch.log1p(s.x[:, : len(OPS) + 1].sum(0)), s.glob])


# ---------------------------------------------------------------------------- data


def real_episode(
    env, actions: ActionSpace, choose, model: str | None = None, seed: int | None = None
):
    """One episode in the real environment; ``choose(state, mask, z_index)`` → action id (see
    :func:`collect`). Returns the :class:`Episode` and the environment's last info."""
    obs, info = env.reset(seed=seed, options={"model": model} if model else None)
    base = env.oracle.estimate(env.graphs[info["model"]])
    states, masks, acts, rewards, dones = [], [], [], [], []
    while True:
        state = featurize(obs["graph"], env.oracle, base)
        ids, mask = actions.of(obs["candidates"])
        states.append(state)
        masks.append(mask)
        a = int(choose(state, mask, len(acts)))
        env_action = 0 if a == 0 else ids.index(a) + 1
        obs, r, term, trunc, info = env.step(env_action)
        acts.append(a)
        rewards.append(float(r))
        dones.append(bool(term))
        if term or trunc:
            states.append(featurize(obs["graph"], env.oracle, base))
            masks.append(actions.of(obs["candidates"])[1])
            return Episode(states, masks, acts, rewards, dones), info


def random_chooser(rng: np.random.Generator, stop_weight: float = 0.1):
    """A random agent: a legal action uniformly, stopping with probability ``stop_weight``."""

    def choose(_state, mask, _t) -> int:
        legal = np.flatnonzero(mask[1:]) + 1
        if len(legal) == 0 or rng.random() < stop_weight:
            return 0
        return int(rng.choice(legal))

    return choose


def collect(env, actions: ActionSpace, episodes: int, seed: int = 0) -> tuple[list[Episode], int]:
    """``episodes`` random-agent episodes on ``env``'s models; also the real steps taken."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        ep, _ = real_episode(env, actions, random_chooser(rng), seed=int(rng.integers(2**31)))
        out.append(ep)
    return out, sum(len(ep.actions) for ep in out)


def save_episodes(episodes: list[Episode], path: str | Path) -> None:
    """The dataset as one torch file (tensors and lists only: loads with ``weights_only``)."""
    blob = [
        {
            "states": [tuple(s) for s in ep.states],
            "masks": [torch.from_numpy(m) for m in ep.masks],
            "actions": ep.actions,
            "rewards": ep.rewards,
            "dones": ep.dones,
        }
        for ep in episodes
    ]
    with replacing(path) as tmp:
        torch.save({"version": 1, "dims": [NODE_DIM, EDGE_DIM, GLOBAL_DIM], "episodes": blob}, tmp)


def load_episodes(path: str | Path) -> list[Episode]:
    blob = torch.load(str(path), weights_only=True)
    if blob.get("dims") != [NODE_DIM, EDGE_DIM, GLOBAL_DIM]:
        raise ValueError(f"{path}: rollouts featurised for another encoder; collect them again")
    return [
        Episode(
            [GraphTensors(*s) for s in ep["states"]],
            [m.numpy() for m in ep["masks"]],
            list(ep["actions"]),
            list(ep["rewards"]),
            list(ep["dones"]),
        )
        for ep in blob["episodes"]
    ]

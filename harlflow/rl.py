"""The reinforcement-learning pieces HARL and X-RLflow share: rollout samples, generalised
advantage estimation, the PPO update with its metric names, and seeding.

Each agent keeps its own network and its own state type; it hands :func:`ppo_update` a function
that re-evaluates a batch of samples under the current weights (log-probabilities of the actions
taken, policy entropies, state values). The update then reads as CleanRL's ``ppo.py``: clipped
policy loss, value loss, entropy bonus, one gradient step per epoch, and metrics named by group
(``losses/policy``, ``losses/value``, ``losses/entropy``, ``losses/approx_kl``,
``losses/clipfrac``; agents add their own ``charts/...``).

Every learned thing (the three agents, the cost model) saves and loads through
:func:`save_checkpoint` / :func:`load_checkpoint`: weights-only, versioned, one error naming the
file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from harlflow.core.errors import loading
from harlflow.core.files import replacing


class Sample(NamedTuple):
    """One step of one trajectory, as the rollout buffer stores it."""

    state: Any
    """what the policy saw (each agent has its own named state type)"""
    action: int
    """index of the action taken"""
    logprob: float
    """its log-probability under the policy that took it"""
    value: float
    """the critic's value of ``state`` then"""
    reward: float
    done: bool
    """the episode ended after this step"""


@dataclass
class PPOConfig:
    """PPO's hyperparameters (each agent's config extends these with its network's)."""

    lr: float = 3e-4
    """Adam learning rate"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE λ: bias/variance trade-off of the advantage"""
    clip_coef: float = 0.2
    """PPO ratio clipping"""
    ent_coef: float = 0.01
    """entropy bonus: keeps the policy exploring"""
    vf_coef: float = 0.5
    """value-loss weight"""
    update_epochs: int = 4
    """passes over each batch of samples"""
    max_grad_norm: float = 0.5
    """gradient clipping"""


def setup(seed: int, *, threads: int = 1) -> None:
    """Once per run, by the run's entry point: seed torch's global RNG (network initialisation)
    and set torch's intra-op threads.

    The agents' networks are small: extra threads only spin against each other and against
    TVM's build workers (measured: a GAT layer's ``index_add`` ran 20x slower with two threads
    on a busy 2-core machine). Agents never touch this process-wide state themselves; each
    keeps a private generator for the actions it samples.
    """
    torch.manual_seed(seed)
    torch.set_num_threads(threads)


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    dones: np.ndarray,
    last_value: float,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
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


def advantages(
    trajectories: Sequence[Sequence[Sample]],
    last_values: Sequence[float],
    cfg: PPOConfig,
    reward_scale: float = 1.0,
) -> tuple[list[Sample], np.ndarray, np.ndarray]:
    """GAE over each trajectory (``last_values`` bootstrap the cut-off ones); returns the samples
    flattened in order, their advantages and their returns. Empty trajectories are skipped."""
    samples: list[Sample] = []
    advs, rets = [], []
    for traj, last in zip(trajectories, last_values, strict=True):
        if not traj:
            continue
        rewards = np.array([s.reward * reward_scale for s in traj])
        values = np.array([s.value for s in traj])
        dones = np.array([s.done for s in traj])
        a, r = compute_gae(rewards, values, dones, last, cfg.gamma, cfg.gae_lambda)
        samples += traj
        advs.append(a)
        rets.append(r)
    if not samples:
        return [], np.zeros(0), np.zeros(0)
    return samples, np.concatenate(advs), np.concatenate(rets)


Evaluate = Callable[[list[Sample]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""samples → (log-probability of each sample's action, policy entropy, state value), each (n,),
under the network's current weights"""


def ppo_update(
    evaluate: Evaluate,
    optimizer: torch.optim.Optimizer,
    parameters: Sequence[nn.Parameter],
    samples: list[Sample],
    adv: np.ndarray,
    returns: np.ndarray,
    cfg: PPOConfig,
) -> dict[str, float]:
    """``cfg.update_epochs`` PPO steps on one batch; the last epoch's losses as metrics."""
    advs = torch.as_tensor(adv, dtype=torch.float32)
    if len(advs) > 1:
        advs = (advs - advs.mean()) / (advs.std() + 1e-8)
    rets = torch.as_tensor(returns, dtype=torch.float32)
    old_logp = torch.tensor([s.logprob for s in samples], dtype=torch.float32)
    metrics: dict[str, float] = {}
    for _ in range(cfg.update_epochs):
        logp, entropy, values = evaluate(samples)
        log_ratio = logp - old_logp
        ratio = log_ratio.exp()

        # ---- policy loss: PPO's clipped surrogate
        pg_loss = torch.max(
            -advs * ratio, -advs * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)
        ).mean()
        # ---- value loss
        v_loss = 0.5 * ((values - rets) ** 2).mean()
        # ---- entropy bonus, and the total
        ent = entropy.mean()
        loss = pg_loss - cfg.ent_coef * ent + cfg.vf_coef * v_loss

        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm)
        optimizer.step()
        with torch.no_grad():
            approx_kl = ((ratio - 1) - log_ratio).mean()
            clipfrac = ((ratio - 1).abs() > cfg.clip_coef).float().mean()
        metrics = {
            "losses/policy": pg_loss.item(),
            "losses/value": v_loss.item(),
            "losses/entropy": ent.item(),
            "losses/approx_kl": approx_kl.item(),
            "losses/clipfrac": clipfrac.item(),
        }
    return metrics


# ---------------------------------------------------------------------------------- checkpoints
CHECKPOINT_VERSION = 1
"""the format :func:`save_checkpoint` writes; files without a header are format 0 (before it)"""


def save_checkpoint(path: str | Path, kind: str, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, strings and lists or dicts of them: what
    ``torch.load(weights_only=True)`` reads back, never pickled code) as a ``kind`` checkpoint
    ("HARL agent", "X-RLflow agent", ...), with the format version, in one rename."""
    with replacing(path) as tmp:
        torch.save({"harlflow": kind, "version": CHECKPOINT_VERSION, **state}, tmp)


def load_checkpoint(path: str | Path, kind: str) -> dict[str, Any]:
    """The state a ``kind`` checkpoint holds. Files of format 0 (no header) load as they are.
    A missing, corrupt or foreign file, another kind or a newer format is one
    :class:`~harlflow.core.errors.BadInputError` naming the file; a loader that finds the state
    does not fit (another rule library, ...) raises ``ValueError`` inside ``loading(path, kind)``
    and reads the same."""
    with loading(path, kind):
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(blob, dict):
            raise ValueError(f"it holds a {type(blob).__name__}, not a checkpoint")
        found, version = blob.pop("harlflow", kind), int(blob.pop("version", 0))
        if found != kind:
            raise ValueError(f"it is a {found} checkpoint")
        if version > CHECKPOINT_VERSION:
            raise ValueError(f"it has checkpoint format {version}: upgrade harlflow to load it")
        return blob

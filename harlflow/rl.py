"""The reinforcement-learning pieces HARL, X-RLflow and RLFlow share, in Stable-Baselines3's
split:

- **the policy network**: each agent's own ``nn.Module`` (actor and critic) and its own state
  type; the agent's ``act(state)`` samples from it, ``evaluate(samples)`` re-scores samples under
  the current weights;
- **the rollout buffer** (:class:`RolloutBuffer`): whole or cut-off trajectories of named
  :class:`Sample` tuples, each with the value it bootstraps from;
- **the algorithm** (:class:`PPOAgent`): ``collect`` fills a buffer, ``update(buffer)`` is one
  PPO update. Collecting is where the three differ: X-RLflow plays episodes on the real
  environment (:func:`collect`, Gymnasium's loop), HARL walks edits of many schedules at once and
  scores them with the cost model (``harl.search_strategy``), RLFlow rolls its controller out in
  the world model (``xrlflow.rlflow``); all three hand the same buffer to the same update.

The update reads as CleanRL's ``ppo.py`` (:func:`ppo_update`): GAE, clipped policy loss, value
loss, entropy bonus, one gradient step per epoch, and metrics named by group (``losses/policy``,
``losses/value``, ``losses/entropy``, ``losses/approx_kl``, ``losses/clipfrac``; agents add their
own ``charts/...``).

Every learned thing (the three agents, the cost model) saves and loads through
:class:`Checkpointed` (:func:`save_checkpoint` / :func:`load_checkpoint`): weights-only,
versioned, one error naming the file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

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


class RolloutBuffer:
    """Trajectories of :class:`Sample` tuples, each with the value it bootstraps from: 0 for one
    that ended (its last sample is ``done``), the critic's value of the state it stopped in for
    one cut off. Trajectories vary in length (a walk ends when it stops improving, an episode when
    the agent stops), so the buffer keeps one list per trajectory, not a fixed-size array."""

    def __init__(
        self,
        trajectories: Sequence[Sequence[Sample]] = (),
        last_values: Sequence[float] | None = None,
    ) -> None:
        self.trajectories: list[list[Sample]] = []
        self.last_values: list[float] = []
        lasts = [0.0] * len(trajectories) if last_values is None else last_values
        for traj, last in zip(trajectories, lasts, strict=True):
            self.add(traj, last)

    def add(self, trajectory: Sequence[Sample], last_value: float = 0.0) -> None:
        """One trajectory and the value it bootstraps from (ignored when it ended)."""
        self.trajectories.append(list(trajectory))
        self.last_values.append(float(last_value))

    def __len__(self) -> int:
        """Samples in the buffer."""
        return sum(len(t) for t in self.trajectories)

    def returns(self) -> list[float]:
        """Each trajectory's undiscounted return."""
        return [sum(s.reward for s in t) for t in self.trajectories]

    def lengths(self) -> list[int]:
        return [len(t) for t in self.trajectories]

    def compute(
        self, cfg: PPOConfig, reward_scale: float = 1.0
    ) -> tuple[list[Sample], np.ndarray, np.ndarray]:
        """The samples flattened in order, their GAE advantages and their returns
        (:func:`advantages`)."""
        return advantages(self.trajectories, self.last_values, cfg, reward_scale)


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


# ---------------------------------------------------------------------------------- the agents
class Checkpointed:
    """Something learned that saves and loads through one helper (:func:`save_checkpoint`):
    a subclass names its ``kind``, says what it saves (:meth:`checkpoint`) and how to rebuild
    itself from that (:meth:`restore`); ``save`` and ``load`` are the same for all."""

    kind: ClassVar[str]
    """what its checkpoints say they hold ("HARL agent", "harlflow cost model", ...)"""

    def checkpoint(self) -> dict[str, Any]:
        """The state to save: tensors, numbers, strings, lists and dicts of them."""
        raise NotImplementedError

    @classmethod
    def restore(cls, blob: dict[str, Any], **kwargs: Any) -> Any:
        """Rebuild from what :meth:`checkpoint` saved; ``ValueError`` (or a ``KeyError``) when
        it does not fit, which :meth:`load` reports as a ``BadInputError`` naming the file."""
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write a checkpoint in one rename (:func:`save_checkpoint`)."""
        save_checkpoint(path, self.kind, self.checkpoint())

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> Any:
        """A saved one; a missing, corrupt or mismatched file is a ``BadInputError`` naming it
        (``kwargs`` go to :meth:`restore`: a seed, a rule library)."""
        blob = load_checkpoint(path, cls.kind)
        with loading(path, cls.kind):
            return cls.restore(blob, **kwargs)


class PPOAgent(Checkpointed):
    """The shape of every agent (HARL's ``EditAgent``, X-RLflow's, RLFlow's controller).

    - ``net``: the policy network, actor and critic;
    - :meth:`act`: an action for a state, sampled with the agent's own generator (same seed and
      weights, same actions), with its log-probability and the state's value;
    - :meth:`evaluate`: log-probabilities, entropies and values of samples under the current
      weights, which PPO's update needs;
    - :meth:`update`: one PPO update on a :class:`RolloutBuffer`;
    - ``save`` / ``load`` (:class:`Checkpointed`).

    The network's initial weights come from torch's global RNG, which the run seeds once
    (:func:`setup`)."""

    name: ClassVar[str]
    """the agent's name where users choose it (``--rewrite xrlflow``, ``--strategy harl``)"""

    def __init__(self, net: nn.Module, cfg: PPOConfig, *, seed: int, adam_eps: float = 1e-8):
        self.net, self.cfg = net, cfg
        self.opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=adam_eps)
        self.gen = torch.Generator().manual_seed(seed)
        self.updates = 0
        """PPO updates this agent has had, over its saved lives"""

    @property
    def reward_scale(self) -> float:
        """Rewards are multiplied by this before GAE (the critic learns scaled returns)."""
        return 1.0

    def act(self, state: Any, greedy: bool = False) -> tuple[Any, Any, Any]:
        """(action, its log-probability, the state's value); ``greedy`` takes the likeliest."""
        raise NotImplementedError

    def evaluate(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:data:`Evaluate`: the samples re-scored under the current weights."""
        raise NotImplementedError

    def update(self, buffer: RolloutBuffer) -> dict[str, float]:
        """One PPO update on ``buffer``; its ``losses/...`` metrics, empty when there was too
        little to learn from (fewer than two samples)."""
        samples, adv, ret = buffer.compute(self.cfg, self.reward_scale)
        if len(samples) < 2:
            return {}
        metrics = ppo_update(
            self.evaluate, self.opt, list(self.net.parameters()), samples, adv, ret, self.cfg
        )
        self.updates += 1
        return metrics


class EnvAgent(PPOAgent):
    """An agent that plays a Gymnasium environment (:func:`rollout`): it also says how it
    sees the environment's observations."""

    def observer(self, env: Any, info: dict[str, Any]) -> Callable[[Any], Any]:
        """For the episode that ``env.reset`` just began (its ``info``): observation → state."""
        raise NotImplementedError


def rollout(
    env: Any,
    agent: EnvAgent,
    *,
    options: dict[str, Any] | None = None,
    greedy: bool = False,
    seed: int | None = None,
) -> tuple[list[Sample], float, dict[str, Any]]:
    """One episode of ``agent`` on ``env`` (Gymnasium's reset/step loop): its samples, the value
    it bootstraps from (0 when it terminated, the critic's value when it was truncated) and the
    environment's last info."""
    obs, info = env.reset(seed=seed, options=options)
    observe = agent.observer(env, info)
    trajectory: list[Sample] = []
    while True:
        state = observe(obs)
        action, logprob, value = agent.act(state, greedy=greedy)
        obs, reward, terminated, truncated, info = env.step(action)
        trajectory.append(Sample(state, action, logprob, value, float(reward), bool(terminated)))
        if terminated or truncated:
            last = 0.0 if terminated else float(agent.act(observe(obs))[2])
            return trajectory, last, info


def collect(
    env: Any, agent: EnvAgent, episodes: int, rng: np.random.Generator
) -> tuple[RolloutBuffer, list[dict[str, Any]]]:
    """``episodes`` episodes of ``agent`` on ``env``, each reset with a seed drawn from ``rng``:
    the filled buffer and each episode's last info."""
    buffer, infos = RolloutBuffer(), []
    for _ in range(episodes):
        trajectory, last, info = rollout(env, agent, seed=int(rng.integers(2**31)))
        buffer.add(trajectory, last)
        infos.append(info)
    return buffer, infos


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

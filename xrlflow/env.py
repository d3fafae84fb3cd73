"""The rewrite environment (gymnasium API).

- **State**: the current :class:`~xrlflow.ir.Graph` and its candidate graphs.
- **Actions**: ``Discrete(max_candidates + 1)``; action 0 is *stop*, action ``i`` applies the
  ``i``-th candidate (every applicable (rule, location), de-duplicated by graph hash, in graph
  order). ``info["action_mask"]`` says which are legal in this state.
- **Reward**: the relative improvement of the oracle's per-operator *estimate* at each step,
  ``(est[t-1] - est[t]) / measured[0]``; every ``measure_every`` steps and at the end of the
  episode the graph is measured end to end and the reward gets the correction that makes the
  return since the previous measurement equal the *measured* relative improvement. So the
  return of an episode is ``(measured[0] - measured[end]) / measured[0]``: a step may cost
  (a temporary slowdown) when a later one pays more.
- **Episode end**: *stop*, no candidates left (terminated) or ``max_steps`` (truncated).
  ``info["best"]`` keeps the best *measured* graph seen in the episode, as
  ``(latency, graph, number of steps that led to it)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

from xrlflow import rules as R
from xrlflow.cost import CostOracle
from xrlflow.ir import Graph, check


class GraphSpace(gym.Space):
    """Observations are python objects: ``{"graph": Graph, "candidates": [Candidate, ...]}``."""

    def __init__(self):
        super().__init__(shape=None, dtype=None)

    def contains(self, x) -> bool:
        return (
            isinstance(x, dict)
            and isinstance(x.get("graph"), Graph)
            and isinstance(x.get("candidates"), list)
        )

    def sample(self, mask=None, probability=None):  # pragma: no cover - not samplable
        raise NotImplementedError("graph observations cannot be sampled")


@dataclass
class Step:
    """What an episode did: the rule applied at each step and what it cost."""

    rule: str
    node: str
    estimate: float
    measured: float | None = None


@dataclass
class _Episode:
    name: str
    graph: Graph
    start_measured: float
    last_measured: float
    est: float
    since_measure: float = 0.0
    steps: list[Step] = field(default_factory=list)
    best: tuple[float, Graph, int] | None = None  # (measured, graph, steps taken to reach it)


class RewriteEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        graphs: dict[str, Graph],
        oracle: CostOracle,
        rules: list[R.Rule] | None = None,
        max_steps: int = 20,
        measure_every: int = 5,
        max_candidates: int = 64,
        candidate_cache: dict | None = None,
    ):
        if not graphs:
            raise ValueError("RewriteEnv needs at least one graph")
        self.graphs = {k: check(g) for k, g in graphs.items()}
        self.oracle, self.rules = oracle, rules or R.RULES
        self.max_steps, self.measure_every, self.max_candidates = (
            max_steps,
            measure_every,
            max_candidates,
        )
        self.action_space = gym.spaces.Discrete(max_candidates + 1)
        self.observation_space = GraphSpace()
        self._ep: _Episode | None = None
        self._cands: list[R.Candidate] = []
        # graph hash → candidates; may be shared between environments (a pure function of the graph)
        self._cand_cache: dict[str, list[R.Candidate]] = (
            {} if candidate_cache is None else candidate_cache
        )

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        names = sorted(self.graphs)
        name = (options or {}).get("model") or names[int(self.np_random.integers(len(names)))]
        if name not in self.graphs:
            raise KeyError(f"unknown model {name!r}; have {names}")
        g = self.graphs[name]
        m = self.oracle.measure(g)
        self._ep = _Episode(name, g, m, m, self.oracle.estimate(g), best=(m, g, 0))
        return self._observe(), self._info()

    def step(self, action: int):
        ep = self._ep
        if ep is None:
            raise RuntimeError("call reset() before step()")
        action = int(action)
        if action == 0:
            return self._observe(), self._finish(0.0), True, False, self._info()
        if not 1 <= action <= len(self._cands):
            raise ValueError(f"action {action} is not legal here ({len(self._cands)} candidates)")
        cand = self._cands[action - 1]
        est = self.oracle.estimate(cand.graph)
        reward = (ep.est - est) / ep.start_measured
        ep.since_measure += reward
        ep.graph, ep.est = cand.graph, est
        ep.steps.append(Step(cand.rule, cand.node, est))
        obs = self._observe()
        terminated = not self._cands
        truncated = len(ep.steps) >= self.max_steps and not terminated
        if terminated or truncated:
            reward = self._finish(reward)
        elif len(ep.steps) % self.measure_every == 0:
            reward += self._correct()
        return obs, reward, terminated, truncated, self._info()

    # ------------------------------------------------------------------ internals
    def _finish(self, reward: float) -> float:
        return reward + self._correct()

    def _correct(self) -> float:
        """Measure end to end; the reward correction that makes returns measured ones."""
        ep = self._ep
        m = self.oracle.measure(ep.graph)
        measured_gain = (ep.last_measured - m) / ep.start_measured
        correction = measured_gain - ep.since_measure
        ep.last_measured, ep.since_measure = m, 0.0
        if ep.steps:
            ep.steps[-1].measured = m
        if m < ep.best[0]:
            ep.best = (m, ep.graph, len(ep.steps))
        return correction

    def candidates(self, g: Graph) -> list[R.Candidate]:
        key = g.structural_hash()
        if key not in self._cand_cache:
            if len(self._cand_cache) > 4096:
                self._cand_cache.clear()
            self._cand_cache[key] = R.candidates(g, self.rules, limit=self.max_candidates)
        return self._cand_cache[key]

    def _observe(self) -> dict:
        self._cands = self.candidates(self._ep.graph)
        return {"graph": self._ep.graph, "candidates": list(self._cands)}

    def _info(self) -> dict:
        ep = self._ep
        mask = np.zeros(self.max_candidates + 1, dtype=bool)
        mask[: len(self._cands) + 1] = True
        return {
            "action_mask": mask,
            "model": ep.name,
            "estimate": ep.est,
            "start_latency": ep.start_measured,
            "latency": ep.last_measured,
            "steps": list(ep.steps),
            "best": ep.best,
        }

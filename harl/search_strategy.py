"""HARL's search strategy: sketch-level bandit + parameter-level PPO agent + adaptive exploration.

One round (``generate_measure_candidates``) of a task:

1. **Sketch level.** Each trajectory starts in a design space (sketch) picked by UCB over the
   sketches' value estimates (the best normalised throughput measured from each), so sketches
   that keep losing stop receiving samples.
2. **Starting points.** Up to half the trajectories start from the best measured schedules
   (database + this run); the rest from the best-predicted of ``random_starts`` fresh samples
   of UCB-picked sketches (all of which also join the candidate pool).
3. **Parameter level.** The agent edits decisions step by step (:mod:`harl.edits`); the reward
   of a step is the cost model's predicted improvement, in units of the spread of that model's
   scores on this task (:class:`ScoreScale`), so one agent learns from XGBoost's scores and the
   attention model's alike. Every valid schedule visited joins the candidate pool; the agent is
   trained with PPO on the trajectories.
4. **Neighbours.** ``neighbours`` random one-edit neighbours of the best measured schedules are
   scored and join the pool too (evolutionary search's mutations of the best, in HARL's edit
   space): on a convolution ~170 candidates a round instead of ~95, most of those fresh
   samples, so the cost model's cut picks among schedules near the best.
5. **Selection.** The pool's best-predicted schedules not measured before, with ε of the picks
   drawn at random from the pool (exploration).

Adaptive exploration — the rule, applied after every measured round (``notify_runner_results``)
and every set of trajectories:

- a trajectory stops when its predicted score has not improved for ``patience`` steps;
- episode length grows by 2 (up to ``max_steps``) when most trajectories were still improving at
  their last step, and shrinks by 2 (down to ``min_steps``) when most stopped before half of it;
- ε shrinks ×0.7 (down to ``eps_min``) after a round that improved the task's best measured
  latency, and grows ×1.5 + 0.05 (up to ``eps_max``) after one that did not;
- the number of trajectories doubles (up to ``max_trajectories``) after two rounds without
  improvement and halves back (down to ``min_trajectories``) after an improving round;
- the task ends (``None``: no more measurements) after ``converge_rounds`` rounds without a
  measured improvement of at least ``min_gain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from harl import edits as E
from harl.agent import STATE_DIM, EditAgent, EditState
from harl.database import FAILED_RUN_SECS, mean_run_secs
from harl.schedules import replay
from harlflow.rl import RolloutBuffer, Sample


@dataclass
class ExplorationConfig:
    """Adaptive exploration settings (initial values and bounds)."""

    trajectories: int = 8
    """parallel trajectories per round (adapted)"""
    min_trajectories: int = 4
    max_trajectories: int = 32
    steps: int = 6
    """edit steps per trajectory (adapted)"""
    min_steps: int = 2
    max_steps: int = 16
    patience: int = 2
    """steps without predicted improvement before a trajectory stops"""
    eps: float = 0.1
    """fraction of measurements drawn at random from the pool (adapted)"""
    eps_min: float = 0.02
    eps_max: float = 0.5
    converge_rounds: int = 4
    """rounds without a measured gain before the task ends"""
    min_gain: float = 0.005
    """relative latency gain that counts as an improvement"""
    random_starts: int = 64
    """fresh design-space samples scored by the cost model each round (trajectory starts)"""
    neighbours: int = 128
    """random one-edit neighbours of the best measured schedules scored each round (they join
    the pool: a larger pool near the best, cut by the cost model; 0: none)"""
    neighbour_parents: int = 8
    """how many of the best measured schedules the neighbours are drawn around"""
    invalid_penalty: float = 0.05
    """reward of an edit the postprocessors reject (in standard deviations of the scores)"""


@dataclass
class ScoreScale:
    """A cost model's scores on one task, normalised: ``(score - mean) / std`` over every score
    it gave so far (Welford's running moments). Two models whose scores differ by a scale and an
    offset (XGBoost's normalised throughput, the attention model's unbounded logit) give the
    agent the same states and rewards."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, scores: list[float]) -> None:
        for x in scores:
            self.n += 1
            d = x - self.mean
            self.mean += d / self.n
            self.m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        """The spread so far (1 before two distinct scores: nothing to scale by yet)."""
        s = math.sqrt(self.m2 / self.n) if self.n > 1 else 0.0
        return s if s > 1e-12 else 1.0

    def z(self, score: float) -> float:
        """``score`` as standard deviations from the mean."""
        return (score - self.mean) / self.std

    def gain(self, new: float, old: float) -> float:
        """``new - old`` in standard deviations: the reward of an edit."""
        return (new - old) / self.std


@dataclass
class _Sketch:
    """Value estimate of one design space."""

    measured: int = 0
    best_gflops: float = 0.0
    picks: int = 0


@dataclass
class Trajectory:
    """One walk of edits from a start schedule (:meth:`HARLSearchStrategy._explore`)."""

    schedule: Any
    """where the walk is: the last valid schedule it reached"""
    sketch: int
    """the design space it started in"""
    score: float
    """the cost model's score of ``schedule`` (higher is predicted faster)"""
    best: float
    """the best score along the walk"""
    idle: int = 0
    """steps since ``best`` last improved (the walk stops at ``patience``)"""
    samples: list[Sample] = field(default_factory=list)
    """one per edit: what PPO learns from"""


class _Proposal(NamedTuple):
    """One trajectory's edit at one step, before the cost model scores the result."""

    trajectory: Trajectory
    state: EditState
    action: int
    logprob: float
    value: float
    schedule: Any  # the edited schedule, None when the postprocessors rejected it


@dataclass
class _Shared:
    """What every task's strategy shares within one tuning run: the agent and its metrics."""

    agent: EditAgent
    metrics: list[dict[str, float]] = field(default_factory=list)


def _pool_features(raw) -> np.ndarray:
    """PerStoreFeature's (n_stores, 164) → mean and max over stores, sign-log scaled."""
    f = raw.numpy() if hasattr(raw, "numpy") else np.asarray(raw)
    if f.size == 0:
        return np.zeros(2 * 164, dtype=np.float32)
    f = np.sign(f) * np.log1p(np.abs(f))
    return np.concatenate([f.mean(axis=0), f.max(axis=0)]).astype(np.float32)


@derived_object
class HARLSearchStrategy(ms.search_strategy.PySearchStrategy):
    """HARL: learned sketch selection + PPO decision edits + adaptive exploration."""

    def __init__(
        self,
        *,
        agent: EditAgent | None = None,
        seed: int = 0,
        exploration: ExplorationConfig | None = None,
        _shared: _Shared | None = None,
    ):
        self.seed = seed
        self.cfg = exploration or ExplorationConfig()
        self.shared = _shared or _Shared(agent or EditAgent(seed=seed))
        self.rng = np.random.default_rng(seed)
        self.ctx = None

    # ------------------------------------------------------------ MetaSchedule interface
    def _initialize_with_tune_context(self, context) -> None:
        self.ctx = context
        self.mod = context.mod
        self.postprocs = list(context.space_generator.postprocs)
        self.extractor = ms.feature_extractor.PerStoreFeature()
        from tvm.s_tir.analysis import estimate_tir_flops

        self.flop = max(1.0, float(estimate_tir_flops(self.mod)))

    def pre_tuning(
        self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None
    ) -> None:
        self.max_trials, self.per_iter = max_trials, num_trials_per_iter
        self.spaces = [s.trace for s in design_spaces]
        self.signatures = [self._signature(t) for t in self.spaces]
        self.sketches = [_Sketch() for _ in self.spaces]
        self.database, self.cost_model = database, cost_model
        self.trials = 0
        self.measured: set[int] = set()
        self.best: list[tuple[float, Any]] = []  # (measured run seconds, trace), best first
        self.best_secs = math.inf
        # imagined rounds (offline pre-training) take their picks as measured, ranked by the
        # cost model: (predicted score, trace), best first; starts come from ``best`` first
        self.imagined: list[tuple[float, Any]] = []
        self.stale_rounds = 0
        self.pending: list[tuple[int, int]] = []  # (hash, sketch) of candidates in flight
        self.scale = ScoreScale()  # this task's cost-model scores: rewards in their spread
        self.cfg = ExplorationConfig(**self.cfg.__dict__)  # this task's adaptive copy
        if database is not None and database.has_workload(self.mod):
            for r in database.get_top_k(database.commit_workload(self.mod), 64):
                secs = mean_run_secs(r.run_secs) if r.run_secs else math.inf
                sch = self._replay(r.trace)
                if sch is None:
                    continue
                self.measured.add(self._hash(sch))
                if secs < FAILED_RUN_SECS:
                    self.best.append((secs, r.trace))
                    self._credit(self._sketch_of(r.trace), secs)
            self.best.sort(key=lambda x: x[0])
            self.best_secs = self.best[0][0] if self.best else math.inf

    def post_tuning(self) -> None:
        self.ctx = None

    def generate_measure_candidates(self):
        if self.trials >= self.max_trials or self.stale_rounds >= self.cfg.converge_rounds:
            return None
        want = min(self.per_iter, self.max_trials - self.trials)
        pool, _ = self._explore_and_learn()
        picks = self._select(pool, want)
        if not picks:
            return None
        self.pending = [(h, k) for h, k, _ in picks]
        return [self._candidate(sch) for _, _, sch in picks]

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.trials += len(results)
        improved = False
        # a budget (harl.tuning.BudgetedStrategy) may cut a round short: what was measured
        # is a prefix of what was proposed
        pending = self.pending[: len(results)]
        for (h, k), cand, res in zip(pending, measure_candidates, results, strict=True):
            self.measured.add(h)
            ok = res.error_msg is None and res.run_secs
            secs = mean_run_secs(res.run_secs) if ok else math.inf
            if 0 <= k < len(self.sketches):
                self.sketches[k].measured += 1
            if ok:
                self._credit(k, secs)
                if secs < self.best_secs * (1 - self.cfg.min_gain):
                    improved = True
                self.best.append((secs, cand.sch.trace))
        self._trim_best()
        if self.best:
            self.best_secs = min(self.best_secs, self.best[0][0])
        self._adapt_after_round(improved)
        self.pending = []

    def imagine_round(self, *, learn: bool = True) -> dict[str, float]:
        """One round in imagination (offline pre-training, :mod:`harl.pretraining`): the
        cost model's predictions stand in for measurements. Explores as a real round does,
        updates the agent when ``learn``, and takes the picks as measured, ranked by
        predicted score (kept in ``imagined``, apart from measured seconds). Returns the
        round's mean trajectory return (predicted gain) and trajectory count."""
        pool, buffer = self._explore_and_learn(learn=learn)
        for h, _, sch in self._select(pool, self.per_iter):
            self.measured.add(h)
            score = pool[h][0] if h in pool else 0.0
            self.imagined.append((score, sch.trace))
        self._trim_best()
        returns = buffer.returns()
        return {
            "return": float(np.mean(returns)) if returns else 0.0,
            "trajectories": float(len(returns)),
        }

    def clone(self):
        return HARLSearchStrategy(seed=self.seed + 1, exploration=self.cfg, _shared=self.shared)

    # ------------------------------------------------------------ search
    def _explore_and_learn(self, learn: bool = True):
        """This round's trajectories (:meth:`_explore`), then, with ``learn``, one PPO
        update of the shared agent on them; returns (candidate pool, buffer)."""
        pool, buffer = self._explore()
        if buffer.trajectories and learn:
            m = self.shared.agent.update(buffer)
            if m:
                self.shared.metrics.append(m)
        return pool, buffer

    def _trim_best(self) -> None:
        """Keep the 32 best schedules, best first (the trajectories' starts): the fastest
        measured, the highest scored imagined."""
        self.best.sort(key=lambda x: x[0])
        del self.best[32:]
        self.imagined.sort(key=lambda x: -x[0])
        del self.imagined[32:]

    def _explore(self):
        """Run this round's trajectories (HARL's ``collect``); returns the candidate pool and
        the rollout buffer of the walks, each bootstrapping from 0: every walk ends, by its own
        rule or its step limit."""
        cfg, agent = self.cfg, self.shared.agent
        pool: dict[int, tuple[float, int, Any]] = {}  # hash → (score, sketch, schedule)
        starts = self._starts(pool)
        if not starts:
            return pool, RolloutBuffer()
        live = [Trajectory(sch, k, score, score) for sch, k, score in starts]
        still_improving = 0
        for step in range(cfg.steps):
            active = [t for t in live if t.idle < cfg.patience]
            if not active:
                break
            proposals: list[_Proposal] = []
            for t in active:
                trace = t.schedule.trace
                legal = E.legal_edits(trace)
                if not legal:  # nothing left to edit: the walk ends here
                    t.idle = cfg.patience
                    if t.samples:
                        t.samples[-1] = t.samples[-1]._replace(done=True)
                    continue
                state = EditState(self._state(t, step), E.edit_features(trace, legal))
                a, logp, value = agent.act(state)
                new = E.apply_edit(self.mod, trace, legal[a], self.postprocs, self._seed())
                proposals.append(_Proposal(t, state, a, logp, value, new))
            valid = [p.schedule for p in proposals if p.schedule is not None]
            scores = iter(self._predict(valid) if valid else [])
            for p in proposals:
                t = p.trajectory
                if p.schedule is None:
                    reward = -cfg.invalid_penalty
                else:
                    score = next(scores)
                    reward = self.scale.gain(score, t.score)
                    t.schedule, t.score = p.schedule, score
                    pool.setdefault(self._hash(p.schedule), (score, t.sketch, p.schedule))
                if self.scale.gain(t.score, t.best) > 1e-6:
                    t.best, t.idle = t.score, 0
                else:
                    t.idle += 1
                # a walk ends when it stops improving or its steps run out: the state carries
                # step / steps, so the step limit is part of the task (time-aware, not a cut)
                done = t.idle >= cfg.patience or step == cfg.steps - 1
                t.samples.append(Sample(p.state, p.action, p.logprob, p.value, reward, done))
        self._neighbours(pool)
        buffer = RolloutBuffer([t.samples for t in live if t.samples])  # all ended: values 0
        for t in live:
            if t.idle == 0 and t.samples:
                still_improving += 1
        self._adapt_episode(still_improving, live)
        return pool, buffer

    def _select(self, pool: dict, want: int) -> list[tuple[int, int, Any]]:
        """Best-predicted unmeasured candidates; ε of the picks at random from the pool."""
        fresh = [(h, v) for h, v in pool.items() if h not in self.measured]
        fresh.sort(key=lambda hv: -hv[1][0])
        n_random = int(round(self.cfg.eps * want))
        chosen = fresh[: want - n_random]
        rest = fresh[want - n_random :]
        if rest and n_random:
            idx = self.rng.choice(len(rest), size=min(n_random, len(rest)), replace=False)
            chosen += [rest[i] for i in sorted(idx)]
        for _ in range(4 * want):  # pool too small: fresh random samples of picked sketches
            if len(chosen) >= want:
                break
            k = self._pick_sketch()
            sch = self._sample(k)
            if sch is None:
                continue
            h = self._hash(sch)
            if h not in self.measured and all(h != c[0] for c in chosen):
                chosen.append((h, (0.0, k, sch)))
        return [(h, v[1], v[2]) for h, v in chosen[:want]]

    # ------------------------------------------------------------ sketch level
    def _pick_sketch(self) -> int:
        """UCB1 over sketches on best measured throughput (normalised to the best sketch)."""
        total = sum(s.picks for s in self.sketches) + 1
        top = max((s.best_gflops for s in self.sketches), default=0.0) or 1.0
        scores = []
        for s in self.sketches:
            if s.picks == 0:
                scores.append(math.inf)
                continue
            value = s.best_gflops / top if s.measured else 0.5
            scores.append(value + math.sqrt(2 * math.log(total) / s.picks))
        best = max(scores)
        k = int(self.rng.choice([i for i, v in enumerate(scores) if v == best]))
        self.sketches[k].picks += 1
        return k

    def _credit(self, k: int, secs: float) -> None:
        if 0 <= k < len(self.sketches) and secs > 0:
            self.sketches[k].best_gflops = max(self.sketches[k].best_gflops, self.flop / secs / 1e9)

    def _starts(self, pool: dict) -> list[tuple[Any, int, float]]:
        """This round's trajectory starts: (schedule, sketch, predicted score).

        Up to half come from the best measured schedules (replayed with fresh seeds for
        any sampling left in them); the rest are the best-predicted of ``random_starts``
        fresh samples from UCB-picked sketches. Every scored sample also joins ``pool``.
        """
        cfg = self.cfg
        measured = []
        tops = [trace for _, trace in self.best] or [trace for _, trace in self.imagined]
        for trace in tops[: max(1, cfg.trajectories // 2)]:
            sch = self._replay(trace)
            if sch is not None:
                measured.append((sch, self._sketch_of(trace)))
        sampled = []
        for _ in range(cfg.random_starts):
            k = self._pick_sketch()
            sch = self._sample(k)
            if sch is not None:
                sampled.append((sch, k))
        scored = list(
            zip(
                measured + sampled,
                self._predict([s for s, _ in measured + sampled]),
                strict=True,
            )
        )
        for (sch, k), score in scored:
            pool.setdefault(self._hash(sch), (score, k, sch))
        rest = sorted(scored[len(measured) :], key=lambda x: -x[1])
        chosen = scored[: len(measured)] + rest[: cfg.trajectories - len(measured)]
        return [(sch, k, score) for (sch, k), score in chosen]

    def _neighbours(self, pool: dict) -> None:
        """Score ``neighbours`` random one-edit neighbours of the best measured (or imagined)
        schedules and add them to ``pool``: what evolutionary search's mutations of the best
        give it, a pool near the best from which the cost model's best-predicted are measured."""
        cfg = self.cfg
        parents = [trace for _, trace in self.best] or [trace for _, trace in self.imagined]
        parents = parents[: cfg.neighbour_parents]
        if not cfg.neighbours or not parents:
            return
        found: dict[int, tuple[int, Any]] = {}  # hash → (sketch, schedule), scored together
        per_parent = -(-cfg.neighbours // len(parents))
        for trace in parents:  # distinct edits of each parent: no replay is wasted on a repeat
            legal = E.legal_edits(trace)
            for j in self.rng.permutation(len(legal))[:per_parent]:
                sch = E.apply_edit(self.mod, trace, legal[int(j)], self.postprocs, self._seed())
                if sch is None:
                    continue
                h = self._hash(sch)
                if h not in pool and h not in self.measured and h not in found:
                    found[h] = (self._sketch_of(trace), sch)  # two parents may share one
        scores = self._predict([sch for _, sch in found.values()])
        for (h, (k, sch)), score in zip(found.items(), scores, strict=True):
            pool[h] = (score, k, sch)

    def _sample(self, k: int):
        from tvm.s_tir import Trace

        return replay(self.mod, Trace(self.spaces[k].insts, {}), self.postprocs, self._seed())

    # ------------------------------------------------------------ adaptivity
    def _adapt_after_round(self, improved: bool) -> None:
        c = self.cfg
        if improved:
            self.stale_rounds = 0
            c.eps = max(c.eps_min, c.eps * 0.7)
            c.trajectories = max(c.min_trajectories, c.trajectories // 2)
        else:
            self.stale_rounds += 1
            c.eps = min(c.eps_max, c.eps * 1.5 + 0.05)
            if self.stale_rounds >= 2:
                c.trajectories = min(c.max_trajectories, c.trajectories * 2)

    def _adapt_episode(self, still_improving: int, live: list[Trajectory]) -> None:
        c = self.cfg
        early = sum(1 for t in live if len(t.samples) < max(1, c.steps // 2))
        if still_improving > len(live) / 2:
            c.steps = min(c.max_steps, c.steps + 2)
        elif early > len(live) / 2:
            c.steps = max(c.min_steps, c.steps - 2)

    # ------------------------------------------------------------ helpers
    def _state(self, t: Trajectory, step: int) -> np.ndarray:
        cand = self._candidate(t.schedule)
        feats = _pool_features(self.extractor.extract_from(self.ctx, [cand])[0])
        z = self.scale.z
        ctx = np.array([step / max(1, self.cfg.steps), z(t.score), z(t.best), self.cfg.eps],
                       np.float32)  # fmt: skip
        s = np.concatenate([feats, E.decision_encoding(t.schedule.trace), ctx])
        assert s.shape == (STATE_DIM,)
        return s

    def _predict(self, schedules: list) -> list[float]:
        if self.cost_model is None or not schedules:
            return [0.0] * len(schedules)
        cands = [self._candidate(s) for s in schedules]
        scores = [float(x) for x in self.cost_model.predict(self.ctx, cands)]
        self.scale.update(scores)
        return scores

    @staticmethod
    def _candidate(sch):
        """A measure candidate with the arguments of the schedule's own entry function: a
        weight-layout rewrite (prepacking) changes the weight's shape."""
        return ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, True))

    def _replay(self, trace):
        return replay(self.mod, trace, self.postprocs, self._seed())

    def _seed(self) -> int:
        return int(self.rng.integers(1, 2**31 - 1))

    @staticmethod
    def _hash(sch) -> int:
        from tvm_ffi import structural_hash

        return int(structural_hash(sch.mod))

    @staticmethod
    def _signature(trace) -> tuple[str, ...]:
        return tuple(i.kind.name for i in trace.insts if i.kind.name != "EnterPostproc")

    def _sketch_of(self, trace) -> int:
        sig = self._signature(trace)
        for k, s in enumerate(self.signatures):
            if sig[: len(s)] == s:
                return k
        return -1

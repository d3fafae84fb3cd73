"""Rewrite searches: X-RLflow inference and the two baselines, all returning a :class:`Result`.

- :func:`greedy`: apply the substitution with the lowest estimated cost while it improves.
- :func:`backtracking`: TASO's cost-bounded search — a priority queue of graphs by estimated
  cost; a candidate is kept when its cost is below ``alpha`` × the best so far (α > 1 admits
  temporary slowdowns), until ``budget`` graphs have been expanded.
- :func:`xrlflow` / :func:`rlflow`: the trained policy (X-RLflow's, or RLFlow's controller) run
  greedily plus ``rollouts`` sampled episodes; the best *measured* graph wins.

Every result reports the input's and the output's measured latency; ``best_of`` never returns a
graph measured slower than the input.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from harlflow.core import signals
from xrlflow import rules as R
from xrlflow.cost import CostOracle
from xrlflow.env import RewriteEnv, Step
from xrlflow.ir import Graph, check


@dataclass
class Result:
    method: str
    graph: Graph
    steps: list[Step]
    latency_before: float
    latency_after: float
    seconds: float
    explored: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.latency_before / self.latency_after if self.latency_after > 0 else 1.0

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for s in self.steps:
            counts[s.rule] = counts.get(s.rule, 0) + 1
        return {
            "method": self.method,
            "latency_before_ms": self.latency_before * 1e3,
            "latency_after_ms": self.latency_after * 1e3,
            "speedup": self.speedup,
            "seconds": self.seconds,
            "explored": self.explored,
            "rules_applied": counts,
            "steps": [f"{s.rule}@{s.node}" for s in self.steps],
            "nodes": len(self.graph.nodes),
            "stopped": self.notes.get("stopped"),  # "time budget" when the deadline ended it
        }


SIGNIFICANCE_TRIES = 12
"""candidates greedy search re-times per step on a timing oracle before it stops"""


def greedy(
    g: Graph,
    oracle: CostOracle,
    rules: list[R.Rule] | None = None,
    max_steps: int = 200,
    min_gain: float | None = None,
    deadline: float | None = None,
    pricing_s: float | None = None,
) -> Result:
    """Take the candidate with the lowest estimate while it gains more than ``min_gain``
    (default: the oracle's ``decision_margin``) and, for an oracle that times operators, while
    the gain stands out of the timing noise (``oracle.significant``): candidates are tried best
    estimate first, up to ``SIGNIFICANCE_TRIES`` of them, and the first that passes both is
    taken. (Stopping after the best three made BERT's greedy rewrite on onnxruntime take 12
    substitutions in one run and none in the next: noisy estimates put three look-alike
    rewrites first, each failed the re-timing, and a sure one further down was never tried.
    Timing oracles still decide differently between runs: 4, 8 and 12 substitutions on BERT
    in three runs. The TVM oracle's decisions are the same in every run.)

    Before ``deadline`` (a ``time.monotonic()`` instant) the search stops pricing, as soon as
    pricing one more candidate at its pace so far would end after it: the candidates priced so
    far still compete for the current step, then it ends with the graph reached.
    ``pricing_s``: what pricing one graph took the caller, when it priced ``g`` already (the
    oracle caches it, so timing ``g`` here would say nothing)."""
    t0, rules = time.monotonic(), rules or R.RULES
    g = check(g)
    margin = oracle.decision_margin if min_gain is None else min_gain
    t = time.monotonic()
    before, est, steps, explored = oracle.measure(g), oracle.estimate(g), [], 0
    # graphs priced, and the seconds they took
    full_s = time.monotonic() - t if pricing_s is None else pricing_s  # one graph in full
    # an oracle that can price a candidate by what it changed (the TVM oracle) does so; the
    # graph a step reaches is priced in full before its candidates are
    change = getattr(oracle, "estimate_change", None)
    priced, pricing_s = 1, full_s
    stopped = False  # by the deadline
    for _ in range(max_steps):
        signals.check()  # a stop request a swallowed TVM error may have hidden
        cands = R.candidates(g, rules)
        scored = []
        for i, c in enumerate(cands):
            if _past(deadline, pricing_s / priced):  # one more would end after the deadline
                stopped = True
                break
            t = time.monotonic()
            e = change(g, c.graph) if change is not None else oracle.estimate(c.graph)
            scored.append((e, i, c))
            priced, pricing_s = priced + 1, pricing_s + time.monotonic() - t
        explored += len(scored)
        scored.sort(key=lambda x: (x[0], x[1]))
        taken = next(
            (
                (e, c)
                for e, _, c in scored[:SIGNIFICANCE_TRIES]
                if e < est * (1 - margin) and _significant(oracle, g, c.graph)
            ),
            None,
        )
        if taken is None:
            break
        est, c = taken
        g = c.graph
        steps.append(Step(c.rule, c.node, est))
        if stopped or _past(deadline, full_s if change is not None else 0.0):
            stopped = True
            break
        if change is not None:
            est = oracle.estimate(g)
    notes = {"stopped": "time budget"} if stopped else {}
    after = oracle.measure(g)
    return Result("greedy", g, steps, before, after, time.monotonic() - t0, explored, notes)


def _past(deadline: float | None, ahead: float = 0.0) -> bool:
    """Whether ``deadline`` has passed, or will have within ``ahead`` seconds."""
    return deadline is not None and time.monotonic() + ahead >= deadline


def _significant(oracle: CostOracle, before: Graph, after: Graph) -> bool:
    """A deterministic oracle's estimate decides alone; a timing oracle re-times the difference."""
    check = getattr(oracle, "significant", None)
    return check is None or check(before, after)


def backtracking(
    g: Graph,
    oracle: CostOracle,
    rules: list[R.Rule] | None = None,
    alpha: float = 1.05,
    budget: int = 300,
    deadline: float | None = None,
) -> Result:
    """Best-first search: expand the cheapest graph reached, keep every candidate priced within
    ``alpha`` of the best so far; stop after ``budget`` expansions or at ``deadline``."""
    t0, rules = time.monotonic(), rules or R.RULES
    g = check(g)
    before = oracle.measure(g)
    start_est = oracle.estimate(g)
    best = (start_est, g, [])
    seen = {g.structural_hash()}
    queue: list[tuple[float, int, Graph, list[Step]]] = [(start_est, 0, g, [])]
    tie, expanded, explored = 1, 0, 0
    while queue and expanded < budget and not _past(deadline):
        signals.check()
        est, _, cur, steps = heapq.heappop(queue)
        expanded += 1
        for c in R.candidates(cur, rules):
            explored += 1
            h = c.graph.structural_hash()
            if h in seen:
                continue
            seen.add(h)
            e = oracle.estimate(c.graph)
            path = steps + [Step(c.rule, c.node, e)]
            if e < best[0]:
                best = (e, c.graph, path)
            if e < alpha * best[0]:
                heapq.heappush(queue, (e, tie, c.graph, path))
                tie += 1
    return Result(
        "backtracking",
        best[1],
        best[2],
        before,
        oracle.measure(best[1]),
        time.monotonic() - t0,
        explored,
        {"alpha": alpha, "budget": budget, "expanded": expanded},
    )


def policy(
    g: Graph,
    agent,
    oracle: CostOracle,
    rules: list[R.Rule] | None = None,
    rollouts: int = 4,
    max_steps: int = 40,
    measure_every: int = 5,
    seed: int = 0,
    deadline: float | None = None,
) -> Result:
    """An agent's policy (X-RLflow's or RLFlow's: anything with a ``name`` and an
    ``episode(env, model=, greedy=, seed=) -> info``) greedily, then ``rollouts`` sampled
    episodes (no new one after ``deadline``); the best measured graph wins."""
    t0 = time.monotonic()
    env = RewriteEnv(
        {"model": g}, oracle, rules or R.RULES, max_steps=max_steps, measure_every=measure_every
    )
    best: tuple[float, Graph, list[Step]] | None = None
    before = None
    notes: dict = {"rollouts": rollouts}
    for k in range(rollouts + 1):
        signals.check()
        if k and _past(deadline):  # the greedy episode always runs
            notes |= {"stopped": "time budget", "rollouts_run": k - 1}
            break
        info = agent.episode(env, model="model", greedy=k == 0, seed=seed + k)
        before = info["start_latency"]
        lat, graph, n = info["best"]
        steps = info["steps"][:n]
        if best is None or lat < best[0]:
            best = (lat, graph, steps)
    return Result(
        agent.name,
        best[1],
        best[2],
        before,
        best[0],
        time.monotonic() - t0,
        rollouts + 1,
        notes,
    )


def best_of(original: Graph, result: Result) -> Result:
    """``result``, unless its graph measured slower than the input: then the input unchanged."""
    if result.latency_after <= result.latency_before:
        return result
    return Result(
        result.method,
        original,
        [],
        result.latency_before,
        result.latency_before,
        result.seconds,
        result.explored,
        {**result.notes, "reverted": True},
    )

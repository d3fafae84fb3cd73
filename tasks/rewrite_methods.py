"""Rewrite methods and cost oracles by name: the one place a new one is added.

A *method* turns the imported graph into a rewritten one, judged by an *oracle*. Each is a
function registered here; the CLI's ``--rewrite`` / ``--rewrite-oracle`` / ``--oracle`` choices,
the settings check (``flows.settings``) and the rewrite stage's dispatch (``tasks.rewriting``)
all come from :data:`METHODS` and :data:`ORACLES`, as search strategies come from
``harl.strategies.STRATEGIES``.

To add a method, write ``def name(job: RewriteJob) -> xrlflow.search.Result`` below and decorate
it with ``@method("name", "what it does")``; an oracle is ``def name(target, database_dir) ->
CostOracle`` decorated with ``@oracle(...)``. This module imports nothing heavy at its top (the
CLI reads the names on every start); each function imports what it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harlflow.core.errors import BadInputError, loading


@dataclass
class RewriteJob:
    """What a method gets: the graph, its judge, and the stage's settings."""

    graph: Any
    """the normalised ``xrlflow.ir.Graph`` to rewrite"""
    judge: Any
    """the ``CostOracle`` that prices candidates"""
    log: Callable[[str], None] = print
    seed: int = 0
    deadline: float | None = None
    """``time.monotonic()`` instant after which no new candidate is priced"""
    pricing_s: float | None = None
    """what pricing the whole graph once took (the judge has it cached)"""
    max_steps: int = 30
    rollouts: int = 2
    train_iterations: int = 10
    agent_path: str | Path | None = None
    """the X-RLflow agent (loaded if the file exists, else trained here and saved there)"""
    rlflow_agent_path: str | Path | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    """a trained agent's learning curve, appended by the method"""


@dataclass(frozen=True)
class Registered:
    name: str
    run: Callable[..., Any] | None
    doc: str


METHODS: dict[str, Registered] = {
    "none": Registered("none", None, "no rewriting: the imported graph is tuned as it is")
}
ORACLES: dict[str, Registered] = {}


def method(name: str, doc: str):
    """Register ``fn(job) -> Result`` as the rewrite method ``name``."""

    def register(fn):
        METHODS[name] = Registered(name, fn, doc)
        return fn

    return register


def oracle(name: str, doc: str):
    """Register ``fn(target, database_dir) -> CostOracle`` as the oracle ``name``."""

    def register(fn):
        ORACLES[name] = Registered(name, fn, doc)
        return fn

    return register


def lookup(registry: dict[str, Registered], name: str, what: str) -> Registered:
    """``registry[name]``, or a BadInputError that lists the choices."""
    if name not in registry:
        raise BadInputError(f"unknown {what} {name!r}: choose one of {', '.join(registry)}")
    return registry[name]


def make_oracle(name: str, target: dict | None = None, database_dir: str | Path | None = None):
    """The cost oracle called ``name``, for ``target`` (default: this host)."""
    return lookup(ORACLES, name, "rewrite oracle").run(target, database_dir)


# ---------------------------------------------------------------------------------- methods
@method("greedy", "take the best-priced substitution while it gains (deterministic on tvm)")
def greedy(job: RewriteJob):
    from xrlflow import search

    job.log(f"rewrite: greedy over {len(job.graph.nodes)} nodes, judged on {job.judge.name}")
    return search.greedy(job.graph, job.judge, deadline=job.deadline, pricing_s=job.pricing_s)


@method("backtracking", "best-first search, keeping every path within 5 % of the best so far")
def backtracking(job: RewriteJob):
    from xrlflow import search

    job.log(f"rewrite: backtracking over {len(job.graph.nodes)} nodes, judged on {job.judge.name}")
    return search.backtracking(job.graph, job.judge, deadline=job.deadline)


@method("xrlflow", "the X-RLflow policy (GNN + PPO), greedily then sampled rollouts")
def xrlflow(job: RewriteJob):
    agent = _load_or_train(job, "X-RLflow agent", job.agent_path, _xrlflow_load, _xrlflow_train)
    return _rollouts(job, agent, "X-RLflow policy")


@method("rlflow", "the RLFlow controller, trained in a learned world model of the rewrites")
def rlflow(job: RewriteJob):
    agent = _load_or_train(job, "RLFlow agent", job.rlflow_agent_path, _rlflow_load, _rlflow_train)
    return _rollouts(job, agent, "RLFlow controller")


def _rollouts(job: RewriteJob, agent, policy: str):
    """``agent``'s policy greedily, then ``job.rollouts`` sampled episodes (``search.policy``)."""
    from xrlflow import search

    job.log(f"rewrite: {policy}, greedy + {job.rollouts} sampled rollouts on {job.judge.name}")
    return search.policy(
        job.graph, agent, job.judge, rollouts=job.rollouts, max_steps=job.max_steps,
        seed=job.seed, deadline=job.deadline,
    )  # fmt: skip


def _load_or_train(job: RewriteJob, what: str, path, load, train):
    """The agent saved at ``path`` when there is one; else one trained on this graph and saved
    there (a file that does not load is one clear error naming it)."""
    if path and Path(path).is_file():
        job.log(f"rewrite: loading the {what} from {path}")
        with loading(path, what):
            return load(path, job.seed)
    agent = train(job)
    if path:
        agent.save(path)
    return agent


def _xrlflow_load(path, seed: int):
    from xrlflow import agent as A

    return A.XRLflowAgent.load(path, seed=seed)


def _xrlflow_train(job: RewriteJob):
    from xrlflow import agent as A
    from xrlflow.env import RewriteEnv

    n = job.train_iterations
    job.log(f"rewrite: no trained agent at {job.agent_path}; training one on this model "
            f"({n} PPO iterations)")  # fmt: skip
    agent = A.XRLflowAgent(seed=job.seed)
    env = RewriteEnv({"model": job.graph}, job.judge, max_steps=20, measure_every=5)

    def progress(i: int, m: dict) -> None:
        job.curve.append(m)
        job.log(
            f"rewrite: PPO iteration {i + 1}/{n} | mean return {m['charts/mean_return']:+.4f} | "
            f"best gain {m['charts/mean_best_gain']:+.2%}"
        )

    A.train(env, agent, iterations=n, episodes_per_iter=2, callback=progress, seed=job.seed)
    return agent


def _rlflow_load(path, seed: int):
    from xrlflow import rlflow as RF

    return RF.RLFlowAgent.load(path, seed=seed)


def _rlflow_train(job: RewriteJob):
    from xrlflow import rlflow as RF
    from xrlflow.env import RewriteEnv

    n = max(job.train_iterations, 1) * 3  # imagined iterations are cheap
    job.log(
        f"rewrite: no trained RLFlow agent at {job.rlflow_agent_path}; training one on this "
        f"model (world model from random episodes, {n} PPO iterations in imagination)"
    )
    agent = RF.RLFlowAgent(seed=job.seed)
    env = RewriteEnv({"model": job.graph}, job.judge, max_steps=10, measure_every=5)

    def progress(i: int, m: dict) -> None:
        job.curve.append(m)
        if "charts/real_return" in m:
            job.log(
                f"rewrite: RLFlow iteration {i + 1}/{n} | imagined return "
                f"{m['charts/imagined_return']:+.4f} | real return {m['charts/real_return']:+.4f}"
                f" | real steps {m['charts/real_steps']:.0f}"
            )

    RF.train(env, agent, iterations=n, random_episodes=12, ground_every=10, callback=progress,
             seed=job.seed)  # fmt: skip
    return agent


# ---------------------------------------------------------------------------------- oracles
@oracle("tvm", "the compiled artifact's kernels: tuning records, else the target's profile")
def tvm(target: dict | None, database_dir: str | Path | None):
    from harlflow.core.targets import resolve_target
    from tasks.rewrite_oracle import TvmOracle

    return TvmOracle(resolve_target(target), database_dir)


@oracle("onnxruntime", "onnxruntime's per-operator timings on this CPU")
def onnxruntime(target: dict | None, database_dir: str | Path | None):
    from xrlflow.cost import OrtOracle

    return OrtOracle()


@oracle("flops", "an analytical count: FLOPs and bytes per operator, nothing run")
def flops(target: dict | None, database_dir: str | Path | None):
    from xrlflow.cost import FlopsOracle

    return FlopsOracle()

"""``harlflow rewrite-train``: train a rewrite agent (X-RLflow or RLFlow) on a set of models,
with its learning curve, its world model's losses (RLFlow) and the saved file in MLflow.

One MLflow run, ``rewrite-train``, tagged ``harlflow.kind=rewrite-agent``: the settings as
params, one step per iteration of ``charts/...`` (returns, real-environment steps),
``losses/...`` (PPO) and ``world/...`` (the world model, fitted and held-out), and the agent
file as an artifact, registered as a version of ``xrlflow-agent`` or ``rlflow-agent``. The
agent file is written only after the run has logged and registered everything.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from harlflow.core.errors import BadInputError, StoreError, first_line
from harlflow.core.files import replacing
from tasks import tracking

AGENTS = ("xrlflow", "rlflow")
ARTIFACT_PATH = "agent"


def registered_name(agent_kind: str) -> str:
    """The registered model whose versions are the ``agent_kind`` agents trained here."""
    return f"{agent_kind}-agent"


def check(agent_kind: str, *, iterations: int, episodes: int, max_steps: int) -> None:
    """What :func:`train_agent` would refuse, refused before any work (the CLI calls it before
    Prefect starts): a ``BadInputError`` naming the value."""
    if agent_kind not in AGENTS:
        raise BadInputError(f"unknown agent {agent_kind!r}: choose one of {', '.join(AGENTS)}")
    if iterations < 1 or episodes < 1 or max_steps < 1:
        raise BadInputError("--iterations, --episodes and --max-steps must be >= 1")


def load_graphs(models: list[str], *, seed: int = 0) -> dict:
    """The models to train on (as ``optimize`` takes them), imported under the home and
    normalised: name → graph."""
    from harlflow.core.config import import_cache_dir
    from tasks.importing import default_name, import_model
    from xrlflow import ir

    if not models:
        raise BadInputError("rewrite-train needs at least one model")
    graphs = {}
    for m in models:
        imported = import_model(m, cache_dir=import_cache_dir(), seed=seed)
        graphs[default_name(m)] = ir.normalize(ir.check(ir.load(imported.onnx_path)))
    return graphs


def train_agent(
    graphs: dict,
    agent_kind: str,
    oracle,
    *,
    out: str | Path,
    iterations: int,
    episodes: int,
    max_steps: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``agent_kind`` on ``graphs`` (name → normalised graph) judged by ``oracle``, log
    the run to MLflow and save the agent to ``out``; returns the learning curve."""
    from harlflow import rl
    from xrlflow.env import RewriteEnv

    check(agent_kind, iterations=iterations, episodes=episodes, max_steps=max_steps)
    rl.setup(seed)
    env = RewriteEnv(graphs, oracle, max_steps=max_steps)
    curve: list[dict] = []

    def progress(i: int, m: dict) -> None:
        curve.append(m)
        shown = [
            f"{k.split('/')[1]} {m[k]:+.4f}"
            for k in (
                "charts/mean_return",
                "charts/imagined_return",
                "charts/real_return",
                "world/latent_nll",
                "world/reward",
            )  # fmt: skip
            if k in m
        ]
        log(f"iteration {i + 1}/{iterations}: " + ", ".join(shown))

    c = tracking.client()
    with tracking.run(c, "rewrite-train", tags={"harlflow.kind": "rewrite-agent"}) as run_id:
        tracking.log_params(
            c,
            run_id,
            {
                "agent": agent_kind,
                "oracle": oracle.name,
                "models": ",".join(sorted(graphs)),
                "iterations": iterations,
                "episodes": episodes,
                "max_steps": max_steps,
                "seed": seed,
            },
        )
        if agent_kind == "xrlflow":
            from xrlflow import agent as A

            agent = A.XRLflowAgent(seed=seed)
            A.train(env, agent, iterations=iterations, episodes_per_iter=episodes,
                    callback=progress, seed=seed)  # fmt: skip
        else:
            from xrlflow import rlflow as RF

            agent = RF.RLFlowAgent(seed=seed)
            world_curve: list[dict] = []
            RF.train(env, agent, iterations=iterations, random_episodes=episodes * 6,
                     ground_episodes=episodes, callback=progress, seed=seed,
                     on_world_epoch=lambda _e, m: world_curve.append(m))  # fmt: skip
            for step, m in enumerate(world_curve):  # the first fit's epochs
                tracking.log_metrics(c, run_id, {f"{k}_fit": v for k, v in m.items()}, step=step)
        for step, m in enumerate(curve):
            tracking.log_metrics(c, run_id, m, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / Path(out).name
            agent.save(staged)
            try:
                c.log_artifact(run_id, str(staged), ARTIFACT_PATH)
            except Exception as e:  # the agent file is not written: one line, no partial state
                raise StoreError(f"logging the agent to MLflow failed: {first_line(e)}") from None
            version = tracking.register_version(
                c, registered_name(agent_kind), run_id, ARTIFACT_PATH,
                description=f"harlflow's {agent_kind} rewrite agent (harlflow rewrite-train).",
                tags={"oracle": oracle.name, "models": ",".join(sorted(graphs))},
            )  # fmt: skip
            with replacing(out) as partial:
                shutil.copyfile(staged, partial)
    log(f"saved {out}; registered {registered_name(agent_kind)} version {version} (run {run_id})")
    return {"path": str(out), "run_id": run_id, "version": version, "curve": curve}

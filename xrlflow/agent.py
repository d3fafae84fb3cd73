"""The X-RLflow agent: a graph attention network that embeds the current graph and every
candidate graph one substitution away, a policy over (stop, candidates), and PPO with GAE.

Encoding (:func:`featurize`):

- node features: op one-hot (:data:`OPS` + "other"), output shape (rank, log numel, log of the
  last four dims), constant inputs (count, log numel), graph-output flag, and the oracle's cost
  of the node (log µs);
- edge features: the tensor's dims (log of the last four, rank, log numel) and direction (each
  tensor gives a forward and a backward edge, so information flows both ways);
- a global feature: the graph's estimated cost relative to the episode's starting graph.

The encoder is ``layers`` GAT message-passing steps (5, as in X-RLflow) with edge-aware
attention, then mean+max pooling. A candidate's logit comes from its embedding, its difference
to the current graph's embedding and the rule that produced it; *stop* and the value come from
the current graph's embedding. PPO defaults follow the X-RLflow paper: γ 0.99, λ 0.95,
lr 5e-4, clip 0.2, 4 epochs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from harlflow.rl import EnvAgent, PPOConfig, Sample, collect, rollout
from xrlflow import rules as R
from xrlflow.cost import CostOracle
from xrlflow.ir import Graph

OPS = [
    "Conv", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Erf", "Exp",
    "Softmax", "LayerNormalization", "BatchNormalization", "Transpose", "Reshape", "Squeeze",
    "Unsqueeze", "Flatten", "Concat", "Split", "Slice", "Gather", "MaxPool", "AveragePool",
    "GlobalAveragePool", "ReduceMean", "Pow", "Sqrt", "Identity", "Dropout", "Pad", "Constant",
    "Cast", "Shape", "Expand", "Where", "Clip", "LeakyRelu", "Neg", "Abs",
]  # fmt: skip
_OP_INDEX = {op: i for i, op in enumerate(OPS)}
NODE_DIM = len(OPS) + 1 + 6 + 2 + 2
EDGE_DIM = 6 + 1
GLOBAL_DIM = 2


KIND = "X-RLflow agent"
"""what its checkpoints say they hold (``harlflow.rl.save_checkpoint``)"""


class GraphTensors(NamedTuple):
    x: torch.Tensor  # (nodes, NODE_DIM)
    src: torch.Tensor  # (edges,)
    dst: torch.Tensor  # (edges,)
    e: torch.Tensor  # (edges, EDGE_DIM)
    glob: torch.Tensor  # (GLOBAL_DIM,)


def _dims(shape) -> list[float]:
    if shape is None:
        return [0.0] * 6
    s = [d if isinstance(d, int) and d > 0 else 1 for d in shape]
    last = ([1] * 4 + s)[-4:]
    return [math.log1p(d) for d in last] + [len(s) / 4.0, math.log1p(math.prod(s)) / 10.0]


def featurize(g: Graph, oracle: CostOracle, base_cost: float) -> GraphTensors:
    """Node, edge and global features of ``g`` (see module docstring)."""
    index = {n.name: i for i, n in enumerate(g.nodes)}
    producer = {o: n.name for n in g.nodes for o in n.outputs if o}
    outs = set(g.output_names)
    x = np.zeros((len(g.nodes), NODE_DIM), np.float32)
    src, dst, e = [], [], []
    for i, n in enumerate(g.nodes):
        x[i, _OP_INDEX.get(n.op, len(OPS))] = 1.0
        o = len(OPS) + 1
        x[i, o : o + 6] = _dims(g.shape(n.outputs[0]) if n.outputs else None)
        consts = [g.initializers[t] for t in n.inputs if t in g.initializers]
        x[i, o + 6] = len(consts) / 4.0
        x[i, o + 7] = math.log1p(sum(c.size for c in consts)) / 10.0
        x[i, o + 8] = float(any(t in outs for t in n.outputs))
        x[i, o + 9] = math.log1p(oracle.op_cost(g, n) * 1e6) / 5.0
        for t in n.inputs:
            p = producer.get(t)
            if p is None:
                continue
            d = _dims(g.shape(t))
            src += [index[p], i]
            dst += [i, index[p]]
            e += [d + [1.0], d + [-1.0]]
    cost = sum(oracle.op_cost(g, n) for n in g.nodes)
    glob = [cost / base_cost if base_cost > 0 else 1.0, len(g.nodes) / 100.0]
    return GraphTensors(
        torch.from_numpy(x),
        torch.tensor(src, dtype=torch.long),
        torch.tensor(dst, dtype=torch.long),
        torch.tensor(e, dtype=torch.float32).reshape(-1, EDGE_DIM),
        torch.tensor(glob, dtype=torch.float32),
    )


def _union(graphs: list[GraphTensors]):
    """Disjoint union of graphs: features, edges with offsets, and each node's graph index."""
    xs, srcs, dsts, es, batch, off = [], [], [], [], [], 0
    for k, gt in enumerate(graphs):
        xs.append(gt.x)
        srcs.append(gt.src + off)
        dsts.append(gt.dst + off)
        es.append(gt.e)
        batch.append(torch.full((gt.x.shape[0],), k, dtype=torch.long))
        off += gt.x.shape[0]
    return (
        torch.cat(xs),
        torch.cat(srcs),
        torch.cat(dsts),
        torch.cat(es),
        torch.cat(batch),
        torch.stack([gt.glob for gt in graphs]),
    )


class GATLayer(nn.Module):
    """Graph attention with edge features: α_ij ∝ exp(LeakyReLU(a·[Wh_i, Wh_j, W_e e_ij]))."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Linear(d, d, bias=False)
        self.we = nn.Linear(EDGE_DIM, d, bias=False)
        self.att = nn.Parameter(torch.randn(3, d) * 0.1)
        self.self_w = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h, src, dst, e):
        wh, we = self.w(h), self.we(e)
        logits = nn.functional.leaky_relu(
            (wh[dst] * self.att[0]).sum(-1)
            + (wh[src] * self.att[1]).sum(-1)
            + (we * self.att[2]).sum(-1),
            0.2,
        )
        n = h.shape[0]
        mx = torch.full((n,), -1e9).scatter_reduce(0, dst, logits, "amax", include_self=True)
        ex = torch.exp(logits - mx[dst])
        denom = torch.zeros(n).index_add(0, dst, ex)
        alpha = ex / (denom[dst] + 1e-9)
        agg = torch.zeros_like(wh).index_add(0, dst, alpha[:, None] * (wh[src] + we))
        return self.norm(h + nn.functional.elu(self.self_w(h) + agg))


def gat_pool(inp: nn.Module, gat: nn.ModuleList, graphs: list[GraphTensors]) -> torch.Tensor:
    """Each graph's node embeddings after the GAT layers, pooled: ``[mean, max, global]``,
    shape ``(graphs, 2 * hidden + GLOBAL_DIM)`` (X-RLflow's policy and RLFlow's encoder)."""
    x, src, dst, e, batch, glob = _union(graphs)
    h = torch.relu(inp(x))
    for layer in gat:
        h = layer(h, src, dst, e)
    b, d = len(graphs), h.shape[1]
    count = torch.zeros(b).index_add(0, batch, torch.ones(len(batch))).clamp(min=1)
    mean = torch.zeros(b, d).index_add(0, batch, h) / count[:, None]
    mx = torch.full((b, d), -1e9).scatter_reduce(0, batch[:, None].expand(-1, d), h, "amax")
    mx = torch.where(mx < -1e8, torch.zeros_like(mx), mx)
    return torch.cat([mean, mx, glob], dim=1)


@dataclass
class AgentConfig(PPOConfig):
    """The X-RLflow agent's network and PPO settings (PPO's defaults from the X-RLflow paper)."""

    hidden: int = 64
    """width of the node embeddings"""
    layers: int = 5
    """GAT message-passing steps"""
    lr: float = 5e-4
    """Adam learning rate"""
    reward_scale: float = 10.0
    """rewards are relative improvements (~0.01); scaled for the critic"""


class GraphPolicy(nn.Module):
    def __init__(self, cfg: AgentConfig, n_rules: int):
        super().__init__()
        d = cfg.hidden
        self.inp = nn.Linear(NODE_DIM, d)
        self.gat = nn.ModuleList(GATLayer(d) for _ in range(cfg.layers))
        self.readout = nn.Sequential(nn.Linear(2 * d + GLOBAL_DIM, d), nn.Tanh())
        self.score = nn.Sequential(nn.Linear(2 * d + n_rules, d), nn.Tanh(), nn.Linear(d, 1))
        self.stop = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1))
        self.value = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, 1))
        self.n_rules = n_rules

    def embed(self, graphs: list[GraphTensors]) -> torch.Tensor:
        return self.readout(gat_pool(self.inp, self.gat, graphs))

    def forward(self, states: list[State]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per state: logits over [stop, candidates...]; and the states' values."""
        graphs = [g for s in states for g in (s.current, *s.candidates)]
        emb = self.embed(graphs)
        logits, values, i = [], [], 0
        for s in states:
            cur, cands = emb[i], emb[i + 1 : i + 1 + len(s.candidates)]
            i += 1 + len(s.candidates)
            stop = self.stop(cur)
            if len(s.candidates):
                onehot = torch.zeros(len(s.candidates), self.n_rules)
                onehot[torch.arange(len(s.candidates)), torch.tensor(s.rule_ids)] = 1.0
                feats = torch.cat([cands, cands - cur, onehot], dim=1)
                logits.append(torch.cat([stop, self.score(feats).squeeze(1)]))
            else:
                logits.append(stop)
            values.append(self.value(cur))
        return logits, torch.cat(values)


class State(NamedTuple):
    current: GraphTensors
    candidates: tuple[GraphTensors, ...]
    rule_ids: tuple[int, ...]


class XRLflowAgent(EnvAgent):
    """X-RLflow's agent (:class:`harlflow.rl.PPOAgent`): the graph policy, played on the real
    rewrite environment (:func:`harlflow.rl.collect`)."""

    kind = KIND
    name = "xrlflow"

    def __init__(
        self, cfg: AgentConfig | None = None, rules: list[R.Rule] | None = None, seed: int = 0
    ):
        cfg = cfg or AgentConfig()
        self.rule_names = [r.name for r in (rules or R.RULES)]
        self._rule_index = {n: i for i, n in enumerate(self.rule_names)}
        super().__init__(GraphPolicy(cfg, len(self.rule_names)), cfg, seed=seed)
        self._feat_cache: dict[str, GraphTensors] = {}

    @property
    def reward_scale(self) -> float:
        return self.cfg.reward_scale

    def state(self, obs: dict, oracle: CostOracle, base_cost: float) -> State:
        def feat(g: Graph) -> GraphTensors:
            key = g.structural_hash()
            if key not in self._feat_cache:
                if len(self._feat_cache) > 4096:
                    self._feat_cache.clear()
                self._feat_cache[key] = featurize(g, oracle, base_cost)
            return self._feat_cache[key]

        cands = obs["candidates"]
        return State(
            feat(obs["graph"]),
            tuple(feat(c.graph) for c in cands),
            tuple(self._rule_id(c.rule) for c in cands),
        )

    def observer(self, env, info: dict) -> Callable[[dict], State]:
        """Observations of the episode ``env`` began on ``info["model"]`` as states, costs
        relative to that model's."""
        base = env.oracle.estimate(env.graphs[info["model"]])
        return lambda obs: self.state(obs, env.oracle, base)

    def _rule_id(self, rule: str) -> int:
        if rule not in self._rule_index:
            raise ValueError(
                f"rule {rule!r} is not in this agent's rule library ({len(self.rule_names)} "
                "rules): build the environment with the agent's rules, or retrain the agent"
            )
        return self._rule_index[rule]

    @torch.no_grad()
    def act(self, state: State, greedy: bool = False) -> tuple[int, float, float]:
        logits, value = self.net([state])
        dist = torch.distributions.Categorical(logits=logits[0])
        if greedy:
            a = int(torch.argmax(logits[0]))
        else:
            a = int(torch.multinomial(dist.probs, 1, generator=self.gen))
        return a, float(dist.log_prob(torch.tensor(a))), float(value[0])

    def evaluate(self, samples: list[Sample]) -> tuple[torch.Tensor, ...]:
        """Log-probabilities of the actions taken, policy entropies and state values, under the
        current weights."""
        logits, values = self.net([s.state for s in samples])
        logp = torch.stack(
            [torch.log_softmax(lg, 0)[s.action] for lg, s in zip(logits, samples, strict=True)]
        )
        ent = torch.stack([torch.distributions.Categorical(logits=lg).entropy() for lg in logits])
        return logp, ent, values

    def episode(self, env, *, model=None, greedy: bool = False, seed=None) -> dict:
        """One episode on ``env``; its last info (``search.policy``)."""
        options = {"model": model} if model else None
        return rollout(env, self, options=options, greedy=greedy, seed=seed)[2]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        return {
            "config": asdict(self.cfg),
            "rules": self.rule_names,
            "ops": OPS,
            "weights": self.net.state_dict(),
        }

    @classmethod
    def restore(
        cls, blob: dict, *, rules: list[R.Rule] | None = None, seed: int = 0
    ) -> XRLflowAgent:
        """One trained with another rule library says to retrain."""
        rules = rules or R.RULES
        if blob["rules"] != [r.name for r in rules] or blob["ops"] != OPS:
            raise ValueError(
                "it was trained with a different rule library or op vocabulary; retrain "
                "it (harlflow rewrite-train)"
            )
        agent = cls(AgentConfig(**blob["config"]), rules, seed)
        agent.net.load_state_dict(blob["weights"])
        return agent


# ---------------------------------------------------------------------------- training / inference


def train(
    env,
    agent: XRLflowAgent,
    iterations: int = 20,
    episodes_per_iter: int = 4,
    callback: Callable[[int, dict], None] | None = None,
    seed: int = 0,
) -> list[dict]:
    """PPO on ``env``'s models; ``callback(iteration, metrics)`` gets the learning curve."""
    history = []
    rng = np.random.default_rng(seed)
    for it in range(iterations):
        buffer, infos = collect(env, agent, episodes_per_iter, rng)
        metrics = agent.update(buffer) | {
            "charts/mean_return": float(np.mean(buffer.returns())),
            "charts/mean_best_gain": float(
                np.mean([1 - i["best"][0] / i["start_latency"] for i in infos])
            ),
            "charts/mean_steps": float(np.mean(buffer.lengths())),
        }
        history.append(metrics)
        if callback:
            callback(it, metrics)
    return history

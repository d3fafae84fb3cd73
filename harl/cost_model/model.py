"""An attention-based cost model over the per-statement feature sequence of a program (after TLP):
statement features → linear layers → multi-head self-attention → residual blocks → a summed score,
with an embedding of the target added to every statement, trained with a pairwise ranking loss
within each (workload, target) group.

Scores rank programs: higher is faster. Evaluation is on **held-out workloads**
(:func:`split_by_workload`), never on held-out rows of workloads seen in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from harl.cost_model import RECIPES
from harl.cost_model.dataset import FEATURES
from harlflow.rl import Checkpointed

KIND = "harlflow cost model"
"""what its checkpoints say they hold (``harlflow.rl.save_checkpoint``)"""
MAX_STORES = 32  # statements kept per program (the rest are rare: fused kernels have a few)
FINE_TUNE_LR = 0.1
"""the ``head`` recipe's learning rate, as a fraction of the config's"""
DISTINCT = 1.1
"""latency ratio from which :func:`evaluate` counts a pair as clearly ordered (10 %: a chosen
cut, not a measured noise floor)"""


@dataclass
class ModelConfig:
    """The network's shape and its training settings."""

    hidden: int = 128
    """width of the statement embeddings"""
    heads: int = 4
    """attention heads"""
    blocks: int = 2
    """residual MLP blocks after the attention"""
    lr: float = 1e-3
    """Adam learning rate"""
    epochs: int = 30
    """passes over the training groups"""
    pairs_per_group: int = 0
    """sampled program pairs per (workload, target) group and epoch; 0: every pair"""
    pair_weight: str = "log_ratio"
    """``equal``, or ``log_ratio``: a pair weighs ``min(1, |log(lat_i / lat_j)| / log 2)``, so
    that pairs inside the timing noise count little and pairs 2x apart fully"""
    norm: bool = True
    """a LayerNorm on each statement's embedding (before the target is added)"""
    schedule: str = "cosine"
    """learning rate over the epochs: ``constant``, or ``cosine`` (down to 0 at the end)"""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay (0: plain Adam)"""
    inputs: str = "standard"
    """how statement features enter the net: ``signlog`` (``sign(x)·log1p(|x|)``; the features
    are mostly log2-scaled already, so this compresses them twice), or ``standard`` (each
    feature shifted and scaled by its mean and spread over the statements of the rows the model
    is first trained on, kept in the model)"""


LEGACY = {"pair_weight": "equal", "norm": False, "schedule": "constant", "weight_decay": 0.0,
          "inputs": "signlog"}  # fmt: skip
"""the training settings of checkpoints saved before these fields existed (the net they
describe: without ``norm``); those checkpoints also say ``pairs_per_group=64``. The defaults
above replaced them on 2026-12-07, measured with ``python bench/cost_model.py recipes``:
held-out pairwise accuracy 0.661 → 0.724-0.728 (haswell) and 0.691-0.735 → 0.741-0.757 (znver5)
on two workload splits, XGBoost 0.742 / 0.756-0.767 on the same rows"""


class CostNet(nn.Module):
    """Statement sequence (+ target) → one score per program."""

    def __init__(self, cfg: ModelConfig, n_targets: int):
        super().__init__()
        h = cfg.hidden
        layers = [nn.Linear(FEATURES, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU()]
        self.embed = nn.Sequential(*layers, *([nn.LayerNorm(h)] if cfg.norm else []))
        self.target = nn.Embedding(max(1, n_targets), h)
        self.attention = nn.MultiheadAttention(h, cfg.heads, batch_first=True)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h)) for _ in range(cfg.blocks)
        )
        self.out = nn.Linear(h, 1)
        self.standard = cfg.inputs == "standard"
        if self.standard:  # set by calibrate(), before the first training
            self.register_buffer("shift", torch.zeros(FEATURES))
            self.register_buffer("scale", torch.ones(FEATURES))
            self.register_buffer("calibrated", torch.tensor(False))

    def calibrate(self, x: torch.Tensor) -> None:
        """Each feature's mean and spread over the statements ``x`` (statements, FEATURES)."""
        self.shift.copy_(x.mean(dim=0))
        self.scale.copy_(x.std(dim=0).clamp(min=1e-3))
        self.calibrated.fill_(True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """x (batch, stores, FEATURES), mask (batch, stores) True on padding, target (batch,)."""
        if self.standard:
            x = (x - self.shift) / self.scale
        h = self.embed(x) + self.target(target)[:, None, :]
        a, _ = self.attention(h, h, h, key_padding_mask=mask)
        h = h + a
        for block in self.blocks:
            h = h + block(h)
        per_store = self.out(h).squeeze(-1).masked_fill(mask, 0.0)
        return per_store.sum(dim=1)


def _batch(
    features: Sequence[np.ndarray], signlog: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded statement sequences (sign-log scaled if ``signlog``) and their padding mask."""
    n = min(MAX_STORES, max(1, max(len(f) for f in features)))
    x = np.zeros((len(features), n, FEATURES), np.float32)
    mask = np.ones((len(features), n), bool)
    for i, f in enumerate(features):
        f = f[:n]
        x[i, : len(f)] = np.sign(f) * np.log1p(np.abs(f)) if signlog else f
        mask[i, : len(f)] = False
    mask[:, 0] = False  # an empty program still attends to one (zero) statement
    return torch.from_numpy(x), torch.from_numpy(mask)


def split_by_workload(rows: list[dict], holdout: float, seed: int) -> tuple[list, list]:
    """(train, test) rows, with whole workloads held out: a fraction ``holdout`` of them."""
    workloads = sorted({r["workload"] for r in rows})
    rng = np.random.default_rng(seed)
    rng.shuffle(workloads)
    k = max(1, int(round(holdout * len(workloads))))
    held = set(workloads[:k])
    return [r for r in rows if r["workload"] not in held], [
        r for r in rows if r["workload"] in held
    ]


def _groups(rows: list[dict]) -> list[list[dict]]:
    """Valid rows grouped by (workload, target): the programs a ranking compares."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if not r["failed"]:
            groups.setdefault((r["workload"], r["target"]), []).append(r)
    return [g for g in groups.values() if len(g) >= 2]


def evaluate(predict: Callable[[list[dict]], np.ndarray], rows: list[dict]) -> dict[str, float]:
    """Pairwise comparison accuracy and top-1 / top-5 of the scores ``predict`` gives (the
    best measured latency among the predicted best k, relative to the best measured: 1.0 is
    perfect), averaged over (workload, target) groups.

    ``pairwise_accuracy`` counts every pair of different latencies. Beside it,
    ``pairwise_accuracy_10pct`` counts only the pairs at least :data:`DISTINCT` apart, and
    ``pairs_10pct_share`` says which share of the pairs they are: no model ranks pairs that
    differ by less than the timing noise better than their labels do, and this tells those
    errors from errors on clearly ordered programs (on the committed dataset, 86 % of held-out
    pairs are 10 % apart or more, and accuracy on them is only ~0.03 higher)."""
    pair_ok = pair_n = far_ok = far_n = 0
    top1, top5 = [], []
    for g in _groups(rows):
        score = predict(g)
        lat = np.array([r["run_us"] for r in g])
        i, j = np.triu_indices(len(g), 1)
        differ = lat[i] != lat[j]
        far = np.maximum(lat[i], lat[j]) >= DISTINCT * np.minimum(lat[i], lat[j])
        right = (score[i] > score[j]) == (lat[i] < lat[j])
        pair_ok += int(right[differ].sum())
        pair_n += int(differ.sum())
        far_ok += int(right[far].sum())
        far_n += int(far.sum())
        order = np.argsort(-score)
        top1.append(lat.min() / lat[order[0]])
        top5.append(lat.min() / lat[order[:5]].min())
    return {
        "pairwise_accuracy": pair_ok / pair_n if pair_n else math.nan,
        "pairwise_accuracy_10pct": far_ok / far_n if far_n else math.nan,
        "pairs_10pct_share": far_n / pair_n if pair_n else math.nan,
        "top1": float(np.mean(top1)) if top1 else math.nan,
        "top5": float(np.mean(top5)) if top5 else math.nan,
        "groups": len(top1),
    }


class CostModel(Checkpointed):
    """The network, its target vocabulary, training and persistence."""

    kind = KIND

    def __init__(self, cfg: ModelConfig | None = None, targets: Sequence[str] = ()):
        self.cfg = cfg or ModelConfig()
        self.targets = list(targets)
        self.net = CostNet(self.cfg, len(self.targets))

    def with_targets(self, targets: Sequence[str]) -> CostModel:
        """This model with an embedding row for each of ``targets`` it lacks (a new target's
        row starts as the mean of the trained ones: "some CPU like those seen")."""
        missing = [t for t in targets if t not in self.targets]
        if not missing:
            return self
        grown = CostModel(self.cfg, [*self.targets, *missing])
        state = self.net.state_dict()
        old = state["target.weight"][: len(self.targets)]
        if len(self.targets):
            new = old.mean(dim=0, keepdim=True).expand(len(missing), -1)
            state["target.weight"] = torch.cat([old, new])
        else:
            state["target.weight"] = grown.net.state_dict()["target.weight"]
        grown.net.load_state_dict(state)
        return grown

    def _batch(self, rows: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch([r["features"] for r in rows], signlog=self.cfg.inputs == "signlog")

    def _target_ids(self, rows: Sequence[dict]) -> torch.Tensor:
        index = {t: i for i, t in enumerate(self.targets)}
        return torch.tensor([index.get(r["target"], 0) for r in rows], dtype=torch.long)

    @torch.no_grad()
    def predict(self, rows: Sequence[dict]) -> np.ndarray:
        """Scores of the rows' programs (higher: predicted faster)."""
        self.net.eval()
        x, mask = self._batch(rows)
        return self.net(x, mask, self._target_ids(rows)).numpy()

    def head_parameters(self) -> list[nn.Parameter]:
        """What the ``head`` recipe trains: the target embeddings (a row per
        target) and the output layer; the statement body (embedding, attention, residual
        blocks) stays as pre-trained."""
        return [self.net.target.weight, *self.net.out.parameters()]

    def fit(
        self,
        rows: list[dict],
        *,
        seed: int = 0,
        epochs: int | None = None,
        on_epoch: Callable[[int, float], None] | None = None,
        recipe: str = "full",
    ) -> list[float]:
        """Train on ``rows`` with a pairwise logistic loss within each group, for ``epochs``
        (default: the config's); the mean loss per epoch (also given to ``on_epoch``).
        ``recipe``: ``"full"`` trains every weight at the config's learning rate; ``"head"``
        (fine-tuning a pre-trained model on a new target's few records) only
        :meth:`head_parameters`, at :data:`FINE_TUNE_LR` of it."""
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
        rng = np.random.default_rng(seed)
        params = self.head_parameters() if recipe == "head" else list(self.net.parameters())
        lr = self.cfg.lr * (FINE_TUNE_LR if recipe == "head" else 1.0)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)
        epochs = self.cfg.epochs if epochs is None else epochs
        cosine = self.cfg.schedule == "cosine"
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if cosine else None
        groups = _groups(rows)
        if self.net.standard and not self.net.calibrated and groups:
            statements = [r["features"][:MAX_STORES] for g in groups for r in g]
            self.net.calibrate(torch.from_numpy(np.concatenate(statements)).float())
        curve = []
        for _ in range(epochs):
            self.net.train()
            losses = []
            for g in (groups[i] for i in rng.permutation(len(groups))):
                loss = self._pair_loss(g, rng)
                if loss is None:
                    continue
                self.net.zero_grad(set_to_none=True)  # the frozen body too
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if sched is not None:
                sched.step()
            curve.append(float(np.mean(losses)) if losses else math.nan)
            if on_epoch is not None:
                on_epoch(len(curve), curve[-1])
        return curve

    def _pair_loss(self, g: list[dict], rng: np.random.Generator) -> torch.Tensor | None:
        """The pairwise logistic loss over one group's programs (None: all latencies equal)."""
        x, mask = self._batch(g)
        score = self.net(x, mask, self._target_ids(g))
        lat = torch.tensor([r["run_us"] for r in g], dtype=torch.float64)
        if self.cfg.pairs_per_group > 0:
            i = torch.from_numpy(rng.integers(0, len(g), self.cfg.pairs_per_group))
            j = torch.from_numpy(rng.integers(0, len(g), self.cfg.pairs_per_group))
        else:
            i, j = torch.triu_indices(len(g), len(g), 1)
        keep = lat[i] != lat[j]
        if not keep.any():
            return None
        i, j = i[keep], j[keep]
        sign = torch.where(lat[i] < lat[j], 1.0, -1.0)  # i faster: score i higher
        loss = nn.functional.softplus(-sign * (score[i] - score[j]))
        if self.cfg.pair_weight == "equal":
            return loss.mean()
        w = (torch.log(lat[i] / lat[j]).abs() / math.log(2.0)).clamp(max=1.0).float()
        return (w * loss).sum() / w.sum()

    def evaluate(self, rows: list[dict]) -> dict[str, float]:
        """:func:`evaluate` with this model's scores."""
        return evaluate(self.predict, rows)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        """Weights, config and target vocabulary."""
        return {
            "config": asdict(self.cfg),
            "targets": self.targets,
            "features": FEATURES,
            "weights": self.net.state_dict(),
        }

    @classmethod
    def restore(cls, blob: dict) -> CostModel:
        if blob.get("features") != FEATURES:
            raise ValueError(
                f"it has {blob.get('features')} features per statement, not {FEATURES}: "
                "retrain it (harlflow cost-model train)"
            )
        model = cls(ModelConfig(**{**LEGACY, **blob["config"]}), blob["targets"])
        model.net.load_state_dict(blob["weights"])
        return model

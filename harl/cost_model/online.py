"""The attention cost model as MetaSchedule's cost model: a ``PyCostModel`` that scores
candidates with a :class:`~harl.cost_model.model.CostModel` and keeps learning online from the
run's measurements (a few epochs on what the run measured so far, after every round).

Both search strategies use it through ``tune(..., cost_model=...)``: ``"xgb"`` (MetaSchedule's
XGBoost, the default), ``"transfer"`` (the team's model that ``harlflow cost-model train``
fine-tuned on the store's records, else the model pre-trained on the dataset the package ships
with, :data:`PRETRAINED`), a :class:`~harl.cost_model.model.CostModel`, or the path of a saved
one. A target the model was not trained on gets an embedding of its own, started at the mean of
the known targets' and learned online.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from harl.cost_model.model import CostModel, ModelConfig
from harl.database import mean_run_secs
from harlflow.core import config
from harlflow.core.errors import BadInputError
from harlflow.core.targets import target_key

PRETRAINED = Path(__file__).with_name("pretrained.pt")  # regenerate: see the README
ONLINE_EPOCHS = 2  # passes over the run's measurements after each round
ONLINE_WINDOW = 512  # the most recent measurements kept for online updates


@derived_object
class LearnedCostModel(ms.cost_model.PyCostModel):
    """Scores candidates with an attention :class:`CostModel`; learns from each round."""

    def __init__(self, model: CostModel, target: dict[str, Any]):
        self.model = model
        self.target = target_key(target)
        self.model = model.with_targets([self.target])  # a new target: its own embedding
        self.rows: list[dict] = []
        self.extractor = ms.feature_extractor.PerStoreFeature()

    def load(self, path: str) -> None:
        self.model = CostModel.load(path)

    def save(self, path: str) -> None:
        self.model.save(path)

    def _rows(self, context, candidates) -> list[dict]:
        feats = self.extractor.extract_from(context, candidates)
        workload = str(hash(context.mod))
        return [
            {
                "features": f.numpy().astype(np.float32),
                "target": self.target,
                "workload": workload,
            }
            for f in feats
        ]

    def predict(self, context, candidates) -> np.ndarray:
        if not candidates:
            return np.zeros(0)
        return self.model.predict(self._rows(context, candidates)).astype("float64")

    def update(self, context, candidates, results) -> None:
        for row, res in zip(self._rows(context, candidates), results, strict=True):
            ok = res.error_msg is None and res.run_secs
            run_us = mean_run_secs(res.run_secs) * 1e6 if ok else np.nan
            row.update(run_us=run_us, failed=not ok)
            self.rows.append(row)
        del self.rows[:-ONLINE_WINDOW]
        self.model.fit(self.rows, seed=len(self.rows), epochs=ONLINE_EPOCHS)


def transfer_model_path() -> Path:
    """What ``--cost-model transfer`` loads: the team's fine-tuned model, else the shipped one."""
    team = config.cost_model_path()
    return team if team.is_file() else PRETRAINED


def create_cost_model(spec: str | Path | CostModel, target: dict[str, Any]):
    """MetaSchedule's cost model for ``spec``: ``"xgb"`` stays MetaSchedule's XGBoost;
    ``"transfer"``, a :class:`CostModel` or the path of a saved one becomes a learned,
    online-updated model."""
    if isinstance(spec, str) and spec == "xgb":
        return "xgb"
    if isinstance(spec, str) and spec == "transfer":
        spec = transfer_model_path()
    if isinstance(spec, CostModel):
        model = spec
    elif isinstance(spec, (str, Path)):
        model = CostModel.load(spec)
    else:
        raise BadInputError(f"--cost-model must be 'xgb', 'transfer' or a model file, got {spec!r}")
    return LearnedCostModel(model, target)


def untrained(target: dict[str, Any], cfg: ModelConfig | None = None) -> CostModel:
    """A fresh model for one target (what online learning starts from without pre-training)."""
    return CostModel(cfg, [target_key(target)])

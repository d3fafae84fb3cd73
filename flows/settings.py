"""The settings of an optimisation run: one dataclass from the CLI through ``optimize`` and
``retune`` (and a ``serve`` deployment's parameters), checked before any store is touched."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harl.budget import UNLIMITED_TRIALS
from harl.runners import parse_rpc
from harl.spec import TuningSpec
from harl.strategies import STRATEGIES
from harlflow.core.errors import BadInputError
from harlflow.core.targets import resolve_target
from tasks.rewrite_methods import METHODS, ORACLES, lookup
from tasks.s3 import parse_s3_uri

DEFAULT_TRIALS = 64


@dataclass
class RunSettings:
    """How a model is optimised: budget, search, target, stages and where it is published."""

    trials: int | None = None
    """global trial budget; None: 64, or no cap when ``time_budget_s`` is given"""
    time_budget_s: float | None = None
    """stop tuning after this many seconds (with ``trials``, whichever comes first)"""
    strategy: str = "evolutionary"
    """search strategy: a name in ``harl.strategies.STRATEGIES``"""
    target: str | dict[str, Any] | None = None
    """TVM target dict (or JSON, or cpu/host); None: this host's CPU"""
    rewrite: str = "greedy"
    """graph rewriting before tuning: none, greedy, xrlflow or rlflow"""
    rewrite_oracle: str = "tvm"
    """what judges a rewrite: ``tvm`` (the compiled artifact's kernels) or ``onnxruntime``"""
    seed: int = 0
    """seeds sampling, the agents' weights and the import's reference inputs"""
    min_trials_per_task: int = 4
    """measured warm-up samples each new task gets first"""
    measure: bool = True
    """measure the artifact against onnxruntime (and PyTorch eager for PyTorch sources), side by
    side (:mod:`harlflow.measure`)"""
    measure_seconds: float = 10.0
    """time limit of a side-by-side measurement (the regression gate may take up to 3×)"""
    measure_untuned: bool = False
    """also measure the untuned TVM build (it compiles again, and can be slow to run)"""
    s3_uri: str | None = None
    """also upload the artifact to s3://bucket/prefix"""
    promote: bool = False
    """move the 'production' alias to the new version unless it regresses"""
    max_regression: float = 0.05
    """allowed slowdown against production for ``promote`` (a fraction)"""
    rpc: str | None = None
    """measure on the RPC tracker HOST:PORT:KEY instead of locally"""
    cost_model: str = "xgb"
    """what ranks candidates: ``xgb`` (MetaSchedule's XGBoost), ``transfer`` (the pre-trained
    attention cost model, fine-tuned on the team's records when it has been) or a saved one's
    path"""
    task_scheduler: str | None = None
    """which task gets the next round: ``harl`` or ``gradient``; None: the strategy's own"""

    def checked(self) -> RunSettings:
        """These settings validated, with the target resolved and the trial default applied;
        a bad value is a :class:`BadInputError` naming it, before anything is written."""
        trials = self.trials
        if trials is None:  # a time budget alone is not capped by a trial count
            trials = UNLIMITED_TRIALS if self.time_budget_s else DEFAULT_TRIALS
        TuningSpec(trials, self.time_budget_s, min_trials_per_task=self.min_trials_per_task,
                   task_scheduler=self.task_scheduler)  # fmt: skip
        if self.strategy not in STRATEGIES:
            raise BadInputError(
                f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}"
            )
        lookup(METHODS, self.rewrite, "rewrite method")
        lookup(ORACLES, self.rewrite_oracle, "rewrite oracle")
        if self.max_regression < 0 or self.measure_seconds <= 0:
            raise BadInputError("--max-regression must be >= 0 and --measure-seconds > 0")
        if self.promote and not self.measure:
            raise BadInputError("--promote compares measured latencies: drop --no-measure")
        if self.s3_uri:
            parse_s3_uri(self.s3_uri)
        if self.rpc:
            parse_rpc(self.rpc)
        if self.cost_model != "xgb":
            from harl.cost_model.model import CostModel
            from harl.cost_model.online import transfer_model_path

            path = transfer_model_path() if self.cost_model == "transfer" else self.cost_model
            CostModel.load(path)  # a missing or bad file fails here, named
        return dataclasses.replace(self, trials=trials, target=resolve_target(self.target))

    def tuning_spec(self, *, time_budget_s: float | None, reserve_s_per_task: float = 0.0,
                    agent_path: str | Path | None = None) -> TuningSpec:  # fmt: skip
        """What the tune stage is asked to do: these (checked) settings, with the time left of
        the run's budget for tuning."""
        return TuningSpec(
            self.trials, time_budget_s, self.strategy, self.seed, self.min_trials_per_task,
            self.cost_model, agent_path, reserve_s_per_task, self.task_scheduler,
        )  # fmt: skip

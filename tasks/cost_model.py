"""``harlflow cost-model train``: the team's cost model, fine-tuned on every model it tuned.

Every optimize run's measurements accumulate in the store's tuning database. Training collects
them into ``$HARLFLOW_HOME/cost_model/records.parquet`` (merged, deduplicated), starts from the
current transfer model (the team's, else the one the package ships) or from scratch, reports
pairwise accuracy and top-1/top-5 on held-out workloads before and after, saves the model where
``--cost-model transfer`` finds it, and logs the run to MLflow with the model registered as a
version of ``harlflow-cost-model`` (tagged with its targets and accuracy), like the artifacts.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harl import database
from harl.cost_model import RECIPES
from harlflow.core import config
from harlflow.core.errors import BadInputError, StoreError, loading
from harlflow.core.files import replacing
from tasks import tracking

REGISTERED_NAME = "harlflow-cost-model"
ARTIFACT_PATH = "cost_model"


@dataclass
class TrainResult:
    path: str
    rows: int
    workloads: int
    targets: list[str]
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str | None = None
    version: str | None = None


def check_train(
    datasets: Iterable[str | Path] = (),
    *,
    start: str = "transfer",
    epochs: int | None = None,
    holdout: float = 0.2,
    recipe: str = "full",
) -> None:
    """What :func:`train` would refuse, refused before any work (the CLI calls it before
    Prefect starts, the flow before collecting the store's records, :func:`train` when it
    runs): a ``BadInputError`` naming the value."""
    from harl.cost_model import dataset

    if not 0 <= holdout < 1:
        raise BadInputError(f"--holdout must be in [0, 1), got {holdout}")
    if epochs is not None and epochs < 1:
        raise BadInputError(f"--epochs must be >= 1, got {epochs}")
    if recipe not in RECIPES:
        raise BadInputError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if recipe == "head" and start == "scratch":
        raise BadInputError("--recipe head fine-tunes a trained model: not with --scratch")
    if start not in ("transfer", "scratch") and not Path(start).is_file():
        raise BadInputError(f"--from: no cost model file at {start}")
    for p in map(Path, datasets):
        if not p.is_file():
            raise BadInputError(f"dataset not found: {p}")
        with loading(p, "harlflow dataset"):
            dataset.schema(p)
    db = config.tuning_db()
    if not datasets and not database.has_records(db):
        raise BadInputError(
            f"no tuning records in {db}: run 'harlflow optimize' first, or give --dataset"
        )


def store_records(log: Callable[[str], None] = print) -> Path:
    """The store's tuning database collected into the store's dataset file."""
    from harl.cost_model import dataset

    check_train()
    db = config.tuning_db()
    out = config.cost_model_records()
    counts = dataset.collect([db], out)
    log(
        f"collected {database.describe(db)}: {counts['rows']} programs "
        f"({counts['new_rows']} new) in {out}"
    )
    return out


def train(
    datasets: Iterable[str | Path] = (),
    *,
    start: str = "transfer",
    out: str | Path | None = None,
    epochs: int | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    register: bool = True,
    log: Callable[[str], None] = print,
    recipe: str = "full",
) -> TrainResult:
    """Fine-tune (``start="transfer"`` or a model path) or train from scratch (``"scratch"``)
    on ``datasets`` (default: the store's records), evaluate on held-out workloads, save to
    ``out`` (default: the team's model) and, with ``register``, log and register in MLflow.
    ``recipe``: ``"full"`` trains every weight; ``"head"`` only the target embeddings and the
    output layer at a tenth of the learning rate (:meth:`CostModel.fit`)."""
    from harl.cost_model import dataset
    from harl.cost_model.model import CostModel, ModelConfig, split_by_workload
    from harl.cost_model.online import transfer_model_path
    from harlflow import rl

    check_train(datasets, start=start, epochs=epochs, holdout=holdout, recipe=recipe)
    paths = [Path(p) for p in datasets] or [store_records(log)]
    rows: list[dict] = []
    for p in paths:
        with loading(p, "harlflow dataset"):
            rows += dataset.load(p)
    targets = sorted({r["target"] for r in rows})
    workloads = {r["workload"] for r in rows}
    if not rows or len(workloads) < 2:
        raise BadInputError(f"too few records to train on: {len(rows)} programs")
    rl.setup(seed)
    if start == "scratch":
        model = CostModel(ModelConfig(), targets)
    else:
        model = CostModel.load(transfer_model_path() if start == "transfer" else start)
        model = model.with_targets(targets)
    train_rows, test_rows = split_by_workload(rows, holdout, seed) if holdout > 0 else (rows, [])
    result = TrainResult(
        path=str(Path(out) if out else config.cost_model_path()),
        rows=len(rows),
        workloads=len(workloads),
        targets=targets,
    )
    if test_rows:
        result.before = model.evaluate(test_rows)
        log(f"held-out workloads before: {fmt(result.before)}")
    t0 = time.monotonic()
    n_epochs = epochs or model.cfg.epochs

    def progress(epoch: int, loss: float) -> None:
        log(f"epoch {epoch}/{n_epochs}: ranking loss {loss:.4f}")

    result.losses = model.fit(
        train_rows, seed=seed, epochs=n_epochs, on_epoch=progress, recipe=recipe
    )
    result.seconds = time.monotonic() - t0
    if test_rows:
        result.after = model.evaluate(test_rows)
        log(f"held-out workloads after:  {fmt(result.after)}")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.pt"
        model.save(staged)
        if register:  # before the team's model changes: a failed registration changes nothing
            _register(result, staged, start, seed, holdout, recipe)
            log(f"registered {REGISTERED_NAME} version {result.version} (run {result.run_id})")
        with replacing(result.path) as partial:
            shutil.copyfile(staged, partial)
    log(f"saved {result.path}")
    return result


def fmt(m: dict[str, float]) -> str:
    """Held-out accuracy (:meth:`CostModel.evaluate`'s metrics) in one line."""
    return (
        f"pairwise accuracy {m['pairwise_accuracy']:.3f} "
        f"({m['pairwise_accuracy_10pct']:.3f} on the {m['pairs_10pct_share']:.0%} of pairs "
        f"≥10% apart), top-1 {m['top1']:.3f}, "
        f"top-5 {m['top5']:.3f} ({m['groups']} groups)"
    )


def _register(
    result: TrainResult, staged: Path, start: str, seed: int, holdout: float, recipe: str
) -> None:
    """Log the training run (params, metrics, the model file) and register the model."""
    c = tracking.client()
    with tracking.run(c, "cost-model-train", tags={"harlflow.kind": "cost-model"}) as run_id:
        tracking.log_params(
            c,
            run_id,
            {
                "start": start,
                "rows": result.rows,
                "workloads": result.workloads,
                "targets": ",".join(result.targets),
                "epochs": len(result.losses),
                "holdout": holdout,
                "recipe": recipe,
                "seed": seed,
            },
        )
        for step, loss in enumerate(result.losses):
            tracking.log_metrics(c, run_id, {"ranking_loss": loss}, step=step)
        metrics: dict[str, Any] = {"train_seconds": result.seconds}
        for when, m in (("before", result.before), ("after", result.after)):
            for k in ("pairwise_accuracy", "pairwise_accuracy_10pct", "top1", "top5"):
                if k in m:
                    metrics[f"{when}_{k}"] = m[k]
        tracking.log_metrics(c, run_id, metrics)
        try:
            c.log_artifact(run_id, str(staged), ARTIFACT_PATH)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError(f"registering {REGISTERED_NAME} in MLflow failed: {e}") from None
        tags = {"targets": ",".join(result.targets), "rows": str(result.rows)}
        if "pairwise_accuracy" in result.after:
            tags["pairwise_accuracy"] = f"{result.after['pairwise_accuracy']:.4f}"
        result.version = tracking.register_version(
            c,
            REGISTERED_NAME,
            run_id,
            ARTIFACT_PATH,
            description="harlflow's learned cost model, fine-tuned on the team's records.",
            tags=tags,
        )
        result.run_id = run_id

"""The pipeline's stages and the training jobs' stages as Prefect tasks: thin wrappers around
each stage's plain function, defined once, here, so that the stage modules import without
Prefect (the CLI checks a run's input with them before Prefect, which creates its home on
import, is loaded).

None is retried as a whole: measurements are not I/O that flakes, a retried publish would
register a second version (S3 uploads retry per file, MLflow's client its HTTP requests), and
imports are content-addressed under the home (the same content imports once), so no Prefect
cache either.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from harlflow.core import config
from harlflow.core.signature import TensorSpec
from tasks import cost_model, datasets, harl_training, rewrite_training
from tasks.importing import ImportedModel, import_model
from tasks.packaging import package
from tasks.publishing import publish
from tasks.rewriting import rewrite_model
from tasks.tuning import tune_model


@task(name="import", cache_policy=NO_CACHE)
def import_task(
    model: str, inputs: list[TensorSpec] | None, checkpoint: str | None, seed: int, name: str | None
) -> ImportedModel:
    """Import a model into a canonical ONNX plus reference outputs, under the home."""
    return import_model(
        model,
        cache_dir=config.import_cache_dir(),
        inputs=inputs,
        checkpoint=checkpoint,
        name=name,
        seed=seed,
    )


rewrite_task = task(name="rewrite", cache_policy=NO_CACHE)(rewrite_model)
tune_task = task(name="tune", cache_policy=NO_CACHE)(tune_model)
package_task = task(name="package", cache_policy=NO_CACHE)(package)
publish_task = task(name="publish", cache_policy=NO_CACHE)(publish)


# ---- the offline training jobs' stages (flows/training.py)
generate_task = task(name="generate", cache_policy=NO_CACHE)(datasets.generate)
log_dataset_task = task(name="register-dataset", cache_policy=NO_CACHE)(datasets.log_dataset)
store_records_task = task(name="collect-records", cache_policy=NO_CACHE)(cost_model.store_records)
cost_model_task = task(name="train-cost-model", cache_policy=NO_CACHE)(cost_model.train)
harl_agent_task = task(name="train-harl-agent", cache_policy=NO_CACHE)(harl_training.train)
load_graphs_task = task(name="import-models", cache_policy=NO_CACHE)(rewrite_training.load_graphs)
rewrite_agent_task = task(name="train-rewrite-agent", cache_policy=NO_CACHE)(
    rewrite_training.train_agent
)

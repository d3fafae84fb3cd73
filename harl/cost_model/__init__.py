"""The learned cost model: the dataset of measured programs (:mod:`.dataset`) and an
attention model that ranks programs from their per-statement features (:mod:`.model`)."""

RECIPES = ("full", "head")
"""how :meth:`~harl.cost_model.model.CostModel.fit` trains: every weight, or only the target
embeddings and the output layer (the pre-trained body frozen); here, importing nothing heavy,
for the CLI's checks"""

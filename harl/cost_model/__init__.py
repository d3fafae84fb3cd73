"""The learned cost model: the dataset of measured programs (:mod:`.dataset`) and an
attention model that ranks programs from their per-statement features (:mod:`.model`)."""

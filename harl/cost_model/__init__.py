"""The learned cost model's pieces: the dataset of measured programs (:mod:`.dataset`)."""

"""harlflow's lowest layer: what every other package may import, and which imports none of them.

Errors for users (:mod:`.errors`), where the stores live (:mod:`.config`), cross-process locks
(:mod:`.locks`), content hashes (:mod:`.hashing`), tensor signatures (:mod:`.signature`), TVM
targets (:mod:`.targets`) and the comparison of outputs against a reference (:mod:`.outputs`).
The layering above it is an import-linter contract in ``pyproject.toml``.
"""

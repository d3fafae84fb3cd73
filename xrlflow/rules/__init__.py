"""Verified subgraph substitutions, as data: the rule library X-RLflow and greedy search use.

- :mod:`.engine`: :class:`Rule`, :class:`Match`, :func:`candidates`, :func:`apply`;
- one module per rule family, each ending with its ``RULES`` list: :mod:`.fold` (constants into
  weights, biases into Gemm/Conv), :mod:`.const` (constant folding), :mod:`.eliminate`,
  :mod:`.layout`, :mod:`.merge` (parallel operators, enlarged kernels) and :mod:`.algebra`;
- :mod:`.common`: helpers several families use;
- :mod:`.examples`: a random instance of every rule's pattern, which the tests rewrite and
  compare against the original with onnxruntime.

To add a rule: write its rewrite function in its family's module, an example model in
:mod:`.examples`, and append a :class:`Rule` (with its one-line doc) to that module's ``RULES``.
The library is the families' lists in the order below; a saved X-RLflow agent records it and
must be retrained when it changes (``harlflow rewrite-train``).
"""

from __future__ import annotations

from xrlflow.rules import algebra, const, eliminate, fold, layout, merge
from xrlflow.rules.engine import Candidate, Match, Rewrite, Rule, RuleError, apply, candidates

RULES: list[Rule] = [
    *fold.RULES,
    *const.RULES,
    *eliminate.RULES,
    *layout.RULES,
    *merge.RULES,
    *algebra.RULES,
]
BY_NAME = {r.name: r for r in RULES}
assert len(BY_NAME) == len(RULES), "rule names must be unique"

__all__ = [
    "BY_NAME",
    "RULES",
    "Candidate",
    "Match",
    "Rewrite",
    "Rule",
    "RuleError",
    "apply",
    "candidates",
]

"""The rule engine: rules as data, matching them on a graph, and applying a rewrite.

A :class:`Rule` is a pattern (the op type a match is anchored at) plus a rewrite function that
looks at the anchor's neighbourhood and yields zero or more :class:`Rewrite` s (new nodes, new
initializers, and which old tensors the new ones replace). Old nodes that nothing reads any more
are dropped by dead-code elimination in :meth:`Graph.replace`, and every rewritten graph must
pass :func:`~xrlflow.ir.check` before it becomes a :class:`Candidate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx

from xrlflow.ir import Graph, GraphError, Node, check


@dataclass
class Rewrite:
    """New nodes and initializers; ``rename``: old tensor → the new tensor carrying its value."""

    add: list[Node]
    rename: dict[str, str]
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    remove: list[Node] = field(default_factory=list)


@dataclass(frozen=True)
class Rule:
    """A substitution: where it anchors, how it rewrites, an example of its pattern, a doc."""

    name: str
    category: str
    """fold, fuse, const, eliminate, layout, merge, enlarge or algebra (after TASO's)"""
    anchor: str | tuple[str, ...]
    """op type(s) a match starts at ("*": any op)"""
    rewrite: Callable[[Match, Node], Iterator[Rewrite]]
    """yields the rewrites at an anchor node; yields nothing when the pattern does not fit"""
    example: Callable[[np.random.Generator], onnx.ModelProto]
    """a random instance of the pattern (the tests rewrite it and compare outputs)"""
    doc: str
    """what it does, in one line (``harlflow rules`` lists it)"""


class RuleError(RuntimeError):
    """A rule's rewrite function failed on a node: a bug in the rule, not a non-match."""


@dataclass(frozen=True)
class Candidate:
    """One applicable substitution: rule ``rule`` at ``node`` (``index``-th rewrite there)."""

    rule: str
    node: str
    index: int
    graph: Graph = field(compare=False, repr=False)


class Match:
    """Lookups a rewrite function needs (built once per graph)."""

    def __init__(self, g: Graph):
        self.g = g
        self.prod = g.producer_of()
        self.cons = g.consumers_of()
        self.outs = set(g.output_names)

    def c(self, t: str) -> np.ndarray | None:
        return self.g.initializers.get(t)

    def src(self, t: str, op: str | tuple[str, ...] | None = None) -> Node | None:
        n = self.prod.get(t)
        if n is None or (op is not None and n.op not in ((op,) if isinstance(op, str) else op)):
            return None
        return n

    def sole_use(self, t: str) -> Node | None:
        """The only consumer of ``t``, when ``t`` is not a graph output."""
        users = self.cons.get(t, [])
        return users[0] if len(users) == 1 and t not in self.outs else None

    def private(self, n: Node) -> bool:
        """Every output of ``n`` has at most one consumer and none is a graph output."""
        return all(len(self.cons.get(o, [])) <= 1 and o not in self.outs for o in n.outputs)

    def shape(self, t: str) -> tuple[int, ...] | None:
        return self.g.static_shape(t)

    def new(self, op: str, inputs, n_out: int = 1, **attrs) -> Node:
        outs = tuple(self.g.fresh(op.lower()) for _ in range(n_out))
        return Node(self.g.fresh(op), op, tuple(inputs), outs, attrs)

    def init(self, arr: np.ndarray, hint: str = "w") -> tuple[str, dict[str, np.ndarray]]:
        name = self.g.fresh(hint)
        return name, {name: np.ascontiguousarray(arr)}


def candidates(g: Graph, rules: list[Rule], limit: int | None = None) -> list[Candidate]:
    """Every (rule, location) whose rewrite passes :func:`check`, de-duplicated by graph hash."""
    m = Match(g)
    seen = {g.structural_hash()}
    out: list[Candidate] = []
    by_anchor: dict[str, list[Rule]] = {}
    for r in rules:
        for a in (r.anchor,) if isinstance(r.anchor, str) else r.anchor:
            by_anchor.setdefault(a, []).append(r)
    for n in list(g.nodes):
        for rule in by_anchor.get(n.op, []) + by_anchor.get("*", []):
            for i, rw in enumerate(_safe(rule, m, n)):
                new = apply(g, rw)
                if new is None:
                    continue
                h = new.structural_hash()
                if h in seen:
                    continue
                seen.add(h)
                out.append(Candidate(rule.name, n.name, i, new))
                if limit is not None and len(out) >= limit:
                    return out
    return out


# What a rewrite function may raise when the numbers of one instance do not fit its pattern
# (arrays that do not broadcast, a division by zero): "no match" there. Anything else (a
# TypeError, a KeyError, an AttributeError) is a bug in the rule and stops with its name.
_NO_MATCH = (ValueError, ArithmeticError)


def _safe(rule: Rule, m: Match, n: Node) -> list[Rewrite]:
    try:
        return list(rule.rewrite(m, n))
    except _NO_MATCH:
        return []
    except Exception as e:
        raise RuleError(
            f"rule {rule.name!r} failed at node {n.name!r} ({n.op}): {type(e).__name__}: {e}"
        ) from e


def apply(g: Graph, rw: Rewrite) -> Graph | None:
    """The rewritten graph, or None when it fails :func:`check` (never a broken graph)."""
    try:
        new = g.replace(rw.remove, rw.add, rw.inits, rw.rename)
        return check(new, g.outputs)
    except GraphError:
        return None

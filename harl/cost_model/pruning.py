"""Dataset pruning: keep the programs that teach the ranking something, drop near-duplicates.

Tuning databases are redundant: an evolutionary search measures many programs that differ in
one tile factor of a loop that does not matter, and their features and latencies are nearly the
same. :func:`prune` keeps a fraction of each (workload, target) group by farthest-point sampling
on the programs' pooled features: the group's fastest and slowest programs first, then always
the program farthest from everything kept so far, so what is dropped is what is closest to a
kept program. :func:`random_subset` is the baseline it is compared with
(``bench/cost_model.py`` draws the curve of pairwise accuracy against data kept).
"""

from __future__ import annotations

import math

import numpy as np


def _pooled(rows: list[dict]) -> np.ndarray:
    """A program's statement sequence as one vector: sign-log features, summed and max-pooled."""
    out = []
    for r in rows:
        f = np.sign(r["features"]) * np.log1p(np.abs(r["features"]))
        out.append(np.concatenate([f.sum(axis=0), f.max(axis=0)]))
    x = np.asarray(out, np.float32)
    scale = x.std(axis=0)
    return x / np.where(scale > 0, scale, 1.0)


def _farthest_points(rows: list[dict], k: int) -> list[dict]:
    if k >= len(rows):
        return rows
    lat = np.array([r["run_us"] for r in rows])
    chosen = [int(np.argmin(lat)), int(np.argmax(lat))][: max(1, k)]
    x = _pooled(rows)
    chosen = list(dict.fromkeys(chosen))  # one program only: fastest and slowest are the same
    dist = np.min([np.linalg.norm(x - x[c], axis=1) for c in chosen], axis=0)
    dist[chosen] = -np.inf
    while len(chosen) < k:
        nxt = int(np.argmax(dist))  # ties (exact copies) go to the first: deterministic
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(x - x[nxt], axis=1))
        dist[nxt] = -np.inf
    return [rows[i] for i in sorted(chosen)]


def _groups(rows: list[dict]) -> dict[tuple[str, str, bool], list[dict]]:
    groups: dict[tuple[str, str, bool], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["target"], bool(r["failed"])), []).append(r)
    return groups


def prune(rows: list[dict], keep: float, seed: int = 0) -> list[dict]:
    """About ``keep`` (0..1] of ``rows``: per (workload, target) group, the fastest, the slowest
    and then the most distinct programs (at least two per group). Failed programs (no latency
    to rank) are subsampled at random to the same fraction."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    rng = np.random.default_rng(seed)
    out = []
    for (_, _, failed), g in _groups(rows).items():
        k = max(1 if failed else 2, math.ceil(keep * len(g)))
        if failed:
            out += [g[i] for i in sorted(rng.choice(len(g), min(k, len(g)), replace=False))]
        else:
            out += _farthest_points(g, k)
    return out


def random_subset(rows: list[dict], keep: float, seed: int = 0) -> list[dict]:
    """The baseline: the same fraction of each group, drawn uniformly at random."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    rng = np.random.default_rng(seed)
    out = []
    for (_, _, failed), g in _groups(rows).items():
        k = min(len(g), max(1 if failed else 2, math.ceil(keep * len(g))))
        out += [g[i] for i in sorted(rng.choice(len(g), k, replace=False))]
    return out

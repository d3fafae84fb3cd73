"""Decision edits: the agent's action space over a schedule's sampled decisions.

A MetaSchedule schedule is a design-space trace plus decisions for its sampling instructions.
An edit changes one decision:

- ``SamplePerfectTile``: move one prime factor from one loop level to another (the extent is
  unchanged, so the split stays perfect); respects the innermost-factor limit.
- ``SampleCategorical``: step to the neighbouring candidate (unroll depth, vectorise lanes ...).
- ``SampleComputeLocation``: step to the neighbouring loop of the consumer (-1 = root).

Applying an edit replays the trace with the new decision and runs the space generator's
postprocessors: an edit whose replay or postprocessing fails is invalid, never a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from harl.agent import ACTION_DIM

TILE, CATEGORICAL, LOCATION = "SamplePerfectTile", "SampleCategorical", "SampleComputeLocation"
EDITABLE = (TILE, CATEGORICAL, LOCATION)


@dataclass(frozen=True)
class Edit:
    """One change of one decision: ``inst`` is its position among the trace's instructions."""

    inst: int
    kind: str
    src: int = 0  # tile: level losing a factor; categorical/location: -1 or +1 (direction)
    dst: int = 0  # tile: level gaining it


def _smallest_prime(n: int) -> int:
    for p in range(2, int(math.isqrt(n)) + 1):
        if n % p == 0:
            return p
    return n


def decisions(trace) -> list[tuple[int, Any, Any]]:
    """(position, instruction, decision) of every editable sampling instruction."""
    out = []
    for i, inst in enumerate(trace.insts):
        if inst.kind.name in EDITABLE and inst in trace.decisions:
            out.append((i, inst, trace.decisions[inst]))
    return out


def legal_edits(trace) -> list[Edit]:
    """Every edit that keeps a decision inside its domain (validity is checked on apply)."""
    edits: list[Edit] = []
    for i, inst, dec in decisions(trace):
        kind = inst.kind.name
        if kind == TILE:
            tiles = [int(t) for t in dec]
            max_inner = int(inst.attrs[1]) if len(inst.attrs) > 1 else -1
            for s, ts in enumerate(tiles):
                if ts <= 1:
                    continue
                p = _smallest_prime(ts)
                for d in range(len(tiles)):
                    if d == s:
                        continue
                    if d == len(tiles) - 1 and max_inner > 0 and tiles[d] * p > max_inner:
                        continue
                    edits.append(Edit(i, kind, s, d))
        elif kind == CATEGORICAL:
            n = len(inst.attrs[0])
            for step in (-1, 1):
                if 0 <= int(dec) + step < n:
                    edits.append(Edit(i, kind, step))
        else:
            for step in (-1, 1):
                if int(dec) + step >= -1:
                    edits.append(Edit(i, kind, step))
    return edits


def new_decision(trace, edit: Edit):
    """The decision ``edit`` gives its instruction."""
    inst = trace.insts[edit.inst]
    dec = trace.decisions[inst]
    if edit.kind == TILE:
        tiles = [int(t) for t in dec]
        p = _smallest_prime(tiles[edit.src])
        tiles[edit.src] //= p
        tiles[edit.dst] *= p
        return tiles
    return int(dec) + edit.src


def apply_edit(mod, trace, edit: Edit, postprocs, seed: int):
    """The schedule after ``edit``, post-processed; ``None`` when the result is invalid."""
    from harl.schedules import replay

    inst = trace.insts[edit.inst]
    try:
        new_trace = trace.with_decision(inst, new_decision(trace, edit), remove_postproc=True)
    except Exception:
        return None
    return replay(mod, new_trace, postprocs, seed)


def edit_features(trace, edits: list[Edit]) -> np.ndarray:
    """(n_edits, ACTION_DIM) description of each edit for the policy network."""
    n = max(1, len(trace.insts))
    feats = np.zeros((len(edits), ACTION_DIM), dtype=np.float32)
    for k, e in enumerate(edits):
        inst = trace.insts[e.inst]
        dec = trace.decisions[inst]
        f = feats[k]
        f[3] = e.inst / n
        f[11] = 1.0
        if e.kind == TILE:
            tiles = [int(t) for t in dec]
            levels = max(1, len(tiles) - 1)
            f[0] = 1.0
            f[4], f[5] = e.src / levels, e.dst / levels
            f[6], f[7] = math.log2(tiles[e.src]) / 10, math.log2(max(1, tiles[e.dst])) / 10
            f[8] = float(e.dst == len(tiles) - 1)
            f[9] = float(e.src == 0)
        elif e.kind == CATEGORICAL:
            f[1] = 1.0
            f[4] = e.src
            f[10] = int(dec) / max(1, len(inst.attrs[0]) - 1)
        else:
            f[2] = 1.0
            f[4] = e.src
            f[10] = (int(dec) + 1) / 8
    return feats


def decision_encoding(trace, size: int = 24) -> np.ndarray:
    """A fixed-size summary of the decisions: log2 tile factors, categorical indices, in order."""
    vals: list[float] = []
    for _, inst, dec in decisions(trace):
        if inst.kind.name == TILE:
            vals += [math.log2(max(1, int(t))) / 10 for t in dec]
        else:
            vals.append(int(dec) / 8)
    out = np.zeros(size, dtype=np.float32)
    out[: min(size, len(vals))] = vals[:size]
    return out

"""The side-by-side measuring protocol every latency harlflow reports comes from.

Timing on a shared machine is noisy, and the noise is one-sided and moves over seconds: the
same artifact's median moved 0.74-1.17 ms between fresh processes minutes apart. Comparing a
number measured now with one measured in another run (as the regression gate once did) is a
coin flip at 5 %. So every comparison is made like this:

1. **Fresh processes, one per runtime** (``python -m harlflow.measure KIND ...``), started one at
   a time, each pinned to the target's cores (``sched_setaffinity``) with that many threads. Only
   one times at a time: the others wait on a pipe, and after each runtime's part of a round the
   coordinator pauses :data:`SETTLE_S` so that its idle threads have stopped spinning before the
   next one starts. The thread pools spin between parallel loops as they do when deployed, TVM's
   for :data:`SPIN_COUNT` yields instead of its default 300 000 (which outlast the pause and
   slowed the onnxruntime process timed next by 30-40 %). ``spin=False`` turns spinning off in
   both (onnxruntime's ``session.intra_op.allow_spinning = 0``, ``TVM_THREAD_POOL_SPIN_COUNT=0``):
   not how they are deployed, and TVM's pool then wakes its threads through the kernel for every
   parallel loop (a GPT-style decoder took 1.65× as long, a small CNN 2.4×).
2. **Rounds, alternating** A B C A B C ...: in each round every runtime makes one untimed call,
   then a fixed number of timed calls (chosen once per runtime from its warm-up so that its part
   of a round lasts about ``round_seconds``); the round's statistic is their median. Whatever
   the machine does during a round hits all runtimes alike.
3. **Blocks of fresh processes.** Two processes running the same artifact differ by a steady
   0.5-1 % (where their memory landed: measured A/A, ``bench/measurement.py``), which no number
   of rounds in one process averages out. So the rounds come in blocks, each with new
   processes, and intervals are taken over blocks: a ratio A/B is, per block, the median of the
   per-round ratios (each round's A over the same round's B, which cancels what the machine did
   in that round); the reported ratio is their geometric mean over blocks with a Student-t
   interval on the log scale. A runtime's latency is the median of its round medians, with the
   same t-interval over its block medians. (With a single block, both fall back to a percentile
   bootstrap over rounds, which leaves the process-to-process part out.)
4. **Stop** when the question is answered (by default: every runtime's ratio to the first has an
   interval that excludes 1.0), or when ``max_seconds`` have passed, after at least
   ``min_blocks`` blocks either way.

:func:`side_by_side` runs the protocol; :func:`gate` is the regression gate's decision on a
:class:`Measurement`. Nothing here imports TVM or onnxruntime: the workers do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harlflow.core.errors import MeasurementError

LEVEL = 0.95
"""confidence level of every interval harlflow reports"""
RESAMPLES = 2000
MIN_BLOCKS = 3
"""blocks of fresh processes measured even when the time limit comes first"""
ROUND_SECONDS = 0.1
BLOCK_SECONDS = 1.0
"""how long a block's rounds last (its processes' start-up comes on top)"""
MAX_CALLS = 200
# Student's t, two-sided 95 %, by degrees of freedom (1-30); beyond, 1.96 + 2.4/df is within 0.1 %
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


@dataclass(frozen=True)
class Runtime:
    """One thing to time: a harlflow artifact directory (``tvm``), an ONNX file under
    onnxruntime (``ort``), or a PyTorch source (``torch``: a factory or a ``.pt2`` program)."""

    label: str
    kind: str
    path: str
    source_kind: str = "factory"
    checkpoint: str | None = None
    ort_level: str = "all"
    """onnxruntime's graph optimisation level: disable, basic, extended or all"""

    def worker_args(self) -> list[str]:
        args = [self.kind, "--path", str(self.path)]
        if self.kind == "ort" and self.ort_level != "all":
            args += ["--ort-level", self.ort_level]
        if self.kind == "torch":
            args += ["--source-kind", self.source_kind]
            if self.checkpoint:
                args += ["--checkpoint", self.checkpoint]
        return args


def bootstrap_median_ci(
    values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values`` (seeded: the same values give
    the same interval)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    meds = np.median(v[rng.integers(0, v.size, size=(resamples, v.size))], axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(meds, [tail, 1 - tail])
    return float(lo), float(hi)


def log_t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean of positive ``values`` and its 95 % Student-t interval on the log scale:
    (centre, low, high). Needs two values or more."""
    logs = np.log(np.asarray(values, dtype=np.float64))
    n = logs.size
    if n < 2:
        raise ValueError("a t-interval needs two values or more")
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96 + 2.4 / (n - 1)
    half = t * logs.std(ddof=1) / np.sqrt(n)
    mean = logs.mean()
    return float(np.exp(mean)), float(np.exp(mean - half)), float(np.exp(mean + half))


@dataclass(frozen=True)
class Estimate:
    """A runtime's latency: median of round medians, p90 of all timed calls, an interval, and
    how it was measured."""

    median_ms: float
    p90_ms: float
    ci_ms: tuple[float, float]
    rounds: int
    blocks: int
    calls_per_round: int

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "ci_ms": list(self.ci_ms),
            "rounds": self.rounds,
            "blocks": self.blocks,
            "calls_per_round": self.calls_per_round,
        }


@dataclass(frozen=True)
class Ratio:
    """``a``'s latency over ``b``'s, with its interval."""

    value: float
    ci: tuple[float, float]

    def to_dict(self) -> dict:
        return {"ratio": self.value, "ci": list(self.ci)}

    def excludes(self, x: float) -> bool:
        return self.ci[0] > x or self.ci[1] < x


@dataclass
class Measurement:
    """Every timed call of a side-by-side session, by round and block, and why it stopped."""

    labels: list[str]
    calls: dict[str, int]
    """timed calls per round, per runtime"""
    threads: int
    rounds: list[dict[str, list[float]]] = field(default_factory=list)
    """per round: label → that round's timed calls in ms"""
    block_of: list[int] = field(default_factory=list)
    """per round: the block (generation of fresh processes) it ran in"""
    order: list[str] = field(default_factory=list)
    """labels in the order their rounds ran (A B C A B C ...)"""
    seconds: float = 0.0
    """wall time of the whole session, the workers' start-up included"""
    block_ends: list[float] = field(default_factory=list)
    """seconds into the session at which each block ended"""
    stopped: str = ""
    """why it stopped: "decided" (the stop rule held), "time limit" or "max blocks" """

    @property
    def blocks(self) -> int:
        return len(set(self.block_of))

    def first_blocks(self, k: int) -> Measurement:
        """The session as it stood after its first ``k`` blocks (what a shorter limit gives)."""
        n = sum(b < k for b in self.block_of)
        return Measurement(
            labels=self.labels,
            calls=self.calls,
            threads=self.threads,
            rounds=self.rounds[:n],
            block_of=self.block_of[:n],
            order=self.order[: n * len(self.labels)],
            seconds=self.block_ends[k - 1],
            stopped="cut",
            block_ends=self.block_ends[:k],
        )

    def round_medians(self, label: str) -> np.ndarray:
        return np.array([np.median(r[label]) for r in self.rounds])

    def _by_block(self, per_round: np.ndarray) -> list[float]:
        where = np.asarray(self.block_of)
        return [float(np.median(per_round[where == b])) for b in sorted(set(self.block_of))]

    def estimate(self, label: str) -> Estimate:
        meds = self.round_medians(label)
        median = float(np.median(meds))
        if self.blocks >= 2:
            _, lo, hi = log_t_interval(self._by_block(meds))
        else:
            lo, hi = bootstrap_median_ci(meds)
        every = np.concatenate([r[label] for r in self.rounds])
        return Estimate(
            median_ms=median,
            p90_ms=float(np.percentile(every, 90)),
            ci_ms=(min(lo, median), max(hi, median)),
            rounds=len(meds),
            blocks=self.blocks,
            calls_per_round=self.calls[label],
        )

    def _per_round_ratio(self, a: str, b: str) -> np.ndarray:
        """Each round's ``a`` over the same round's ``b`` (their round medians)."""
        return self.round_medians(a) / self.round_medians(b)

    def block_ratio_median(self, a: str, b: str) -> float:
        """The median over blocks of each block's median per-round ratio ``a``/``b``."""
        return float(np.median(self._by_block(self._per_round_ratio(a, b))))

    def ratio(self, a: str, b: str) -> Ratio:
        per_round = self._per_round_ratio(a, b)
        if self.blocks >= 2:
            value, lo, hi = log_t_interval(self._by_block(per_round))
            return Ratio(value, (lo, hi))
        return Ratio(float(np.median(per_round)), bootstrap_median_ci(per_round))

    def to_dict(self) -> dict:
        """Estimates of every runtime and ratios of each to the first, plus the session."""
        first = self.labels[0]
        return {
            "latency_ms": {k: self.estimate(k).to_dict() for k in self.labels},
            "ratios_to": {
                first: {k: self.ratio(k, first).to_dict() for k in self.labels[1:]},
            },
            "session": self.session(),
        }

    def session(self) -> dict:
        return {
            "protocol": "side-by-side",
            "rounds": len(self.rounds),
            "blocks": self.blocks,
            "order": self.labels,
            "seconds": round(self.seconds, 2),
            "stopped": self.stopped,
            "threads": self.threads,
            "level": LEVEL,
        }


def separated(m: Measurement) -> bool:
    """The default stop rule: every runtime's ratio to the first excludes 1.0."""
    return all(m.ratio(k, m.labels[0]).excludes(1.0) for k in m.labels[1:])


class _Worker:
    """One runtime's measuring process; it answers one line of JSON per request."""

    def __init__(self, rt: Runtime, reference: str, cpus: list[int], spin: bool):
        env = {
            **os.environ,
            "TVM_NUM_THREADS": str(len(cpus)),
            "OMP_NUM_THREADS": str(len(cpus)),
            "HARLFLOW_MEASURE_CPUS": ",".join(map(str, cpus)),
            "HARLFLOW_MEASURE_SPIN": "1" if spin else "0",
        }
        if not spin:
            env["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
        elif SPIN_COUNT is not None:
            env["TVM_THREAD_POOL_SPIN_COUNT"] = str(SPIN_COUNT)
        self.runtime = rt
        self.label = rt.label
        # stderr to a file, never a pipe: a worker whose library prints much would block on a
        # full pipe nobody reads while it is being timed
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "harlflow.measure", *rt.worker_args()]
        self.proc = subprocess.Popen(
            [*cmd, "--reference", str(reference), "--threads", str(len(cpus))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        try:
            self.ready = self._answer()  # {"first_ms", "warm_ms"} once loaded and warmed up
        except BaseException:
            self.close()
            raise

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            lines = self.stderr.read().strip().splitlines()
            said = [ln for ln in lines if ln.startswith("harlflow.measure: error:")]
            tail = (said or lines[-1:] or ["no output"])[-1]
            rt = self.runtime
            what = rt.label if rt.label == str(rt.path) else f"{rt.label} ({rt.path})"
            said = tail.removeprefix("harlflow.measure: error: ")
            raise MeasurementError(f"measuring {what} failed: {said}")
        return json.loads(line)

    def timed(self, calls: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"calls": calls}) + "\n")
        self.proc.stdin.flush()
        return self._answer()["ms"]

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()
            self.stderr.close()


SPIN_COUNT: int | None = 10_000
"""TVM_THREAD_POOL_SPIN_COUNT of the TVM workers when spinning (None: TVM's default, 300 000
yields before a thread sleeps, which outlasted a 20 ms pause and slowed the onnxruntime process
timed next by 30-40 %; 10 000 gave TVM the same latency, see ``bench/measurement.py``)"""
SETTLE_S = 0.02
"""with spinning on: the pause after a runtime's part of a round, so that its idle threads have
stopped spinning before the next runtime is timed"""


def _part(w: _Worker, calls: int, spin: bool) -> list[float]:
    times = w.timed(calls)
    if spin:
        time.sleep(SETTLE_S)
    return times


def measure_cpus(threads: int) -> list[int]:
    """The cores the workers are pinned to: the first ``threads`` this process may use."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    return allowed[: max(1, threads)]


def side_by_side(
    runtimes: Sequence[Runtime],
    reference: str | Path,
    *,
    threads: int,
    max_seconds: float = 10.0,
    min_blocks: int = MIN_BLOCKS,
    max_blocks: int = 100,
    rounds_per_block: int | None = None,
    round_seconds: float = ROUND_SECONDS,
    stop: Callable[[Measurement], bool] | None = separated,
    spin: bool = True,
    log: Callable[[str], None] | None = None,
) -> Measurement:
    """Time ``runtimes`` on the inputs in ``reference`` (an .npz with ``input/NAME`` arrays) by
    the protocol above. ``stop`` (None: never) ends it once ``min_blocks`` blocks agree;
    ``max_seconds`` bounds the whole session, start-ups included, beyond ``min_blocks``.
    ``rounds_per_block`` defaults to what fills about :data:`BLOCK_SECONDS`, or
    ``max_seconds / (2 * min_blocks)`` if less (5 to 30 rounds)."""
    labels = [r.label for r in runtimes]
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"runtimes need distinct labels, got {labels}")
    start = time.perf_counter()
    cpus = measure_cpus(threads)
    m = Measurement(labels=labels, calls={}, threads=len(cpus))
    while not m.stopped:
        block = m.blocks
        workers: list[_Worker] = []
        try:
            for rt in runtimes:  # one at a time: a loading process never competes with another
                workers.append(_Worker(rt, str(reference), cpus, spin))
            if not m.calls:  # chosen once, from the first block's warm-up, then kept
                for w in workers:
                    per_call = max(w.ready["warm_ms"] / 1e3, 1e-6)
                    m.calls[w.runtime.label] = int(
                        np.clip(round(round_seconds / per_call), 3, MAX_CALLS)
                    )
                if rounds_per_block is None:
                    per_round = sum(
                        (m.calls[w.runtime.label] + 1) * w.ready["warm_ms"] / 1e3 for w in workers
                    )
                    # short limits get short blocks: min_blocks of them fit in about half of it
                    block_s = min(BLOCK_SECONDS, max_seconds / (2 * min_blocks))
                    rounds_per_block = int(np.clip(round(block_s / per_round), 5, 30))
            for _ in range(rounds_per_block):
                m.rounds.append({w.label: _part(w, m.calls[w.label], spin) for w in workers})
                m.block_of.append(block)
                m.order += labels
        finally:
            for w in workers:
                w.close()
        spent = time.perf_counter() - start
        m.block_ends.append(spent)
        if m.blocks >= min_blocks and stop is not None and stop(m):
            m.stopped = "decided"
        elif spent >= max_seconds and m.blocks >= min_blocks:
            m.stopped = "time limit"
        elif m.blocks >= max_blocks:
            m.stopped = "max blocks"
    m.seconds = time.perf_counter() - start
    if log:
        log(
            f"measured {', '.join(labels)} side by side: {m.blocks} blocks of fresh processes, "
            f"{len(m.rounds)} rounds in {m.seconds:.1f} s ({m.stopped})"
        )
    return m


@dataclass(frozen=True)
class GateDecision:
    """What the regression gate concluded from a side-by-side measurement."""

    promote: bool
    ratio: Ratio
    """the new version's latency over production's"""
    median: float
    """the median of the blocks' ratios (what decides when the interval straddles the limit)"""
    limit: float
    """1 + max_regression"""
    basis: str
    """"interval": the interval lay on one side of the limit; "median": it straddled the limit
    when measuring ended, so the median decided"""
    new_ms: Estimate
    production_ms: Estimate
    rounds: int
    blocks: int

    def describe(self) -> str:
        lo, hi = self.ratio.ci
        how = (
            f"{LEVEL:.0%} interval {lo:.3f}-{hi:.3f}"
            if self.basis == "interval"
            else f"{LEVEL:.0%} interval {lo:.3f}-{hi:.3f} straddles {self.limit:.3f}: decided on "
            f"the blocks' median ratio, {self.median:.3f}"
        )
        return (
            f"{self.new_ms.median_ms:.4g} ms vs production's {self.production_ms.median_ms:.4g} "
            f"ms side by side: ratio {self.ratio.value:.3f} ({how}; {self.blocks} blocks, "
            f"{self.rounds} rounds)"
        )

    def to_dict(self) -> dict:
        return {
            "decision": "promote" if self.promote else "refuse",
            "basis": self.basis,
            "ratio": self.ratio.value,
            "ratio_ci": list(self.ratio.ci),
            "median_ratio": self.median,
            "limit": self.limit,
            "new_ms": self.new_ms.to_dict(),
            "production_ms": self.production_ms.to_dict(),
            "rounds": self.rounds,
            "blocks": self.blocks,
        }


def undecided(limit: float, new: str = "new", prod: str = "production"):
    """A stop rule for the gate: measure while the ratio's interval straddles ``limit``."""
    return lambda m: m.ratio(new, prod).excludes(limit)


def gate(
    m: Measurement, max_regression: float, new: str = "new", prod: str = "production"
) -> GateDecision:
    """Refuse when the new/production ratio's interval lies entirely above
    ``1 + max_regression``, promote when it lies below; when it straddles, the median of the
    blocks' ratios decides (one disturbed block moves the mean, not the median)."""
    limit = 1.0 + max_regression
    r = m.ratio(new, prod)
    median = m.block_ratio_median(new, prod)
    if r.excludes(limit):
        promote, basis = r.ci[1] < limit, "interval"
    else:
        promote, basis = median <= limit, "median"
    return GateDecision(
        promote=promote,
        ratio=r,
        median=median,
        limit=limit,
        basis=basis,
        new_ms=m.estimate(new),
        production_ms=m.estimate(prod),
        rounds=len(m.rounds),
        blocks=m.blocks,
    )

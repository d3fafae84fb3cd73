"""How harlflow measures latency: one side-by-side protocol (:mod:`.protocol`) for the package
stage, the regression gate, ``harlflow compare`` and the benchmarks, driving fresh worker
processes (:mod:`.worker`, ``python -m harlflow.measure``)."""

from harlflow.measure.protocol import (
    LEVEL,
    Estimate,
    GateDecision,
    Measurement,
    MeasurementError,
    Ratio,
    Runtime,
    bootstrap_median_ci,
    gate,
    separated,
    side_by_side,
    undecided,
)

__all__ = [
    "LEVEL",
    "Estimate",
    "GateDecision",
    "Measurement",
    "MeasurementError",
    "Ratio",
    "Runtime",
    "bootstrap_median_ci",
    "gate",
    "separated",
    "side_by_side",
    "undecided",
]

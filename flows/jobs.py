"""The flows ``harlflow serve`` can put on a schedule, by name (``--job NAME``), Prefect-free so
that the command line lists them and checks a name without importing Prefect.

Adding a scheduled job is a flow in ``flows/`` and one line here.
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from typing import Any

from harlflow.core.errors import BadInputError


@dataclass(frozen=True)
class Job:
    flow: str
    """``module:function`` of the Prefect flow, imported when it is served"""
    help: str


JOBS: dict[str, Job] = {
    "retune": Job("flows.retune:retune", "optimise the changed models of a source (SOURCE)"),
    "dataset-generate": Job("flows.training:dataset_generate", "measure the workload suite"),
    "cost-model-train": Job("flows.training:cost_model_train", "refresh the team's cost model"),
    "harl-train": Job("flows.training:harl_train", "pre-train HARL's agent in imagination"),
    "rewrite-train": Job("flows.training:rewrite_train", "train a rewrite agent on models"),
}


def lookup(name: str) -> Job:
    if name not in JOBS:
        raise BadInputError(f"unknown job {name!r}: choose one of {', '.join(JOBS)}")
    return JOBS[name]


def load(name: str):
    """The job's Prefect flow (imports Prefect)."""
    module, function = lookup(name).flow.split(":")
    return getattr(importlib.import_module(module), function)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as flow parameters: a VALUE that reads as JSON is taken as JSON
    (numbers, lists, ``null``), anything else as a string."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise BadInputError(f"--param {pair!r}: expected KEY=VALUE, e.g. epochs=3")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def bind(flow, name: str, params: dict[str, Any]) -> None:
    """``params`` checked against the flow's signature: an unknown name or a missing required
    one is a ``BadInputError`` naming it (the flow checks the values when it runs, as its
    command does)."""
    signature = inspect.signature(flow.fn)
    unknown = [k for k in params if k not in signature.parameters]
    if unknown:
        raise BadInputError(
            f"job {name} has no parameter {unknown[0]!r}: it takes "
            + ", ".join(signature.parameters)
        )
    missing = [
        k for k, p in signature.parameters.items() if p.default is p.empty and k not in params
    ]
    if missing:
        raise BadInputError(f"job {name} needs --param {missing[0]}=...")

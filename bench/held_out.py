"""Are the benchmark networks held out? The tuning tasks of each network in ``bench/families.py``
against the workloads of a cost-model dataset (and so of the shipped models trained on it).

    python bench/held_out.py [--dataset data/cost_model/records.parquet] [--networks a,b]
        [--out bench/results/held_out.json]

The time-to-quality benchmark (issue 25) needs networks that no learned part has seen. The
dataset's networks are not among them (``tasks.datasets.SUITE_NETWORKS``), but its operator
grid (``ops_<family>_x``) holds common transformer and CNN shapes, so a benchmark network's
kernel can still be a dataset workload. A task counts as seen when its workload id (the
``workload`` column: the hash of the task's TensorIR) is in the dataset, on any target. Prints a
table (tasks, tasks seen, the share of the network's FLOPs they hold) and writes JSON.
No timing: safe beside other work.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from harl import compilation  # noqa: E402
from harl.cost_model import dataset  # noqa: E402
from harlflow.core.targets import resolve_target  # noqa: E402
from tasks.importing import import_model, to_relax  # noqa: E402


def network_tasks(name: str, target: dict, work: Path) -> list[dict]:
    """The network's tuning tasks: name, workload id, FLOPs (times the task's weight; 0 for a
    kernel TVM cannot count, which then stays out of the FLOP share)."""
    from families import export

    m = import_model(str(export(name, work)), cache_dir=work / "cache")
    mod = compilation.prepare(to_relax(m.onnx_path, m.inputs))
    out = []
    for t in compilation.extract_tasks(mod, target):
        flop = compilation.task_flop(t)
        out.append({"task": t.task_name, "workload": dataset.task_workload_id(t),
                    "flop": 0.0 if math.isnan(flop) else flop * t.weight})  # fmt: skip
    return out


def main() -> None:
    from families import FAMILIES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, default=ROOT / "data/cost_model/records.parquet")
    p.add_argument("--networks", default=",".join(FAMILIES))
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/held_out.json")
    a = p.parse_args()
    seen = {w for w, _ in dataset.programs_per_workload(a.dataset)}
    if not seen:
        sys.exit(f"error: {a.dataset} holds no dataset rows")
    target = resolve_target("cpu")
    work = Path(tempfile.mkdtemp(prefix="held-out-"))
    result = {"dataset": str(a.dataset), "dataset_workloads": len(seen), "networks": {}}
    print(f"{'network':14s} {'tasks':>5s} {'seen':>5s} {'FLOP share seen':>16s}  seen tasks")
    for name in a.networks.split(","):
        tasks = network_tasks(name, target, work)
        hit = [t for t in tasks if t["workload"] in seen]
        total = sum(t["flop"] for t in tasks) or 1.0
        share = sum(t["flop"] for t in hit) / total
        result["networks"][name] = {"tasks": tasks, "seen": [t["task"] for t in hit],
                                    "flop_share_seen": share}  # fmt: skip
        print(f"{name:14s} {len(tasks):5d} {len(hit):5d} {share:16.1%}  "
              f"{', '.join(t['task'] for t in hit)}", flush=True)  # fmt: skip
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

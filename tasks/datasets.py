"""``harlflow dataset generate``: measure schedules of a workload suite on one or more targets and
collect them into the learned cost model's dataset (:mod:`harl.cost_model.dataset`).

The suite is the bundled networks' tuning tasks plus operators at varied shapes (GEMMs, dense
layers, batched matmuls, convolutions with 1×1/3×3 kernels and strides 1/2, depthwise
convolutions). ``HELD_OUT_NETWORKS`` are never generated: ``bench/cost_model.py`` tunes them
with each cost model, as networks the model has not seen.

Each unit (a network or a pack of operators) is tuned on each target with
:func:`harl.tuning.tune` into one database per target: a warm-up of seeded samples (most of them
register-blocked, a quarter uniformly random) then MetaSchedule's evolutionary search, so the
dataset has both random and searched programs. Every trial is committed as it is measured, a
task another unit already measured is not measured again, and an interrupted unit resumes
(:class:`harl.journal.RunJournal`): the same command run again continues where it stopped.
After each unit, its tasks' records are collected into the dataset file (merged,
deduplicated), and a unit whose tasks all have rows there for the target (at least half of
``--trials-per-task`` a task, over the unit) is skipped: a generation also resumes from the
dataset file alone, in a new work directory (the committed dataset grows over several
sessions that way).

Targets run on this machine stand in for different hardware: AVX2-only code (``"mcpu":
"haswell"``), AVX-512 (``znver5``), one core or two (``num-cores``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harlflow.core.errors import BadInputError
from harlflow.core.signature import TensorSpec
from harlflow.core.targets import resolve_target, target_key

SUITE_NETWORKS = ("tiny_mlp", "small_cnn", "resnet18", "bert_encoder", "inception_small")
HELD_OUT_NETWORKS = ("vit_small", "squeezenet_small")

# The stand-ins for different hardware (issue 12): AVX-512 on two cores and on one, AVX2 only.
DEFAULT_TARGETS = (
    {"kind": "llvm", "mcpu": "znver5", "num-cores": 2},
    {"kind": "llvm", "mcpu": "znver5", "num-cores": 1},
    {"kind": "llvm", "mcpu": "haswell", "num-cores": 2},
)

# Operator shape variations, a pack per family (one tuning call each). GEMMS: M, K, N;
# CONVS: C_in, C_out, H=W, kernel, stride.
GEMMS = [(64, 512, 512), (128, 512, 128), (256, 256, 1024), (384, 768, 768),
         (512, 128, 512), (196, 384, 1536), (32, 1024, 1024), (768, 64, 768)]  # fmt: skip
DENSES = [(1, 512, 1000), (16, 784, 256), (128, 1024, 256), (49, 512, 2048)]  # M, K, N; +bias, relu
BMMS = [(8, 64, 64, 64), (4, 196, 64, 196), (12, 128, 32, 128), (2, 256, 128, 256)]  # B, M, K, N
CONVS = [(3, 32, 112, 3, 2), (32, 64, 56, 3, 1), (64, 128, 56, 1, 2), (96, 96, 28, 3, 1),
         (128, 256, 28, 3, 2), (256, 64, 14, 1, 1), (160, 160, 14, 3, 1), (384, 384, 7, 3, 1),
         (64, 256, 28, 1, 1), (48, 48, 40, 5, 1)]  # fmt: skip
DEPTHWISE = [(32, 112, 3, 1), (96, 56, 3, 2), (192, 28, 3, 1), (384, 14, 5, 1)]  # C, H=W, k, stride

# The wider grid (``ops_<family>_x`` units, issue 25: ~300 workloads for the 30,000-program
# dataset): the projections of transformers of common widths and sequence lengths, their
# attention products, classifier heads, and the convolutions of ResNet- and MobileNet-like
# stages at their usual channel counts and resolutions.
_WIDTHS, _SEQS = (256, 384, 512, 768, 1024), (8, 32, 64, 128, 196, 256)
GEMMS_X = [(s, d, n) for d in _WIDTHS for s in _SEQS for n in (d, 4 * d)] + [
    (s, 4 * d, d) for d in _WIDTHS for s in _SEQS
]
DENSES_X = [(m, k, n) for m in (1, 8, 32) for k, n in
            ((512, 1000), (1024, 1000), (2048, 1000), (768, 3072), (3072, 768))]  # fmt: skip
BMMS_X = [(h, s, dh, s) for h in (4, 8, 12) for s in (64, 128, 196) for dh in (32, 64)] + [
    (h, s, s, dh) for h in (4, 8, 12) for s in (64, 128, 196) for dh in (32, 64)
]
_STAGES = ((64, 56), (128, 28), (256, 14), (512, 7), (24, 56), (40, 28), (80, 14), (112, 14),
           (160, 7))  # fmt: skip
CONVS_X = [(c, c, hw, k, 1) for c, hw in _STAGES for k in (1, 3)] + [
    (c, 2 * c, hw, k, 2) for c, hw in _STAGES for k in (1, 3) if hw > 7
]
DEPTHWISE_X = [(c * 6, hw, k, s) for c, hw in _STAGES for k in (3, 5) for s in (1, 2) if hw > 7]
SHAPES = {
    "gemm": GEMMS, "dense": DENSES, "bmm": BMMS, "conv": CONVS, "depthwise": DEPTHWISE,
    "gemm_x": GEMMS_X, "dense_x": DENSES_X, "bmm_x": BMMS_X, "conv_x": CONVS_X,
    "depthwise_x": DEPTHWISE_X,
}  # fmt: skip


@dataclass
class Unit:
    """One tuning call of the suite: a network, or a pack of operators."""

    name: str
    build: Callable[[Path], tuple[Path, list[TensorSpec]]]
    """writes the unit's ONNX file under a directory; its path and input specs"""


def _onnx_ops(name: str, ops: list[tuple[list, list, list, list]]):
    """One ONNX graph holding independent operators: each (nodes, inputs, outputs, weights)."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inputs, outputs, inits = [], [], [], []
    for n, i, o, w in ops:
        nodes += n
        inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in i]
        outputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in o]
        inits += w
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model), [
        TensorSpec(k, tuple(s), "float32") for _, i, _, _ in ops for k, s in i
    ]


def _weight(name: str, shape, rng: np.random.Generator):
    from onnx import numpy_helper

    return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype("float32"), name)


def _operator_pack(family: str) -> list[tuple[list, list, list, list]]:
    from onnx import helper

    rng = np.random.default_rng(0)
    ops = []
    if family not in SHAPES:
        raise BadInputError(f"unknown operator family {family!r}")
    shapes, kind = SHAPES[family], family.removesuffix("_x")
    if kind == "gemm":
        for k, (m, kk, n) in enumerate(shapes):
            x, w, y = f"x{k}", f"w{k}", f"y{k}"
            node = helper.make_node("MatMul", [x, w], [y])
            ops.append(([node], [(x, [m, kk])], [y], [_weight(w, (kk, n), rng)]))
    elif kind == "dense":
        for k, (m, kk, n) in enumerate(shapes):
            x, w, b, y = f"x{k}", f"w{k}", f"b{k}", f"y{k}"
            nodes = [
                helper.make_node("Gemm", [x, w, b], [f"g{k}"]),
                helper.make_node("Relu", [f"g{k}"], [y]),
            ]
            weights = [_weight(w, (kk, n), rng), _weight(b, (n,), rng)]
            ops.append((nodes, [(x, [m, kk])], [y], weights))
    elif kind == "bmm":
        for k, (b, m, kk, n) in enumerate(shapes):
            p, q, y = f"p{k}", f"q{k}", f"y{k}"
            node = helper.make_node("MatMul", [p, q], [y])
            ops.append(([node], [(p, [b, m, kk]), (q, [b, kk, n])], [y], []))
    elif kind == "conv":
        for k, (ci, co, hw, ks, s) in enumerate(shapes):
            x, w, y = f"x{k}", f"w{k}", f"y{k}"
            node = helper.make_node(
                "Conv", [x, w], [y], pads=[ks // 2] * 4, strides=[s, s], kernel_shape=[ks, ks]
            )
            ops.append(([node], [(x, [1, ci, hw, hw])], [y], [_weight(w, (co, ci, ks, ks), rng)]))
    else:  # depthwise
        for k, (c, hw, ks, s) in enumerate(shapes):
            x, w, y = f"x{k}", f"w{k}", f"y{k}"
            node = helper.make_node(
                "Conv", [x, w], [y], pads=[ks // 2] * 4, strides=[s, s], group=c,
                kernel_shape=[ks, ks],
            )  # fmt: skip
            ops.append(([node], [(x, [1, c, hw, hw])], [y], [_weight(w, (c, 1, ks, ks), rng)]))
    return ops


OPERATOR_FAMILIES = tuple(SHAPES)


def _operators_unit(family: str) -> Unit:
    def build(work: Path) -> tuple[Path, list[TensorSpec]]:
        import onnx

        proto, specs = _onnx_ops(f"ops_{family}", _operator_pack(family))
        path = work / f"ops_{family}.onnx"
        onnx.save(proto, str(path))
        return path, specs

    return Unit(f"ops_{family}", build)


def _network_unit(name: str) -> Unit:
    def build(work: Path) -> tuple[Path, list[TensorSpec]]:
        from tasks.importing import import_model

        m = import_model(f"harlflow.examples:{name}", cache_dir=work / "imports")
        return Path(m.onnx_path), list(m.inputs)

    return Unit(name, build)


def suite(names: Iterable[str] | None = None) -> list[Unit]:
    """The workload suite's units: ``names`` picks some (networks by example name, operator
    packs as ``ops_<family>``, ``all`` for the base suite and the wider grid); None is the base
    suite (networks first, then the five original packs: what the shipped models learned on)."""
    from harlflow.examples import EXAMPLES

    everything = {n: _network_unit(n) for n in SUITE_NETWORKS}
    everything |= {f"ops_{f}": _operators_unit(f) for f in OPERATOR_FAMILIES}
    if names is None:
        return [u for n, u in everything.items() if not n.endswith("_x")]
    units = []
    for n in names:
        if n == "all":
            units += [u for u in everything.values() if u not in units]
        elif n in everything:
            units.append(everything[n])
        elif n in EXAMPLES:  # any bundled network may be asked for, held-out ones included
            units.append(_network_unit(n))
        else:
            raise BadInputError(
                f"unknown suite unit {n!r}: choose from all, {', '.join([*everything, *EXAMPLES])}"
            )
    return units


def unit_module(unit: Unit, work: Path):
    """The unit's model, imported and prepared for task extraction (its ONNX file under
    ``work``)."""
    from harl import compilation
    from tasks.importing import to_relax

    path, specs = unit.build(work)
    return compilation.prepare(to_relax(path, specs))


def measured(
    have: dict[tuple[str, str], int], workloads: Iterable[str], key: str, trials_per_task: int
) -> bool:
    """Whether a unit's ``workloads`` are measured on target ``key`` in a dataset (``have``:
    :func:`harl.cost_model.dataset.programs_per_workload`): each has rows, and together at
    least half of ``trials_per_task`` programs per task. Counted over the unit, not per task:
    the task scheduler gives a unit's trials unevenly, and an elementwise task's samples are
    often one program (finished units held ~33 of 34 per task, single tasks 1-3); but a unit
    stopped after its warm-up, whose records were collected, is not taken as done. One task in
    twenty may lack rows (a unit stopped in its last minutes: haswell's ``ops_gemm_x`` held 3,002
    programs with 4 of 90 tasks never reached, and would otherwise be measured again whole); a
    unit of fewer than twenty tasks needs every one."""
    counts = [have.get((w, key), 0) for w in workloads]
    missing = sum(1 for c in counts if not c)
    return missing <= len(counts) // 20 and sum(counts) >= len(counts) * trials_per_task / 2


def target_slug(target: dict[str, Any]) -> str:
    """A directory name for a target's database (readable, unique per :func:`target_key`)."""
    key = target_key(target)
    return re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-")


def check_generate(
    targets: Iterable[str | dict[str, Any]] = DEFAULT_TARGETS,
    *,
    units: Iterable[str] | None = None,
    trials_per_task: int = 32,
    warm_up: int = 8,
) -> list[dict[str, Any]]:
    """What :func:`generate` would refuse, refused before any work (the CLI calls it before
    Prefect starts): a ``BadInputError`` naming the value. Returns the targets resolved."""
    if trials_per_task < 1:
        raise BadInputError(f"--trials-per-task must be >= 1, got {trials_per_task}")
    if not 0 <= warm_up <= trials_per_task:
        raise BadInputError(f"--warm-up must be within 0..{trials_per_task}, got {warm_up}")
    resolved = [resolve_target(t) for t in targets]
    if not resolved:
        raise BadInputError("give at least one --target")
    suite(units)
    return resolved


REGISTERED_NAME = "harlflow-dataset"
ARTIFACT_PATH = "dataset"


def log_dataset(out: str | Path, summary: dict[str, Any], params: dict[str, Any]) -> str:
    """One MLflow run for a generation (its settings, what each target measured, the dataset
    file) with the file registered as a new version of :data:`REGISTERED_NAME`; the version.
    Sets ``summary["run_id"]``."""
    from tasks import tracking

    c = tracking.client()
    with tracking.run(c, "dataset-generate", tags={"harlflow.kind": "dataset"}) as run_id:
        tracking.log_params(c, run_id, params)
        per_target = list(summary["targets"].values())
        for step, counts in enumerate(per_target):  # one step per target, in order
            metrics = {"dataset/trials": counts["trials"], "dataset/rows": counts["rows"]}
            tracking.log_metrics(c, run_id, metrics, step=step)
        rows = per_target[-1]["rows"] if per_target else 0  # the file after the last target
        trials = sum(t["trials"] for t in per_target)
        tracking.log_metrics(c, run_id, {"dataset/trials_now": trials, "dataset/rows_now": rows})
        c.log_dict(run_id, summary, "generation.json")
        c.log_artifact(run_id, str(out), ARTIFACT_PATH)
        version = tracking.register_version(
            c, REGISTERED_NAME, run_id, ARTIFACT_PATH,
            description="Measured programs of the workload suite: the learned cost model's data "
            "(harlflow dataset generate).",
            tags={"rows": str(rows), "targets": ",".join(summary["targets"])},
        )  # fmt: skip
    summary["run_id"] = run_id
    return version


def generate(
    out: str | Path,
    work: str | Path,
    targets: Iterable[str | dict[str, Any]] = DEFAULT_TARGETS,
    *,
    units: Iterable[str] | None = None,
    trials_per_task: int = 32,
    warm_up: int = 8,
    seed: int = 0,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the suite on every target into ``work/<target>/`` and collect it into ``out``.

    Each task gets about ``trials_per_task`` measured programs: ``warm_up`` seeded samples, the
    rest from the evolutionary search. Run again after an interruption, the same command
    measures only what is missing; so does a new ``work`` with the same ``out`` (by unit).
    Returns counts per target.
    """
    from harl import compilation, tuning
    from harl.cost_model import dataset

    resolved = check_generate(targets, units=units, trials_per_task=trials_per_task,
                              warm_up=warm_up)  # fmt: skip
    chosen = suite(units)
    say = on_progress or (lambda line: None)
    work = Path(work)
    (work / "onnx").mkdir(parents=True, exist_ok=True)
    have = dataset.programs_per_workload(out)  # what an earlier generation already collected
    modules = {}
    summary: dict[str, Any] = {"targets": {}}
    for ti, target in enumerate(resolved, 1):
        key = target_key(target)
        db_dir = work / target_slug(target)
        counts = {"trials": 0, "records": 0, "rows": sum(have.values()),
                  "new_rows": 0}  # fmt: skip
        for ui, unit in enumerate(chosen, 1):
            if unit.name not in modules:
                modules[unit.name] = unit_module(unit, work / "onnx")
            mod = modules[unit.name]
            tasks = compilation.extract_tasks(mod, target)
            ids = {dataset.task_workload_id(t) for t in tasks}
            where = f"[target {ti}/{len(resolved)} {key}] {ui}/{len(chosen)}"
            if measured(have, ids, key, trials_per_task):
                say(f"{where} {unit.name}: {len(tasks)} tasks already in {out}, skipped")
                continue
            say(f"{where} {unit.name}: {len(tasks)} tasks")

            shown = [0]

            def progress(p, where=where, name=unit.name, shown=shown) -> None:
                if p.trials >= shown[0] + 32 or p.trials >= p.budget:
                    shown[0] = p.trials
                    say(f"{where} {name}: {p.trials}/{p.budget} trials")

            result = tuning.tune(
                mod,
                target,
                db_dir,
                trials=trials_per_task * len(tasks),
                strategy="evolutionary",
                seed=seed + ui,
                min_trials_per_task=warm_up,
                on_progress=progress,
            )
            new = sum(1 for t in result.tasks if t.schedule == "tuned")
            say(f"{where} {unit.name}: {result.trials} trials ({new} tasks measured now)")
            # Collected unit by unit: the file is what a later generation resumes from, with
            # or without this work directory (a unit is skipped once ``measured`` says so).
            got = dataset.collect([db_dir], out, workloads=ids)
            say(f"{where} {unit.name}: collected into {out}: {got['rows']} rows")
            have = dataset.programs_per_workload(out)
            counts["trials"] += result.trials
            counts["records"] += got["records"]
            counts["new_rows"] += got["new_rows"]
            counts["rows"] = got["rows"]
        say(f"[target {ti}/{len(resolved)}] {key}: {counts['trials']} trials, "
            f"{counts['new_rows']} new rows, {counts['rows']} rows in {out}")  # fmt: skip
        summary["targets"][key] = counts
    return summary

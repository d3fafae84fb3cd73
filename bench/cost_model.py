"""The learned cost model against MetaSchedule's XGBoost: ranking accuracy, transfer, pruning,
and tuning held-out networks at equal budgets.

    python bench/cost_model.py accuracy --dataset data/cost_model/records.parquet
    python bench/cost_model.py recipes --dataset data/cost_model/records.parquet [--splits 0,1]
    python bench/cost_model.py saved --dataset D --models A.pt,B.pt [--unseen-by OLD.parquet]
    python bench/cost_model.py tuning --networks vit_small,squeezenet_small --budget 128

``accuracy`` (no timing: safe beside other work). Workloads are split once (a quarter held out,
the same workloads on every target); every number is on the held-out workloads' programs
(pairwise accuracy over all pairs, and over the pairs at least 10 % apart, with their share):

- per target T: MetaSchedule's XGBoost (its own ``XGBModel`` training on the same rows) and the
  attention model from scratch, each on 1%, 5%, 10% and 100% of T's training rows; the
  attention model pre-trained on the *other* targets, zero-shot on T and fine-tuned on those
  1%, 5%, 10% (transfer to hardware it has not seen), every weight (``full``) or only the
  target embeddings and output layer at a tenth of the learning rate (``head``);
- with ``--model M --model-data D``: the saved model M (say, the shipped one, trained on the
  older dataset D) beside the attention model trained on all of T's training rows, both on the
  held-out workloads absent from D (what M never saw);
- pruning: attention models trained on the rows :func:`harl.cost_model.pruning.prune` keeps
  (and on a random subset of the same size) against the fraction kept.

``recipes`` (no timing): the attention model's training recipes (``VARIANTS``: sampled or all
pairs per group, pairs weighted by their latency ratio, a LayerNorm, a cosine schedule, weight
decay, standardised inputs) against XGBoost, per target, trained from scratch on each split's
training workloads; held-out and training-row accuracy.

``saved`` (no timing): saved models (say, the shipped one and one trained with
``harlflow cost-model train --holdout 0.25``) on that split's held-out workloads, leaving out those
an older model's dataset holds (``--unseen-by``).

``tuning`` (timing: run alone): each held-out network (never in ``dataset generate``'s suite)
is tuned with each cost model and strategy at the same budget, from empty databases, one after
the other per seed. Reported: final weighted task latency, its ratio to XGBoost's, and the
trials the learned model needed to reach XGBoost's final latency (with every task measured).

Both write JSON next to ``--out`` and print a table; ``tuning`` also plots latency against trials.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harl.cost_model import dataset, pruning  # noqa: E402
from harl.cost_model.model import (  # noqa: E402
    LEGACY,
    CostModel,
    ModelConfig,
    evaluate,
    split_by_workload,
)
from harlflow import rl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FRACTIONS = (0.01, 0.05, 0.10, 1.0)
KEEP = (1.0, 0.55, 0.4)


# --------------------------------------------------------------------------- baselines
class XGBRanker:
    """MetaSchedule's XGBoost cost model trained on dataset rows: the same per-statement
    features, the same target (each program's best-in-group latency over its own, failures 0)
    and the same ``PackSum`` training MetaSchedule runs inside ``XGBModel.update``."""

    def __init__(self, seed: int = 0):
        from tvm.s_tir import meta_schedule as ms

        self.model = ms.cost_model.XGBModel(num_warmup_samples=0)
        self.seed = seed

    def fit(self, rows: list[dict]) -> XGBRanker:
        best: dict[tuple[str, str], float] = {}
        for r in rows:
            if not r["failed"]:
                key = (r["workload"], r["target"])
                best[key] = min(best.get(key, math.inf), r["run_us"])
        xs = [r["features"] for r in rows]
        ys = np.array(
            [
                0.0 if r["failed"] else best[(r["workload"], r["target"])] / r["run_us"]
                for r in rows
            ],
            np.float32,
        )
        self.model._train(xs, ys)  # MetaSchedule's training step, without a TuneContext
        return self

    def predict(self, rows: list[dict]) -> np.ndarray:
        return self.model._predict([r["features"] for r in rows])


def _subsample(rows: list[dict], frac: float, seed: int) -> list[dict]:
    """``frac`` of the rows, uniformly at random (the "few records of a new target")."""
    if frac >= 1:
        return rows
    rng = np.random.default_rng(seed)
    k = max(2, math.ceil(frac * len(rows)))
    return [rows[i] for i in sorted(rng.choice(len(rows), min(k, len(rows)), replace=False))]


def _train(rows: list[dict], targets: list[str], cfg: ModelConfig, seed: int) -> CostModel:
    rl.setup(seed)
    model = CostModel(cfg, targets)
    model.fit(rows, seed=seed)
    return model


def _row(table: list[dict], **kw) -> None:
    table.append(kw)
    m = kw
    print(
        f"{m['target'][:44]:44s} {m['model']:24s} {m['fraction']:>6.0%} {m['train_rows']:6d} "
        f"{m['pairwise_accuracy']:9.3f} {m['pairwise_accuracy_10pct']:6.3f} "
        f"{m['pairs_10pct_share']:6.2f} {m['top1']:6.3f} {m['top5']:6.3f}",
        flush=True,
    )


def accuracy(a: argparse.Namespace) -> dict:
    rows = dataset.load(a.dataset)
    train, test = split_by_workload(rows, a.holdout, a.seed)
    targets = sorted({r["target"] for r in rows})
    cfg = ModelConfig(epochs=a.epochs)
    out: dict = {
        "dataset": str(a.dataset),
        "rows": len(rows),
        "workloads": len({r["workload"] for r in rows}),
        "held_out_workloads": len({r["workload"] for r in test}),
        "targets": targets,
        "epochs": a.epochs,
        "accuracy": [],
        "against_saved": [],
        "pruning": [],
    }
    print(f"{len(rows)} programs, {out['workloads']} workloads ({out['held_out_workloads']} held "
          f"out), targets: {', '.join(targets)}")  # fmt: skip
    header = (f"{'target':44s} {'model':24s} {'data':>6s} {'rows':>6s} {'pairwise':>9s} "
              " ≥10%  share  top-1  top-5")  # fmt: skip
    print(header)
    for t in targets:
        t_train = [r for r in train if r["target"] == t]
        t_test = [r for r in test if r["target"] == t]
        others = [r for r in train if r["target"] != t]
        for frac in FRACTIONS:
            part = _subsample(t_train, frac, a.seed)
            try:
                xgb = evaluate(XGBRanker(a.seed).fit(part).predict, t_test)
            except Exception as e:  # too few rows for XGBoost to train on
                print(f"  xgboost on {len(part)} rows: {e}")
                xgb = dict.fromkeys(("pairwise_accuracy", "pairwise_accuracy_10pct",
                                     "pairs_10pct_share", "top1", "top5"), math.nan)  # fmt: skip
            _row(out["accuracy"], target=t, model="xgboost", fraction=frac,
                 train_rows=len(part), **xgb)  # fmt: skip
            scratch = _train(part, [t], cfg, a.seed)
            _row(out["accuracy"], target=t, model="attention-scratch", fraction=frac,
                 train_rows=len(part), **scratch.evaluate(t_test))  # fmt: skip
        if a.model is not None:
            _against_saved(a, out, t, t_test, scratch, len(t_train))
        if not others:
            continue
        source = _train(others, sorted({r["target"] for r in others}), cfg, a.seed)
        zero = source.with_targets([t])
        _row(out["accuracy"], target=t, model="pretrained-zero-shot", fraction=0.0,
             train_rows=0, **zero.evaluate(t_test))  # fmt: skip
        for frac in FRACTIONS[:-1]:
            part = _subsample(t_train, frac, a.seed)
            for recipe, name in (("full", "pretrained+fine-tuned"), ("head", "pretrained+head")):
                tuned = copy.deepcopy(zero)
                tuned.fit(part, seed=a.seed, epochs=a.fine_tune_epochs, recipe=recipe)
                _row(out["accuracy"], target=t, model=name, fraction=frac,
                     train_rows=len(part), **tuned.evaluate(t_test))  # fmt: skip
        _write(out, a.out)
    if a.no_pruning:
        return out
    print("\npruning (all targets):")
    print(header)
    for keep in KEEP:
        for method, fn in (("pruned", pruning.prune), ("random", pruning.random_subset)):
            if keep == 1.0 and method == "random":
                continue
            part = fn(train, keep, a.seed)
            model = _train(part, targets, cfg, a.seed)
            _row(out["pruning"], target="all", model=f"attention-{method}", fraction=keep,
                 train_rows=len(part), **model.evaluate(test))  # fmt: skip
            _write(out, a.out)
    full = next(p for p in out["pruning"] if p["fraction"] == 1.0)["pairwise_accuracy"]
    within = [
        p["fraction"]
        for p in out["pruning"]
        if p["model"] == "attention-pruned" and p["pairwise_accuracy"] >= full - 0.01
    ]
    out["least_data_within_1_point"] = min(within) if within else None
    print(f"least data kept within 1 point of the full set's accuracy: "
          f"{out['least_data_within_1_point']}")  # fmt: skip
    _write(out, a.out)
    return out


_OLD = {**LEGACY, "pairs_per_group": 64}  # the recipe before 2026-12-07
_ALL_WEIGHTED = {**_OLD, "pairs_per_group": 0, "pair_weight": "log_ratio"}
_NORM_COSINE = {**_ALL_WEIGHTED, "norm": True, "schedule": "cosine"}
VARIANTS = {
    "sampled-64": _OLD,
    "all-pairs": {**_OLD, "pairs_per_group": 0},
    "all-pairs+weighted": _ALL_WEIGHTED,
    "all+weighted+norm+cosine": _NORM_COSINE,
    "all+weighted+norm+cosine+decay": {**_NORM_COSINE, "weight_decay": 0.05},
    "standard-inputs+all+weighted+norm+cosine": {**_NORM_COSINE, "inputs": "standard"},
}
"""training recipes of the attention model that ``recipes`` compares (``ModelConfig`` fields)"""


def recipes(a: argparse.Namespace) -> dict:
    """Each training recipe in ``--variants`` against XGBoost, per target, on ``--splits``
    workload splits: accuracy on the held-out workloads, and on the training rows (a recipe
    that fits its training groups no better than the held-out ones underfits)."""
    rows = dataset.load(a.dataset)
    targets = sorted({r["target"] for r in rows})
    out: dict = {"dataset": str(a.dataset), "rows": len(rows), "epochs": a.epochs,
                 "variants": {v: VARIANTS[v] for v in a.variants}, "results": []}  # fmt: skip
    print(f"{len(rows)} programs; {'split':>5s} {'target':44s} {'model':34s} {'train':>6s} "
          f"{'pairwise':>9s} {'≥10%':>6s} {'top-1':>6s}")  # fmt: skip

    def report(split, t, name, fitted, on_test, seconds):
        r = {"split": split, "target": t, "model": name, "train_pairwise": fitted,
             "seconds": round(seconds, 1), **on_test}  # fmt: skip
        out["results"].append(r)
        print(f"{split:5d} {t[:44]:44s} {name:34s} {fitted:6.3f} {r['pairwise_accuracy']:9.3f} "
              f"{r['pairwise_accuracy_10pct']:6.3f} {r['top1']:6.3f}", flush=True)  # fmt: skip
        _write(out, a.out)

    for split in a.splits:
        train, test = split_by_workload(rows, a.holdout, split)
        for t in targets:
            t_train = [r for r in train if r["target"] == t]
            t_test = [r for r in test if r["target"] == t]
            t0 = time.time()
            xgb = XGBRanker(split).fit(t_train)
            fitted = evaluate(xgb.predict, t_train)["pairwise_accuracy"]
            report(split, t, "xgboost", fitted, evaluate(xgb.predict, t_test), time.time() - t0)
            for v in a.variants:
                t0 = time.time()
                model = _train(t_train, [t], ModelConfig(epochs=a.epochs, **VARIANTS[v]), split)
                fitted = model.evaluate(t_train)["pairwise_accuracy"]
                report(split, t, v, fitted, model.evaluate(t_test), time.time() - t0)
    summary: dict = {}
    for r in out["results"]:
        summary.setdefault(r["model"], []).append(r["pairwise_accuracy"])
    out["mean_pairwise"] = {m: float(np.mean(v)) for m, v in summary.items()}
    print("mean held-out pairwise over splits and targets:")
    for m, v in out["mean_pairwise"].items():
        print(f"  {m:34s} {v:.3f}")
    _write(out, a.out)
    return out


def _unseen_by(rows: list[dict], datasets: list) -> list[dict]:
    """The rows whose workload none of ``datasets`` holds, on any target (what a model trained
    on them never saw)."""
    seen = {w for d in datasets for w, _ in dataset.programs_per_workload(d)}
    return [r for r in rows if r["workload"] not in seen]


def saved(a: argparse.Namespace) -> dict:
    """Saved models side by side on the held-out workloads of one split (``--holdout``,
    ``--seed``: the split ``harlflow cost-model train --holdout`` makes with the same values),
    only those absent from every ``--unseen-by`` dataset (the data an older model learned on)."""
    rows = dataset.load(a.dataset)
    _, test = split_by_workload(rows, a.holdout, a.seed)
    test = _unseen_by(test, a.unseen_by)
    targets = sorted({r["target"] for r in test})
    out: dict = {"dataset": str(a.dataset), "holdout": a.holdout, "seed": a.seed,
                 "unseen_by": [str(d) for d in a.unseen_by], "rows": len(test),
                 "workloads": len({r["workload"] for r in test}), "results": []}  # fmt: skip
    print(f"{len(test)} held-out programs of {out['workloads']} workloads no --unseen-by "
          "dataset holds")  # fmt: skip
    for path in a.models:
        model = CostModel.load(path).with_targets(targets)
        for t in [*targets, "all"]:
            part = test if t == "all" else [r for r in test if r["target"] == t]
            r = {"model": str(path), "target": t, "rows": len(part), **model.evaluate(part)}
            out["results"].append(r)
            print(f"{Path(path).name:24s} {t[:44]:44s} {len(part):6d} pairwise "
                  f"{r['pairwise_accuracy']:.3f} (≥10%: {r['pairwise_accuracy_10pct']:.3f}) "
                  f"top-1 {r['top1']:.3f} ({r['groups']} groups)")  # fmt: skip
    _write(out, a.out)
    return out


def _against_saved(a, out: dict, t: str, t_test: list, scratch: CostModel, n_train: int) -> None:
    """``--model`` (say, the shipped model, trained on an older dataset ``--model-data``) and
    the attention model trained on all of this split's rows of ``t``, both on the held-out
    workloads the saved model never saw (those absent from ``--model-data``)."""
    unseen = _unseen_by(t_test, [a.model_data] if a.model_data else [])
    saved = CostModel.load(a.model).with_targets([t])
    have = dataset.programs_per_workload(a.model_data) if a.model_data else {}
    n_saved = sum(have.values())
    for name, model, rows in (("saved " + Path(a.model).name, saved, n_saved),
                              ("attention-scratch", scratch, n_train)):  # fmt: skip
        _row(out["against_saved"], target=t, model=name, fraction=1.0, train_rows=rows,
             held_out_rows=len(unseen), **model.evaluate(unseen))  # fmt: skip


# --------------------------------------------------------------------------- tuning
def _network(name: str, work: Path):
    from harl import compilation
    from tasks.importing import import_model, to_relax

    m = import_model(f"harlflow.examples:{name}", cache_dir=work / "imports")
    return compilation.prepare(to_relax(m.onnx_path, list(m.inputs)))


def tuning(a: argparse.Namespace) -> dict:
    from harl import tuning as harl_tuning
    from harlflow.core.targets import resolve_target, target_key

    target = resolve_target(a.target)
    out: dict = {"target": target, "budget": a.budget, "runs": [], "summary": []}
    work = Path(tempfile.mkdtemp(prefix="bench-cost-model-"))
    print(f"target {target_key(target)}, budget {a.budget}")
    for seed in a.seeds:
        for name in a.networks:
            mod = _network(name, work)
            for strategy in a.strategies:
                for cm in a.cost_models:  # back to back: the machine is the same for both
                    curve: list[tuple[int, float]] = []

                    def progress(p, curve=curve) -> None:
                        if p.weighted_us is not None and p.tasks_measured == p.tasks_total:
                            curve.append((p.trials, p.weighted_us))

                    t0 = time.monotonic()
                    res = harl_tuning.tune(
                        mod,
                        target,
                        work / f"db-{name}-{strategy}-{cm}-{seed}",
                        trials=a.budget,
                        strategy=strategy,
                        seed=seed,
                        cost_model=cm,
                        on_progress=progress,
                    )
                    run = {
                        "network": name,
                        "strategy": strategy,
                        "cost_model": cm,
                        "seed": seed,
                        "trials": res.trials,
                        "wall_s": round(time.monotonic() - t0, 1),
                        "final_us": res.weighted_latency_us,
                        "curve": curve,
                    }
                    out["runs"].append(run)
                    print(f"{name:18s} {strategy:13s} {cm:9s} seed {seed}: "
                          f"{run['final_us']:10.1f} µs in {res.trials} trials, "
                          f"{run['wall_s']:.0f} s", flush=True)  # fmt: skip
                    _write(out, a.out)
    _summarise(out)
    _write(out, a.out)
    _plot(out, Path(a.out).with_suffix(".png"))
    return out


def _reach(curve: list, goal: float) -> int | None:
    return next((t for t, us in curve if us <= goal * (1 + 1e-9)), None)


def _summarise(out: dict) -> None:
    runs = out["runs"]
    print(f"\n{'network':18s} {'strategy':13s} {'cost model':10s} {'latency/xgb':>11s} "
          f"{'trials to xgb final':>20s}")  # fmt: skip
    for r in runs:
        if r["cost_model"] == "xgb":
            continue
        base = next(
            b
            for b in runs
            if b["cost_model"] == "xgb"
            and (b["network"], b["strategy"], b["seed"]) == (r["network"], r["strategy"], r["seed"])
        )
        reach = _reach(r["curve"], base["final_us"])
        row = {
            "network": r["network"],
            "strategy": r["strategy"],
            "cost_model": r["cost_model"],
            "seed": r["seed"],
            "latency_ratio_to_xgb": r["final_us"] / base["final_us"],
            "trials_to_xgb_final": reach,
            "fraction_of_xgb_trials": reach / base["trials"] if reach else None,
        }
        out["summary"].append(row)
        frac = f"{reach} ({reach / base['trials']:.0%})" if reach else "not reached"
        print(f"{r['network']:18s} {r['strategy']:13s} {r['cost_model']:10s} "
              f"{row['latency_ratio_to_xgb']:11.3f} {frac:>20s}")  # fmt: skip
    ratios = [s["latency_ratio_to_xgb"] for s in out["summary"]]
    if ratios:
        out["geomean_latency_ratio_to_xgb"] = float(np.exp(np.mean(np.log(ratios))))
        print(f"geometric mean latency ratio to xgb: {out['geomean_latency_ratio_to_xgb']:.3f}")


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["network"], r["strategy"]) for r in out["runs"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (net, strat) in zip(axes[0], keys, strict=True):
        for r in out["runs"]:
            if (r["network"], r["strategy"]) == (net, strat) and r["curve"]:
                t, us = zip(*r["curve"], strict=True)
                ax.plot(t, np.array(us) / 1e3, label=f"{r['cost_model']} (seed {r['seed']})")
        ax.set(title=f"{net}, {strat}", xlabel="trials", ylabel="weighted latency (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def _write(out: dict, path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float))
    tmp.replace(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--dataset", required=True)
    acc.add_argument("--holdout", type=float, default=0.25)
    acc.add_argument("--epochs", type=int, default=30)
    acc.add_argument("--fine-tune-epochs", type=int, default=5)
    acc.add_argument("--seed", type=int, default=0)
    acc.add_argument("--no-pruning", action="store_true", help="only the accuracy table")
    acc.add_argument("--model", type=Path, help="a saved model to compare (e.g. the shipped one)")
    acc.add_argument("--model-data", type=Path, help="the dataset --model was trained on")
    acc.add_argument("--out", default=str(RESULTS / "cost_model_accuracy.json"))
    rec = sub.add_parser("recipes")
    rec.add_argument("--dataset", required=True)
    rec.add_argument("--holdout", type=float, default=0.25)
    rec.add_argument("--epochs", type=int, default=30)
    rec.add_argument("--splits", default="0,1", help="workload split seeds")
    rec.add_argument("--variants", default=",".join(VARIANTS), help=", ".join(VARIANTS))
    rec.add_argument("--out", default=str(RESULTS / "cost_model_training_recipes.json"))
    sav = sub.add_parser("saved")
    sav.add_argument("--dataset", required=True)
    sav.add_argument("--models", required=True, help="comma-separated saved models")
    sav.add_argument("--unseen-by", default="", help="comma-separated datasets to leave out")
    sav.add_argument("--holdout", type=float, default=0.25)
    sav.add_argument("--seed", type=int, default=0)
    sav.add_argument("--out", default=str(RESULTS / "cost_model_saved.json"))
    tun = sub.add_parser("tuning")
    tun.add_argument("--networks", default="vit_small,squeezenet_small")
    tun.add_argument("--strategies", default="evolutionary,harl")
    tun.add_argument("--cost-models", default="xgb,transfer")
    tun.add_argument("--budget", type=int, default=128)
    tun.add_argument("--seeds", default="0")
    tun.add_argument("--target", default=None, help="default: this host")
    tun.add_argument("--out", default=str(RESULTS / "cost_model_tuning.json"))
    a = ap.parse_args()
    if a.command == "accuracy":
        accuracy(a)
    elif a.command == "saved":
        a.models = a.models.split(",")
        a.unseen_by = [Path(d) for d in a.unseen_by.split(",") if d]
        saved(a)
    elif a.command == "recipes":
        a.splits = [int(x) for x in a.splits.split(",")]
        a.variants = a.variants.split(",")
        unknown = [v for v in a.variants if v not in VARIANTS]
        if unknown:
            ap.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
        recipes(a)
    else:
        for k in ("networks", "strategies", "cost_models"):
            setattr(a, k, getattr(a, k).split(","))
        a.seeds = [int(s) for s in a.seeds.split(",")]
        tuning(a)


if __name__ == "__main__":
    main()

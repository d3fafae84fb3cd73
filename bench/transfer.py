"""``--trials 0`` with schedules transferred from a store that measured similar layers
(``harl/transfer.py``), against the same network compiled from an empty store (the fallback
schedules) and onnxruntime, side by side.

    python bench/transfer.py [--donor squeezenet_small] [--network squeezenet]
        [--donor-minutes 3] [--seconds 20] [--out bench/results/transfer.json]

The donor (a bundled example) is tuned for ``--donor-minutes`` into a store of its own; the
held-out network (``bench/families.py``, never tuned here) is then packaged with no trial at
all, once from an empty store and once from the donor's. The three runtimes are timed by
harlflow's protocol (fresh processes, alternated, 95 % intervals).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from harl import compilation, tuning  # noqa: E402
from harl.budget import UNLIMITED_TRIALS  # noqa: E402
from harlflow.core.targets import resolve_target  # noqa: E402
from harlflow.measure import Runtime, side_by_side  # noqa: E402
from tasks.importing import import_model, to_relax  # noqa: E402
from tasks.packaging import measure_threads, package  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--donor", default="squeezenet_small")
    p.add_argument("--network", default="squeezenet")
    p.add_argument("--donor-minutes", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/transfer.json")
    a = p.parse_args()
    from families import export

    target = resolve_target("cpu")
    work = Path(tempfile.mkdtemp(prefix="transfer-"))
    donor = import_model(f"harlflow.examples:{a.donor}", cache_dir=work / "cache")
    store = f"sqlite:///{work / 'donor.db'}"
    t = time.monotonic()
    res = tuning.tune(
        compilation.prepare(to_relax(donor.onnx_path, donor.inputs)), target, store,
        trials=UNLIMITED_TRIALS, time_budget_s=a.donor_minutes * 60, seed=0,
    )  # fmt: skip
    print(f"donor {a.donor}: {res.trials} trials in {time.monotonic() - t:.0f} s", flush=True)

    m = import_model(str(export(a.network, work)), cache_dir=work / "cache")
    arts = {}
    for label, location in (("empty store", work / "empty"), ("donor's store", store)):
        art = package(
            m, target, database_dir=location, home=work / label.split()[0],
            tune_summary={}, measure=False, log=lambda *_: None,
        )  # fmt: skip
        kinds = art.manifest["tuning"]["kernels"].values()
        arts[label] = (art, {k: sum(v == k for v in kinds) for k in set(kinds)})
        print(f"{a.network} from the {label}: kernels {arts[label][1]}", flush=True)
    runtimes = [
        Runtime(f"tvm --trials 0, {label}", "tvm", art.directory)
        for label, (art, _) in arts.items()
    ]
    ort = Runtime("onnxruntime", "ort", str(m.onnx_path))
    s = side_by_side(
        [*runtimes, ort], m.reference_path, threads=measure_threads(target),
        max_seconds=a.seconds,
    )  # fmt: skip
    rows = []
    for rt, (label, (_, kinds)) in zip(runtimes, arts.items(), strict=True):
        r = s.ratio(rt.label, "onnxruntime")
        rows.append({
            "store": label, "kernels": kinds, "ms": s.estimate(rt.label).median_ms,
            "ratio_to_onnxruntime": r.value, "ratio_ci": list(r.ci),
        })  # fmt: skip
    empty, donor_row = rows
    r = s.ratio(runtimes[1].label, runtimes[0].label)
    out = {
        "host": platform.node(), "target": target, "donor": a.donor, "network": a.network,
        "donor_minutes": a.donor_minutes, "donor_trials": res.trials,
        "onnxruntime_ms": s.estimate("onnxruntime").median_ms, "rows": rows,
        "transferred_over_fallback": r.value, "transferred_over_fallback_ci": list(r.ci),
        "measurement": s.session(),
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"\n{'runtime':34s} {'ms':>9s} {'/ onnxruntime':>14s}  95% interval")
    for row in rows:
        print(f"tvm --trials 0, {row['store']:18s} {row['ms']:9.3f} "
              f"{row['ratio_to_onnxruntime']:14.2f}  [{row['ratio_ci'][0]:.2f}, "
              f"{row['ratio_ci'][1]:.2f}]")  # fmt: skip
    print(f"{'onnxruntime':34s} {out['onnxruntime_ms']:9.3f}")
    print(f"transferred / fallback: {r.value:.3f} [{r.ci[0]:.3f}, {r.ci[1]:.3f}]")


if __name__ == "__main__":
    main()

"""The TVM oracle pricing rewrite candidates by the region they changed, against pricing each
candidate in full: seconds per candidate and the estimates' relative difference.

    python bench/region_pricing.py [--models family:resnet50_deep,bert_encoder]
                                   [--candidates 8] [--out bench/results/region_pricing.json]

For each model: the first ``--candidates`` rewrite candidates of the imported graph (one per
rule first, then in order), each priced both ways by one oracle with an empty database (every
kernel priced by the roofline, as on a fresh machine), the region first; the full pricing then
finds the region's kernels priced already, which favours it, not the region. One process,
sequential: a pricing is compilation work, not a latency to compare side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def bench(model: str, n: int, work: Path) -> dict:
    from families import source

    from harlflow.core.targets import resolve_target
    from tasks.importing import import_model
    from tasks.rewrite_oracle import TvmOracle, _regions
    from xrlflow import rules as R
    from xrlflow.ir import check, load

    m = import_model(source(model, work), cache_dir=work / "cache")
    g = check(load(m.onnx_path))
    oracle = TvmOracle(resolve_target("host"))
    t = time.perf_counter()
    base = oracle.estimate(g)
    base_s = time.perf_counter() - t
    cands = R.candidates(g, R.RULES)
    first = {}
    for c in cands:
        first.setdefault(c.rule, c)
    chosen = list(first.values()) + [c for c in cands if c not in first.values()]
    rows = []
    for c in chosen[:n]:
        regions = _regions(g, c.graph)
        t = time.perf_counter()
        by_region = oracle.estimate_change(g, c.graph)
        region_s = time.perf_counter() - t
        t = time.perf_counter()
        full = oracle.estimate(c.graph)
        full_s = time.perf_counter() - t
        rows.append(
            {
                "rule": c.rule,
                "region_nodes": [len(r) for r in regions] if regions else None,
                "region_s": round(region_s, 3),
                "full_s": round(full_s, 3),
                "by_region": by_region,
                "full": full,
                "relative_difference": (by_region - full) / full,
                "gain_full": (base - full) / base,
                "gain_by_region": (base - by_region) / base,
            }
        )
        r = rows[-1]
        print(
            f"  {c.rule:26s} region {r['region_s']:6.2f} s  full {r['full_s']:6.2f} s  "
            f"({r['full_s'] / max(r['region_s'], 1e-9):5.1f}x)  difference "
            f"{r['relative_difference']:+.4f}  gain {r['gain_full']:+.4f} / "
            f"{r['gain_by_region']:+.4f}",
            flush=True,
        )
    return {"model": model, "nodes": len(g.nodes), "base_s": round(base_s, 3), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="family:resnet50_deep,bert_encoder")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "region_pricing.json"))
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="region-pricing-") as tmp:
        for model in a.models.split(","):
            print(f"{model}:", flush=True)
            results.append(bench(model, a.candidates, Path(tmp)))
            r = results[-1]
            region = sorted(x["region_s"] for x in r["rows"])
            full = sorted(x["full_s"] for x in r["rows"])
            worst = max(abs(x["relative_difference"]) for x in r["rows"])
            print(
                f"  {r['nodes']} nodes; median {region[len(region) // 2]:.2f} s by region vs "
                f"{full[len(full) // 2]:.2f} s in full; largest difference {worst:.4f}",
                flush=True,
            )
            Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
